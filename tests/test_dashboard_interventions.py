"""The Interventions page over causal checks the `interventions` flow made on the small organism,
and its shaping functions."""

from __future__ import annotations

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard.views import interventions as view
from emc.store import STORE_FILE_NAME, Store
from emc.store.interventions import (
    decomposition_summary,
    explained_per_prompt,
    intervention_summary,
    rollout_summary,
)
from emc.store.models import ModelRow
from flows.interventions import interventions_flow
from tests.apptest_charts import chart_data
from tests.apptest_pages import page_test
from tests.behaviour_store import ROLLOUT_SAMPLES, write_config
from tests.graph_store import TracedStore, build_traced_store

N_PROMPTS = 2


@pytest.fixture(scope="module")
def checked(tmp_path_factory, small_organism, prefect_harness) -> TracedStore:
    """Graph pairs of two prompts, then every causal check on them, made once for this module."""
    data_dir = tmp_path_factory.mktemp("interventions-page")
    # Few, short rollouts: the flow's sampling is tested in test_behaviour.py.
    write_config(small_organism, data_dir, continuation_samples=ROLLOUT_SAMPLES)
    traced = build_traced_store(small_organism, data_dir, n_prompts=N_PROMPTS)
    summary = interventions_flow(data_dir=str(data_dir), doses=[1, 5])
    assert summary["measured"] == N_PROMPTS and not summary["failed"]
    return traced


@pytest.fixture
def page(checked, monkeypatch) -> AppTest:
    """The page over the flow's store (reading never writes to it)."""
    monkeypatch.setenv("EMC_DATA_DIR", str(checked.data_dir))
    return open_page()


@pytest.fixture(scope="module")
def pair(checked) -> tuple[str, str]:
    return checked.base_model_id, checked.adapted_model_id


def open_page() -> AppTest:
    page = page_test("interventions").run()
    assert not page.exception
    return page


def table(page: AppTest, *columns: str) -> pd.DataFrame:
    """The first table on the page with these columns."""
    found = [d.value for d in page.dataframe if set(columns) <= set(d.value.columns)]
    assert found, f"no table with columns {columns}"
    return found[0]


def intervention_table(page: AppTest, kind: str) -> pd.DataFrame:
    """The table of interventions that lists this kind (one table per family)."""
    found = [
        d.value
        for d in page.dataframe
        if kind in set(d.value.get("kind", ())) and "examples" not in d.value  # not the rollouts'
    ]
    assert len(found) == 1, f"{len(found)} tables list {kind!r}"
    return found[0]


def shares_of(frame: pd.DataFrame, **where: str) -> float:
    rows = frame
    for column, value in where.items():
        rows = rows[rows[column] == value]
    assert len(rows) == 1, where
    return float(rows["share"].iloc[0])


# The page


def test_without_store_the_page_says_to_run_the_causal_checks(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "nothing"))
    page = open_page()
    assert "emc patch" in page.info[0].value and "emc intervene" in page.info[0].value
    assert not (tmp_path / "nothing" / STORE_FILE_NAME).exists()  # reading never creates a store


def test_a_store_without_causal_checks_says_to_run_them(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page()
    assert "No causal checks" in page.info[0].value
    assert "emc patch" in page.info[0].value and "emc intervene" in page.info[0].value
    assert not page.selectbox and not page.metric and not page.get("vega_lite_chart")


def test_the_headline_is_what_explained_per_prompt_gives(checked, page, pair):
    explained = explained_per_prompt(checked.store, *pair)
    assert len(explained) == N_PROMPTS
    shown = {m.label: m.value for m in page.metric}
    assert shown == {
        "Prompts decomposed": str(N_PROMPTS),
        "Explained (direct)": f"{explained['explained'].mean():.1%}",
        "Unexplained": f"{explained['unexplained'].mean():.1%}",
        "MLP features": f"{explained['mlp_features'].mean():.1%}",
        "MLP error": f"{explained['mlp_error'].mean():.1%}",
        "Attention": f"{explained['attn'].mean():.1%}",
    }
    assert page.selectbox[0].value == pair
    per_prompt = table(page, "prompt", "explained", "unexplained")
    columns = list(explained.columns)
    pd.testing.assert_frame_equal(
        per_prompt[columns].sort_values("prompt_id").reset_index(drop=True),
        explained.sort_values("prompt_id").reset_index(drop=True),
        check_dtype=False,
    )


def test_where_the_shift_lives_draws_direct_and_total_shares(checked, page, pair):
    summary = decomposition_summary(checked.store, *pair)
    (direct,) = chart_data(page, "component")
    assert set(direct["component"]) >= {"attention", "MLP features", "MLP error"}
    layer0 = summary[(summary["component"] == "mlp_error") & (summary["layer"] == 0)]
    shown = direct[(direct["component"] == "MLP error") & (direct["layer"] == "L0")]
    assert float(shown["share"].iloc[0]) == pytest.approx(float(layer0["direct"].iloc[0]))
    (total,) = chart_data(page, "patched")
    assert set(total["patched"]) == set(view.PATCHES)
    mlp1 = summary[(summary["component"] == "mlp") & (summary["layer"] == 1)].iloc[0]
    assert shares_of(total, site="L1 MLP", patched=view.PATCHES[0]) == pytest.approx(
        mlp1["total_into_base"]
    )
    assert shares_of(total, site="L1 MLP", patched=view.PATCHES[1]) == pytest.approx(
        mlp1["total_from_adapted"]
    )


def test_dose_response_shows_removed_and_reproduced_beside_their_controls(checked, page, pair):
    features = intervention_summary(checked.store, "features", *pair)
    restore, inject = chart_data(page, "k")
    for frame in (restore, inject):
        assert list(dict.fromkeys(frame["k"])) == ["1", "5", "all (256)"]
        assert set(frame["features"]) == {view.CHOSEN, view.CONTROL}
        assert frame[frame["features"] == view.CONTROL]["k"].tolist() == ["1", "5"]
    top5 = features[(features["target"] == "top 5")].set_index("kind")
    assert shares_of(restore, k="5", features=view.CHOSEN) == pytest.approx(
        top5.loc["restore", "removed"]
    )
    assert shares_of(restore, k="5", features=view.CONTROL) == pytest.approx(
        top5.loc["restore", "control_removed"]
    )
    assert shares_of(inject, k="5", features=view.CHOSEN) == pytest.approx(
        top5.loc["inject", "share"]
    )
    assert len(intervention_table(page, "restore")) == len(features)


def test_the_adapter_tab_draws_the_scale_and_each_removal(checked, page, pair):
    adapter = intervention_summary(checked.store, "adapter", *pair)
    (scale,) = chart_data(page, "scale")
    assert scale["scale"].tolist() == [-1.0, 0.0, 0.5, 1.0, 2.0]
    assert scale.set_index("scale").loc[1.0, "share"] == pytest.approx(1.0)
    layers, kinds, modules = chart_data(page, "removed")
    assert layers["target"].tolist() == ["layer 0", "layer 1"]
    without = adapter[adapter["kind"] == "without_layer"].set_index("target")["removed"]
    assert layers.set_index("target")["removed"].to_dict() == pytest.approx(without.to_dict())
    assert "up_proj" in set(kinds["target"])
    n_modules = int((adapter["kind"] == "without_module").sum())
    assert len(modules) == n_modules and "L0 mlp.down_proj" in set(modules["target"])
    assert len(intervention_table(page, "scale")) == len(adapter)


def test_the_directions_tab_sets_each_mode_against_a_random_direction(checked, page, pair):
    directions = intervention_summary(checked.store, "direction", *pair)
    charts = chart_data(page, "direction")
    assert len(charts) == 3
    for frame in charts:
        assert set(frame["direction"]) == {"mean difference", "random"}
    assert list(dict.fromkeys(charts[0]["target"])) == ["layer 0", "layer 1", "every layer"]
    assert list(dict.fromkeys(charts[2]["target"])) == [  # ablate: rank 1 as well
        "layer 0", "layer 1", "layer 0 direction, every layer", "layer 1 direction, every layer",
        "every layer",
    ]  # fmt: skip
    assert len(intervention_table(page, "subtract")) == len(directions)
    subtract, add, _ablate = charts
    row = directions[(directions["kind"] == "subtract") & (directions["target"] == "layer 1")]
    assert shares_of(subtract, target="layer 1", direction="random") == pytest.approx(
        float(row["control_removed"].iloc[0])
    )
    row = directions[(directions["kind"] == "add") & (directions["target"] == "layer 0")]
    assert shares_of(add, target="layer 0", direction="mean difference") == pytest.approx(
        float(row["share"].iloc[0])
    )


def test_the_rollouts_tab_draws_every_setting_with_its_interval_and_coherence(checked, page, pair):
    summary = rollout_summary(checked.store, *pair)
    (frame,) = chart_data(page, "p_harmful")
    assert len(frame) == len(summary) and frame["ci_low"].le(frame["p_harmful"]).all()
    assert frame["p_harmful"].tolist() == pytest.approx(summary["p_harmful"].tolist())
    assert frame["mean_coherent"].between(0, 100).all()
    assert frame["control"].sum() == summary["target"].str.startswith("random").sum()
    effects = table(page, "cut / reproduced", "meets goal")
    assert len(effects) == len(summary) - 2 - frame["control"].sum()  # not as is, not controls
    answers = table(page, "examples", "positions")
    assert len(answers) == len(summary)  # one prompt's rows: every setting


def test_your_edits_runs_the_command_and_shows_the_edit_before_and_after(checked, page, pair):
    # The form runs `emc intervene --features` for real (a subprocess on this store).
    features = page.text_input(key="edit-features").value
    assert features.count("/") == 5  # the top 5 of the feature ranking by default
    page.selectbox(key="edit-mode").set_value("zero")
    page.button[0].click()  # the form's submit button
    page.run(timeout=300)
    assert not page.exception
    assert [s.value for s in page.success] == ["Measured. The results are below."], [
        c.value for c in page.code
    ]
    edits = table(page, "control_share", "removed", "prompt")
    assert len(edits) == N_PROMPTS and edits["kind"].eq("zero").all()
    tokens = table(page, "before", "after")
    assert len(tokens) == 5 and tokens["p before"].between(0, 1).all()
    *_, effects = [d.value for d in page.dataframe if "cut / reproduced" in d.value.columns]
    assert len(effects) == 1 and effects["setting"].iloc[0].startswith("custom zero")


# Shaping


def test_the_edit_command_is_what_a_terminal_would_run():
    assert view.edit_command("/d", "0/1, 1/2", "scale", -2.0, "all", ["p1"]) == [
        "emc", "intervene", "p1", "--features", "0/1,1/2", "--mode", "scale", "--positions",
        "all", "--strength", "-2", "-d", "/d",
    ]  # fmt: skip
    assert "--strength" not in view.edit_command("/d", "0/1", "zero", 3.0, "prompt")


def test_before_and_after_line_up_by_rank():
    frame = view.before_after('{"top_before": [["a", 0.5], ["b", 0.2]], "top_after": [["c", 0.9]]}')
    assert frame.to_dict("records")[0] == {"rank": 1, "before": "a", "p before": 0.5,
                                           "after": "c", "p after": 0.9}  # fmt: skip
    assert frame["after"].isna().tolist() == [False, True]
    assert view.before_after(None).empty


def model(model_id: str, role: str, base_ref: str = "base") -> ModelRow:
    return ModelRow(
        model_id=model_id, slug=model_id, fingerprint="f", role=role, base_ref=base_ref,
        adapter_ref=None, merged=False, transcoders_ref="t", backend="nnsight", dtype="fp32",
        device="cpu", first_run_id="run",
    )  # fmt: skip


def test_labels_of_doses_and_modules():
    assert view.dose_label("top 20", 20) == "20"
    assert view.dose_label("all", 256) == "all (256)"
    assert view.module_label("model.layers.3.self_attn.q_proj") == "L3 self_attn.q_proj"
    assert view.module_label("down_proj") == "down_proj"


def test_an_effect_is_removed_on_the_adapted_model_and_reproduced_on_the_base():
    summary = pd.DataFrame(
        {
            "model_role": ["adapted", "base"],
            "share": [0.8, 0.3],
            "control_share": [0.95, 0.1],
            "removed": [0.2, None],
            "control_removed": [0.05, None],
        }
    )
    shaped = view.with_effect(summary)
    assert shaped["effect"].tolist() == pytest.approx([0.2, 0.3])
    assert shaped["control_effect"].tolist() == pytest.approx([0.05, 0.1])
