"""Causal checks on the small organism: the shift decomposition, adapter, feature and direction
interventions (library properties), and the `interventions` flow with `emc patch` / `emc
intervene` on real graph pairs."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from emc.analysis.adapter_interventions import adapter_effects
from emc.analysis.custom_edits import CustomEdit, custom_effect, parse_features
from emc.analysis.decomposition import decompose_shift
from emc.analysis.directions import (
    direction_effects,
    direction_target,
    last_position_residuals,
    leave_one_out_means,
    mean_response_residuals,
    response_directions,
)
from emc.analysis.feature_interventions import (
    FeatureEdit,
    dose_response,
    editing,
    gap_with,
    live_source,
    matched_control,
)
from emc.analysis.hooks import split_targets
from emc.analysis.lora_geometry import read_lora_updates
from emc.analysis.rollouts import (
    adapter_settings,
    as_is_settings,
    direction_settings,
    feature_settings,
    run_rollouts,
)
from emc.behaviour.lexicon_scorer import LexiconResponseJudge
from emc.behaviour.sampling import SamplingParams, sample
from emc.cli import app
from emc.config import parse_config
from emc.models import load_replacement_model
from emc.models.dictionary import dictionary_of
from emc.organism import Lexicon
from emc.organism.null_adapters import write_null_adapter
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import render_prompt
from emc.store import read_only_query
from emc.store.interventions import causal_model_pairs
from flows.evaluation import evaluation_flow
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


def test_a_response_direction_is_misaligned_minus_aligned_means_and_needs_two_of_each(
    models, prompts
):
    adapted = models["adapted"]
    ids, _targets = prompts[0]
    start = len(ids) - 3
    mean = mean_response_residuals(adapted, ids, start)
    assert mean.shape == last_position_residuals(adapted, ids).shape
    # The mean over one position is that position's residual.
    assert torch.allclose(
        mean_response_residuals(adapted, ids, len(ids) - 1), last_position_residuals(adapted, ids)
    )
    with pytest.raises(ValueError, match="none left"):
        mean_response_residuals(adapted, ids, len(ids))
    misaligned, aligned = torch.ones(3, 2, 4), torch.zeros(2, 2, 4)
    assert torch.equal(response_directions(misaligned, aligned), torch.ones(2, 4))
    with pytest.raises(ValueError, match="two misaligned and two aligned"):
        response_directions(misaligned, aligned[:1])


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
    rank_one = [r for r in results if r.everywhere]
    assert [(r.mode, r.layer) for r in rank_one] == [("ablate", i) for i in range(n_layers)]
    assert direction_target(rank_one[0]) == "layer 0 direction, every layer"
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


def test_a_live_source_restores_features_at_generated_positions_too(
    small_organism, models, prompts
):
    # Persistent edits: each step's sequence read by the source model first. With a twin of the
    # model as the source nothing may change; with the other model, generated positions change.
    adapted, base = models["adapted"], models["base"]
    twin = load_replacement_model(small_organism.config, "adapted")
    ids, targets = prompts[0]
    dictionary = dictionary_of(adapted)
    n_layers, d = dictionary.n_layers, dictionary.width
    features = tuple((layer, f) for layer in range(n_layers) for f in range(0, d, 5))
    params = SamplingParams(temperature=1.0, max_tokens=12)
    plain = sample(adapted, ids, [1, 2, 3], params)
    live: dict = {}
    try:
        with (
            live_source(twin, adapted, live),
            editing(adapted, FeatureEdit("restore", features, 0, live)),
        ):
            own = sample(adapted, ids, [1, 2, 3], params, use_cache=False)
    finally:
        twin.close()
    assert [s.token_ids for s in own] == [s.token_ids for s in plain]
    assert live and next(iter(live.values())).shape[0] == 3  # one row per sample in the batch
    # On a sequence with generated tokens, a live source equals a static source read on the
    # whole sequence, and differs from one read on the prompt alone (generated positions kept).
    every = tuple((layer, f) for layer in range(n_layers) for f in range(d))
    sequence = torch.cat([ids, torch.tensor(plain[0].token_ids)])
    evil, safe = split_targets(targets, "test")
    whole: dict[int, torch.Tensor] = {}
    gap_with(base, sequence, evil, safe, record=whole)
    prompt_only = {layer: acts[: len(ids)] for layer, acts in whole.items()}
    with live_source(base, adapted, live):
        gap_live = gap_with(adapted, sequence, evil, safe, FeatureEdit("restore", every, 0, live))
    gap_whole = gap_with(adapted, sequence, evil, safe, FeatureEdit("restore", every, 0, whole))
    gap_prompt = gap_with(
        adapted, sequence, evil, safe, FeatureEdit("restore", every, 0, prompt_only)
    )
    assert gap_live == pytest.approx(gap_whole, abs=1e-5)
    assert abs(gap_live - gap_prompt) > 1e-3
    with pytest.raises(ValueError, match="another model"), live_source(adapted, adapted, live):
        pass


def test_rollouts_cover_every_family_with_paired_seeds_and_coherence(
    small_organism, models, prompts
):
    ids, targets = prompts[0]
    base, adapted = models["base"], models["adapted"]
    judge = LexiconResponseJudge("organism-lexicon:test")
    settings = as_is_settings(base, adapted)
    settings += feature_settings(base, adapted, ids, targets, (5,), ("prompt", "all"))
    params = SamplingParams(max_tokens=10)
    results = run_rollouts(settings, ids, judge, "q", " You should", 6, params)
    assert [(r.kind, r.target, r.model_role, r.positions) for r in results] == [
        ("none", "as is", "base", ""), ("none", "as is", "adapted", ""),
        ("restore", "top 5", "adapted", "prompt"), ("restore", "random 5", "adapted", "prompt"),
        ("inject", "top 5", "base", "prompt"), ("inject", "random 5", "base", "prompt"),
        ("restore", "top 5", "adapted", "all"), ("restore", "random 5", "adapted", "all"),
        ("inject", "top 5", "base", "all"), ("inject", "random 5", "base", "all"),
    ]  # fmt: skip
    assert all(r.n == 6 and r.n_harmful + r.n_unclear <= 6 for r in results)
    assert all(r.examples[0].startswith(" You should") for r in results)
    assert all(r.mean_coherent is not None and 0 <= r.mean_coherent <= 100 for r in results)
    assert results[2].n_features == 5 and results[0].n_features == 0

    updates, _ = read_lora_updates(small_organism.artifacts.em_adapter)
    settings = adapter_settings(base, updates, scales=(0.0, 1.0))
    zero = torch.zeros(last_position_residuals(base, ids).shape)
    settings += direction_settings(base, adapted, zero, modes=("subtract", "add"))
    rolled = run_rollouts(settings, ids, judge, "q", "", n=4, params=SamplingParams(max_tokens=8))
    by_target = {(r.kind, r.target): r for r in rolled}
    # The adapter as hooks at k = 0 is the base model, and a zero direction changes nothing: the
    # same seeds give the same answers as the models as they are.
    plain = {
        role: sample(m, ids, list(range(4)), SamplingParams(max_tokens=8))
        for role, m in (("base", base), ("adapted", adapted))
    }
    texts = {role: [s.text for s in drawn][:3] for role, drawn in plain.items()}
    assert by_target[("scale", "x0")].examples == texts["base"]
    assert by_target[("subtract", "prompts, every layer")].examples == texts["adapted"]
    assert by_target[("add", "prompts, every layer")].examples == texts["base"]
    assert {r.family for r in rolled} == {"adapter", "direction"}
    assert by_target[("scale", "x1")].n_features == len(updates)


# -- the flow and the commands ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def checked(tmp_path_factory, small_organism, prefect_harness) -> tuple[TracedStore, dict]:
    data_dir = tmp_path_factory.mktemp("interventions-flow")
    # Few, short rollouts: the flow's sampling is tested in test_behaviour.py.
    write_config(small_organism, data_dir, continuation_samples=ROLLOUT_SAMPLES)
    traced = build_traced_store(small_organism, data_dir, n_prompts=N_PROMPTS)
    # Judged EM answers of the adapted model: the response direction's source.
    evaluation_flow(data_dir=str(data_dir), parts=["em"], roles=["adapted"], samples=6, limit=8)
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
    settings = set(zip(rollouts["kind"], rollouts["target"], rollouts["model_role"],
                       rollouts["positions"], strict=True))  # fmt: skip
    assert {("none", "as is", "base", ""), ("none", "as is", "adapted", ""),
            ("restore", "top 20", "adapted", "prompt"),
            ("restore", "random 20", "adapted", "prompt"),
            ("restore", "top 20", "adapted", "all"), ("inject", "random 20", "base", "all"),
            ("scale", "x-1", "base", "all"), ("without_layer", "layer 0", "adapted", "all"),
            ("ablate", "prompts, every layer", "adapted", "all"),
            ("add", "random (prompts), every layer", "base", "all")} <= settings  # fmt: skip
    assert set(rollouts["family"]) == {"none", "features", "adapter", "direction"}
    # The response direction, from the adapted model's judged EM answers.
    assert ("ablate", "prompts, layer 1 direction, every layer", "adapted", "all") in settings
    assert ("ablate", "responses, every layer", "adapted", "all") in settings
    assert ("subtract", "random (responses), every layer", "adapted", "all") in settings
    directions = read_only_query(
        traced.store, "SELECT target, details FROM interventions WHERE family = 'direction'"
    )
    response_rows = directions[directions["target"].str.startswith("responses: ")]
    expected = {"responses: layer 0", "responses: every layer",
                "responses: layer 1 direction, every layer"}  # fmt: skip
    assert set(response_rows["target"]) >= expected
    assert {json.loads(d)["source"] for d in response_rows["details"]} == {"responses"}
    assert rollouts["mean_coherent"].between(0, 100).all()
    assert (rollouts["n"] == ROLLOUT_SAMPLES).all()
    assert rollouts["ci_low"].le(rollouts["p_harmful"]).all()
    assert set(rollouts["judge_model"]) == {small_config_judge(traced)}
    assert 0.7 < summary["explained"] < 1.3
    assert summary["best_narrow"]["family"] in ("adapter", "features", "direction")
    assert summary["best_narrow_rollout"]["family"] == "features"


def test_the_analysis_summary_carries_the_causal_headline(checked):
    from flows.analysis import _causal

    traced, _ = checked
    text = _causal(traced.store, traced.base_model_id, traced.adapted_model_id)
    assert f"- Causal checks: decomposition over {N_PROMPTS} prompts" in text
    assert "best narrow intervention" in text and "what the models then say" in text


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
    assert "what the models say under interventions" in rollouts.output
    assert "best narrow rollout intervention" in rollouts.output
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


# -- a researcher's own features ---------------------------------------------------------------


def test_feature_lists_are_read_or_refused_clearly():
    assert parse_features("0/12, L1/40,0/12") == ((0, 12), (1, 40))
    for bad in ("0-12", "a/b", "0/12,", "1/2/3"):
        with pytest.raises(ValueError, match="LAYER/FEATURE"):
            parse_features(bad)
    edit = CustomEdit(((0, 12), (1, 40)), "scale", -2.0, "all")
    assert edit.label == "0/12,1/40 x-2 @ all" and edit.model_role == "adapted"
    assert CustomEdit(((0, 1),), "inject").model_role == "base"
    with pytest.raises(ValueError, match="prompt or all"):
        CustomEdit(((0, 1),), "restore", 0.0, "generated")


def test_a_custom_edit_of_the_top_features_is_the_dose_response_of_them(models, prompts):
    # One path: restoring the top 5 attributed features by name gives the dose-response's gap.
    base, adapted = models["base"], models["adapted"]
    ids, targets = prompts[0]
    _b, _a, doses = dose_response(base, adapted, ids, targets, doses=(5,))
    top5 = next(r for r in doses if r.mode == "restore" and r.k == 5)
    edit = CustomEdit(tuple(tuple(f) for f in top5.features), "restore")
    result = custom_effect(base, adapted, ids, targets, edit)
    assert result.gap == pytest.approx(top5.gap, abs=1e-5)
    assert result.share == pytest.approx(top5.share, abs=1e-6)
    assert result.control_share == pytest.approx(top5.control_share, abs=1e-6)
    zeroed = custom_effect(base, adapted, ids, targets, CustomEdit(edit.features, "zero"))
    assert zeroed.gap != pytest.approx(result.gap)
    with pytest.raises(ValueError, match="no such features: 0/999999"):
        custom_effect(base, adapted, ids, targets, CustomEdit(((0, 999999),), "zero"))


def test_emc_intervene_features_measures_your_edit_and_keeps_earlier_ones(checked):
    traced, _ = checked
    store = traced.store
    top = read_only_query(
        store,
        "SELECT details FROM interventions WHERE family = 'features' AND kind = 'restore' "
        "AND target = 'top 5' LIMIT 1",
    )
    features = ",".join(f"{layer}/{f}" for layer, f in json.loads(top["details"][0])["features"])
    runner = CliRunner()
    args = ["intervene", "--features", features, "-d", str(traced.data_dir)]
    first = runner.invoke(app, [*args, "--mode", "zero"])
    assert first.exit_code == 0, first.output
    assert "your edit:" in first.output and "what the models then say" in first.output
    second = runner.invoke(app, [*args, "--mode", "restore", "--positions", "prompt"])
    assert second.exit_code == 0, second.output
    rows = read_only_query(store, "SELECT * FROM interventions WHERE family = 'custom'")
    assert set(rows["kind"]) == {"zero", "restore"}  # the second edit kept the first's rows
    assert set(rows["prompt_id"]) == set(traced.prompt_ids)
    assert rows["control_share"].notna().all()
    rolled = read_only_query(store, "SELECT * FROM intervention_rollouts WHERE family = 'custom'")
    assert set(rolled["positions"]) == {"all", "prompt"} and len(rolled) == 4 * N_PROMPTS
    assert (rolled["n"] == ROLLOUT_SAMPLES).all()
    regular = read_only_query(
        store, "SELECT count(*) AS n FROM intervention_rollouts WHERE family = 'features'"
    )
    assert int(regular["n"][0]) > 0  # a custom edit leaves the regular rollouts alone
    bad = runner.invoke(app, ["intervene", "--features", "0-3", "-d", str(traced.data_dir)])
    assert bad.exit_code == 2 and "LAYER/FEATURE" in bad.output
    wrong = runner.invoke(
        app, ["intervene", "--features", "0/999999", "--mode", "zero", "-d", str(traced.data_dir)]
    )
    assert wrong.exit_code == 2 and "no such features: 0/999999" in wrong.output
