"""The analysis flow on real organism graph pairs: forward diffs, deltas, ablations, geometry."""

from __future__ import annotations

import logging

import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.config import dump_config
from emc.organism import OrganismRecipe
from emc.store import read_only_query
from emc.store.analysis import ablation_results, analysis_failures
from emc.store.graph_diff import prompt_graph_diff
from emc.store.graph_pairs import graph_pairs
from flows import analysis
from flows.analysis import analysis_flow, analysis_inputs
from tests.graph_store import TracedStore, build_traced_store

pytestmark = pytest.mark.usefixtures("prefect_harness")
N_PROMPTS = 3


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, small_organism, prefect_harness) -> tuple[TracedStore, dict]:
    data_dir = tmp_path_factory.mktemp("analysis-flow")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    traced = build_traced_store(small_organism, data_dir, n_prompts=N_PROMPTS)
    summary = analysis_flow(data_dir=str(data_dir), ablate_top=3, lora_null=100)
    return traced, summary


def _rows(traced: TracedStore, sql: str):
    return read_only_query(traced.store, sql)


def test_both_forward_passes_agree_until_the_adapter_and_differ_from_its_first_layer(
    analysed, small_organism
):
    traced, summary = analysed
    assert summary["prompts"] == summary["measured"] == N_PROMPTS and not summary["failed"]
    assert summary["loading_errors"] == 0 and summary["first_divergent_layer"] == 0
    forward = _rows(traced, "SELECT * FROM forward_diffs")
    n_layers = OrganismRecipe.small().n_layers
    assert len(forward) == N_PROMPTS * (n_layers + 1)
    embeddings = forward[forward["layer"] == -1]
    assert (embeddings["rel_diff"] == 0).all() and not embeddings["diverged"].any()
    blocks = forward[forward["layer"] >= 0]
    assert blocks["diverged"].all() and (blocks["rel_diff"] > 1e-3).all()
    assert set(forward["dtype"]) == {"fp32"} and set(forward["run_id"]) == {summary["run_id"]}
    pair = graph_pairs(traced.store)[0]
    assert prompt_graph_diff(traced.store, pair).first_divergent_layer == 0


def test_measured_activations_cover_what_the_graphs_kept(analysed):
    traced, _ = analysed
    # A feature's activation summed over every position is at least the sum over the positions
    # its graph kept (activations are non-negative), and so is the count of active positions.
    joined = _rows(
        traced,
        """
        SELECT d.base_activation AS measured, sum(n.activation) AS kept,
               d.base_positions AS positions, count(*) AS kept_positions
        FROM activation_deltas d
        JOIN graphs g ON g.prompt_id = d.prompt_id AND g.model_id = d.base_model_id
        JOIN graph_nodes n ON n.graph_id = g.graph_id AND n.kind = 'feature'
                          AND n.layer = d.layer AND n.feature = d.feature
        GROUP BY ALL
        """,
    )
    assert len(joined) > 10
    assert (joined["measured"] >= joined["kept"] - 1e-4).all()
    assert (joined["positions"] >= joined["kept_positions"]).all()


def test_ablating_the_top_features_is_recorded_with_a_matched_control(analysed):
    traced, summary = analysed
    results = ablation_results(traced.store)
    assert set(results["kind"]) == {"top", "control"}
    assert len(results) == 2 * N_PROMPTS and summary["ablated_prompts"] == N_PROMPTS
    top = results[results["kind"] == "top"]
    assert (top["n_interventions"] > 0).all()
    assert summary["top_features"] and len(summary["top_features"]) == 3
    assert summary["ablation_top_change"] == pytest.approx(top["evil_prob_change"].mean())
    # The planted misalignment: the features ranked as pushing evil over safe do push it.
    assert summary["ablation_top_change"] < 0
    assert "Zeroing them at every position" in summary["ground_truth"]
    assert "Causal checks: none yet" in summary["ground_truth"]


def test_lora_geometry_is_stored_with_its_histograms(analysed, small_organism):
    traced, summary = analysed
    comparisons = _rows(traced, "SELECT * FROM lora_comparisons")
    assert len(comparisons) == summary["lora_comparisons"] > 0
    width = OrganismRecipe.small().transcoder_width
    assert all(sum(counts) == width for counts in comparisons["hist_counts"])
    assert all(
        len(e) == len(c) + 1
        for e, c in zip(comparisons["hist_edges"], comparisons["hist_counts"], strict=True)
    )
    features = _rows(traced, "SELECT * FROM lora_features")
    assert len(features) == 10 * len(comparisons)


def test_a_rerun_skips_measured_prompts_and_adds_no_duplicates(analysed, caplog):
    traced, _ = analysed
    before = {t: len(_rows(traced, f"SELECT * FROM {t}")) for t in _TABLES}
    caplog.set_level(logging.INFO)
    again = analysis_flow(data_dir=str(traced.data_dir), ablate_top=3, lora_null=100)
    assert again["measured"] == 0 and again["prompts"] == N_PROMPTS
    # The run's log says what it found, what it skipped and why, and what it did instead.
    logged = [r.getMessage() for r in caplog.records if r.name.startswith("prefect.")]
    assert any(m.startswith(f"{N_PROMPTS} prompt(s) with a current graph pair: ") for m in logged)
    assert (
        f"forward diffs: {N_PROMPTS} prompt(s) measured before, skipped (`emc analyze --redo` "
        "to redo)" in logged
    ), logged
    assert any(m.startswith("ranking by total_diff: ") and "; top 3: L" in m for m in logged)
    assert any(m.startswith(f"ablation {N_PROMPTS}/{N_PROMPTS}, prompt ") for m in logged)
    assert {t: len(_rows(traced, f"SELECT * FROM {t}")) for t in _TABLES} == before


_TABLES = ("forward_diffs", "activation_deltas", "ablations", "lora_comparisons", "lora_features")


def test_cli_prints_the_ranking_the_ground_truth_and_a_prompt_diff(analysed):
    traced, _ = analysed
    runner = CliRunner()
    ranking = runner.invoke(
        app, ["analyze", "--ranking-only", "--top", "5", "-d", str(traced.data_dir)]
    )
    assert ranking.exit_code == 0, ranking.output
    assert "top 5 features by total_diff" in ranking.output
    prompt = traced.prompt_ids[0]
    shown = runner.invoke(app, ["diff", prompt[:8], "-d", str(traced.data_dir)])
    assert shown.exit_code == 0, shown.output
    assert "first layer where the models differ: 0" in shown.output
    assert "only in adapted" in shown.output
    everything = runner.invoke(app, ["diff", "-d", str(traced.data_dir)])
    assert everything.exit_code == 0 and "per layer, over those pairs" in everything.output
    unknown = runner.invoke(app, ["diff", "zzz", "-d", str(traced.data_dir)])
    assert unknown.exit_code != 0 and "no traced prompts match" in unknown.output


# Per-prompt failures: stored as failed rows, left out of the numbers, tried again by a re-run.
# These run last: they break one prompt for real and end with the store as it was.


def _fail_on(monkeypatch, traced: TracedStore, name: str, prompt_ids: list[str]) -> None:
    """Make flows.analysis's `name` (its first two arguments: a model and token ids) raise on
    these prompts' token ids, as a model error on one input would."""
    inputs = analysis_inputs(traced.store, traced.base_model_id, traced.adapted_model_id)
    broken = [p.input_ids for p in inputs if p.prompt_id in prompt_ids]
    real = getattr(analysis, name)

    def failing(loaded, ids, *args, **kwargs):
        if ids.tolist() in broken:
            raise RuntimeError(f"injected fault in {name}")
        return real(loaded, ids, *args, **kwargs)

    monkeypatch.setattr(analysis, name, failing)


def _failed_rows(traced: TracedStore):
    return _rows(
        traced,
        "SELECT 'ablations' AS t, prompt_id, kind, run_id, model_id, error FROM ablations "
        "WHERE status = 'failed' UNION ALL SELECT 'activation_deltas', prompt_id, NULL, run_id, "
        "adapted_model_id, error FROM activation_deltas WHERE status = 'failed' ORDER BY t",
    )


def test_failed_prompts_are_stored_exit_3_or_2_and_a_rerun_replaces_them(analysed, monkeypatch):
    traced, _ = analysed
    runner = CliRunner()
    args = ["analyze", "--ablate", "3", "--top", "3", "-d", str(traced.data_dir)]
    broken = traced.prompt_ids[1]
    before = {t: len(_rows(traced, f"SELECT * FROM {t}")) for t in _TABLES}

    # One prompt's forward passes and ablation fail: exit 3, the prompt listed with both steps.
    _fail_on(monkeypatch, traced, "residual_states", [broken])
    _fail_on(monkeypatch, traced, "ablate_features", [broken])
    some = runner.invoke(app, [*args, "--redo"])
    assert some.exit_code == 3, some.output
    listed = " ".join(some.output.split())  # rich wraps long lines
    assert f"failed {broken} forward: RuntimeError: injected fault in residual_states; " in listed
    assert "ablation (top): RuntimeError: injected fault in ablate_features" in listed
    assert f"partial: {N_PROMPTS - 1} prompt(s) done, 1 failed" in listed
    run_id = _rows(traced, "SELECT run_id FROM runs WHERE name = 'analysis' "
                   "ORDER BY started_at DESC LIMIT 1")["run_id"][0]  # fmt: skip
    failed = _failed_rows(traced)
    assert failed["t"].tolist() == ["ablations", "activation_deltas"]  # one row per failed step
    assert (failed["prompt_id"] == broken).all() and (failed["run_id"] == run_id).all()
    assert (failed["model_id"] == traced.adapted_model_id).all()
    assert failed["error"].str.contains("RuntimeError: injected fault").all()
    assert failed["kind"].tolist()[0] == "top"
    # Its measurements are gone (never both ok and failed rows); the others' are all ok.
    forward = set(_rows(traced, "SELECT DISTINCT prompt_id FROM forward_diffs")["prompt_id"])
    assert forward == set(traced.prompt_ids) - {broken}
    ablations = ablation_results(traced.store, include_failed=True)
    assert ablations.groupby("prompt_id")["status"].apply(sorted).to_dict() == {
        p: ["failed"] if p == broken else ["ok", "ok"] for p in traced.prompt_ids
    }
    # The numbers leave it out; `emc diff` says why it has no forward diff.
    assert broken not in set(ablation_results(traced.store)["prompt_id"])
    assert f"on average over {N_PROMPTS - 1} prompts" in listed
    shown = runner.invoke(app, ["diff", broken[:8], "-d", str(traced.data_dir)])
    assert "forward passes failed: RuntimeError: injected fault" in " ".join(shown.output.split())

    # The forward passes are fixed, every ablation fails: exit 2. The re-run measured the failed
    # prompt again and replaced its failed row; each prompt now has one failed ablation row.
    monkeypatch.undo()
    _fail_on(monkeypatch, traced, "ablate_features", traced.prompt_ids)
    every = runner.invoke(app, args)
    assert every.exit_code == 2, every.output
    assert f"every prompt failed ({N_PROMPTS})" in " ".join(every.output.split())
    assert _failed_rows(traced)["t"].tolist() == ["ablations"] * N_PROMPTS
    assert len(ablation_results(traced.store, include_failed=True)) == N_PROMPTS

    # Fixed: a plain re-run replaces every failed row with ok rows, and adds no duplicates.
    monkeypatch.undo()
    fixed = analysis_flow(data_dir=str(traced.data_dir), ablate_top=3, lora_null=100)
    assert fixed["measured"] == 0 and not fixed["failed"] and fixed["done"] == N_PROMPTS
    assert fixed["ablated_prompts"] == N_PROMPTS
    assert _failed_rows(traced).empty and analysis_failures(traced.store).empty
    assert {t: len(_rows(traced, f"SELECT * FROM {t}")) for t in _TABLES} == before
