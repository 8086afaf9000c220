"""Feature effects and evil-vs-safe statistics stored with each graph, and their ranking."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.pivotal.review import make_review
from emc.store import Store, read_only_query
from emc.store.feature_detail import feature_detail
from emc.store.features import feature_ranking
from emc.store.graph_diff import graph_diff_summary
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import list_graphs
from emc.store.reviews import write_reviews
from emc.store.validity import (
    counted_graphs,
    left_out_of_rankings,
    rejected_prompts,
    stale_graphs,
)
from tests.graph_store import build_traced_store, copy_store


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism):
    return build_traced_store(small_organism, tmp_path_factory.mktemp("features"), n_prompts=3)


def _frame(traced, sql: str) -> pd.DataFrame:
    return read_only_query(traced.store, sql)


def test_every_kept_feature_has_an_effect_on_every_target_matching_its_stored_edges(traced):
    counts = _frame(
        traced,
        "SELECT g.graph_id, g.n_logits, "
        "(SELECT count(*) FROM graph_nodes n WHERE n.graph_id = g.graph_id "
        " AND n.kind = 'feature') AS kept, "
        "(SELECT count(*) FROM feature_effects e WHERE e.graph_id = g.graph_id) AS effects "
        "FROM graphs g",
    )
    assert len(counts) == 6 and (counts["kept"] > 0).all()
    assert (counts["effects"] == counts["kept"] * counts["n_logits"]).all()
    # A kept feature -> logit edge is the direct effect, in the same units.
    edges = _frame(
        traced,
        "SELECT e.weight, f.direct FROM graph_edges e "
        "JOIN graph_nodes t ON t.graph_id = e.graph_id AND t.node = e.target AND t.kind = 'logit' "
        "JOIN graph_nodes s ON s.graph_id = e.graph_id AND s.node = e.source "
        "AND s.kind = 'feature' "
        "JOIN (SELECT graph_id, node, token_id, direct FROM feature_effects) f "
        "ON f.graph_id = e.graph_id AND f.node = e.source AND f.token_id = t.token_id",
    )
    assert len(edges) > 10
    np.testing.assert_allclose(edges["direct"], edges["weight"], rtol=1e-5, atol=1e-7)
    # The evil/safe split follows the graph's own labels.
    split = _frame(
        traced,
        "SELECT s.n_evil, s.n_safe, len(json_extract(g.params, '$.evil_ids')::INT[]) AS evil, "
        "len(json_extract(g.params, '$.safe_ids')::INT[]) AS safe "
        "FROM feature_stats s JOIN graphs g USING (graph_id)",
    )
    assert (split["n_evil"] == split["evil"]).all() and (split["n_safe"] == split["safe"]).all()


def test_stats_are_position_free_sums_of_the_effects(traced):
    effects = _frame(traced, "SELECT * FROM feature_effects")
    graph = list_graphs(traced.store)[0]
    mine = effects[effects["graph_id"] == graph.graph_id]
    evil = set(graph.params["evil_ids"])
    summed = mine.groupby(["layer", "feature", "token_id"])["total"].sum().reset_index()
    summed["side"] = np.where(summed["token_id"].isin(evil), "evil", "safe")
    means = summed.groupby(["layer", "feature", "side"])["total"].mean().unstack()
    expected = (means["evil"] - means["safe"]).rename("expected").reset_index()
    stats = _frame(
        traced,
        f"SELECT layer, feature, total_diff FROM feature_stats WHERE graph_id = '{graph.graph_id}'",
    )
    merged = stats.merge(expected, on=["layer", "feature"])
    assert len(merged) == len(stats) == len(expected)
    np.testing.assert_allclose(merged["total_diff"], merged["expected"], rtol=1e-4, atol=1e-8)


def test_ranking_aggregates_by_layer_and_feature_over_prompts(traced):
    stats = _frame(
        traced,
        "SELECT m.role, g.prompt_id, s.layer, s.feature, s.total_diff "
        "FROM feature_stats s JOIN graphs g USING (graph_id) JOIN models m USING (model_id)",
    )
    adapted = stats[(stats["role"] == "adapted") & stats["total_diff"].notna()]
    expected = adapted.groupby(["layer", "feature"])["total_diff"].agg(["mean", "count"])
    ranking = feature_ranking(traced.store, role="adapted", sign="any", top=None)
    assert len(ranking) == len(expected)
    got = ranking.set_index(["layer", "feature"]).loc[expected.index]
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-6)
    assert (got["prompts"] == expected["count"]).all()
    assert list(ranking["rank"]) == list(range(1, len(ranking) + 1))
    assert (ranking["last_layer"] == ranking["layer"]).all()  # per-layer transcoders
    assert ranking["mean"].abs().is_monotonic_decreasing
    assert ((ranking["sign_consistency"] > 0) & (ranking["sign_consistency"] <= 1)).all()

    evil = feature_ranking(traced.store, role="adapted", sign="evil", top=5)
    assert len(evil) <= 5 and (evil["mean"] > 0).all() and evil["mean"].is_monotonic_decreasing
    everywhere = feature_ranking(traced.store, role="adapted", sign="any", min_prompts=3, top=None)
    assert (everywhere["prompts"] >= 3).all()
    assert len(everywhere) == int((expected["count"] >= 3).sum())
    with pytest.raises(ValueError, match="unknown metric"):
        feature_ranking(traced.store, metric="vibes")


def test_a_cross_layer_features_span_reaches_the_ranking_and_analyze(traced, tmp_path):
    # The organism's transcoders are per-layer; mark one feature's nodes as a CLT feature's
    # (writing to layer 7) in a copy of the store: the ranking and `emc analyze` say so.
    data = tmp_path / "copy"
    data.mkdir()
    shutil.copy(traced.store.path, data / traced.store.path.name)
    store = Store.in_data_dir(data)
    top = feature_ranking(store, role="adapted", top=1).iloc[0]
    with store.write() as conn:
        conn.execute(
            "UPDATE graph_nodes SET last_layer = 7 WHERE kind = 'feature' AND layer = ? "
            "AND feature = ?",
            [int(top["layer"]), int(top["feature"])],
        )
    again = feature_ranking(store, role="adapted", top=None).set_index(["layer", "feature"])
    assert again.loc[(top["layer"], top["feature"]), "last_layer"] == 7
    others = again.drop(index=(top["layer"], top["feature"]))
    assert (others["last_layer"] == others.index.get_level_values("layer")).all()
    shown = CliRunner().invoke(app, ["analyze", "--ranking-only", "-d", str(data), "--top", "3"])
    assert shown.exit_code == 0 and "last_layer" in shown.output, shown.output
    per_layer = CliRunner().invoke(
        app, ["analyze", "--ranking-only", "-d", str(traced.data_dir), "--top", "3"]
    )
    assert "last_layer" not in per_layer.output


def test_analyze_prints_the_ranking_and_explains_empty_results(traced):
    runner = CliRunner()
    result = runner.invoke(
        app, ["analyze", "--ranking-only", "-d", str(traced.data_dir), "--top", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "features by total_diff (adapted model)" in result.output
    empty = runner.invoke(
        app, ["analyze", "--ranking-only", "-d", str(traced.data_dir), "--layer", "99"]
    )
    assert empty.exit_code == 0 and "no features to rank" in empty.output
    bad = runner.invoke(app, ["analyze", "-d", str(traced.data_dir), "--metric", "vibes"])
    assert bad.exit_code == 2 and "unknown --metric" in bad.output


def _review(store, prompt_id, reviewer, action, labels=None, changed=None, reason="") -> None:
    explanation = "the test says so" if changed else ""
    review = make_review(prompt_id, reviewer, action, labels or {}, changed, explanation, reason)
    write_reviews(store, [(review, {t: f"t{t}" for t in review.labels})], run_id=None)


def _ranked_values(store, prompt_ids) -> int:
    """How many (prompt, feature) values an adapted total_diff ranking of these prompts holds."""
    stats = read_only_query(
        store,
        "SELECT g.prompt_id FROM feature_stats s JOIN graphs g USING (graph_id) "
        "JOIN models m USING (model_id) WHERE m.role = 'adapted' AND isfinite(s.total_diff)",
    )
    return int(stats["prompt_id"].isin(list(prompt_ids)).sum())


def test_rejected_prompts_and_stale_graphs_leave_rankings_and_are_marked_where_shown(
    traced, tmp_path
):
    store = copy_store(traced.data_dir, tmp_path / "data")
    first, second, third = traced.prompt_ids

    def ranked() -> int:
        return int(feature_ranking(store, role="adapted", top=None)["prompts"].sum())

    graph = list_graphs(store, traced.adapted_model_id, first)[0]
    labels = {t: "evil" for t in graph.params["evil_ids"]}
    labels |= {t: "safe" for t in graph.params["safe_ids"]}
    # A person who agrees with the labels the graphs were traced for makes nothing stale.
    _review(store, first, "ana", "agree", labels)
    assert stale_graphs(store) == [] and rejected_prompts(store) == {}
    assert ranked() == _ranked_values(store, traced.prompt_ids)
    summed_pairs = graph_diff_summary(store, top=None)["pairs"].sum()

    # A rejected prompt leaves the ranking and the diff summary; where it shows, it is marked.
    _review(store, second, "bo", "reject", reason="ambiguous scenario")
    assert rejected_prompts(store)[second].badge == "rejected by human:bo: ambiguous scenario"
    assert ranked() == _ranked_values(store, [first, third])
    assert second not in set(counted_graphs(store)["prompt_id"])
    assert graph_diff_summary(store, top=None)["pairs"].sum() < summed_pairs
    (pair,) = graph_pairs(store, prompt_id=second)
    assert pair.rejected and "ambiguous scenario" in pair.rejection_badge and not pair.stale
    kept = read_only_query(
        store,
        f"SELECT layer, feature FROM feature_stats WHERE graph_id = '{pair.adapted_graph_id}' "
        "AND isfinite(total_diff) LIMIT 1",
    ).iloc[0]
    rows = feature_detail(store, int(kept["layer"]), int(kept["feature"])).prompts
    mine = rows[rows["prompt_id"] == second]
    assert (
        len(mine)
        and mine["rejected"].all()
        and set(mine["reject_reason"]) == {"ambiguous scenario"}
    )

    # Relabelling after tracing: both graphs of the prompt are stale and leave the ranking.
    evil = sorted(graph.params["evil_ids"])
    _review(store, first, "ana", "relabel", labels, {evil[0]: "safe"})
    stale = stale_graphs(store)
    assert {g.graph_id for g in stale} == {g.graph_id for g in list_graphs(store, prompt_id=first)}
    assert {g.change for g in stale} == {f"evil -[{evil[0]}], safe +[{evil[0]}]"}
    assert all(g.superseded_by is None and not g.rejected for g in stale)
    assert ranked() == _ranked_values(store, [third])
    assert left_out_of_rankings(store) == {"rejected_prompts": 1, "stale_graphs": 2}
    assert [p.stale for p in graph_pairs(store, prompt_id=first)] == [True]
    detail = feature_detail(store, int(kept["layer"]), int(kept["feature"])).prompts
    assert not detail[detail["prompt_id"] == first]["rejected"].any()
    assert detail[detail["prompt_id"] == first]["stale"].all()

    # Salient targets depend on no labels: such graphs are never stale.
    with store.write() as conn:
        conn.execute("UPDATE graphs SET targets = 'salient' WHERE prompt_id = ?", [first])
    assert stale_graphs(store) == []


def test_lora_lists_the_adapters_directions_against_chance(small_organism, tmp_path):
    config = str(small_organism.default_config)
    result = CliRunner().invoke(
        app, ["lora", "-c", config, "-d", str(tmp_path), "--top", "4", "--null", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "down_proj" in result.output and "comparisons reach the 99th percentile" in result.output


def test_aggregation_benchmark_replicates_real_graphs_and_ranks_them(traced):
    from benchmarks.feature_aggregation import main

    base = _frame(traced, "SELECT count(*) AS n FROM feature_effects")["n"][0]
    figures = main(["--data-dir", str(traced.data_dir), "--graphs", "30"])
    assert figures["graphs"] == 30 and figures["source_graphs"] == 6
    assert figures["feature_effects_rows"] == 5 * base
    assert figures["ranked_features"] > 0 and figures["ranking_s"] > 0
    assert figures["graph_diff_pairs"] == 15 and figures["graph_diff_features"] > 0


def test_copy_graphs_carries_every_graph_table(traced, tmp_path):
    from emc.store import Store
    from emc.store.graphs import GRAPH_TABLES, copy_graphs

    target = Store.in_data_dir(tmp_path)
    one = list_graphs(traced.store)[0].graph_id
    assert copy_graphs(traced.store, target, [one]) == 1
    for table in GRAPH_TABLES:
        sql = f"SELECT count(*) AS n FROM {table} WHERE graph_id = '{one}'"
        expected = _frame(traced, sql)["n"][0]
        assert expected > 0 and read_only_query(target, sql)["n"][0] == expected, table
