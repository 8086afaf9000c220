"""Base-vs-adapted graph diff over real organism graph pairs, and the analysis tables' writers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from emc.analysis.ground_truth import compare_with_ground_truth
from emc.store import read_only_query
from emc.store.analysis import (
    AblationRecord,
    ablation_results,
    activation_delta_summary,
    insert_ablations,
    measured_prompt_ids,
    replace_activation_deltas,
    replace_forward_diffs,
)
from emc.store.features import feature_ranking
from emc.store.graph_diff import graph_diff_summary, layer_diff_summary, prompt_graph_diff
from emc.store.graph_pairs import graph_pairs
from tests.graph_store import TracedStore, build_traced_store


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    return build_traced_store(small_organism, tmp_path_factory.mktemp("graph-diff"), n_prompts=3)


def _kept(traced: TracedStore, graph_id: str) -> pd.DataFrame:
    return read_only_query(
        traced.store,
        "SELECT layer, feature, sum(activation) AS activation FROM graph_nodes "
        f"WHERE graph_id = '{graph_id}' AND kind = 'feature' GROUP BY ALL",
    )


def test_layer_rows_account_for_every_attributed_feature_and_error(traced):
    layers = read_only_query(traced.store, "SELECT * FROM graph_layers")
    graphs = read_only_query(
        traced.store, "SELECT graph_id, n_active_features, n_features FROM graphs"
    )
    assert set(layers["graph_id"]) == set(graphs["graph_id"])
    per_graph = layers.groupby("graph_id")[["active_features", "features"]].sum()
    joined = per_graph.join(graphs.set_index("graph_id"))
    assert (joined["active_features"] == joined["n_active_features"]).all()
    assert (joined["features"] == joined["n_features"]).all()
    share = layers["error_influence"] / (layers["error_influence"] + layers["feature_influence"])
    assert np.allclose(layers["error_share"], share)
    assert layers["error_share"].between(0, 1).all() and (layers["error_influence"] > 0).all()


def test_prompt_diff_matches_the_stored_rows_of_both_graphs(traced):
    pair = graph_pairs(traced.store)[0]
    diff = prompt_graph_diff(traced.store, pair)
    base = _kept(traced, pair.base_graph_id).set_index(["layer", "feature"])
    adapted = _kept(traced, pair.adapted_graph_id).set_index(["layer", "feature"])
    assert diff.shared == len(base.index.intersection(adapted.index))
    assert diff.only_base == len(base.index.difference(adapted.index))
    assert diff.only_adapted == len(adapted.index.difference(base.index))
    assert diff.only_adapted > 0  # adapted graphs keep more features on the organism

    stats = read_only_query(
        traced.store,
        "SELECT graph_id, layer, feature, total_diff FROM feature_stats "
        f"WHERE graph_id IN ('{pair.base_graph_id}', '{pair.adapted_graph_id}')",
    )
    effect = {(r.graph_id, r.layer, r.feature): r.total_diff for r in stats.itertuples()}
    for row in diff.features.itertuples():
        expected = effect.get((pair.adapted_graph_id, row.layer, row.feature), 0.0)
        expected -= effect.get((pair.base_graph_id, row.layer, row.feature), 0.0)
        assert row.effect_delta == pytest.approx(expected, abs=1e-12)
        if row.presence == "both":
            key = (row.layer, row.feature)
            activation = adapted.loc[key, "activation"] - base.loc[key, "activation"]
            assert row.activation_delta == pytest.approx(activation, rel=1e-5)
    deltas = diff.features["abs_effect_delta"].to_numpy()
    assert (np.diff(deltas) <= 0).all(), "features are listed by |effect delta|"

    layers = diff.layers.set_index("layer")
    stored = read_only_query(
        traced.store, f"SELECT * FROM graph_layers WHERE graph_id = '{pair.adapted_graph_id}'"
    ).set_index("layer")
    assert np.allclose(layers["adapted_error_share"], stored["error_share"])
    assert layers["only_adapted"].sum() == diff.only_adapted
    assert layers["effect_delta"].sum() == pytest.approx(diff.features["effect_delta"].sum())
    assert diff.forward.empty and diff.first_divergent_layer is None and not diff.loading_error


def test_summary_aggregates_the_per_prompt_diffs(traced):
    pairs = graph_pairs(traced.store)
    diffs = [prompt_graph_diff(traced.store, p) for p in pairs]
    summary = graph_diff_summary(traced.store, top=None)
    every = pd.concat([d.features for d in diffs])
    assert len(summary) == every.groupby(["layer", "feature"]).ngroups
    first = summary.iloc[0]
    rows = every[(every["layer"] == first.layer) & (every["feature"] == first.feature)]
    assert first.pairs == len(rows)
    assert first.mean_effect_delta == pytest.approx(rows["effect_delta"].mean())
    assert abs(first.mean_effect_delta) == pytest.approx(summary["mean_effect_delta"].abs().max())
    assert (graph_diff_summary(traced.store, min_pairs=len(pairs), top=None)["pairs"] == 3).all()

    layers = layer_diff_summary(traced.store)
    assert list(layers["layer"]) == [0, 1] and (layers["pairs"] == len(pairs)).all()
    mean_delta = np.mean([d.layers.loc[0, "error_share_delta"] for d in diffs])
    assert layers.loc[0, "error_share_delta"] == pytest.approx(mean_delta)


def test_measurements_replace_earlier_ones_and_flag_a_loading_error(traced):
    pair = graph_pairs(traced.store)[0]
    ids = (pair.prompt_id, pair.base_model_id, pair.adapted_model_id)
    forward = pd.DataFrame(
        {
            "layer": [-1, 0, 1],
            "rel_diff": [0.0, 0.3, 0.5],
            "max_abs_diff": [0.0, 1.0, 2.0],
            "upstream_of_adapter": [True, False, False],
            "diverged": [False, True, True],
        }
    )
    deltas = pd.DataFrame(
        {
            "layer": [0, 1],
            "feature": [3, 4],
            "base_activation": [1.0, 0.0],
            "adapted_activation": [0.5, 2.0],
            "delta": [-0.5, 2.0],
            "base_positions": [1, 0],
            "adapted_positions": [1, 2],
        }
    )
    for _ in range(2):  # a re-run replaces, never duplicates
        replace_forward_diffs(traced.store, *ids, "run-1", forward, 1e-6, "float32")
        replace_activation_deltas(traced.store, *ids, "run-1", deltas)
    assert len(read_only_query(traced.store, "SELECT * FROM forward_diffs")) == 3
    assert measured_prompt_ids(traced.store, *ids[1:]) == {pair.prompt_id}
    diff = prompt_graph_diff(traced.store, pair)
    assert diff.first_divergent_layer == 0 and not diff.loading_error
    summary = activation_delta_summary(traced.store, *ids[1:])
    assert list(summary["feature"]) == [4, 3] and summary["mean_abs_delta"].tolist() == [2.0, 0.5]

    # A difference at the embeddings, upstream of the adapter, is a loading error.
    broken = forward.assign(diverged=[True, True, True])
    replace_forward_diffs(traced.store, *ids, "run-2", broken, 1e-6, "float32")
    diff = prompt_graph_diff(traced.store, pair)
    assert diff.loading_error and diff.first_divergent_layer == -1
    assert layer_diff_summary(traced.store)["loading_errors"].max() == 1
    replace_forward_diffs(traced.store, *ids, "run-3", forward, 1e-6, "float32")


def _ablation(kind: str, before: float, after: float, features=((1, 5),)) -> AblationRecord:
    return AblationRecord(
        run_id="run-1",
        prompt_id="p1",
        model_id="m-adapted",
        kind=kind,
        metric="total_diff",
        features=[{"layer": a, "feature": b, "positions_active": 1} for a, b in features],
        n_interventions=len(features),
        evil_prob_before=before,
        evil_prob_after=after,
        safe_prob_before=0.2,
        safe_prob_after=0.3,
        evil_share_before=before / (before + 0.2),
        evil_share_after=after / (after + 0.3),
        logit_gap_before=1.0,
        logit_gap_after=0.5,
        dtype="float32",
    )


def test_ablations_are_replaced_by_identity_and_feed_the_ground_truth(traced):
    top, control = _ablation("top", 0.6, 0.2), _ablation("control", 0.6, 0.55, ((1, 9),))
    insert_ablations(traced.store, [top, control])
    # A re-run replaces, even when the ranking's top features have changed since.
    insert_ablations(traced.store, [_ablation("top", 0.6, 0.3, ((1, 6),))])
    insert_ablations(traced.store, [_ablation("top", 0.6, 0.25)])
    results = ablation_results(traced.store, "m-adapted")
    assert len(results) == 2
    assert results.set_index("kind").loc["top", "evil_prob_change"] == pytest.approx(-0.35)

    ranking = feature_ranking(traced.store, model_id=traced.adapted_model_id, sign="evil", top=None)
    best = (int(ranking.iloc[0].layer), int(ranking.iloc[0].feature))
    deltas = pd.DataFrame({"rank": [1, 2], "layer": [best[0], 0], "feature": [best[1], 99]})
    lora = pd.DataFrame({"layer": [best[0]], "feature": [best[1]], "null_percentile": [99.5]})
    truth = compare_with_ground_truth(ranking, deltas, lora, results, k=3)
    assert truth.top[0] == best and truth.overlap_changed == [best] and truth.overlap_lora == [best]
    assert truth.delta_ranks[best] == 1
    assert truth.expected_overlap == pytest.approx(3 * 2 / len(ranking))
    assert truth.ablation.top_mean_change == pytest.approx(-0.35)
    assert truth.ablation.control_mean_change == pytest.approx(-0.05)
    assert truth.ablation.top_lowered == 1
    assert truth.ablation.top_mean_gap_change == pytest.approx(-0.5)
    text = truth.markdown()
    assert f"L{best[0]}/{best[1]} #1" in text and "-0.3500" in text and "-0.500" in text
