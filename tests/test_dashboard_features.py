"""The Features page over real base/adapted graphs of the small organism, its shaping functions,
and `feature_detail`, the store's view of one feature."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import widgets
from dashboard.views import features as view
from emc.pivotal.review import make_review
from emc.store import STORE_FILE_NAME, Store, read_only_query
from emc.store.analysis import (
    AblationFailure,
    AblationRecord,
    insert_ablations,
    lora_comparisons,
    record_failed_ablations,
    replace_forward_diffs,
    replace_lora_geometry,
)
from emc.store.feature_detail import feature_detail, feature_layers, metric_family
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import GraphDiff, prompt_graph_diff
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.reviews import write_reviews
from tests.apptest_charts import chart_data
from tests.apptest_pages import page_test
from tests.graph_store import TracedStore, build_traced_store, copy_store

RUN = "test-analysis"


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    """Labelled-target graphs of base and adapted on three prompts, made once for this module."""
    return build_traced_store(small_organism, tmp_path_factory.mktemp("features-template"), 3)


@pytest.fixture
def store(traced, tmp_path, monkeypatch) -> Store:
    """A private copy of the template store; the page reads the copy."""
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "data"))
    return copy_store(traced.data_dir, tmp_path / "data")


@pytest.fixture(scope="module")
def pairs(traced) -> list[GraphPair]:
    return graph_pairs(traced.store)


def open_page() -> AppTest:
    page = page_test("features").run()
    assert not page.exception
    return page


def rerun(page: AppTest) -> AppTest:
    page.run()
    assert not page.exception
    return page


def metrics(page: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in page.metric}


def table(page: AppTest, column: str) -> pd.DataFrame:
    """The first table on the page with this column."""
    found = [d.value for d in page.dataframe if column in d.value.columns]
    assert found, f"no table with a {column!r} column"
    return found[0]


def tables(page: AppTest) -> int:
    return len(page.dataframe)


def same_rows(shown: pd.DataFrame, expected: pd.DataFrame) -> None:
    columns = list(expected.columns)
    pd.testing.assert_frame_equal(
        shown[columns].reset_index(drop=True),
        expected.reset_index(drop=True),
        check_dtype=False,
    )


def forward_rows(layers: list[int], upstream: set[int], diverged: set[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": layers,
            "rel_diff": [0.2 if layer in diverged else 1e-4 for layer in layers],
            "max_abs_diff": [1.5 if layer in diverged else 0.01 for layer in layers],
            "upstream_of_adapter": [layer in upstream for layer in layers],
            "diverged": [layer in diverged for layer in layers],
        }
    )


def lora_frames(adapter: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two comparisons of one adapter direction (as the analysis flow stores them), top features."""
    edges = np.linspace(-0.2, 0.2, 9)
    comparisons = pd.DataFrame(
        {
            "module": ["model.layers.0.mlp.down_proj"] * 2,
            "kind": ["down_proj"] * 2,
            "module_layer": [0, 0],
            "direction": [0, 0],
            "singular_value": [3.5, 3.5],
            "compared_with": ["encoder", "decoder"],
            "layer": [1, 0],
            "n_features": [1000, 1000],
            "best_feature": [125, 7],
            "best_cosine": [0.41, -0.09],
            "max_abs_cosine": [0.41, 0.09],
            "mean_cosine": [0.001, -0.002],
            "std_cosine": [0.05, 0.05],
            "null_median": [0.12, 0.12],
            "null_q99": [0.16, 0.16],
            "null_percentile": [100.0, 12.5],
            "hist_edges": [edges.tolist()] * 2,
            "hist_counts": [[1, 20, 150, 329, 330, 150, 19, 1], [2, 18, 160, 320, 320, 160, 18, 2]],
            "hist_chance": [[1.5, 19.0, 148.0, 331.5, 331.5, 148.0, 19.0, 1.5]] * 2,
        }
    )
    features = pd.DataFrame(
        {
            "module": ["model.layers.0.mlp.down_proj"] * 4,
            "kind": ["down_proj"] * 4,
            "module_layer": [0] * 4,
            "direction": [0] * 4,
            "singular_value": [3.5] * 4,
            "compared_with": ["encoder", "encoder", "decoder", "decoder"],
            "layer": [1, 1, 0, 0],
            "feature": [125, 30, 7, 8],
            "cosine": [0.41, -0.2, -0.09, 0.08],
            "abs_cosine": [0.41, 0.2, 0.09, 0.08],
            "abs_rank": [1, 2, 1, 2],
            "null_percentile": [100.0, 99.0, 12.5, 5.0],
        }
    )
    return comparisons, features


def ablation(prompt_id: str, model_id: str, kind: str, before: float, after: float, **extra):
    values = {
        "run_id": RUN,
        "prompt_id": prompt_id,
        "model_id": model_id,
        "kind": kind,
        "metric": "total_diff",
        "features": [{"layer": 1, "feature": 125 if kind == "top" else 3, "positions_active": 2}],
        "n_interventions": 2,
        "evil_prob_before": before,
        "evil_prob_after": after,
        "safe_prob_before": 0.2,
        "safe_prob_after": 0.25,
        "evil_share_before": before / (before + 0.2),
        "evil_share_after": after / (after + 0.25),
        "logit_gap_before": 0.5,
        "logit_gap_after": 0.1,
        "dtype": "float32",
    }
    return AblationRecord(**(values | extra))


# The page


def test_without_store_the_page_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "nothing"))
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not (tmp_path / "nothing" / STORE_FILE_NAME).exists()  # reading never creates one


def test_a_store_without_graphs_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not page.tabs and not page.dataframe and not page.metric


def test_the_ranking_table_is_the_stored_ranking_for_each_model_choice(store):
    page = open_page()
    assert [t.label for t in page.tabs] == ["Ranking", "Base vs adapted", "Across prompts"]
    assert page.selectbox(key="features-model").value == "adapted"
    for model, role in view.MODEL_ROLES.items():
        page.selectbox(key="features-model").select(model)
        rerun(page)
        expected = feature_ranking(store, "total_diff", role=role, top=30)
        shown = table(page, "sign_consistency")
        assert len(expected) > 5
        assert shown.iloc[0].to_dict() == pytest.approx(expected.iloc[0].to_dict(), nan_ok=True)
        same_rows(shown, expected)
        assert set(shown["role"]) == ({role} if role else {"base", "adapted"})


def test_the_filters_narrow_the_ranking(store):
    page = open_page()
    before = table(page, "sign_consistency")
    assert page.selectbox(key="features-layer").options == ["all", "0", "1"]
    assert set(before["layer"]) == {0, 1}

    page.selectbox(key="features-layer").select(0)
    shown = table(rerun(page), "sign_consistency")
    assert set(shown["layer"]) == {0} and not shown.equals(before)
    same_rows(shown, feature_ranking(store, role="adapted", layer=0, top=30))

    page.selectbox(key="features-layer").select("all")
    page.selectbox(key="features-sign").select("safe")
    page.number_input(key="features-min-prompts").set_value(2)
    page.number_input(key="features-top").set_value(5)
    shown = table(rerun(page), "sign_consistency")
    assert len(shown) <= 5 and (shown["mean"] < 0).all() and (shown["prompts"] >= 2).all()
    same_rows(shown, feature_ranking(store, role="adapted", sign="safe", min_prompts=2, top=5))

    page.selectbox(key="features-sign").select("any")
    page.number_input(key="features-min-prompts").set_value(1)
    page.number_input(key="features-top").set_value(30)
    page.selectbox(key="features-metric").select("direct_diff")
    shown = table(rerun(page), "sign_consistency")
    same_rows(shown, feature_ranking(store, "direct_diff", role="adapted", top=30))

    page.number_input(key="features-min-prompts").set_value(99)
    rerun(page)
    assert "No feature matches these filters." in [i.value for i in page.info]
    assert "sign_consistency" not in {c for d in page.dataframe for c in d.value.columns}


def test_the_top_feature_is_detailed_with_its_ranks(store):
    ranking = feature_ranking(store, role="adapted", top=30)
    top = ranking.iloc[0]
    page = open_page()
    assert page.selectbox(key="features-pick").value == view.feature_key(top.layer, top.feature)
    assert page.selectbox(key="features-pick").options == view.feature_options(ranking)
    assert f"Feature L{top.layer}/{top.feature}" in [s.value for s in page.subheader]
    shown = metrics(page)
    for role in ("base", "adapted"):
        full = feature_ranking(store, role=role, top=None)
        mine = full[(full["layer"] == top.layer) & (full["feature"] == top.feature)]
        expected = "—" if mine.empty else str(int(mine["rank"].iloc[0]))
        assert shown[f"Rank in {role}"] == expected
    assert shown["Rank in adapted"] == "1"
    # The per-prompt table: one row per graph that kept the feature, with its stored statistics.
    rows = table(page, "activation sum")
    stats = read_only_query(
        store,
        "SELECT g.prompt_id, m.role, s.n_positions, s.total_evil_mean, s.total_safe_mean, "
        "s.total_diff FROM feature_stats s JOIN graphs g USING (graph_id) "
        f"JOIN models m USING (model_id) WHERE s.layer = {top.layer} "
        f"AND s.feature = {top.feature} ORDER BY g.prompt_id, m.role",
    )
    assert len(rows) == len(stats) > 0
    assert list(rows["prompt_id"]) == list(stats["prompt_id"])
    assert list(rows["role"]) == list(stats["role"])
    assert list(rows["positions"]) == list(stats["n_positions"])
    np.testing.assert_allclose(rows["diff"], stats["total_diff"], rtol=1e-6)
    np.testing.assert_allclose(rows["evil mean"], stats["total_evil_mean"], rtol=1e-6)
    assert shown["Prompts that keep it"] == str(stats["prompt_id"].nunique())
    # The bar chart: the same diffs, base and adapted side by side.
    (bars,) = chart_data(page, "diff")
    assert sorted(bars["diff"]) == pytest.approx(sorted(stats["total_diff"]))
    assert set(bars["role"]) == set(stats["role"])
    targets = table(page, "side")
    assert set(targets["side"]) == {"evil", "safe"}


def test_a_click_on_a_ranking_row_or_a_typed_feature_is_detailed(store):
    ranking = feature_ranking(store, role="adapted", top=30)
    page = open_page()
    page.session_state["features-ranking"] = {"selection": {"rows": [3], "columns": []}}
    rerun(page)
    row = ranking.iloc[3]
    assert page.selectbox(key="features-pick").value == view.feature_key(row.layer, row.feature)
    assert f"Feature L{row.layer}/{row.feature}" in [s.value for s in page.subheader]
    assert metrics(page)["Rank in adapted"] == "4"

    base_only = feature_ranking(store, role="base", top=None)
    adapted = feature_ranking(store, role="adapted", top=None)
    keys = set(zip(adapted["layer"], adapted["feature"], strict=True))
    missing = base_only[
        [k not in keys for k in zip(base_only.layer, base_only.feature, strict=True)]
    ]
    assert not missing.empty, "the organism's graphs should keep some features only in base"
    lone = missing.iloc[0]
    page.text_input(key="features-lookup").input(f"l{lone.layer} {lone.feature}")
    rerun(page)
    assert f"Feature L{lone.layer}/{lone.feature}" in [s.value for s in page.subheader]
    assert metrics(page)["Rank in base"] == str(lone["rank"])
    assert metrics(page)["Rank in adapted"] == "—"

    page.text_input(key="features-lookup").input("layer one")
    rerun(page)
    assert "L<layer>/<feature>" in page.warning[0].value


def test_base_vs_adapted_shows_each_prompts_diff(store, pairs):
    page = open_page()
    prompts = page.selectbox(key="features-diff-prompt")
    assert len(prompts.options) == len({p.prompt_id for p in pairs}) == 3
    for pair in pairs:
        page.selectbox(key="features-diff-prompt").select(pair.prompt_id)
        rerun(page)
        diff = prompt_graph_diff(store, pair)
        shown = metrics(page)
        assert shown["Shared"] == str(diff.shared)
        assert shown["Only base"] == str(diff.only_base)
        assert shown["Only adapted"] == str(diff.only_adapted)
        assert diff.shared + diff.only_base + diff.only_adapted == len(diff.features)
        assert shown["First divergent layer"] == "not measured"
        assert not page.error
        changed = table(page, "presence")
        same_rows(changed, view.changed_features(diff.features))
        assert changed["effect_delta"].abs().is_monotonic_decreasing
        (effects,) = chart_data(page, "measure")
        per_layer = effects[effects["measure"] == "effect delta"].set_index("layer")["value"]
        stored = diff.layers.set_index("layer")["effect_delta"]
        assert per_layer.to_dict() == pytest.approx(stored.to_dict())
        shares = chart_data(page, "error_share")[0]
        assert set(shares["model"]) == {"base", "adapted"}
        assert len(shares) == 2 * diff.layers["base_error_share"].notna().sum()


def test_a_rejected_prompt_leaves_the_ranking_and_is_marked_where_it_still_shows(store, pairs):
    rejected = pairs[0]
    review = make_review(rejected.prompt_id, "bo", "reject", {}, reject_reason="off topic")
    write_reviews(store, [(review, {})], run_id=None)
    kept = read_only_query(
        store,
        "SELECT layer, feature FROM feature_stats "
        f"WHERE graph_id = '{rejected.adapted_graph_id}' AND isfinite(total_diff) LIMIT 1",
    ).iloc[0]
    page = open_page()
    captions = " | ".join(c.value for c in page.caption)
    assert "Left out: 1 rejected prompt(s) and 0 stale graph(s)" in captions
    # The feature's per-prompt rows still list the rejected prompt, with its mark and reason.
    page.text_input(key="features-lookup").input(f"L{kept.layer}/{kept.feature}")
    rerun(page)
    rows = table(page, "activation sum")
    marks = rows.set_index("prompt_id")["status"]
    assert set(marks.loc[[rejected.prompt_id]]) == {"⛔ rejected by human:bo: off topic"}
    assert set(marks.drop(rejected.prompt_id, errors="ignore")) <= {""}
    # Base vs adapted: marked in the prompt box, and a red notice above its diff.
    options = page.selectbox(key="features-diff-prompt").options
    assert [o for o in options if widgets.REJECTED_MARK in o] == [
        o for o in options if rejected.prompt_id in o
    ]
    page.selectbox(key="features-diff-prompt").select(rejected.prompt_id)
    rerun(page)
    (error,) = page.error
    assert "rejected by human:bo: off topic" in error.value


def test_a_loading_error_is_shown_loudly(store, pairs):
    pair = pairs[0]
    replace_forward_diffs(
        store,
        pair.prompt_id,
        pair.base_model_id,
        pair.adapted_model_id,
        RUN,
        forward_rows([-1, 0, 1], upstream={-1, 0}, diverged={0, 1}),
        tolerance=1e-3,
        dtype="float32",
    )
    page = open_page()
    page.selectbox(key="features-diff-prompt").select(pair.prompt_id)
    rerun(page)
    # Once for the prompt, once across prompts (with where and how many prompts).
    prompt_error, across = (e.value for e in page.error)
    assert prompt_error == view.LOADING_ERROR
    assert across.startswith("Loading error at L0 (1 prompt):")
    assert metrics(page)["First divergent layer"] == "L0"
    (forward,) = chart_data(page, "rel_diff")
    assert dict(zip(forward["layer"], forward["status"], strict=True)) == {
        -1: "within tolerance",
        0: "loading error",
        1: "diverged",
    }
    # Another prompt of the store is fine on its own.
    other = next(p for p in pairs if p.prompt_id != pair.prompt_id)
    page.selectbox(key="features-diff-prompt").select(other.prompt_id)
    rerun(page)
    assert [e.value for e in page.error] == [across]
    assert metrics(page)["First divergent layer"] == "not measured"


def test_across_prompts_shows_the_summary_and_layer_shares(store):
    page = open_page()
    summary = table(page, "in_both")
    assert len(summary) > 5 and summary["rank"].tolist() == list(range(1, len(summary) + 1))
    assert summary["mean_effect_delta"].abs().is_monotonic_decreasing
    shares = chart_data(page, "error_share")
    assert len(shares) == 2  # one prompt's and the mean over prompts
    mean = read_only_query(
        store,
        "SELECT l.layer, avg(l.error_share) AS share FROM graph_layers l "
        "JOIN graphs g USING (graph_id) JOIN models m USING (model_id) "
        "WHERE m.role = 'adapted' GROUP BY l.layer ORDER BY l.layer",
    )
    adapted = shares[1][shares[1]["model"] == "adapted"].sort_values("layer")
    np.testing.assert_allclose(adapted["error_share"], mean["share"], rtol=1e-6)


def test_lora_geometry_shows_the_comparisons_histogram_and_top_features(store, traced):
    comparisons, features = lora_frames(traced.adapted_model_id)
    replace_lora_geometry(store, traced.adapted_model_id, RUN, comparisons, features)
    page = open_page()
    assert "LoRA geometry" in [t.label for t in page.tabs]
    shown = table(page, "best_feature")
    assert list(shown["null_percentile"]) == [100.0, 12.5]
    assert list(shown["best_feature"]) == [125, 7]
    picker = page.selectbox(key="features-lora")
    assert picker.value == view.comparison_key(lora_comparisons(store).iloc[0])
    assert "100.0th percentile" in picker.options[0]
    (histogram,) = chart_data(page, "chance")
    assert histogram["count"].tolist() == comparisons["hist_counts"][0]
    assert histogram["chance"].tolist() == pytest.approx(comparisons["hist_chance"][0])
    top = table(page, "abs_rank")
    assert list(top["feature"]) == [125, 30]

    stored = lora_comparisons(store)
    decoder = next(r for r in stored.to_dict("records") if r["compared_with"] == "decoder")
    picker.select(view.comparison_key(decoder))
    rerun(page)
    (histogram,) = chart_data(page, "chance")
    assert histogram["count"].tolist() == comparisons["hist_counts"][1]
    assert list(table(page, "abs_rank")["feature"]) == [7, 8]
    assert "±0.160" in " ".join(c.value for c in page.caption)


def test_ablations_show_top_against_control(store, traced):
    adapted = traced.adapted_model_id
    first, second = traced.prompt_ids[:2]
    insert_ablations(
        store,
        [
            ablation(first, adapted, "top", 0.6, 0.2),
            ablation(first, adapted, "control", 0.6, 0.58),
            ablation(second, adapted, "top", 0.5, 0.3),
            ablation(second, adapted, "control", 0.5, 0.52),
        ],
    )
    page = open_page()
    assert [t.label for t in page.tabs][-1] == "Ablations"
    shown = metrics(page)
    assert shown["top · mean Δ evil prob"] == f"{(-0.4 - 0.2) / 2:+.4f}"
    assert shown["control · mean Δ evil prob"] == f"{(-0.02 + 0.02) / 2:+.4f}"
    rows = table(page, "top evil prob before").set_index("prompt_id")
    assert rows.loc[first, "top evil prob after"] == pytest.approx(0.2)
    assert rows.loc[second, "control evil prob change"] == pytest.approx(0.02)
    assert rows.loc[first, "top n features"] == 1
    (bars,) = chart_data(page, "change")
    assert sorted(bars["change"]) == pytest.approx([-0.4, -0.2, -0.02, 0.02])


def test_failed_ablations_are_listed_and_left_out_of_the_numbers(store, traced):
    adapted = traced.adapted_model_id
    first, second = traced.prompt_ids[:2]
    insert_ablations(
        store,
        [ablation(first, adapted, "top", 0.6, 0.2), ablation(first, adapted, "control", 0.6, 0.5)],
    )
    failure = AblationFailure(run_id=RUN, prompt_id=second, model_id=adapted, kind="control",
                              metric="total_diff", features=[], dtype="float32",
                              error="RuntimeError: no active feature")  # fmt: skip
    record_failed_ablations(store, [failure])
    page = open_page()
    assert "The ablation failed on 1 prompt(s)" in page.warning[0].value
    listed = table(page, "error")
    assert listed[["prompt_id", "kind", "error"]].values.tolist() == [
        [second, "control", "RuntimeError: no active feature"]
    ]
    shown = metrics(page)
    assert shown["top · mean Δ evil prob"] == f"{-0.4:+.4f}"  # the first prompt's only
    assert list(table(page, "top evil prob before")["prompt_id"]) == [first]


# Shaping functions


def test_feature_keys_round_trip_and_parse_what_people_type():
    assert view.feature_key(np.int16(1), np.int32(125)) == "L1/125"
    for text in ("L1/125", "l1/125", "1/125", " 1:125 ", "L1 125", "1,125"):
        assert view.parse_feature_key(text) == (1, 125)
    for text in ("", "L1", "one/two", "1/2/3", "L-1/3"):
        assert view.parse_feature_key(text) is None


def test_feature_options_list_each_feature_once_in_rank_order():
    ranking = pd.DataFrame({"layer": [1, 1, 0, 1], "feature": [5, 5, 9, 2]})
    assert view.feature_options(ranking) == ["L1/5", "L0/9", "L1/2"]
    assert view.feature_options(ranking.iloc[:0]) == []


def test_clicked_row_reads_the_tables_selection_state():
    assert view.clicked_row(None) is None
    assert view.clicked_row({"selection": {"rows": [], "columns": []}}) is None
    assert view.clicked_row({"selection": {"rows": [4], "columns": []}}) == 4
    assert view.clicked_row({"other": 1}) is None


def test_shorten_and_prompt_labels():
    assert view.shorten("a  b\nc") == "a b c"
    assert view.shorten("x" * 100, 10) == "x" * 9 + "…"
    assert view.shorten(None) == ""
    frame = pd.DataFrame(
        {"prompt_id": ["p1", "p2", "p3", "p1"], "prompt_name": ["same", "same", None, "same"]}
    )
    assert view.prompt_labels(frame) == {"p1": "same · p1", "p2": "same · p2", "p3": "p3"}


def test_divergence_text_names_the_first_divergent_layer(pairs):
    def diff(forward: pd.DataFrame) -> GraphDiff:
        return GraphDiff(pairs[0], "total_diff", pd.DataFrame(), pd.DataFrame(), forward)

    empty = forward_rows([], set(), set())
    assert view.divergence_text(diff(empty)) == "not measured"
    assert view.divergence_text(diff(forward_rows([-1, 0, 1], set(), set()))) == "none"
    assert view.divergence_text(diff(forward_rows([-1, 0, 1], set(), {1, 0}))) == "L0"
    assert view.divergence_text(diff(forward_rows([-1, 0], {-1}, {-1}))) == "embeddings"


def test_layer_frames_are_long_for_charting():
    layers = pd.DataFrame(
        {
            "layer": [0, 1],
            "base_error_share": [0.1, None],
            "adapted_error_share": [0.2, 0.3],
            "effect_delta": [0.5, -0.25],
            "abs_effect_delta": [0.75, None],
        }
    )
    shares = view.error_share_frame(layers)
    assert shares.to_dict("records") == [
        {"layer": 0, "model": "base", "error_share": 0.1},
        {"layer": 0, "model": "adapted", "error_share": 0.2},
        {"layer": 1, "model": "adapted", "error_share": 0.3},
    ]
    effects = view.layer_effect_frame(layers)
    assert effects.set_index(["layer", "measure"])["value"].to_dict() == {
        (0, "effect delta"): 0.5,
        (1, "effect delta"): -0.25,
        (0, "|effect delta|"): 0.75,
        (1, "|effect delta|"): 0.0,
    }


def test_loading_errors_text_says_where_and_how_many():
    layers = pd.DataFrame({"layer": [-1, 0, 1], "loading_errors": [2, 1, None]})
    assert view.loading_errors_text(layers).startswith(
        "Loading error at embeddings (2 prompts), L0 (1 prompt):"
    )
    assert view.loading_errors_text(layers.assign(loading_errors=0)) is None


def test_forward_frame_draws_exact_zeros_at_a_floor_and_labels_status():
    rows = forward_rows([-1, 0, 1, 2], upstream={-1, 0}, diverged={0, 2}).assign(tolerance=1e-3)
    rows.loc[rows["layer"] == 1, "rel_diff"] = 0.0
    frame = view.forward_frame(rows)
    assert frame["layer"].tolist() == [-1, 0, 1, 2]
    assert frame["where"].tolist() == ["embeddings", "L0", "L1", "L2"]
    assert frame["status"].tolist() == [
        "within tolerance",
        "loading error",
        "within tolerance",
        "diverged",
    ]
    assert frame["identical"].tolist() == [False, False, True, False]
    assert frame.loc[2, "rel_diff"] == 0 and frame.loc[2, "shown"] == pytest.approx(1e-5)
    assert (
        frame.loc[frame["rel_diff"] > 0, "shown"] == frame.loc[frame["rel_diff"] > 0, "rel_diff"]
    ).all()
    spec = view.forward_chart(frame).to_dict()
    assert spec["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"


def test_histogram_frame_pairs_edges_with_counts_and_chance(traced):
    comparisons, _ = lora_frames(traced.adapted_model_id)
    row = comparisons.iloc[0].to_dict()
    frame = view.histogram_frame(row)
    assert len(frame) == 8
    assert frame["start"].iloc[0] == pytest.approx(-0.2) and frame["end"].iloc[-1] == 0.2
    assert (frame["end"] > frame["start"]).all()
    assert frame["count"].sum() == sum(row["hist_counts"])
    spec = view.histogram_chart(frame, 0.16).to_dict()
    assert [layer["mark"]["type"] for layer in spec["layer"]] == ["bar", "line", "rule"]
    with pytest.raises(ValueError, match="do not fit"):
        view.histogram_frame(row | {"hist_edges": row["hist_edges"][:-1]})


def test_comparison_helpers(traced):
    comparisons, features = lora_frames(traced.adapted_model_id)
    ordered = view.comparison_table(comparisons.iloc[::-1])
    assert ordered["compared_with"].tolist() == ["encoder", "decoder"]
    assert "hist_edges" not in ordered
    decoder = comparisons.iloc[1].to_dict()
    assert view.comparison_key(decoder) == "model.layers.0.mlp.down_proj|0|decoder|0"
    stored = decoder | {"adapter_model_id": "a"}
    assert view.comparison_key(stored) == "a|model.layers.0.mlp.down_proj|0|decoder|0"
    assert "12.5th percentile" in view.comparison_label(decoder)
    top = view.comparison_features(features.iloc[::-1], decoder)
    assert top["feature"].tolist() == [7, 8] and top["abs_rank"].tolist() == [1, 2]


def test_ablation_shaping_keeps_the_newest_per_prompt_and_kind():
    def row(prompt, kind, change, created, features=1):
        return {
            "prompt_id": prompt,
            "model_id": "m",
            "kind": kind,
            "metric": "total_diff",
            "features": json.dumps([{"layer": 0, "feature": i} for i in range(features)]),
            "evil_prob_before": 0.5,
            "evil_prob_after": 0.5 + change,
            "evil_prob_change": change,
            "evil_share_change": change / 2,
            "created_at": pd.Timestamp(created),
        }

    frame = pd.DataFrame(
        [
            row("p", "top", -0.1, "2025-01-01"),
            row("p", "top", -0.3, "2025-01-02", features=3),  # a re-run with other features
            row("p", "control", 0.0, "2025-01-02"),
            row("q", "top", -0.2, "2025-01-02"),
        ]
    )
    wide = view.ablation_table(frame).set_index("prompt_id")
    assert wide.loc["p", "top evil prob change"] == pytest.approx(-0.3)
    assert wide.loc["p", "top n features"] == 3
    assert pd.isna(wide.loc["q", "control evil prob change"])
    means = view.ablation_means(frame)
    assert means["kind"].tolist() == ["top", "control"]
    assert means["mean_evil_prob_change"].tolist() == pytest.approx([-0.25, 0.0])
    assert means["prompts"].tolist() == [2, 1]


# feature_detail


def test_feature_detail_matches_the_stored_rows(traced):
    store = traced.store
    for role in ("base", "adapted"):
        top = feature_ranking(store, role=role, top=1).iloc[0]
        detail = feature_detail(store, int(top.layer), int(top.feature))
        assert detail.found and getattr(detail, f"{role}_rank") == 1
        nodes = read_only_query(
            store,
            "SELECT graph_id, count(*) AS positions, sum(activation) AS activation_sum, "
            "max(activation) AS activation_max FROM graph_nodes WHERE kind = 'feature' "
            f"AND layer = {top.layer} AND feature = {top.feature} GROUP BY graph_id",
        ).set_index("graph_id")
        rows = detail.prompts.set_index("graph_id")
        assert sorted(rows.index) == sorted(nodes.index)
        for column in ("positions", "activation_sum", "activation_max"):
            np.testing.assert_allclose(rows[column], nodes.loc[rows.index, column], rtol=1e-6)
        assert rows["prompt_text"].notna().all() and rows["prompt_name"].notna().all()
        np.testing.assert_allclose(rows["value"], rows["diff"])  # total_diff is its own diff

        effects = read_only_query(
            store,
            "SELECT e.graph_id, e.token_id, sum(e.direct) AS direct, sum(e.total) AS total, "
            "json_extract(g.params, '$.evil_ids')::INTEGER[] AS evil "
            "FROM feature_effects e JOIN graphs g USING (graph_id) "
            f"WHERE e.layer = {top.layer} AND e.feature = {top.feature} "
            "GROUP BY ALL ORDER BY e.graph_id, e.token_id",
        )
        targets = detail.targets.sort_values(["graph_id", "token_id"]).reset_index(drop=True)
        assert len(targets) == len(effects)
        np.testing.assert_allclose(targets["direct"], effects["direct"], rtol=1e-6)
        np.testing.assert_allclose(targets["total"], effects["total"], rtol=1e-6)
        expected = [
            "evil" if t in e else "safe"
            for t, e in zip(effects["token_id"], effects["evil"], strict=True)
        ]
        assert targets["side"].tolist() == expected
        # Its diff is the mean effect on evil targets minus that on safe ones.
        means = targets.pivot_table(index="graph_id", columns="side", values="total")
        diffs = (means["evil"] - means["safe"]).reindex(rows.index)
        np.testing.assert_allclose(rows["diff"], diffs, rtol=1e-5, atol=1e-9)


def test_feature_detail_ranks_follow_the_rankings_metric_and_sign(traced):
    store = traced.store
    for metric, sign in (
        ("direct_diff", "any"),
        ("total_cohens_d", "evil"),
        ("total_diff", "safe"),
    ):
        rankings = {
            r: feature_ranking(store, metric, role=r, sign=sign, top=None)
            for r in ("base", "adapted")
        }
        for _, row in rankings["adapted"].head(3).iterrows():
            detail = feature_detail(store, row.layer, row.feature, metric, sign=sign)
            assert detail.adapted_rank == row["rank"]
            assert detail.adapted_ranked == len(rankings["adapted"])
            base = rankings["base"]
            mine = base[(base.layer == row.layer) & (base.feature == row.feature)]
            assert detail.base_rank == (None if mine.empty else int(mine["rank"].iloc[0]))
            family = metric_family(metric)
            stats = read_only_query(
                store,
                f"SELECT {family}_diff AS diff FROM feature_stats "
                f"WHERE layer = {row.layer} AND feature = {row.feature}",
            )
            assert sorted(detail.prompts["diff"]) == pytest.approx(sorted(stats["diff"]))


def test_feature_detail_of_an_unkept_feature_is_empty(traced):
    detail = feature_detail(traced.store, 0, 10**6)
    assert not detail.found and detail.targets.empty
    assert detail.base_rank is None and detail.adapted_rank is None
    assert detail.targets.empty
    assert feature_detail(traced.store, 0, 10**6, targets="labelled").prompts.empty
    with pytest.raises(ValueError, match="unknown metric"):
        feature_detail(traced.store, 0, 1, metric="nope")


def test_metric_families_and_traced_layers(traced):
    assert [metric_family(m) for m in RANKING_METRICS[:4]] == ["total", "total", "direct", "direct"]
    assert metric_family("contrastive_total_weighted") == "total_weighted"
    assert metric_family("direct_weighted_cohens_d") == "direct_weighted"
    assert feature_layers(traced.store) == [0, 1]
