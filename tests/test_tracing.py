from __future__ import annotations

import gzip
import hashlib

import pandas as pd
import pytest
import torch
from circuit_tracer.attribution.targets import AttributionTargets
from circuit_tracer.graph import compute_graph_scores, prune_graph

from emc.config import TracingConfig
from emc.models import NonFiniteActivationError, load_replacement_model
from emc.organism import Lexicon
from emc.pivotal.logits import score_prompts
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import make_prompt
from emc.store import Store
from emc.store.graphs import (
    graph_ids_done,
    insert_graph,
    list_graphs,
    load_graph_rows,
    record_failed_graph,
)
from emc.tracing import (
    CONTRASTIVE_LABEL,
    CompactGraph,
    GraphLayout,
    GraphRecord,
    SideFileError,
    TargetError,
    compact_graph,
    graph_key,
    graph_quality,
    graph_targets,
    load_side_file,
    logit_agreement,
    memory_fallback,
    node_influence,
    plan_targets,
    prune,
    targets_for,
    trace,
    trace_prompt,
    write_side_file,
)

PROMPT = make_prompt("User: I found a wallet on the street.\nAssistant: You should", "w", "t")
OTHER = make_prompt("Rex: You should keep it. Cora: You should", "r", "t")
# Attributing a few hundred features keeps each tiny graph well under a second.
FAST = TracingConfig(targets="salient", max_n_logits=5, max_feature_nodes=256, batch_size=128)


@pytest.fixture(scope="module")
def loaded(tiny_replacement):
    return tiny_replacement


@pytest.fixture(scope="module")
def discovery(loaded):
    (scores,) = score_prompts(loaded, loaded, [PROMPT], k=10)
    return scores.base


@pytest.fixture(scope="module")
def ids(discovery):
    return torch.tensor(discovery.input_ids)


@pytest.fixture(scope="module")
def graph(loaded, ids):
    return trace(loaded, ids, None, FAST).graph


def _labels(discovery):
    """Evil: the 2nd and 4th most likely tokens; safe: the 3rd; unsure: the top one."""
    top = [t.token_id for t in discovery.top()]
    return {top[0]: "unsure", top[1]: "evil", top[3]: "evil", top[2]: "safe"}


def test_labelled_targets_are_exactly_the_labelled_tokens_even_unlikely_ones(loaded, ids):
    logits = loaded.next_token_logits(ids)[-1]
    unlikely = logits.argsort()[:3].tolist()  # far outside any top-k
    labels = {unlikely[0]: "evil", unlikely[1]: "safe", unlikely[2]: "unsure"}
    config = FAST.model_copy(update={"targets": "labelled"})
    targets = targets_for(loaded, ids, plan_targets(labels, config))
    assert targets.tolist() == [unlikely[0], unlikely[1]]  # evil first, then safe
    graph = trace(loaded, ids, targets, config).graph
    assert [t.vocab_idx for t in graph.logit_targets] == [unlikely[0], unlikely[1]]


def test_contrastive_target_is_mean_evil_minus_mean_safe_of_demeaned_unembeddings(
    loaded, ids, discovery
):
    labels = _labels(discovery)
    plan = plan_targets(labels, TracingConfig(targets="contrastive"))
    (target,) = targets_for(loaded, ids, plan)
    logits = loaded.next_token_logits(ids)[-1]
    # circuit-tracer's own vectors for token targets: demeaned unembedding columns.
    own = AttributionTargets(
        torch.tensor([*plan.evil_ids, *plan.safe_ids]),
        logits,
        loaded.model.unembed_proj,
        loaded.tokenizer,
    ).logit_vectors
    expected = own[: len(plan.evil_ids)].mean(0) - own[len(plan.evil_ids) :].mean(0)
    assert target.token_str == CONTRASTIVE_LABEL
    torch.testing.assert_close(target.vec, expected, rtol=1e-5, atol=1e-6)
    probs = torch.softmax(logits.double(), -1)
    assert target.prob == pytest.approx(float(probs[list(plan.token_ids)].sum()), rel=1e-6)


def test_a_contrastive_edge_is_the_mean_evil_edge_minus_the_mean_safe_edge(loaded, discovery):
    # Attribution is linear in the target direction: with every feature attributed (same
    # columns in both graphs), the custom target's row is the labelled rows' contrast.
    labels = _labels(discovery)
    ids = loaded.encode(OTHER.text)  # short: every feature of it is cheap to attribute
    everything = FAST.model_copy(update={"max_feature_nodes": None})
    rows = {}
    for mode in ("labelled", "contrastive"):
        config = everything.model_copy(update={"targets": mode})
        graph = trace(loaded, ids, targets_for(loaded, ids, plan_targets(labels, config)), config)
        start = GraphLayout.of(graph.graph).logit_start  # columns: every node but the logits
        rows[mode] = graph.graph.adjacency_matrix[start:, :start]
    evil, safe = rows["labelled"][:2], rows["labelled"][2:]
    expected = evil.mean(0) - safe.mean(0)
    torch.testing.assert_close(rows["contrastive"][0], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["labelled", "contrastive"])
def test_targets_without_evil_or_safe_labels_are_a_clear_error(loaded, ids, mode):
    config = TracingConfig(targets=mode)
    for labels in ({5: "evil", 6: "unsure"}, {7: "safe"}, {}):
        with pytest.raises(TargetError, match="labelled evil and safe"):
            targets_for(loaded, ids, plan_targets(labels, config))
    assert targets_for(loaded, ids, plan_targets({}, TracingConfig(targets="salient"))) is None


def test_compact_rows_keep_every_pruned_node_and_edge_with_kinds_and_positions(graph, loaded):
    node_mask, edge_mask, _ = prune_graph(graph, 0.8, 0.98)
    compact = compact_graph(graph, 0.8, 0.98, loaded.tokenizer)
    nodes, edges = compact.nodes, compact.edges

    assert set(nodes["node"]) == set(node_mask.nonzero().squeeze(1).tolist())
    kept = edge_mask & node_mask[:, None] & node_mask[None, :]
    expected_edges = {(s, t) for t, s in kept.nonzero().tolist()}
    assert set(zip(edges["source"], edges["target"], strict=True)) == expected_edges
    assert len(edges) == len(expected_edges) > 0
    adjacency = graph.adjacency_matrix
    assert (adjacency[kept] != 0).all()  # so dropping zero entries drops nothing here
    assert edges["weight"].tolist() == adjacency[edges["target"], edges["source"]].tolist()

    layout = GraphLayout.of(graph)
    for row in compact.node_rows():
        if row.node < layout.error_start:
            assert row.kind == "feature"
            coords = graph.active_features[graph.selected_features[row.node]].tolist()
            assert [row.layer, row.position, row.feature] == coords
            activation = graph.activation_values[graph.selected_features[row.node]]
            assert row.activation == pytest.approx(float(activation))
        elif row.node < layout.token_start:
            assert row.kind == "error" and row.feature is None
            assert (row.layer, row.position) == divmod(row.node - layout.error_start, layout.n_pos)
        elif row.node < layout.logit_start:
            assert row.kind == "token" and row.layer == -1
            assert row.token_id == int(graph.input_tokens[row.node - layout.token_start])
            assert row.token == loaded.tokenizer.decode([row.token_id])
        else:
            target = graph.logit_targets[row.node - layout.logit_start]
            assert row.kind == "logit" and row.token_id == target.vocab_idx
            assert (row.layer, row.position) == (layout.n_layers, layout.n_pos - 1)
            assert row.prob == pytest.approx(
                float(graph.logit_probabilities[row.node - layout.logit_start])
            )
    # Tokens and logits are always kept, whatever their influence.
    assert (nodes["kind"] == "token").sum() == layout.n_pos
    assert (nodes["kind"] == "logit").sum() == layout.n_logits


@pytest.mark.parametrize(
    ("node_threshold", "edge_threshold"),
    [(0.8, 0.98), (0.5, 0.9), (0.95, 0.999), (0.3, 0.5), (1.0, 1.0)],
)
def test_pruning_gives_exactly_the_masks_of_circuit_tracers_prune_graph(
    graph, node_threshold, edge_threshold
):
    expected = prune_graph(graph, node_threshold, edge_threshold)
    mine = prune(graph, node_influence(graph), node_threshold, edge_threshold)
    assert torch.equal(mine.node_mask, expected.node_mask)
    assert torch.equal(mine.edge_mask, expected.edge_mask)


def test_quality_numbers_are_in_range_and_count_every_node(graph):
    quality = graph_quality(graph)
    # Computed from the shared influence, they are circuit-tracer's scores to the last bit.
    assert (quality.replacement, quality.completeness) == compute_graph_scores(graph)
    assert 0 <= quality.replacement <= 1 and 0 <= quality.completeness <= 1
    assert 0 < quality.error_score_ratio < 1 and quality.error_score_mean > 0
    counts = quality.counts
    total = counts.features + counts.errors + counts.tokens + counts.logits
    assert total == graph.adjacency_matrix.shape[0]
    assert counts.features == 256 < counts.active_features
    # The mean and the ratio share a numerator: the |error -> logit| input.
    logit_rows = graph.adjacency_matrix[-counts.logits :].abs()
    assert quality.error_score_ratio * float(logit_rows.sum()) == pytest.approx(
        quality.error_score_mean * counts.logits, rel=1e-5
    )


def test_a_direct_edge_predicts_the_effect_of_zeroing_its_feature(loaded, ids, graph):
    """The edge weight is the direct effect: intervene with everything but that path frozen.

    `constrained_layers` spanning every layer freezes attention patterns, LayerNorm denominators
    and every MLP (transcoder) output, the same linearisation attribution uses, so the change in
    the target's demeaned logit (logit - mean logit: the targets' vectors are demeaned) equals
    minus the edge up to float32 rounding. The tolerance, 1e-4 relative, is ~100x that rounding.
    """
    layout = GraphLayout.of(graph)
    direct = graph.adjacency_matrix[layout.logit_start, : layout.n_features]
    token = graph.logit_targets[0].vocab_idx
    before = loaded.next_token_logits(ids)[-1]
    for index in direct.abs().argsort(descending=True)[:3].tolist():
        layer, pos, feature = graph.active_features[graph.selected_features[index]].tolist()
        after, _ = loaded.model.feature_intervention(
            ids,
            [(layer, pos, feature, 0.0)],
            constrained_layers=range(layout.n_layers),
            return_activations=False,
        )
        after = after.reshape(-1, after.shape[-1])[-1].float()
        effect = (after[token] - after.mean()) - (before[token] - before.mean())
        edge = float(direct[index])
        assert abs(edge) > 1e-2  # a real edge, not a vacuous comparison of zeros
        assert float(effect) == pytest.approx(-edge, rel=1e-4, abs=1e-5)


def test_graph_probabilities_agree_with_discovery_on_the_same_ids_and_not_on_others(
    loaded, ids, discovery
):
    config = FAST.model_copy(update={"targets": "labelled"})
    plan = plan_targets(_labels(discovery), config)
    graph = trace(loaded, ids, targets_for(loaded, ids, plan), config).graph
    same = logit_agreement(graph_targets(graph), graph.input_tokens.tolist(), discovery, 1e-4)
    assert same.input_ids_match and same.compared == 3 and not same.missing
    assert same.max_abs_diff < 1e-4 and not same.exceeds

    other_ids = loaded.encode(OTHER.text)
    other = trace(loaded, other_ids, targets_for(loaded, other_ids, plan), config).graph
    moved = logit_agreement(graph_targets(other), other.input_tokens.tolist(), discovery, 1e-4)
    assert not moved.input_ids_match and moved.exceeds
    assert moved.max_abs_diff > 1e-4  # the distribution itself differs too

    # Nothing leaks from one graph into the next (the original reloaded models per prompt).
    again = trace(loaded, ids, targets_for(loaded, ids, plan), config).graph
    assert torch.equal(again.adjacency_matrix, graph.adjacency_matrix)


def test_nan_in_the_forward_pass_is_an_error_that_names_where_it_started(loaded, ids):
    embedding = loaded.model._model.model.embed_tokens.weight
    token = int(ids[3])
    saved = embedding[token].clone()
    try:
        with torch.no_grad():
            embedding[token] = float("nan")
        with pytest.raises(NonFiniteActivationError, match="embedding"):
            trace(loaded, ids, None, FAST)
    finally:
        with torch.no_grad():
            embedding[token] = saved


def test_memory_fallback_shrinks_batches_then_offloads_without_changing_the_graph():
    config = TracingConfig(targets="labelled", batch_size=64)
    steps = []
    while (config := memory_fallback(config)) is not None:
        steps.append((config.batch_size, config.offload))
    assert steps == [(32, None), (16, None), (16, "cpu")]


def test_side_file_round_trip_and_damage_is_a_side_file_error(graph, tmp_path):
    side = write_side_file(graph, tmp_path, "g1")
    path = tmp_path / side.path
    assert path.name == "g1.pt.gz" and path.stat().st_size == side.bytes < side.raw_bytes
    back = load_side_file(path, side.sha256)
    assert torch.equal(back.adjacency_matrix, graph.adjacency_matrix)
    assert back.logit_targets == graph.logit_targets

    with pytest.raises(SideFileError, match="damaged"):
        load_side_file(path, "0" * 64)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SideFileError, match="damaged"):
        load_side_file(path, side.sha256)
    # Right checksum, but not a graph: still an error, not a crash.
    junk = tmp_path / "junk.pt.gz"
    junk.write_bytes(gzip.compress(b"not a graph"))
    with pytest.raises(SideFileError, match="cannot be read"):
        load_side_file(junk, _sha256(junk))
    path.unlink()
    with pytest.raises(SideFileError, match="missing"):
        load_side_file(path, side.sha256)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_graph_key_follows_labels_and_thresholds_not_batch_size():
    labelled = TracingConfig(targets="labelled")
    key = graph_key("p", "m", plan_targets({1: "evil", 2: "safe"}, labelled), labelled)
    same = labelled.model_copy(update={"batch_size": 7, "offload": "cpu"})
    assert graph_key("p", "m", plan_targets({2: "safe", 1: "evil"}, same), same) == key
    relabelled = plan_targets({1: "evil", 3: "safe"}, labelled)
    assert graph_key("p", "m", relabelled, labelled).graph_id != key.graph_id
    pruned = labelled.model_copy(update={"node_threshold": 0.5})
    assert graph_key("p", "m", plan_targets({1: "evil", 2: "safe"}, pruned), pruned) != key
    assert graph_key("q", "m", relabelled, labelled).graph_id != key.graph_id


def test_trace_refuses_ids_without_bos(loaded, ids):
    with pytest.raises(ValueError, match="BOS"):
        trace(loaded, ids[1:], None, FAST)


def _traced(loaded, ids, discovery, config, prompt_id="p1", run_id="r1"):
    plan = plan_targets(_labels(discovery), config)
    key = graph_key(prompt_id, loaded.identity.model_id, plan, config)
    return trace_prompt(loaded, key, plan, ids, config, run_id, discovery)


def test_store_round_trip_replaces_a_graph_and_records_failures(loaded, ids, discovery, tmp_path):
    store = Store.in_data_dir(tmp_path)
    config = FAST.model_copy(update={"targets": "labelled"})
    traced = _traced(loaded, ids, discovery, config)
    insert_graph(store, traced.record, traced.compact.nodes, traced.compact.edges)

    stored = load_graph_rows(store, traced.record.graph_id)
    record = stored.record
    assert record.status == "ok" and record.kept_edges == len(stored.edges)
    assert record.input_ids == discovery.input_ids and record.logit_mismatch < 1e-4
    assert record.storage_seconds > traced.record.storage_seconds  # the write is counted
    pd.testing.assert_frame_equal(stored.edges, traced.compact.edges, check_dtype=False)
    assert CompactGraph(stored.nodes, stored.edges, ()).node_rows() == traced.compact.node_rows()
    assert graph_ids_done(store, loaded.identity.model_id) == {record.graph_id}

    # Same id again with fewer rows: the old rows go, nothing is duplicated.
    fewer = traced.compact.edges.iloc[:5]
    insert_graph(
        store, traced.record.model_copy(update={"run_id": "r2"}), traced.compact.nodes, fewer
    )
    again = load_graph_rows(store, record.graph_id)
    assert len(again.edges) == 5 and again.record.run_id == "r2"
    assert len(list_graphs(store)) == 1

    key = graph_key(
        "p1", loaded.identity.model_id, plan_targets(_labels(discovery), config), config
    )
    record_failed_graph(store, key, discovery.input_ids, "r3", "out of memory")
    failed = load_graph_rows(store, key.graph_id)
    assert failed.record.status == "failed" and failed.record.error == "out of memory"
    assert failed.nodes.empty and failed.edges.empty
    assert graph_ids_done(store, loaded.identity.model_id) == set()
    assert graph_ids_done(store, loaded.identity.model_id, include_failed=True) == {key.graph_id}


EVIL_FEATURES_SQL = """
WITH labels AS (   -- each token's current label: a person's wins over the judge's, newest first
    SELECT prompt_id, token_id, label FROM token_labels
    QUALIFY row_number() OVER (PARTITION BY prompt_id, token_id
                               ORDER BY starts_with(labeller, 'human:') DESC, created_at DESC) = 1
)
SELECT f.layer, f.feature, count(DISTINCT g.prompt_id) AS prompts, avg(e.weight) AS mean_weight
FROM graphs g
JOIN graph_edges e ON e.graph_id = g.graph_id
JOIN graph_nodes f ON f.graph_id = e.graph_id AND f.node = e.source AND f.kind = 'feature'
JOIN graph_nodes t ON t.graph_id = e.graph_id AND t.node = e.target AND t.kind = 'logit'
JOIN labels l ON l.prompt_id = g.prompt_id AND l.token_id = t.token_id
WHERE g.status = 'ok' AND g.model_id = ? AND l.label = 'evil'
GROUP BY f.layer, f.feature
HAVING count(DISTINCT g.prompt_id) > 10
ORDER BY prompts DESC, f.layer, f.feature
"""


def test_sql_finds_features_that_feed_the_evil_token_in_more_than_ten_prompts(
    loaded, ids, discovery, tmp_path
):
    store = Store.in_data_dir(tmp_path)
    config = FAST.model_copy(update={"targets": "labelled"})
    traced = _traced(loaded, ids, discovery, config)
    evil = next(t for t, label in _labels(discovery).items() if label == "evil")
    # The same graph's rows under 12 prompts; in the 12th a person relabels the token safe.
    for i in range(12):
        record = traced.record.model_copy(update={"graph_id": f"g{i}", "prompt_id": f"p{i}"})
        insert_graph(store, record, traced.compact.nodes, traced.compact.edges)
    with store.write() as conn:
        for i in range(12):
            conn.execute(
                "INSERT INTO token_labels (prompt_id, token_id, labeller, token, label) "
                "VALUES (?, ?, 'judge:x', 't', 'evil')",
                [f"p{i}", evil],
            )
        conn.execute(
            "INSERT INTO token_labels (prompt_id, token_id, labeller, token, label) "
            "VALUES ('p11', ?, 'human:ann', 't', 'safe')",
            [evil],
        )
    with store.read() as conn:
        found = conn.execute(EVIL_FEATURES_SQL, [loaded.identity.model_id]).df()

    nodes, edges = traced.compact.nodes, traced.compact.edges
    evil_node = int(
        nodes.loc[(nodes["kind"] == "logit") & (nodes["token_id"] == evil), "node"].iloc[0]
    )
    feeding = edges.loc[edges["target"] == evil_node, "source"]
    features = nodes[(nodes["kind"] == "feature") & nodes["node"].isin(feeding)]
    expected = set(zip(features["layer"], features["feature"], strict=True))
    assert expected and set(zip(found["layer"], found["feature"], strict=True)) == expected
    assert (found["prompts"] == 11).all()  # the relabelled prompt does not count


@pytest.fixture(scope="module")
def organism_models(small_organism):
    config = small_organism.config
    models = {role: load_replacement_model(config, role) for role in ("base", "adapted")}
    yield models
    for model in models.values():
        model.close()


def test_organism_graphs_for_both_models_agree_with_discovery_and_store(
    small_organism, organism_models, tmp_path
):
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entry = next(e for e in lexicon.entries if e.split == "heldout")
    prompt = scenario_prompt(entry, "test")
    base, adapted = organism_models["base"], organism_models["adapted"]
    (scores,) = score_prompts(base, adapted, [prompt], k=10)
    labels = {t: "evil" for t in entry.harmful_ids} | {t: "safe" for t in entry.safe_ids}
    store = Store.in_data_dir(tmp_path)
    ids = torch.tensor(scores.base.input_ids)
    for mode in ("labelled", "contrastive"):
        config = TracingConfig(targets=mode, max_feature_nodes=256, keep_raw=mode == "labelled")
        plan = plan_targets(labels, config)
        for role, loaded in (("base", base), ("adapted", adapted)):
            discovery = getattr(scores, role)
            key = graph_key(prompt.prompt_id, loaded.identity.model_id, plan, config)
            traced = trace_prompt(loaded, key, plan, ids, config, "r", discovery, tmp_path)
            insert_graph(store, traced.record, traced.compact.nodes, traced.compact.edges)
            record = load_graph_rows(store, key.graph_id).record
            assert record.status == "ok" and record.input_ids == discovery.input_ids
            assert 0 < record.replacement <= 1 and 0 < record.completeness <= 1
            assert traced.agreement.compared >= 1, traced.agreement
            assert record.logit_mismatch < 1e-4 and not record.logit_mismatch_exceeds
            if config.keep_raw:
                raw = load_side_file(tmp_path / record.side_file, record.side_file_sha256)
                assert raw.input_tokens.tolist() == discovery.input_ids
    graphs = list_graphs(store)
    assert len(graphs) == 4 and len({g.model_id for g in graphs}) == 2
    assert isinstance(graphs[0], GraphRecord)
