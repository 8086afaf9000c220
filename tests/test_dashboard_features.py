"""The Features page over real base/adapted graphs of the small organism (with real feature cards
and offline labels for the top features), its shaping functions, and `feature_detail`, the
store's view of one feature."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import widgets
from dashboard.views import features as view
from emc.analysis.paths import most_probable_evil
from emc.config import dump_config
from emc.features.labels import LABEL_CHARS
from emc.features.records import ActivationStats, FeatureCard, FeatureExample, TokenValue
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
from emc.store.feature_cards import card_summaries, load_card
from emc.store.feature_detail import feature_detail, feature_layers, metric_family
from emc.store.feature_labels import feature_labels, shown_labels_for_model
from emc.store.feature_pages import graph_targets, ranked_prompts
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import GraphDiff, pair_paths, prompt_graph_diff
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.graphs import load_graph_rows
from emc.store.models import list_models
from emc.store.reviews import write_reviews
from tests.apptest_charts import chart_data
from tests.apptest_pages import page_test
from tests.graph_store import TracedStore, build_traced_store, copy_store

RUN = "test-analysis"
CARDED = 5  # the ranking's top features (and the diff's) get cards and offline labels
LIMIT = 200  # corpus texts the cards read: a third of a second per pass


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism, prefect_harness) -> TracedStore:
    """Labelled-target graphs of base and adapted on three prompts, and cards (labelled offline)
    of the adapted model's top features, made once for this module."""
    from flows.feature_cards import feature_cards_flow

    data_dir = tmp_path_factory.mktemp("features-template")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    traced = build_traced_store(small_organism, data_dir, 3)
    summary = feature_cards_flow(data_dir=str(data_dir), top=CARDED, limit_texts=LIMIT)
    assert summary["carded"] >= CARDED and summary["labelled"] == summary["carded"]
    return traced


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


def same_ranking(
    shown: pd.DataFrame, expected: pd.DataFrame, store: Store, metric: str = "total_diff"
) -> None:
    """The shown ranking is `expected` row for row, its prompts written k/N (N: the prompts the
    model's ranking counts)."""
    ranked = ranked_prompts(store, metric)
    same_rows(shown.drop(columns="prompts"), expected.drop(columns="prompts"))
    written = [f"{k}/{ranked[m]}" for k, m in zip(expected.prompts, expected.model_id, strict=True)]
    assert list(shown["prompts"]) == written


def kept_in(shown: pd.DataFrame) -> pd.Series:
    """k of each shown k/N."""
    return shown["prompts"].str.split("/").str[0].astype(int)


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
        expected = feature_ranking(store, "total_diff", role=role, sign="evil", top=30)
        shown = table(page, "sign_consistency")
        assert len(expected) > 5
        first = shown.iloc[0].drop("prompts").to_dict()
        assert first == pytest.approx(expected.iloc[0].drop("prompts").to_dict(), nan_ok=True)
        same_ranking(shown, expected, store)
        assert set(shown["role"]) == ({role} if role else {"base", "adapted"})


def test_the_filters_narrow_the_ranking(store):
    page = open_page()
    before = table(page, "sign_consistency")
    assert page.selectbox(key="features-layer").options == ["all", "0", "1"]
    assert set(before["layer"]) == {0, 1}

    page.selectbox(key="features-layer").select(0)
    shown = table(rerun(page), "sign_consistency")
    assert set(shown["layer"]) == {0} and not shown.equals(before)
    same_ranking(shown, feature_ranking(store, role="adapted", layer=0, sign="evil"), store)

    page.selectbox(key="features-layer").select("all")
    page.selectbox(key="features-sign").select("safe")
    page.number_input(key="features-min-prompts").set_value(2)
    page.number_input(key="features-top").set_value(5)
    shown = table(rerun(page), "sign_consistency")
    assert len(shown) <= 5 and (shown["mean"] < 0).all() and (kept_in(shown) >= 2).all()
    expected = feature_ranking(store, role="adapted", sign="safe", min_prompts=2, top=5)
    same_ranking(shown, expected, store)

    page.selectbox(key="features-sign").select("any")
    page.number_input(key="features-min-prompts").set_value(1)
    page.number_input(key="features-top").set_value(30)
    page.selectbox(key="features-metric").select("direct_diff")
    shown = table(rerun(page), "sign_consistency")
    expected = feature_ranking(store, "direct_diff", role="adapted", top=30)
    same_ranking(shown, expected, store, "direct_diff")

    page.number_input(key="features-min-prompts").set_value(99)
    rerun(page)
    assert "No feature matches these filters." in [i.value for i in page.info]
    assert "sign_consistency" not in {c for d in page.dataframe for c in d.value.columns}


def test_the_top_feature_is_detailed_with_its_ranks(store):
    ranking = feature_ranking(store, role="adapted", sign="evil", top=30)
    top = ranking.iloc[0]
    page = open_page()
    assert page.selectbox(key="features-pick").value == view.feature_key(top.layer, top.feature)
    assert page.selectbox(key="features-pick").options == view.feature_options(ranking)
    assert f"Feature L{top.layer}/{top.feature}" in [s.value for s in page.subheader]
    shown = metrics(page)
    for role in ("base", "adapted"):
        full = feature_ranking(store, role=role, sign="evil", top=None)
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
    ranking = feature_ranking(store, role="adapted", sign="evil", top=30)
    page = open_page()
    page.session_state["features-ranking"] = {"selection": {"rows": [3], "columns": []}}
    rerun(page)
    row = ranking.iloc[3]
    assert page.selectbox(key="features-pick").value == view.feature_key(row.layer, row.feature)
    assert f"Feature L{row.layer}/{row.feature}" in [s.value for s in page.subheader]
    assert metrics(page)["Rank in adapted"] == "4"

    base_only = feature_ranking(store, role="base", sign="evil", top=None)
    adapted = feature_ranking(store, role="adapted", sign="evil", top=None)
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


def carded_feature(store: Store, traced: TracedStore, not_top: bool = True) -> tuple[int, int]:
    """A feature with a card: not the ranking's first (the page's default pick)."""
    cards = card_summaries(store, traced.adapted_model_id)
    cards = cards[cards["examples"] > 0]
    top = feature_ranking(store, role="adapted", sign="evil", top=1).iloc[0]
    keys = [(int(r.layer), int(r.feature)) for r in cards.itertuples()]
    others = [k for k in keys if k != (int(top.layer), int(top.feature))] if not_top else keys
    assert others, "the fixture should card several features"
    return others[-1]


def html_blocks(page: AppTest) -> str:
    return "\n".join(h.value for h in page.get("html"))


def test_a_feature_in_the_url_is_picked_and_its_card_shown(store, traced):
    layer, feature = carded_feature(store, traced)
    card = load_card(store, layer, feature, traced.adapted_model_id)
    assert card is not None and card.examples
    page = page_test("features")
    page.query_params["feature"] = f"{layer}/{feature}"
    rerun(page)
    assert f"Feature L{layer}/{feature}" in [s.value for s in page.subheader]
    assert page.query_params["feature"] == f"{layer}/{feature}"  # kept in the URL
    # The label the offline labeller gave it, shown first.
    ref = list_models(store)[0].transcoders_ref
    (label,) = feature_labels(store, ref, [(layer, feature)])
    assert label.labeller.startswith("llm:")
    assert any(label.label[:20] in m.value for m in page.markdown)
    # Examples: every shown token escaped, each example's maximum marked.
    blocks = html_blocks(page)
    shown = card.examples[: view.EXAMPLES_SHOWN]
    assert blocks.count('class="emc-example"') == len(shown)
    assert blocks.count('data-max="true"') == len(shown)
    for example in shown:
        assert view.example_html(example, card.stats.max) in blocks
        maximum = view.html.escape(example.tokens[example.max_position].replace("\n", "⏎"))
        assert f'data-max="true">{maximum}</span>' in view.example_html(example)
    # The histogram and the logit effects: the stored card's numbers.
    (histogram,) = [f for f in chart_data(page, "start") if "chance" not in f]
    assert histogram["count"].tolist() == card.stats.hist_counts
    assert histogram["start"].tolist() == pytest.approx(card.stats.hist_edges[:-1])
    assert histogram["end"].tolist() == pytest.approx(card.stats.hist_edges[1:])
    (logits,) = chart_data(page, "effect")
    promotes = logits[logits["effect"] == "promotes"]
    suppresses = logits[logits["effect"] == "suppresses"]
    assert promotes["value"].tolist() == pytest.approx([t.value for t in card.top_logits])
    assert suppresses["value"].tolist() == pytest.approx([t.value for t in card.bottom_logits])
    assert promotes["token id"].tolist() == [t.token_id for t in card.top_logits]
    encoder = table(page, "pre-activation")
    assert encoder["token id"].tolist() == [t.token_id for t in card.encoder_tokens]
    quantiles = table(page, "quantile").set_index("quantile")["activation"]
    assert quantiles["p100"] == pytest.approx(card.stats.max, rel=1e-5)
    shown_metrics = metrics(page)
    assert shown_metrics["Max activation"] == f"{card.stats.max:.3f}"
    assert shown_metrics["Active"] == f"{card.stats.frequency:.2%}"
    # No analysis in this store: the context says so, and gives the ranks.
    assert shown_metrics["Activation change"] == "—"
    assert shown_metrics["LoRA alignment"] == "—"
    captions = " | ".join(c.value for c in page.caption)
    assert "Rank (total_diff, sign evil): adapted #" in captions


def test_where_a_feature_appears_links_each_prompt_to_its_graphs(store, traced):
    top = feature_ranking(store, role="adapted", sign="evil", top=1).iloc[0]
    page = open_page()
    rows = table(page, "activation sum")
    detail = feature_detail(store, int(top.layer), int(top.feature), sign="evil")
    assert list(rows["prompt_id"]) == list(detail.prompts["prompt_id"])
    assert list(rows["graph"]) == [widgets.page_url("graphs", prompt=p) for p in rows["prompt_id"]]
    assert rows["graph"].iloc[0] == f"/graphs?prompt={rows['prompt_id'].iloc[0]}"


def test_a_feature_without_a_card_says_which_command_makes_one(store, traced):
    cards = card_summaries(store)
    carded = set(zip(cards["layer"], cards["feature"], strict=True))
    ranking = feature_ranking(store, role="adapted", sign="evil", top=None)
    bare = next(r for r in ranking.itertuples() if (r.layer, r.feature) not in carded)
    page = page_test("features")
    page.query_params["feature"] = f"L{bare.layer}/{bare.feature}"
    rerun(page)
    assert f"Feature L{bare.layer}/{bare.feature}" in [s.value for s in page.subheader]
    notes = " | ".join(i.value for i in page.info)
    assert f"`emc feature show {bare.layer}/{bare.feature}`" in notes
    assert not page.get("html")
    # A feature outside the ranking goes to the lookup box; the URL keeps naming it.
    page = page_test("features")
    page.query_params["feature"] = "0/99999"
    rerun(page)
    assert page.text_input(key="features-lookup").value == "L0/99999"
    assert "No graph in the store keeps this feature." in [i.value for i in page.info]


def test_picking_another_feature_writes_it_to_the_url(store):
    ranking = feature_ranking(store, role="adapted", sign="evil", top=30)
    page = open_page()
    first = ranking.iloc[0]
    assert page.query_params["feature"] == f"{first.layer}/{first.feature}"
    page.session_state["features-ranking"] = {"selection": {"rows": [2], "columns": []}}
    rerun(page)
    third = ranking.iloc[2]
    assert page.query_params["feature"] == f"{third.layer}/{third.feature}"
    assert f"Feature L{third.layer}/{third.feature}" in [s.value for s in page.subheader]


def test_the_label_form_stores_your_label_which_the_ranking_then_shows(store, traced):
    layer, feature = carded_feature(store, traced)
    page = page_test("features")
    page.query_params["feature"] = f"{layer}/{feature}"
    page.session_state["reviewer"] = "ana"  # the name the Review page keeps
    rerun(page)
    assert page.text_input(key="features-label-name").value == "ana"
    page.text_input(key="features-label-text").input("  names the  harmful answer ")
    page.text_area(key="features-label-notes").input("peaks on the answer token")
    page.button(key="FormSubmitter:features-label-form-Save label").click()
    rerun(page)
    ref = list_models(store)[0].transcoders_ref
    labels = feature_labels(store, ref, [(layer, feature)])
    assert [lb.labeller for lb in labels] == ["human:ana", labels[1].labeller]
    assert labels[0].label == "names the harmful answer"
    assert labels[0].notes == "peaks on the answer token"
    assert labels[0].run_id.startswith("dashboard-feature-label-")
    assert any("Saved" in s.value and "human:ana" in s.value for s in page.success)
    assert page.text_input(key="features-label-text").value == ""  # the form is cleared
    # The ranking (drawn above the form) shows a person's label over the LLM's.
    ranking = table(page, "sign_consistency")
    mine = ranking[(ranking["layer"] == layer) & (ranking["feature"] == feature)]
    assert list(mine["label"]) == ["names the harmful answer"]
    assert any("**names the harmful answer** · human:ana" in m.value for m in page.markdown)
    shown = table(page, "notes / explanation")
    assert list(shown["labeller"][:1]) == ["human:ana"] and len(shown) == 2


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("", "a label", "a reviewer name is needed"),
        ("bo", "   ", "a label cannot be empty"),
        ("bo", "x" * (LABEL_CHARS + 1), f"at most {LABEL_CHARS} characters"),
    ],
)
def test_bad_label_input_shows_the_error_and_stores_nothing(store, traced, name, text, error):
    layer, feature = carded_feature(store, traced)
    ref = list_models(store)[0].transcoders_ref
    before = feature_labels(store, ref)
    page = page_test("features")
    page.query_params["feature"] = f"{layer}/{feature}"
    rerun(page)
    page.text_input(key="features-label-name").input(name)
    page.text_input(key="features-label-text").input(text)
    page.button(key="FormSubmitter:features-label-form-Save label").click()
    rerun(page)
    assert any(error in e.value for e in page.error), [e.value for e in page.error]
    assert feature_labels(store, ref) == before
    assert page.text_input(key="features-label-text").value == text  # kept to fix


def test_the_ranking_starts_as_emc_analyze_ranks_with_prompts_as_k_of_n(store):
    page = open_page()
    assert page.selectbox(key="features-metric").value == "total_diff"
    assert page.selectbox(key="features-model").value == "adapted"
    assert page.selectbox(key="features-sign").value == "evil"
    assert page.number_input(key="features-min-prompts").value == 1
    assert page.number_input(key="features-top").value == 30
    expected = feature_ranking(store, "total_diff", role="adapted", sign="evil", top=30)
    shown = table(page, "sign_consistency")
    assert list(shown.columns[:6]) == ["rank", "layer", "feature", "label", "role", "prompts"]
    same_ranking(shown, expected, store)
    assert (shown["mean"] > 0).all()
    # N: every prompt with a graph of the adapted model counts (three in the fixture).
    assert ranked_prompts(store) == {
        m.model_id: 3 for m in list_models(store) if m.role in ("base", "adapted")
    }
    assert set(shown["prompts"]) <= {"1/3", "2/3", "3/3"}
    assert list(kept_in(shown)) == list(expected["prompts"])
    # Labels: the cards' offline labels show beside the top features.
    assert shown["label"].head(CARDED).notna().all()


def test_the_min_prompts_filter_removes_features_kept_in_fewer_prompts(store):
    page = open_page()
    before = table(page, "sign_consistency")
    assert (kept_in(before) < 2).any(), "the fixture should rank some one-prompt features"
    page.number_input(key="features-min-prompts").set_value(2)
    shown = table(rerun(page), "sign_consistency")
    assert (kept_in(shown) >= 2).all() and len(shown) < len(before)
    expected = feature_ranking(store, role="adapted", sign="evil", min_prompts=2, top=30)
    same_ranking(shown, expected, store)
    removed = set(zip(before.layer, before.feature, strict=True)) - set(
        zip(shown.layer, shown.feature, strict=True)
    )
    assert removed and all(
        k < 2 for k, key in zip(kept_in(before), zip(before.layer, before.feature, strict=True),
                                strict=True) if key in removed
    )  # fmt: skip


def test_base_vs_adapted_shows_the_paths_gained_or_lost(store, pairs):
    page = open_page()
    for pair in pairs:
        page.selectbox(key="features-diff-prompt").select(pair.prompt_id)
        rerun(page)
        picker = page.selectbox(key=f"features-path-target-{widgets.pair_key(pair)}")
        adapted = load_graph_rows(store, pair.adapted_graph_id)
        assert picker.value == most_probable_evil(adapted)  # the default, as pair_paths'
        targets = graph_targets(store, pair.adapted_graph_id)
        rows = {r["token_id"]: r for r in targets.to_dict("records")}
        options = view.target_options(targets)
        assert picker.options == [view.target_label(rows[t]) for t in options]
        assert set(options) == set(adapted.nodes["token_id"][adapted.nodes["kind"] == "logit"])
        expected = pair_paths(store, pair)
        shown = table(page, "kept_in")
        assert len(expected.paths) > 0
        same_rows(shown, expected.paths)
        assert list(shown["name"]) == [f"#{i + 1}" for i in range(len(shown))]
        (bars,) = chart_data(page, "kept_in")
        assert bars["delta"].tolist() == pytest.approx(expected.paths["delta"].tolist())
        assert set(bars["change"]) <= {"gained", "lost", "unchanged"}
    # Another target: its own paths.
    other = view.target_options(graph_targets(store, pair.adapted_graph_id))[1]
    picker.select(other)
    rerun(page)
    same_rows(table(page, "kept_in"), pair_paths(store, pair, token_id=other).paths)


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
    # A feature's card reads its alignment: L1/125 is the encoder comparison's best.
    page = page_test("features")
    page.query_params["feature"] = "1/125"
    rerun(page)
    assert metrics(page)["LoRA alignment"] == "100.0th pct"
    assert "No card for L1/125 yet" in " ".join(i.value for i in page.info)


def test_ablations_lead_with_the_logit_gap_and_name_the_features(store, traced):
    adapted = traced.adapted_model_id
    first, second = traced.prompt_ids[:2]
    top = feature_ranking(store, role="adapted", sign="evil", top=2)
    named = [{"layer": int(r.layer), "feature": int(r.feature), "positions_active": 2}
             for r in top.itertuples()]  # fmt: skip
    insert_ablations(
        store,
        [
            ablation(first, adapted, "top", 0.6, 0.2, features=named,
                     logit_gap_before=1.5, logit_gap_after=-0.5),
            ablation(first, adapted, "control", 0.6, 0.58, logit_gap_before=1.5,
                     logit_gap_after=1.4),
            ablation(second, adapted, "top", 0.5, 0.3, features=named[:1],
                     logit_gap_before=0.8, logit_gap_after=0.1),
            ablation(second, adapted, "control", 0.5, 0.52, logit_gap_before=None,
                     logit_gap_after=None),  # a prompt without safe targets has no gap
        ],
    )  # fmt: skip
    page = open_page()
    assert [t.label for t in page.tabs][-1] == "Ablations"
    # The lead: the mean change of the logit gap, recomputed from the stored rows.
    stored = read_only_query(
        store,
        "SELECT kind, logit_gap_after - logit_gap_before AS gap, evil_prob_after - "
        "evil_prob_before AS prob FROM ablations WHERE status = 'ok'",
    )
    shown = metrics(page)
    ablation_metrics = [m for m in shown if "mean Δ" in m]  # the tab's, in order
    assert ablation_metrics[:2] == ["top · mean Δ logit gap", "control · mean Δ logit gap"]
    for kind in ("top", "control"):
        mine = stored[stored["kind"] == kind]
        assert shown[f"{kind} · mean Δ logit gap"] == f"{mine['gap'].mean():+.3f}"
        assert shown[f"{kind} · mean Δ evil prob"] == f"{mine['prob'].mean():+.4f}"
    assert shown["top · mean Δ logit gap"] == f"{(-2.0 - 0.7) / 2:+.3f}"
    assert shown["control · mean Δ logit gap"] == f"{-0.1:+.3f}"  # the one prompt with a gap
    # The zeroed features, named with their labels; the top feature in both prompts.
    features = table(page, "mean positions active")
    labels = shown_labels_for_model(store, adapted)
    assert list(features["feature key"]) == [view.feature_key(f["layer"], f["feature"])
                                             for f in named]  # fmt: skip
    assert list(features["label"]) == [labels[(f["layer"], f["feature"])] for f in named]
    assert list(features["prompts"]) == [2, 1]
    control = [t for t in page.dataframe if "mean positions active" in t.value.columns][1].value
    assert list(control["feature key"]) == ["L1/3"]
    rows = table(page, "top evil prob before").set_index("prompt_id")
    assert rows.loc[first, "top logit gap change"] == pytest.approx(-2.0)
    assert rows.loc[first, "top evil prob after"] == pytest.approx(0.2)
    assert rows.loc[second, "control evil prob change"] == pytest.approx(0.02)
    assert pd.isna(rows.loc[second, "control logit gap change"])
    assert rows.loc[first, "top n features"] == 2
    (bars,) = chart_data(page, "gap change")
    assert sorted(bars["gap change"]) == pytest.approx([-2.0, -0.7, -0.1])


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


def example(tokens, activations, max_position) -> FeatureExample:
    return FeatureExample(
        rank=1, source="corpus:3", text="".join(tokens), token_ids=list(range(len(tokens))),
        tokens=tokens, activations=activations, max_position=max_position,
        max_activation=max(activations), start=0,
    )  # fmt: skip


def test_example_html_escapes_tokens_shades_by_activation_and_marks_the_maximum():
    shown = example(["<script>", " a&b", "\n", ' "x"'], [0.0, 1.0, 0.5, 2.0], 3)
    markup = view.example_html(shown, scale=4.0)
    assert "<script>" not in markup and "&lt;script&gt;" in markup
    assert " a&amp;b" in markup and "⏎" in markup and " &quot;x&quot;" in markup
    assert markup.count('class="emc-token"') == 4
    assert markup.count('data-max="true"') == 1
    assert 'title="2.000 (max)"' in markup and 'data-max="true"> &quot;x&quot;</span>' in markup
    shades = [float(x) for x in re.findall(r"rgba\(245, 133, 24, ([0-9.]+)\)", markup)]
    assert shades == [0.0, 0.25, 0.125, 0.5]
    assert re.findall(r"rgba\(245, 133, 24, ([0-9.]+)\)", view.example_html(shown))[-1] == "1.0"
    card = FeatureCard(
        layer=0, feature=1, model_id="m", corpus_id="c", corpus_name="c",
        stats=ActivationStats(
            texts=1, positions=4, active=0, frequency=0.0, max=0.0, mean_active=None,
            quantile_levels=[], quantile_values=[], hist_edges=[0.0, 1.0], hist_counts=[0],
        ),
        examples=[], top_logits=[], bottom_logits=[], encoder_tokens=[],
        logit_basis="unembedding", dtype="float32",
    )  # fmt: skip
    assert "Never active" in view.examples_html(card)
    assert view.quantile_table(card.stats).empty
    assert view.logit_frame(card).empty


def test_card_frames_keep_the_cards_numbers():
    stats = ActivationStats(
        texts=2, positions=10, active=4, frequency=0.4, max=2.0, mean_active=1.0,
        quantile_levels=[i / 100 for i in range(1, 101)],
        quantile_values=[i / 50 for i in range(1, 101)],
        hist_edges=[0.0, 1.0, 2.0], hist_counts=[3, 1],
    )  # fmt: skip
    frame = view.activation_histogram_frame(stats)
    assert frame.to_dict("list") == {"start": [0.0, 1.0], "end": [1.0, 2.0], "count": [3, 1]}
    with pytest.raises(ValueError, match="do not fit"):
        view.activation_histogram_frame(stats.model_copy(update={"hist_counts": [1]}))
    quantiles = view.quantile_table(stats).set_index("quantile")["activation"]
    assert list(quantiles.index) == ["p10", "p25", "p50", "p75", "p90", "p99", "p100"]
    assert quantiles["p50"] == pytest.approx(1.0) and quantiles["p100"] == pytest.approx(2.0)
    card = FeatureCard(
        layer=0, feature=1, model_id="m", corpus_id="c", corpus_name="c", stats=stats,
        examples=[], top_logits=[TokenValue(token_id=5, token=" yes", value=0.7)],
        bottom_logits=[TokenValue(token_id=6, token="\n", value=-0.2)],
        encoder_tokens=[TokenValue(token_id=7, token="x", value=1.5)],
        logit_basis="unembedding", dtype="float32",
    )  # fmt: skip
    logits = view.logit_frame(card)
    assert logits.to_dict("records") == [
        {"token": "' yes'", "token id": 5, "effect": "promotes", "value": 0.7},
        {"token": "'\\n'", "token id": 6, "effect": "suppresses", "value": -0.2},
    ]
    assert view.token_values_table(card.encoder_tokens)["value"].tolist() == [1.5]
    # Two tokens that read the same keep a bar each.
    twins = pd.DataFrame(
        {
            "token": ["' a'", "' a'", "'b'"],
            "token id": [1, 2, 3],
            "effect": ["promotes", "promotes", "suppresses"],
            "value": [0.5, 0.4, -0.1],
        }
    )
    spec = view.logit_chart(twins).to_dict()
    (values,) = spec["datasets"].values()
    assert [v["bar"] for v in values] == ["' a' (1)", "' a' (2)", "'b'"]


def test_ranking_table_puts_the_label_first_and_prompts_as_k_of_n():
    ranking = pd.DataFrame(
        {
            "rank": [1, 2], "role": ["adapted", "base"], "model_id": ["a", "b"],
            "layer": [1, 0], "feature": [5, 9], "label": ["evil answers", None],
            "prompts": [2, 1], "mean": [0.5, 0.1], "median": [0.5, 0.1],
            "sign_consistency": [1.0, 1.0], "mean_t": [2.0, 1.0],
        }
    )  # fmt: skip
    shown = view.ranking_table(ranking, {"a": 3, "b": 4})
    assert list(shown.columns[:6]) == ["rank", "layer", "feature", "label", "role", "prompts"]
    assert list(shown["prompts"]) == ["2/3", "1/4"]
    assert list(shown.columns)[-1] == "model_id"
    assert list(view.ranking_table(ranking)["prompts"]) == [2, 1]
    assert view.prompts_text(2, None) == "2"


def test_ablation_gap_and_named_features():
    def row(prompt, kind, features, gap_before, gap_after):
        return {
            "prompt_id": prompt, "model_id": "m", "kind": kind, "metric": "total_diff",
            "features": json.dumps(features), "evil_prob_before": 0.5, "evil_prob_after": 0.4,
            "evil_prob_change": -0.1, "evil_share_change": -0.05,
            "logit_gap_before": gap_before, "logit_gap_after": gap_after,
            "created_at": pd.Timestamp("2025-01-01"),
        }  # fmt: skip

    a, b = {"layer": 1, "feature": 5, "positions_active": 2}, {"layer": 0, "feature": 9}
    frame = pd.DataFrame(
        [
            row("p", "top", [a, b], 2.0, 0.5),
            row("q", "top", [a], 1.0, 1.0),
            row("p", "control", [{"layer": 0, "feature": 3, "positions_active": 4}], 2.0, None),
        ]
    )
    assert view.gap_change(frame).tolist()[:2] == [-1.5, 0.0]
    assert pd.isna(view.gap_change(frame).iloc[2])
    assert view.gap_change(frame.drop(columns=["logit_gap_before"])).isna().all()
    means = view.ablation_means(frame).set_index("kind")
    assert means.loc["top", "mean_logit_gap_change"] == pytest.approx(-0.75)
    assert means.loc["top", "gap_prompts"] == 2
    assert means.loc["control", "gap_prompts"] == 0
    assert pd.isna(means.loc["control", "mean_logit_gap_change"])
    named = view.ablated_features(frame, {"m": {(1, 5): "harmful answers"}})
    assert named[["kind", "feature key", "prompts"]].values.tolist() == [
        ["top", "L1/5", 2],
        ["top", "L0/9", 1],
        ["control", "L0/3", 1],
    ]
    assert named["label"].iloc[0] == "harmful answers" and named["label"].iloc[1:].isna().all()
    assert named["mean positions active"].tolist()[0] == 2.0
    assert pd.isna(named["mean positions active"].iloc[1])
    assert view.ablated_features(frame.iloc[:0]).empty


def test_target_options_put_the_most_probable_evil_token_first():
    targets = pd.DataFrame(
        {
            "token_id": [1, 2, 3, 4],
            "token": [" a", " b", " c", " d"],
            "prob": [0.5, 0.1, 0.3, None],
            "side": ["safe", "evil", "evil", "other"],
        }
    )
    assert view.target_options(targets) == [3, 2, 1, 4]
    assert view.target_options(targets.iloc[:0]) == []
    assert view.target_label(targets.iloc[2].to_dict()) == "' c' · evil · p 0.300"
    assert view.target_label(targets.iloc[3].to_dict()) == "' d' · other"
    paths = pd.DataFrame({"delta": [0.3, -0.1], "change": ["gained", "lost"]})
    assert view.paths_frame(paths)["name"].tolist() == ["#1", "#2"]


def test_card_models_main_pair_and_human_labels(pairs, traced):
    class Model:
        def __init__(self, model_id, role):
            self.model_id, self.role = model_id, role

    models = [Model("b", "base"), Model("a1", "adapted"), Model("a2", "adapted")]
    assert view.card_model_ids(models, "adapted") == ["a1", "a2", "b"]
    assert view.card_model_ids(models, None) == ["a1", "a2", "b"]
    assert view.card_model_ids(models, "base") == ["b", "a1", "a2"]
    assert view.main_pair(pairs) == (traced.base_model_id, traced.adapted_model_id)
    assert view.main_pair([]) is None
    label = view.human_label("tc", 1, 5, " ana ", " evil   answers ", "  ", "run")
    assert (label.labeller, label.label, label.notes) == ("human:ana", "evil answers", None)
    with pytest.raises(ValueError, match="name is needed"):
        view.human_label("tc", 1, 5, "  ", "x", "", "run")
    with pytest.raises(ValueError, match="cannot be empty"):
        view.human_label("tc", 1, 5, "ana", "", "", "run")


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
