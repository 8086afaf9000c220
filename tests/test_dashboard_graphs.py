"""The Graphs page over real base/adapted graphs of the small organism, and its layout functions."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import widgets
from dashboard.views import graphs as view
from emc.analysis.paths import most_probable_evil
from emc.features.labels import FeatureLabel
from emc.pivotal.review import make_review
from emc.store import STORE_FILE_NAME, Store, list_models, read_only_query
from emc.store.feature_labels import save_labels
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.graphs import StoredGraph, load_graph_rows
from emc.store.reviews import write_reviews
from emc.tracing.compact import TOKEN_LAYER
from tests.apptest_pages import page_test
from tests.graph_store import TracedStore, build_traced_store, copy_store


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    """Labelled-target graphs of base and adapted on two prompts, made once for this module."""
    return build_traced_store(small_organism, tmp_path_factory.mktemp("graphs-template"))


@pytest.fixture(scope="module")
def pair(traced) -> GraphPair:
    return graph_pairs(traced.store)[0]


@pytest.fixture(scope="module")
def base(traced, pair) -> StoredGraph:
    return load_graph_rows(traced.store, pair.base_graph_id)


@pytest.fixture(scope="module")
def adapted(traced, pair) -> StoredGraph:
    return load_graph_rows(traced.store, pair.adapted_graph_id)


@pytest.fixture
def reading(traced, monkeypatch) -> Store:
    """The page reads the shared store (reading never writes to it)."""
    monkeypatch.setenv("EMC_DATA_DIR", str(traced.data_dir))
    return traced.store


@pytest.fixture
def copied(traced, tmp_path, monkeypatch) -> Store:
    """A private copy of the store, for tests that change rows; the page reads the copy."""
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "data"))
    return copy_store(traced.data_dir, tmp_path / "data")


def open_page() -> AppTest:
    page = page_test("graphs").run()
    assert not page.exception
    return page


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


def metrics(page: AppTest) -> list[tuple[str, str]]:
    return [(m.label, m.value) for m in page.metric]


def facts_shown(page: AppTest, which: int = 0) -> dict[str, str]:
    """The base (0) or adapted (1) graph's node facts table, as name -> value."""
    table = tables_with(page, "value")[which]
    return dict(zip(table.iloc[:, 0], table["value"], strict=True))


def tables_with(page: AppTest, column: str) -> list[pd.DataFrame]:
    """The page's tables with this column, in page order (base graph's first)."""
    return [d.value for d in page.dataframe if column in d.value.columns]


def pickers(page: AppTest, pair: GraphPair) -> tuple:
    """The two graphs' node pickers' values: (base, adapted)."""
    return tuple(
        page.selectbox(key=f"graphs-node-{graph_id}").value
        for graph_id in (pair.base_graph_id, pair.adapted_graph_id)
    )


def identity_of(graph: StoredGraph, node: int) -> str:
    return view.node_identities(graph)[node]


def shared_feature(base: StoredGraph, adapted: StoredGraph) -> str:
    """The identity of the most influential (in base) feature node both graphs kept."""
    theirs = set(view.node_identities(adapted).values())
    features = base.nodes[base.nodes["kind"] == "feature"].sort_values(
        ["influence", "node"], ascending=[False, True]
    )
    return next(
        identity_of(base, int(n)) for n in features["node"] if identity_of(base, int(n)) in theirs
    )


def laid_out(*graphs: StoredGraph) -> tuple[pd.DataFrame, pd.DataFrame]:
    axis = view.position_axis(*(g.nodes for g in graphs))
    return axis, view.layout_nodes(graphs[0].nodes, axis, view.largest_influence(*graphs))


# The page


def test_without_store_the_page_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "nothing"))
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not (tmp_path / "nothing" / STORE_FILE_NAME).exists()  # reading never creates a store


def test_a_store_without_graphs_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not page.selectbox and not page.metric


def test_the_page_lists_the_prompts_and_shows_both_graphs_numbers(traced, reading):
    pairs = graph_pairs(traced.store)
    page = open_page()
    assert len(page.selectbox(key="graphs-prompt").options) == len(traced.prompt_ids) == 2
    assert not page.warning

    for prompt_id in traced.prompt_ids:
        page.selectbox(key="graphs-prompt").select(prompt_id).run()
        assert not page.exception
        (pair,) = [p for p in pairs if p.prompt_id == prompt_id]
        assert page.selectbox(key=f"graphs-pair-{prompt_id}").options == [widgets.pair_label(pair)]
        base = load_graph_rows(traced.store, pair.base_graph_id).record
        adapted = load_graph_rows(traced.store, pair.adapted_graph_id).record
        expected = [
            (label, f"{value:.3f}")
            for record in (base, adapted)
            for label, value in view.graph_scores(record).items()
        ]
        assert metrics(page) == expected
        captions = texts(page.caption)
        for record in (base, adapted):
            assert record.graph_id in captions and record.model_id in captions
            assert view.graph_counts(record) in captions
        # Both graphs' targets with their probabilities, and a chart each.
        base_targets, adapted_targets = page.dataframe[0].value, page.dataframe[1].value
        assert list(base_targets["role"]) == ["evil", "safe"]
        assert len(adapted_targets) == adapted.n_logits
        assert len(page.get("vega_lite_chart")) == 2


def test_a_prompt_traced_two_ways_offers_both_pairs(copied, pair):
    # A second pair of the same prompt, as a `--targets contrastive` run would add.
    with copied.write() as conn:
        for table in ("graphs", "graph_nodes", "graph_edges"):
            columns = [row[0] for row in conn.execute(f"DESCRIBE {table}").fetchall()]
            chosen = ", ".join(
                "graph_id || '-c'" if c == "graph_id" else "'contrastive'" if c == "targets" else c
                for c in columns
            )
            conn.execute(
                f"INSERT INTO {table} SELECT {chosen} FROM {table} "
                "WHERE list_contains(?, graph_id)",
                [[pair.base_graph_id, pair.adapted_graph_id]],
            )
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    choice = page.selectbox(key=f"graphs-pair-{pair.prompt_id}")
    assert len(choice.options) == 2
    assert {o.split(" ")[0] for o in choice.options} == {"labelled", "contrastive"}

    choice.select(f"{pair.base_graph_id}-c/{pair.adapted_graph_id}-c").run()
    assert not page.exception
    assert f"{pair.adapted_graph_id}-c" in texts(page.caption)


def test_a_logit_mismatch_shows_a_warning_on_that_graph(copied, pair):
    with copied.write() as conn:
        conn.execute(
            "UPDATE graphs SET logit_mismatch = 0.25, logit_mismatch_exceeds = true "
            "WHERE graph_id = ?",
            [pair.adapted_graph_id],
        )
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    (warning,) = page.warning
    assert warning.value == "graph probabilities differ from discovery logits by 0.25"


def test_a_rejected_prompt_and_a_relabelled_prompts_stale_graphs_are_marked(
    copied, traced, pair, base
):
    other = next(p for p in traced.prompt_ids if p != pair.prompt_id)
    evil, safe = sorted(base.record.params["evil_ids"]), base.record.params["safe_ids"]
    labels = {t: "evil" for t in evil} | {t: "safe" for t in safe}
    relabel = make_review(pair.prompt_id, "ana", "relabel", labels, {evil[0]: "safe"}, "not here")
    reject = make_review(other, "bo", "reject", {}, reject_reason="two questions in one")
    write_reviews(copied, [(relabel, {}), (reject, {})], run_id=None)

    page = open_page()
    options = page.selectbox(key="graphs-prompt").options
    assert [o for o in options if widgets.REJECTED_MARK in o] == [
        o for o in options if other in o
    ], options
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    assert not page.exception and not page.error
    (stale_pair,) = graph_pairs(copied, prompt_id=pair.prompt_id)
    assert stale_pair.stale
    (option,) = page.selectbox(key=f"graphs-pair-{pair.prompt_id}").options
    assert option == widgets.pair_label(stale_pair) and option.endswith(widgets.STALE_MARK)
    warnings = [w.value for w in page.warning]
    assert len(warnings) == 2, warnings  # one on each graph of the pair
    assert all(w.startswith("Stale: traced for evil ") for w in warnings)
    assert all(f"now labelled evil {evil[1:]}" in w for w in warnings)

    page.selectbox(key="graphs-prompt").select(other).run()
    assert not page.exception and not page.warning
    (error,) = page.error
    assert "rejected by human:bo: two questions in one" in error.value


def test_picking_a_node_shows_its_facts_and_strongest_edges(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    picker = page.selectbox(key=f"graphs-node-{pair.base_graph_id}")
    # The page opens on a logit: the evil target (here the first target).
    assert picker.value == int(base.nodes.loc[base.nodes["kind"] == "logit", "node"].min())

    feature = base.nodes[base.nodes["kind"] == "feature"].nlargest(1, "influence").iloc[0]
    picker.select(int(feature["node"])).run()
    assert not page.exception
    facts = facts_shown(page)
    assert facts["kind"] == "feature" and facts["feature"] == str(feature["feature"])
    assert facts["layer"] == str(feature["layer"]) and facts["position"] == str(feature["position"])
    incoming = tables_with(page, "from")[0]
    stored = base.edges[base.edges["target"] == feature["node"]]
    strongest = stored.loc[stored["weight"].abs().nlargest(len(incoming)).index, "source"]
    assert list(incoming["node"]) == list(strongest)


def test_a_click_on_the_chart_selects_the_node(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    error = int(base.nodes.loc[base.nodes["kind"] == "error", "node"].iloc[0])
    # What the chart's widget holds after a click on that node.
    page.session_state[f"graphs-chart-{pair.base_graph_id}"] = {
        "selection": {"node": [{"node": error}]}
    }
    page.run()
    assert not page.exception
    assert page.selectbox(key=f"graphs-node-{pair.base_graph_id}").value == error
    assert facts_shown(page)["kind"] == "error"


def test_the_edge_slider_caps_the_edges_drawn(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    page.slider(key="graphs-edges").set_value(50).run()
    assert f"50 of {len(base.edges):,} edges drawn" in texts(page.caption)
    spec = json.loads(page.get("vega_lite_chart")[0].proto.spec)
    assert spec["params"][0]["name"] == "node"


def test_the_url_preselects_the_prompt_pair_and_node(traced, reading):
    pairs = graph_pairs(traced.store)
    # Not the pair the page opens on by itself, and a feature node both graphs kept.
    pair = pairs[1]
    base = load_graph_rows(traced.store, pair.base_graph_id)
    adapted = load_graph_rows(traced.store, pair.adapted_graph_id)
    node = shared_feature(base, adapted)
    page = page_test("graphs")
    page.query_params.update(prompt=pair.prompt_id, pair=widgets.pair_key(pair), node=node)
    page.run()
    assert not page.exception
    assert page.selectbox(key="graphs-prompt").value == pair.prompt_id
    assert page.selectbox(key=f"graphs-pair-{pair.prompt_id}").value == widgets.pair_key(pair)
    ids = [view.node_identities(g) for g in (base, adapted)]
    assert pickers(page, pair) == tuple(view.node_with(i, node) for i in ids)
    assert facts_shown(page)["kind"] == "feature"
    # The URL keeps naming what is on screen.
    assert dict(page.query_params) == {
        "prompt": pair.prompt_id,
        "pair": widgets.pair_key(pair),
        "node": node,
    }

    # Choosing another prompt writes it to the URL, with that pair's default node.
    other = pairs[0]
    page.selectbox(key="graphs-prompt").select(other.prompt_id).run()
    assert not page.exception
    assert page.query_params["prompt"] == other.prompt_id
    assert page.query_params["pair"] == widgets.pair_key(other)
    other_adapted = load_graph_rows(traced.store, other.adapted_graph_id)
    assert page.query_params["node"] == view.default_identity(
        load_graph_rows(traced.store, other.base_graph_id), other_adapted
    )
    assert page.query_params["node"].startswith("logit/")


def test_a_url_naming_nothing_stored_opens_the_default_view(traced, reading):
    page = page_test("graphs")
    page.query_params.update(prompt="no-such-prompt", pair="a/b", node="feature/0/0/0")
    page.run()
    assert not page.exception
    first = graph_pairs(traced.store)[0]
    assert page.selectbox(key="graphs-prompt").value == first.prompt_id
    assert page.query_params["prompt"] == first.prompt_id
    assert page.query_params["node"].startswith("logit/")


def test_the_page_opens_on_the_most_probable_evil_target(traced, reading):
    page = open_page()
    for pair in graph_pairs(traced.store):
        page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
        assert not page.exception
        base = load_graph_rows(traced.store, pair.base_graph_id)
        adapted = load_graph_rows(traced.store, pair.adapted_graph_id)
        token = most_probable_evil(adapted)
        assert token in adapted.record.params["evil_ids"]
        expected = []
        for graph in (base, adapted):
            logits = graph.nodes[graph.nodes["kind"] == "logit"]
            expected.append(int(logits.loc[logits["token_id"] == token, "node"].iloc[0]))
        assert pickers(page, pair) == tuple(expected)
        for which in (0, 1):
            facts = facts_shown(page, which)
            assert facts["kind"] == "logit" and facts["token_id"] == str(token)
        # The evil target is the most probable of the evil targets in the adapted graph.
        targets = page.dataframe[1].value
        evil = targets[targets["role"] == "evil"]
        assert evil.loc[evil["probability"].idxmax(), "token id"] == token


def test_a_node_picked_or_clicked_in_one_graph_is_selected_in_both(traced, reading):
    pair = graph_pairs(traced.store)[0]
    base = load_graph_rows(traced.store, pair.base_graph_id)
    adapted = load_graph_rows(traced.store, pair.adapted_graph_id)
    base_ids, adapted_ids = view.node_identities(base), view.node_identities(adapted)
    # Each node has its own identity in its graph.
    assert len(set(base_ids.values())) == len(base_ids)
    assert len(set(adapted_ids.values())) == len(adapted_ids)
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()

    shared = shared_feature(base, adapted)
    page.selectbox(key=f"graphs-node-{pair.base_graph_id}").select(
        view.node_with(base_ids, shared)
    ).run()
    assert not page.exception
    assert pickers(page, pair) == (
        view.node_with(base_ids, shared),
        view.node_with(adapted_ids, shared),
    )
    base_facts, adapted_facts = facts_shown(page, 0), facts_shown(page, 1)
    for fact in ("kind", "layer", "position", "feature"):
        assert base_facts[fact] == adapted_facts[fact]
    assert page.query_params["node"] == shared

    # A click on the adapted chart selects the same token node in the base graph.
    token = next(
        i for i in adapted_ids.values() if i.startswith("token/") and i in set(base_ids.values())
    )
    page.session_state[f"graphs-chart-{pair.adapted_graph_id}"] = {
        "selection": {"node": [{"node": view.node_with(adapted_ids, token)}]}
    }
    page.run()
    assert not page.exception
    assert pickers(page, pair) == (
        view.node_with(base_ids, token),
        view.node_with(adapted_ids, token),
    )
    assert facts_shown(page, 0)["kind"] == facts_shown(page, 1)["kind"] == "token"

    # A node only the base graph kept: the adapted graph says it does not have it.
    only_base = next(n for n, i in base_ids.items() if i not in set(adapted_ids.values()))
    page.selectbox(key=f"graphs-node-{pair.base_graph_id}").select(only_base).run()
    assert not page.exception
    assert pickers(page, pair) == (only_base, None)
    (info,) = page.info
    described = view.describe_node(base, only_base)
    assert info.value.startswith(f"The adapted graph does not have {described}")
    assert len(tables_with(page, "value")) == 1  # facts of the base node only


def test_a_feature_nodes_effects_on_evil_and_safe_targets_and_its_label(copied, pair, base):
    feature = base.nodes[base.nodes["kind"] == "feature"].nlargest(1, "influence").iloc[0]
    node, layer, index = int(feature["node"]), int(feature["layer"]), int(feature["feature"])
    (model,) = [m for m in list_models(copied) if m.model_id == pair.base_model_id]
    label = FeatureLabel(
        transcoders_ref=model.transcoders_ref,
        layer=layer,
        feature=index,
        labeller="human:ana",
        label="dosage advice",
        run_id="test",
    )
    save_labels(copied, [label])

    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    picker = page.selectbox(key=f"graphs-node-{pair.base_graph_id}")
    assert "dosage advice" in picker.format_func(node)
    picker.select(node).run()
    assert not page.exception
    assert facts_shown(page)["label"] == "dosage advice"

    # The effects shown are the stored feature_effects rows, read here independently.
    stored = read_only_query(
        copied,
        "SELECT token_id, direct, total FROM feature_effects "
        f"WHERE graph_id = '{pair.base_graph_id}' AND node = {node} ORDER BY target",
    )
    shown = tables_with(page, "direct")[0]
    assert sorted(shown["token id"]) == sorted(stored["token_id"])
    evil = set(base.record.params["evil_ids"])
    safe = set(base.record.params["safe_ids"])
    by_token = stored.set_index("token_id")
    for row in shown.itertuples():
        token = row[2]
        assert row.role == ("evil" if token in evil else "safe" if token in safe else "other")
        assert row.direct == pytest.approx(by_token.loc[token, "direct"])
        assert row.total == pytest.approx(by_token.loc[token, "total"])
    assert list(shown["role"]) == sorted(shown["role"], key=view.SIDE_ORDER.index)
    sums = {
        side: stored[stored["token_id"].isin(tokens)]["total"].sum()
        for side, tokens in (("evil", evil), ("safe", safe))
    }
    caption = next(c.value for c in page.caption if c.value.startswith("On evil targets"))
    assert f"total {sums['evil']:+.4g}" in caption
    assert f"on safe targets (1): total {sums['safe']:+.4g}" in caption


def test_the_page_links_to_the_review_item_and_the_feature_card(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    links = [m.value for m in page.markdown]
    review = widgets.page_url("review", prompt=pair.prompt_id)
    assert f"[Review item of this prompt]({review})" in links
    # A logit has no feature card.
    assert not [text for text in links if "Feature card" in text]

    feature = base.nodes[base.nodes["kind"] == "feature"].nlargest(1, "influence").iloc[0]
    layer, index = int(feature["layer"]), int(feature["feature"])
    page.selectbox(key=f"graphs-node-{pair.base_graph_id}").select(int(feature["node"])).run()
    card = widgets.page_url("features", feature=f"{layer}/{index}", prompt=pair.prompt_id)
    assert f"[Feature card L{layer}/{index}]({card})" in [m.value for m in page.markdown]


# Layout and chart data


def test_layout_puts_nodes_in_their_layer_band_and_position_column(base, adapted):
    axis, laid = laid_out(base, adapted)
    assert sorted(laid["node"]) == sorted(base.nodes["node"])
    stored = base.nodes.set_index("node")
    rows = laid.set_index("node")
    assert (rows["layer"] == stored["layer"].reindex(rows.index)).all()
    assert (rows["position"] == stored["position"].reindex(rows.index)).all()
    columns = axis.set_index("position")
    start = rows["position"].map(columns["start"])
    assert (rows["x"] > start).all()
    assert (rows["x"] < start + rows["position"].map(columns["width"])).all()
    assert ((rows["y"] - rows["layer"]).abs() < 0.5).all()
    # Tokens at the bottom, logits at the top, one token per position, labelled on the axis.
    assert (rows.loc[rows["kind"] == "token", "layer"] == TOKEN_LAYER).all()
    assert (rows.loc[rows["kind"] == "logit", "layer"] == rows["layer"].max()).all()
    assert list(axis["position"]) == list(range(len(base.record.input_ids)))
    tokens = stored[stored["kind"] == "token"].set_index("position")["token"]
    for position, label in zip(axis["position"], axis["label"], strict=True):
        assert label.startswith(f"{position} ")
        assert repr(tokens[position])[:4] in label
    # No two nodes on the same spot, and positions read left to right.
    assert not laid.duplicated(["x", "y"]).any()
    by_position = laid.groupby("position")["x"]
    assert (by_position.max().iloc[:-1].to_numpy() < by_position.min().iloc[1:].to_numpy()).all()


def test_a_crowded_position_gets_a_wider_column(base):
    axis = view.position_axis(base.nodes)
    crowd = base.nodes.groupby(["layer", "position"]).size().groupby(level="position").max()
    widths = axis.set_index("position")["width"]
    assert (widths[crowd[crowd == 1].index] == 1).all()
    assert (widths[crowd[crowd > 1].index] > 1).all()
    assert (axis["start"].diff().dropna() == axis["width"].iloc[:-1].to_numpy()).all()


def test_node_sizes_grow_with_influence(base, adapted):
    _, laid = laid_out(base, adapted)
    nodes = laid[laid["kind"] != "logit"].sort_values(["influence", "size"])
    assert nodes["size"].is_monotonic_increasing
    assert nodes["size"].iloc[-1] > nodes["size"].iloc[0]
    assert laid["size"].between(view.MIN_SIZE, view.MAX_SIZE).all()
    # A shared, larger maximum shrinks this graph's markers: sizes compare across the pair.
    axis = view.position_axis(base.nodes)
    shared = view.layout_nodes(base.nodes, axis, 10 * float(base.nodes["influence"].max()))
    own = view.layout_nodes(base.nodes, axis)
    features = own["kind"] == "feature"
    assert (shared.loc[features, "size"] < own.loc[features, "size"]).all()
    logits = laid[laid["kind"] == "logit"].sort_values("prob")
    assert logits["size"].is_monotonic_increasing


@pytest.mark.parametrize("limit", [0, 10, 100, 100_000])
def test_edge_frame_keeps_at_most_the_strongest_edges(base, limit):
    _, laid = laid_out(base)
    edges = view.edge_frame(base.edges, laid, limit)
    assert len(edges) == min(limit, len(base.edges))
    strength = base.edges["weight"].abs()
    if 0 < len(edges) < len(base.edges):
        assert edges["weight"].abs().min() >= strength.nlargest(len(edges) + 1).iloc[-1]
    # Each drawn edge runs between its stored ends.
    where = laid.set_index("node")
    assert np.allclose(edges["x"], where.loc[edges["source"], "x"])
    assert np.allclose(edges["y2"], where.loc[edges["target"], "y"])
    assert (edges["sign"] == np.where(edges["weight"] >= 0, "positive", "negative")).all()
    assert edges["opacity"].between(0, 1).all()


def test_a_focused_nodes_edges_stand_out(base):
    _, laid = laid_out(base)
    node = int(base.nodes.loc[base.nodes["kind"] == "logit", "node"].iloc[0])
    edges = view.edge_frame(base.edges, laid, 200, focus=node)
    touching = (edges["source"] == node) | (edges["target"] == node)
    assert touching.any() and (~touching).any()
    assert edges.loc[touching, "opacity"].min() > edges.loc[~touching, "opacity"].max()


def test_the_chart_draws_edges_under_clickable_nodes(base):
    axis, laid = laid_out(base)
    edges = view.edge_frame(base.edges, laid, 40)
    node = int(laid["node"].iloc[0])
    spec = view.graph_chart(laid, edges, axis, int(laid["layer"].max()), selected=node).to_dict()
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    # Edges, nodes, the targets' label leaders and labels, the selected node's ring.
    assert marks == ["rule", "point", "rule", "text", "point"]
    assert [p["name"] for p in spec["params"]] == ["node"]
    datasets = {len(values) for values in spec["datasets"].values()}
    assert {len(edges), len(laid), 1} <= datasets  # edges, nodes, the selected node's ring


def test_mismatch_warning_only_when_the_graph_exceeds_the_tolerance(base):
    record = base.record
    assert view.mismatch_warning(record.model_copy(update={"logit_mismatch_exceeds": None})) is None
    assert (
        view.mismatch_warning(record.model_copy(update={"logit_mismatch_exceeds": False})) is None
    )
    shown = view.mismatch_warning(
        record.model_copy(update={"logit_mismatch_exceeds": True, "logit_mismatch": 0.0312})
    )
    assert shown == "graph probabilities differ from discovery logits by 0.0312"
    ids_differ = record.model_copy(update={"logit_mismatch_exceeds": True, "logit_mismatch": None})
    assert "not the ones discovery scored" in view.mismatch_warning(ids_differ)


def label_boxes(labels: pd.DataFrame, n_layers: int) -> list[tuple[float, float]]:
    """Each label's line as a (top, bottom) band in pixels."""
    scale = view.pixels_per_layer(n_layers)
    half = view.LABEL_FONT / 2
    return [(y * scale - half, y * scale + half) for y in labels["y"]]


def assert_apart(labels: pd.DataFrame, laid: pd.DataFrame, axis: pd.DataFrame, n_layers: int):
    boxes = sorted(label_boxes(labels, n_layers))
    # No two labels share a line: their font-high bands do not overlap, whatever the x.
    for (_, high), (next_low, _) in itertools.pairwise(boxes):
        assert high <= next_low, boxes
    # All in the logits' band and on the plot, left of the logits' column, with their markers.
    assert (labels["y"] > n_layers - 0.5).all()
    assert (labels["y"] * view.pixels_per_layer(n_layers) + view.LABEL_FONT / 2).max() <= (
        (n_layers + view.Y_MARGIN) * view.pixels_per_layer(n_layers)
    )
    logits = laid[laid["kind"] == "logit"]
    assert (labels["x"] <= logits["x"].min()).all()
    assert labels["x"].nunique() == 1
    where = logits.set_index("node")
    assert list(labels["node_x"]) == list(where.loc[labels["node"], "x"])
    assert list(labels["node_y"]) == list(where.loc[labels["node"], "y"])
    # Nothing but logits sits in the logits' band.
    assert (laid.loc[laid["kind"] != "logit", "y"] < n_layers - 0.5).all()


def test_target_labels_of_real_graphs_do_not_overlap(base, adapted):
    axis, laid = laid_out(base, adapted)
    n_layers = int(laid["layer"].max())
    labels = view.target_labels(laid, axis, n_layers, view.target_roles(base))
    assert sorted(labels["node"]) == sorted(laid.loc[laid["kind"] == "logit", "node"])
    assert_apart(labels, laid, axis, n_layers)
    roles = dict(zip(labels["node"], labels["role"], strict=True))
    logits = base.nodes[base.nodes["kind"] == "logit"].set_index("node")
    for node, role in roles.items():
        token = int(logits.loc[node, "token_id"])
        assert role == ("evil" if token in base.record.params["evil_ids"] else "safe")
    texts = set(labels["text"])
    for node in labels["node"]:
        assert f"{logits.loc[node, 'token']!r} {logits.loc[node, 'prob']:.3f}" in texts
    # The chart draws exactly these labels.
    spec = view.graph_chart(laid, view.edge_frame(base.edges, laid, 10), axis, n_layers).to_dict()
    (text_layer,) = [layer for layer in spec["layer"] if layer["mark"]["type"] == "text"]
    drawn = spec["datasets"][text_layer["data"]["name"]]
    assert [row["text"] for row in drawn] == list(labels["text"])


@pytest.mark.parametrize("extra", [6, 40])
def test_crowded_targets_get_the_lines_there_are_the_most_probable_first(base, extra):
    # As a salient-targets graph has: many logits in one cell.
    logits = base.nodes[base.nodes["kind"] == "logit"]
    more = pd.concat(
        [
            logits.iloc[[0]].assign(
                node=int(base.nodes["node"].max()) + 1 + i,
                token_id=100_000 + i,
                token=f"tok{i}",
                prob=0.5 / (i + 2),
            )
            for i in range(extra)
        ]
    )
    nodes = pd.concat([base.nodes, more], ignore_index=True)
    axis = view.position_axis(nodes)
    laid = view.layout_nodes(nodes, axis)
    n_layers = int(laid["layer"].max())
    labels = view.target_labels(laid, axis, n_layers)
    assert_apart(labels, laid, axis, n_layers)
    assert 1 <= len(labels) < len(laid[laid["kind"] == "logit"])
    shown = laid[laid["node"].isin(labels["node"])]["prob"]
    hidden = laid[(laid["kind"] == "logit") & ~laid["node"].isin(labels["node"])]["prob"]
    assert shown.min() >= hidden.max()
    # A taller chart (more layers) has room for more lines.
    assert len(view.target_labels(laid, axis, 2 * n_layers + 4)) >= len(labels)
