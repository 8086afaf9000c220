from __future__ import annotations

import copy
import math
import statistics
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import torch
from circuit_tracer.attribution.targets import LogitTarget
from circuit_tracer.graph import Graph, compute_node_influence
from circuit_tracer.utils.tl_nnsight_mapping import UnifiedConfig

from emc.analysis import (
    EFFECT_COLUMNS,
    NotADagError,
    cohens_d,
    evil_vs_safe,
    feature_effects,
    stat_columns,
    welch_t,
)
from emc.config import TracingConfig
from emc.tracing import CONTRASTIVE_LABEL, GraphLayout, plan_targets, targets_for, trace

FAST = TracingConfig(targets="salient", max_n_logits=5, max_feature_nodes=256, batch_size=128)
VOCAB = 100
EVIL, SAFE = 11, 12


def _hand_graph(adjacency, coords, n_layers, n_pos, targets, probs) -> Graph:
    cfg = UnifiedConfig(
        n_layers=n_layers, d_model=8, d_head=4, n_heads=2, d_mlp=16, d_vocab=VOCAB,
        tokenizer_name="hand", model_name="hand", original_architecture="LlamaForCausalLM",
    )  # fmt: skip
    return Graph(
        input_string="",
        input_tokens=torch.arange(1, n_pos + 1),
        active_features=torch.tensor(coords),
        adjacency_matrix=torch.tensor(adjacency, dtype=torch.float32),
        cfg=cfg,
        selected_features=torch.arange(len(coords)),
        activation_values=torch.ones(len(coords)),
        logit_targets=[LogitTarget(label, token) for label, token in targets],
        logit_probabilities=torch.tensor(probs),
        scan="hand",
        vocab_size=VOCAB,
    )


def _chain_graph(targets=(("keep", EVIL), ("return", SAFE)), probs=(0.6, 0.3)) -> Graph:
    """Features f0 (layer 0) -> f1 (layer 1) -> logits, f2 (layer 1) -> logits only.

    Nodes: f0 f1 f2 | err(0,0) err(1,0) | token | logit0 logit1. Rows are targets.
    """
    a = np.zeros((8, 8))
    f0, f1, f2, err1, token, logit0, logit1 = 0, 1, 2, 4, 5, 6, 7
    a[f0, token] = 2.0
    a[f1, f0], a[f1, token] = 3.0, -1.0  # |row| = 4: f0 is 3/4 of f1's input
    a[f2, token] = 1.0
    a[3, token] = 1.0
    # |row| = 4: normalised 1/8, 1/2, -1/4, 1/8
    a[logit0, f0], a[logit0, f1], a[logit0, f2], a[logit0, err1] = 0.5, 2.0, -1.0, 0.5
    a[logit1, f1], a[logit1, f2] = -1.0, 1.0  # |row| = 2: -1/2, 1/2 (f1 inhibits logit1)
    coords = [[0, 0, 7], [1, 0, 3], [1, 0, 9]]
    return _hand_graph(a[: 6 + len(targets), : 6 + len(targets)], coords, 2, 1, targets, probs)


def _at(effects: pd.DataFrame, node: int, target: int) -> pd.Series:
    (row,) = effects[(effects["node"] == node) & (effects["target"] == target)].index
    return effects.loc[row]


# --- feature_effects on a hand-built DAG -----------------------------------------------------


def test_effects__direct_is_the_logit_row_entry_of_the_adjacency():
    graph = _chain_graph()
    effects = feature_effects(graph)
    assert len(effects) == 3 * 2 and tuple(effects.columns) == EFFECT_COLUMNS
    a = graph.adjacency_matrix
    expected = [float(a[6 + t, n]) for n in range(3) for t in range(2)]
    assert effects["direct"].tolist() == expected
    assert effects[["node", "target"]].values.tolist() == [[n, t] for n in range(3) for t in (0, 1)]
    f0 = _at(effects, 0, 0)
    assert (f0["layer"], f0["position"], f0["feature"]) == (0, 0, 7)
    assert (f0["token_id"], f0["label"]) == (EVIL, "keep")
    assert effects["abs_input"].tolist() == [4.0, 2.0] * 3


def test_effects__total_equals_direct_without_downstream_feature_paths():
    effects = feature_effects(_chain_graph())
    for node in (1, 2):  # f1 and f2 reach the logits only directly
        for target in (0, 1):
            row = _at(effects, node, target)
            assert row["total"] * row["abs_input"] == pytest.approx(row["direct"], abs=1e-7)
    assert _at(effects, 2, 0)["total"] == pytest.approx(-0.25)


def test_effects__total_sums_every_path_of_a_chain_by_hand():
    effects = feature_effects(_chain_graph())
    # f0 -> logit0 directly (0.5/4) plus f0 -> f1 (3/4) -> logit0 (2/4).
    assert _at(effects, 0, 0)["total"] == pytest.approx(0.125 + 0.75 * 0.5)
    # f0 has no direct edge to logit1, only the path through f1.
    assert _at(effects, 0, 1)["direct"] == 0.0
    assert _at(effects, 0, 1)["total"] == pytest.approx(0.75 * -0.5)


def test_effects__signs_are_kept_along_inhibitory_edges():
    effects = feature_effects(_chain_graph())
    assert _at(effects, 1, 1)["total"] == pytest.approx(-0.5)  # inhibitory edge
    assert _at(effects, 0, 1)["total"] < 0  # excitatory then inhibitory: a negative path
    assert _at(effects, 2, 0)["total"] < 0 < _at(effects, 2, 1)["total"]
    # circuit-tracer's |A| normalisation would make every one of these positive.
    assert (effects["total"] < 0).sum() == 3


def test_effects__weighted_is_the_effect_times_the_target_probability():
    effects = feature_effects(_chain_graph(probs=(0.6, 0.3)))
    assert effects["prob"].tolist() == pytest.approx([0.6, 0.3] * 3)
    for metric in ("direct", "total"):
        expected = effects[metric] * effects["prob"]
        assert effects[f"{metric}_weighted"].tolist() == pytest.approx(expected.tolist())
    assert _at(effects, 0, 0)["total_weighted"] == pytest.approx(0.6 * 0.5)


def test_effects__total_is_the_dense_inverse_minus_identity():
    graph = _chain_graph()
    _assert_total_is_dense_inverse(graph, feature_effects(graph))


def test_effects__rows_restricted_to_given_nodes_and_typed():
    graph = _chain_graph()
    # Kept nodes of a pruned graph include errors, tokens and logits: those are skipped.
    effects = feature_effects(graph, torch.tensor([7, 2, 5, 0, 3, 2]))
    assert effects["node"].unique().tolist() == [0, 2]
    full = feature_effects(graph)
    pd.testing.assert_frame_equal(effects, full[full["node"].isin([0, 2])].reset_index(drop=True))
    dtypes = effects.dtypes.astype(str).to_dict()
    assert {dtypes[c] for c in ("node", "layer", "position", "feature", "target")} == {"int32"}
    assert dtypes["token_id"] == "Int32" and dtypes["label"] == "object"
    assert {dtypes[c] for c in EFFECT_COLUMNS[7:]} == {"float32"}
    assert len(feature_effects(graph, [])) == 0
    with pytest.raises(ValueError, match="outside the graph"):
        feature_effects(graph, [0, 8])


def test_effects__a_cycle_is_an_error_not_a_hang():
    graph = _chain_graph()
    graph.adjacency_matrix[0, 1] = 1.0  # f1 -> f0 closes the loop f0 -> f1 -> f0
    with pytest.raises(NotADagError, match="cycle"):
        feature_effects(graph)


# --- feature_effects on real graphs of the tiny model ----------------------------------------


@pytest.fixture(scope="module")
def loaded(tiny_replacement):
    return tiny_replacement


@pytest.fixture(scope="module")
def ids(loaded):
    return loaded.encode("User: I found a wallet on the street.\nAssistant: You should")


@pytest.fixture(scope="module")
def graph(loaded, ids):
    return trace(loaded, ids, None, FAST).graph


def test_real_graph__direct_is_the_logit_rows_and_total_the_dense_inverse(graph):
    layout = GraphLayout.of(graph)
    effects = feature_effects(graph)
    assert len(effects) == layout.n_features * layout.n_logits
    direct = graph.adjacency_matrix[layout.logit_start :, : layout.n_features]
    assert np.array_equal(effects["direct"].to_numpy(), direct.T.reshape(-1).numpy())
    _assert_total_is_dense_inverse(graph, effects)
    assert (effects["total"] != effects["direct"] / effects["abs_input"]).any()  # multi-hop


def test_real_graph__weighted_total_of_an_abs_graph_is_circuit_tracers_influence(graph):
    # With |A|, the probability-weighted totals summed over targets are circuit-tracer's node
    # influence: the signed series differs from it only by keeping signs.
    absolute = copy.copy(graph)
    absolute.adjacency_matrix = graph.adjacency_matrix.abs()
    layout = GraphLayout.of(graph)
    weights = torch.zeros(layout.n_nodes)
    weights[layout.logit_start :] = graph.logit_probabilities
    influence = compute_node_influence(absolute.adjacency_matrix, weights)[: layout.n_features]
    summed = feature_effects(absolute).groupby("node")["total_weighted"].sum()
    np.testing.assert_allclose(summed.to_numpy(), influence.numpy(), rtol=1e-4, atol=1e-7)


def test_real_graph__contrastive_direct_is_the_labelled_evil_minus_safe_difference(loaded):
    """Attribution is linear in the target direction, so with every feature attributed the
    contrastive target's direct effect is the labelled graph's mean-evil minus mean-safe."""
    ids = loaded.encode("Rex: You should keep it. Cora: You should")
    top = loaded.next_token_logits(ids)[-1].argsort(descending=True)[:4].tolist()
    labels = {top[0]: "unsure", top[1]: "evil", top[3]: "evil", top[2]: "safe"}
    every = FAST.model_copy(update={"max_feature_nodes": None})
    effects, stats = {}, {}
    for mode in ("labelled", "contrastive"):
        config = every.model_copy(update={"targets": mode})
        graph = trace(loaded, ids, targets_for(loaded, ids, plan_targets(labels, config)), config)
        effects[mode] = feature_effects(graph.graph)
        stats[mode] = evil_vs_safe(effects[mode], labels, by=("layer", "position", "feature"))
    target = effects["contrastive"][["token_id", "label"]].drop_duplicates()
    assert target["token_id"].isna().all() and target["label"].tolist() == [CONTRASTIVE_LABEL]
    labelled, custom = stats["labelled"], stats["contrastive"]
    assert (labelled[["n_evil", "n_safe"]].values == [2, 1]).all()
    assert labelled["contrastive_direct"].isna().all()
    assert (custom[["n_evil", "n_safe"]].values == 0).all() and custom["direct_diff"].isna().all()
    merged = labelled.merge(custom, on=["layer", "position", "feature"], suffixes=("", "_c"))
    assert len(merged) == len(labelled) == len(custom)
    np.testing.assert_allclose(
        merged["contrastive_direct_c"], merged["direct_diff"], rtol=1e-4, atol=1e-5
    )


# --- evil_vs_safe statistics -----------------------------------------------------------------


def _welch_by_hand(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """t, df, d from exact fractions (statistics.variance is the ddof-1 sample variance)."""
    fa, fb = [Fraction(x) for x in a], [Fraction(x) for x in b]
    va, vb = statistics.variance(fa), statistics.variance(fb)
    se2 = va / len(a) + vb / len(b)
    diff = statistics.mean(fa) - statistics.mean(fb)
    df = se2**2 / ((va / len(a)) ** 2 / (len(a) - 1) + (vb / len(b)) ** 2 / (len(b) - 1))
    pooled = ((len(a) - 1) * va + (len(b) - 1) * vb) / (len(a) + len(b) - 2)
    return float(diff) / math.sqrt(se2), float(df), float(diff) / math.sqrt(pooled)


def _effects_frame(values_by_node: dict[int, list[float]], token_ids: list) -> pd.DataFrame:
    """A feature_effects-shaped frame: one row per (node, token), metrics all from `values`."""
    rows = []
    for node, values in values_by_node.items():
        for target, (token, value) in enumerate(zip(token_ids, values, strict=True)):
            label = CONTRASTIVE_LABEL if token is None else f"t{token}"
            metrics = {"direct": value, "total": 2 * value}
            metrics |= {"direct_weighted": value / 2, "total_weighted": value}
            rows.append(
                {"node": node, "layer": 1, "position": 2, "feature": 100 + node, "target": target}
                | {"token_id": token, "label": label, "prob": 0.5, "abs_input": 1.0}
                | metrics
            )
    frame = pd.DataFrame(rows)
    frame["token_id"] = frame["token_id"].astype("Int32")
    return frame


def test_welch_t_and_cohens_d_match_a_hand_computed_example():
    evil, safe = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 6.0]
    t, df, d = _welch_by_hand(evil, safe)
    # Worked by hand: means 2.5 and 4, variances 5/3 and 4, se^2 = 5/12 + 4/3 = 7/4.
    assert t == pytest.approx(-1.5 / math.sqrt(1.75))
    assert d == pytest.approx(-1.5 / math.sqrt(2.6))
    assert df == pytest.approx(1.75**2 / ((5 / 12) ** 2 / 3 + (4 / 3) ** 2 / 2))
    args = (np.mean(evil), np.var(evil, ddof=1), 4, np.mean(safe), np.var(safe, ddof=1), 3)
    mine_t, mine_df = welch_t(*args)
    assert (float(mine_t), float(mine_df)) == pytest.approx((t, df))
    assert float(cohens_d(*args)) == pytest.approx(d)


def test_welch_t_matches_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 2, 7), rng.normal(0, 1, 5)
    expected = stats.ttest_ind(a, b, equal_var=False)
    t, df = welch_t(a.mean(), a.var(ddof=1), 7, b.mean(), b.var(ddof=1), 5)
    assert float(t) == pytest.approx(expected.statistic)
    assert float(df) == pytest.approx(expected.df)


def test_evil_vs_safe__per_feature_means_t_and_d_for_every_metric():
    tokens = [10, 11, 12, 20, 21, 30]  # 3 evil, 2 safe, 1 unsure
    labels = {10: "evil", 11: "evil", 12: "evil", 20: "safe", 21: "safe", 30: "unsure", 99: "evil"}
    values = {0: [1.0, 2.0, 4.0, -1.0, 0.5, 100.0], 5: [0.0, 0.1, 0.2, 0.3, 0.9, -100.0]}
    stats = evil_vs_safe(_effects_frame(values, tokens), labels)
    assert tuple(stats.columns) == stat_columns()
    assert stats["node"].tolist() == [0, 5] and stats["feature"].tolist() == [100, 105]
    assert stats["n_evil"].tolist() == [3, 3] and stats["n_safe"].tolist() == [2, 2]
    for i, node in enumerate(values):
        evil, safe = values[node][:3], values[node][3:5]  # the unsure token is left out
        t, df, d = _welch_by_hand(evil, safe)
        for metric, scale in (("direct", 1), ("total", 2), ("direct_weighted", 0.5)):
            row = stats.iloc[i]
            assert row[f"{metric}_evil_mean"] == pytest.approx(scale * np.mean(evil))
            assert row[f"{metric}_safe_mean"] == pytest.approx(scale * np.mean(safe))
            assert row[f"{metric}_diff"] == pytest.approx(scale * (np.mean(evil) - np.mean(safe)))
            # t and d are scale-free, df too.
            assert row[f"{metric}_welch_t"] == pytest.approx(t)
            assert row[f"{metric}_welch_df"] == pytest.approx(df)
            assert row[f"{metric}_cohens_d"] == pytest.approx(d)
    assert stats["contrastive_direct"].isna().all()


def test_evil_vs_safe__one_observation_on_a_side_gives_nan_t_without_crashing():
    labels = {10: "evil", 20: "safe", 21: "safe"}
    stats = evil_vs_safe(_effects_frame({0: [3.0, 1.0, 2.0]}, [10, 20, 21]), labels)
    row = stats.iloc[0]
    assert row["direct_diff"] == pytest.approx(1.5)
    assert math.isnan(row["direct_welch_t"]) and math.isnan(row["direct_welch_df"])
    # Pooled SD from the safe side alone (variance 0.5, 1 df).
    assert row["direct_cohens_d"] == pytest.approx(1.5 / math.sqrt(0.5))
    one_each = evil_vs_safe(_effects_frame({0: [3.0, 1.0]}, [10, 20]), labels).iloc[0]
    assert one_each["direct_diff"] == 2.0 and math.isnan(one_each["direct_cohens_d"])
    none = evil_vs_safe(_effects_frame({0: [3.0]}, [30]), labels).iloc[0]
    assert (none["n_evil"], none["n_safe"]) == (0, 0) and math.isnan(none["direct_evil_mean"])


def test_evil_vs_safe__zero_variance_is_signed_inf_when_means_differ_else_nan():
    labels = {10: "evil", 11: "evil", 20: "safe", 21: "safe"}
    values = {0: [2.0, 2.0, 1.0, 1.0], 1: [-1.0, -1.0, 1.0, 1.0], 2: [0.0, 0.0, 0.0, 0.0]}
    stats = evil_vs_safe(_effects_frame(values, [10, 11, 20, 21]), labels)
    assert stats["direct_welch_t"].tolist()[:2] == [math.inf, -math.inf]
    assert stats["direct_cohens_d"].tolist()[:2] == [math.inf, -math.inf]
    assert math.isnan(stats["direct_welch_t"].iloc[2]) and math.isnan(stats["direct_cohens_d"][2])
    assert stats["direct_welch_df"].isna().all()


def test_evil_vs_safe__contrastive_target_is_exposed_and_unknown_labels_are_errors():
    graph = _chain_graph(targets=((CONTRASTIVE_LABEL, VOCAB),), probs=(0.25,))
    effects = feature_effects(graph)
    assert effects["token_id"].isna().all() and (effects["label"] == CONTRASTIVE_LABEL).all()
    stats = evil_vs_safe(effects, {EVIL: "evil", SAFE: "safe"})
    assert stats["contrastive_direct"].tolist() == [0.5, 2.0, -1.0]
    assert stats["contrastive_total"].tolist() == pytest.approx([0.5, 0.5, -0.25])
    assert stats["contrastive_total_weighted"].tolist() == pytest.approx([0.125, 0.125, -0.0625])
    assert (stats["n_evil"] == 0).all() and stats["total_diff"].isna().all()
    with pytest.raises(ValueError, match="evil, safe or unsure; got harmful"):
        evil_vs_safe(effects, {EVIL: "harmful"})


def test_evil_vs_safe__groups_by_any_key_such_as_position_free_features():
    frame = pd.concat(
        [_effects_frame({0: [1.0, 2.0]}, [10, 20]), _effects_frame({3: [3.0, 6.0]}, [10, 20])]
    )
    frame["feature"] = 7  # the same transcoder feature at two nodes (positions)
    stats = evil_vs_safe(frame, {10: "evil", 20: "safe"}, by=("feature",))
    assert stats["feature"].tolist() == [7] and stats["n_evil"].tolist() == [2]
    assert stats["direct_diff"].tolist() == [-2.0]
    assert tuple(stats.columns) == stat_columns(("feature",))


def _assert_total_is_dense_inverse(graph: Graph, effects: pd.DataFrame) -> None:
    """total[j, t] == ((I - Â)^-1 - I)[t, j] with Â the sign-keeping row-normalised adjacency."""
    layout = GraphLayout.of(graph)
    a = graph.adjacency_matrix.double()
    scale = a.abs().sum(1, keepdim=True)
    normalised = torch.where(scale > 0, a / scale, torch.zeros_like(a))
    identity = torch.eye(layout.n_nodes, dtype=torch.float64)
    series = torch.linalg.solve(identity - normalised, identity) - identity
    expected = series[layout.logit_start :, : layout.n_features].T.reshape(-1)
    np.testing.assert_allclose(effects["total"].to_numpy(), expected.numpy(), atol=1e-5, rtol=1e-4)
