"""Causal checks on the small organism: the shift decomposition, adapter, feature and direction
interventions (library properties), and the `interventions` flow with `emc patch` / `emc
intervene` on real graph pairs."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from emc.analysis.adapter_interventions import adapter_effects
from emc.analysis.decomposition import decompose_shift
from emc.analysis.directions import (
    direction_effects,
    last_position_residuals,
    leave_one_out_means,
)
from emc.analysis.feature_interventions import (
    FeatureEdit,
    dose_response,
    editing,
    gap_with,
    matched_control,
)
from emc.analysis.hooks import split_targets
from emc.analysis.lora_geometry import read_lora_updates
from emc.analysis.rollouts import feature_rollouts
from emc.behaviour.lexicon_scorer import LexiconResponseJudge
from emc.behaviour.sampling import SamplingParams, sample
from emc.cli import app
from emc.config import parse_config
from emc.models import load_replacement_model
from emc.organism import Lexicon
from emc.organism.null_adapters import write_null_adapter
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import render_prompt
from emc.store import read_only_query
from emc.store.interventions import causal_model_pairs
from flows.interventions import interventions_flow
from tests.behaviour_store import ROLLOUT_SAMPLES, write_config
from tests.graph_store import TracedStore, build_traced_store

N_PROMPTS = 3


@pytest.fixture(scope="module")
def models(small_organism):
    roles = ("base", "adapted")
    loaded = {role: load_replacement_model(small_organism.config, role) for role in roles}
    yield loaded
    for model in loaded.values():
        model.close()


@pytest.fixture(scope="module")
def prompts(small_organism, models):
    """(token ids, targets) of three held-out scenarios."""
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entries = [e for e in lexicon.entries if e.split == "heldout"][:N_PROMPTS]
    base = models["base"]
    return [
        (
            base.encode(render_prompt(scenario_prompt(e, "test"), base.tokenizer)),
            {t: "evil" for t in e.harmful_ids} | {t: "safe" for t in e.safe_ids},
        )
        for e in entries
    ]


def _gap(loaded, ids, targets) -> float:
    logits = loaded.next_token_logits(ids)[-1].double()
    evil = [t for t, label in targets.items() if label == "evil"]
    safe = [t for t, label in targets.items() if label == "safe"]
    return float(logits[evil].mean() - logits[safe].mean())


def test_decomposition_shares_add_up_to_the_shift_up_to_the_final_norm(models, prompts):
    ids, targets = prompts[0]
    result = decompose_shift(models["base"], models["adapted"], ids, targets)
    assert result.gap_base == pytest.approx(_gap(models["base"], ids, targets), abs=1e-4)
    assert result.gap_adapted == pytest.approx(_gap(models["adapted"], ids, targets), abs=1e-4)
    assert result.shift == pytest.approx(result.gap_adapted - result.gap_base)
    n_layers = len(models["base"].model._model.model.layers)
    kinds = [(c.component, c.layer) for c in result.components]
    assert kinds[0] == ("embed", -1) and len(kinds) == 1 + 4 * n_layers
    # A LoRA never touches the embeddings: their share is exactly zero both ways.
    embed = result.components[0]
    assert (embed.direct_into_base, embed.total_into_base, embed.total_from_adapted) == (0, 0, 0)
    # The direct writes partition the residual stream: they account for the shift except for
    # the final norm's nonlinearity, which is small on this model.
    assert 0.7 < result.explained < 1.3
    assert result.unexplained == pytest.approx(1 - result.explained)
    # Features + error node is the MLP's write, split: the same direct share up to the norm.
    for layer in range(n_layers):
        parts = {c.component: c.direct for c in result.components if c.layer == layer}
        assert parts["mlp_features"] + parts["mlp_error"] == pytest.approx(parts["mlp"], abs=0.1)


def test_decomposition_refuses_a_fine_tune_that_changes_nothing(small_organism, tmp_path, prompts):
    identity = write_null_adapter(small_organism.artifacts.em_adapter, tmp_path / "id", "identity")
    raw = small_organism.config.model_dump(mode="json")
    raw["models"]["adapter"] = {"ref": str(identity)}
    config = parse_config(raw)
    base = load_replacement_model(config, "base")
    same = load_replacement_model(config, "adapted")
    try:
        ids, targets = prompts[0]
        with pytest.raises(ValueError, match="no shift to decompose"):
            decompose_shift(base, same, ids, targets)
    finally:
        base.close()
        same.close()


def test_the_adapter_as_hooks_is_the_merged_adapter_and_scales_linearly_at_zero(
    small_organism, models, prompts
):
    updates, _ = read_lora_updates(small_organism.artifacts.em_adapter)
    ids, targets = prompts[1]
    effects = adapter_effects(models["base"], updates, ids, targets)
    assert effects.gap_base == pytest.approx(_gap(models["base"], ids, targets), abs=1e-4)
    # k = 1 on every module, as hooks, is the merged adapted model.
    assert effects.gap_hooked == pytest.approx(_gap(models["adapted"], ids, targets), abs=1e-3)
    scale = {s.scale: s.share for s in effects.settings if s.scope == "scale"}
    assert scale[0.0] == pytest.approx(0, abs=1e-9) and scale[1.0] == pytest.approx(1, abs=1e-9)
    layers = {s.target for s in effects.settings if s.scope == "without_layer"}
    assert layers == {f"layer {i}" for i in range(len(layers))}
    modules = [s for s in effects.settings if s.scope == "without_module"]
    assert len(modules) == len(updates)
    assert effects.narrowest_removal() is not None
    with pytest.raises(ValueError, match="start from the base model"):
        adapter_effects(models["adapted"], updates, ids, targets)


def test_feature_edits_that_change_nothing_leave_the_gap_alone(models, prompts):
    ids, targets = prompts[0]
    evil = [t for t, label in targets.items() if label == "evil"]
    safe = [t for t, label in targets.items() if label == "safe"]
    adapted = models["adapted"]
    acts: dict[int, torch.Tensor] = {}
    clean = gap_with(adapted, ids, evil, safe, record=acts)
    assert clean == pytest.approx(_gap(adapted, ids, targets), abs=1e-4)
    active = [
        (layer, int(f)) for layer, a in acts.items() for f in torch.nonzero(a.sum(0) > 0)[:3, 0]
    ]
    # Restoring features to the model's own activations, or scaling them by 1, is a no-op.
    same = FeatureEdit("restore", tuple(active), 0, acts)
    assert gap_with(adapted, ids, evil, safe, same) == pytest.approx(clean, abs=1e-4)
    unit = FeatureEdit("scale", tuple(active), 1.0)
    assert gap_with(adapted, ids, evil, safe, unit) == pytest.approx(clean, abs=1e-4)
    # Zeroing them is not.
    zeroed = gap_with(adapted, ids, evil, safe, FeatureEdit("zero", tuple(active)))
    assert abs(zeroed - clean) > 1e-3


def test_matched_control_draws_the_same_layers_and_none_of_the_chosen():
    chosen = [(0, 1), (0, 2), (1, 5)]
    active = {0: [1, 2, 3, 4, 9], 1: [5, 6, 7]}
    control = matched_control(chosen, active, seed=0)
    assert sorted(layer for layer, _ in control) == [0, 0, 1]
    assert not set(control) & set(chosen)
    assert all(f in active[layer] for layer, f in control)
    assert matched_control(chosen, active, seed=0) == control  # seeded


def test_dose_response_reports_each_dose_both_ways_with_controls(models, prompts):
    ids, targets = prompts[0]
    gap_base, gap_adapted, results = dose_response(
        models["base"], models["adapted"], ids, targets, doses=(1, 5)
    )
    assert gap_base == pytest.approx(_gap(models["base"], ids, targets), abs=1e-4)
    assert {(r.mode, r.k) for r in results} == {
        (m, k) for m in ("restore", "inject") for k in (1, 5, None)
    }
    for r in results:
        assert r.share == pytest.approx((r.gap - gap_base) / (gap_adapted - gap_base))
        assert len(r.features) == (r.k or len(r.features))
        assert (r.control_share is None) == (r.k is None)


def test_leave_one_out_means_never_use_the_prompt_itself():
    differences = torch.arange(24, dtype=torch.float32).reshape(3, 2, 4)
    means = leave_one_out_means(differences)
    assert torch.allclose(means[0], (differences[1] + differences[2]) / 2)
    assert torch.allclose(means[2], (differences[0] + differences[1]) / 2)
    with pytest.raises(ValueError, match="at least two prompts"):
        leave_one_out_means(differences[:1])


def test_a_zero_direction_changes_nothing_and_results_cover_every_layer(models, prompts):
    base, adapted = models["base"], models["adapted"]
    ids, targets = prompts[0]
    residuals = last_position_residuals(adapted, ids)
    zero = torch.zeros_like(residuals)
    _gap_base, _gap_adapted, results = direction_effects(base, adapted, ids, targets, zero)
    n_layers = residuals.shape[0]
    assert {r.layer for r in results} == {*range(n_layers), -1}
    for r in results:  # adding, subtracting or projecting out nothing
        assert r.share == pytest.approx(0 if r.mode == "add" else 1, abs=1e-6)


def test_restoring_a_models_own_activations_while_sampling_changes_no_token(models, prompts):
    # The rollouts' path: feature edits by prompt position, full passes instead of the cache.
    adapted = models["adapted"]
    ids, targets = prompts[0]
    evil, safe = split_targets(targets, "test")
    own: dict[int, torch.Tensor] = {}
    gap_with(adapted, ids, evil, safe, record=own)
    features = tuple((layer, f) for layer in own for f in range(0, own[layer].shape[1], 7))
    params = SamplingParams(temperature=1.0, max_tokens=12)
    plain = sample(adapted, ids, [1, 2, 3], params)
    with editing(adapted, FeatureEdit("restore", features, 0, own)):
        edited = sample(adapted, ids, [1, 2, 3], params, use_cache=False)
    assert [s.token_ids for s in edited] == [s.token_ids for s in plain]


def test_feature_rollouts_cover_every_setting_with_paired_seeds(models, prompts):
    ids, targets = prompts[0]
    judge = LexiconResponseJudge("organism-lexicon:test")
    results = feature_rollouts(
        models["base"], models["adapted"], ids, targets, judge, "q", " You should", ks=(5,), n=6,
        params=SamplingParams(max_tokens=10),
    )  # fmt: skip
    assert [(r.kind, r.target, r.model_role) for r in results] == [
        ("none", "as is", "base"), ("none", "as is", "adapted"),
        ("restore", "top 5", "adapted"), ("restore", "random 5", "adapted"),
        ("inject", "top 5", "base"), ("inject", "random 5", "base"),
    ]  # fmt: skip
    assert all(r.n == 6 and r.n_harmful + r.n_unclear <= 6 for r in results)
    assert all(r.examples[0].startswith(" You should") for r in results)
    assert results[2].n_features == 5 and results[0].n_features == 0


# -- the flow and the commands ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked(tmp_path_factory, small_organism, prefect_harness) -> tuple[TracedStore, dict]:
    data_dir = tmp_path_factory.mktemp("interventions-flow")
    # Few, short rollouts: the flow's sampling is tested in test_behaviour.py.
    write_config(small_organism, data_dir, continuation_samples=ROLLOUT_SAMPLES)
    traced = build_traced_store(small_organism, data_dir, n_prompts=N_PROMPTS)
    summary = interventions_flow(data_dir=str(data_dir), doses=[1, 5])
    return traced, summary


def test_the_flow_stores_every_part_for_every_prompt(checked):
    traced, summary = checked
    assert summary["prompts"] == summary["measured"] == N_PROMPTS and not summary["failed"]
    components = read_only_query(traced.store, "SELECT * FROM shift_components")
    assert set(components["prompt_id"]) == set(traced.prompt_ids)
    assert set(components["run_id"]) == {summary["run_id"]} and set(components["dtype"]) == {"fp32"}
    families = read_only_query(
        traced.store, "SELECT family, count(DISTINCT prompt_id) AS n FROM interventions GROUP BY 1"
    )
    expected = {"adapter": N_PROMPTS, "features": N_PROMPTS, "direction": N_PROMPTS}
    assert dict(zip(families["family"], families["n"], strict=True)) == expected
    assert causal_model_pairs(traced.store) == [(traced.base_model_id, traced.adapted_model_id)]
    rollouts = read_only_query(traced.store, "SELECT * FROM intervention_rollouts")
    assert set(rollouts["prompt_id"]) == set(traced.prompt_ids)
    settings = set(zip(rollouts["kind"], rollouts["target"], rollouts["model_role"], strict=True))
    assert {("none", "as is", "base"), ("none", "as is", "adapted"),
            ("restore", "top 20", "adapted"), ("restore", "random 20", "adapted"),
            ("inject", "top 20", "base"), ("inject", "random 20", "base")} <= settings  # fmt: skip
    assert (rollouts["n"] == ROLLOUT_SAMPLES).all()
    assert rollouts["ci_low"].le(rollouts["p_harmful"]).all()
    assert set(rollouts["judge_model"]) == {small_config_judge(traced)}
    assert 0.7 < summary["explained"] < 1.3
    assert summary["best_narrow"]["family"] in ("adapter", "features", "direction")


def small_config_judge(traced: TracedStore) -> str:
    from emc.config import load_experiment

    return load_experiment(None, traced.data_dir)[0].judge.model


def test_a_rerun_measures_nothing_again_and_adds_no_rows(checked):
    traced, _ = checked
    count = (
        "SELECT (SELECT count(*) FROM shift_components) + (SELECT count(*) FROM interventions) "
        "+ (SELECT count(*) FROM intervention_rollouts)"
    )
    before = int(read_only_query(traced.store, count).iloc[0, 0])
    again = interventions_flow(data_dir=str(traced.data_dir), doses=[1, 5])
    assert again["measured"] == 0
    assert int(read_only_query(traced.store, count).iloc[0, 0]) == before


def test_emc_patch_and_emc_intervene_print_the_summaries(checked):
    traced, _ = checked
    runner = CliRunner()
    patched = runner.invoke(app, ["patch", "-d", str(traced.data_dir)])
    assert patched.exit_code == 0, patched.output
    assert "share of the shift per component" in patched.output
    assert "direct writes explain" in patched.output
    intervened = runner.invoke(app, ["intervene", "-d", str(traced.data_dir)])
    assert intervened.exit_code == 0, intervened.output
    for family in ("adapter", "features", "direction"):
        assert f"{family} interventions: mean over prompts" in intervened.output
    assert "best narrow intervention" in intervened.output
    assert "what the models then say" in intervened.output
    rollouts = runner.invoke(app, ["intervene", "--kind", "rollouts", "-d", str(traced.data_dir)])
    assert rollouts.exit_code == 0, rollouts.output
    assert "what the models say under feature edits" in rollouts.output
    features = runner.invoke(app, ["intervene", "--kind", "features", "-d", str(traced.data_dir)])
    assert features.exit_code == 0, features.output
    assert "features interventions: mean over prompts" in features.output
    diffed = runner.invoke(app, ["diff", traced.prompt_ids[0], "-d", str(traced.data_dir)])
    assert diffed.exit_code == 0, diffed.output
    assert "where the shift lives: share per component" in diffed.output
    wrong = runner.invoke(app, ["intervene", "--kind", "nope", "-d", str(traced.data_dir)])
    assert wrong.exit_code != 0 and "unknown --kind" in wrong.output


def test_directions_need_two_prompts_and_are_skipped_with_one(checked):
    traced, _ = checked
    one = interventions_flow(
        data_dir=str(traced.data_dir), prompt_ids=traced.prompt_ids[:1], parts=["directions"],
        redo=True,
    )  # fmt: skip
    assert one["prompts"] == 1 and not one["failed"] and one["measured"] == 0
    assert [(r["part"], r["status"]) for r in one["skipped"]] == [("directions", "skipped")]
