from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from emc.analysis import ablate_features, control_features, feature_activations
from emc.config import TracingConfig, parse_config
from emc.models import load_replacement_model
from emc.organism import Lexicon
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import render_prompt
from emc.tracing import GraphLayout, plan_targets, targets_for, trace

N_FEATURES = 5


@pytest.fixture(scope="module")
def adapted(small_organism):
    loaded = load_replacement_model(small_organism.config, "adapted")
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def entry(small_organism):
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    return next(e for e in lexicon.entries if e.split == "heldout")


@pytest.fixture(scope="module")
def labels(entry):
    return {t: "evil" for t in entry.harmful_ids} | {t: "safe" for t in entry.safe_ids}


@pytest.fixture(scope="module")
def ids(adapted, entry):
    return adapted.encode(render_prompt(scenario_prompt(entry, "test"), adapted.tokenizer))


@pytest.fixture(scope="module")
def activations(adapted, ids):
    return feature_activations(adapted, ids)


@pytest.fixture(scope="module")
def harmful_features(adapted, ids, labels, entry):
    """The (layer, feature) pairs with the largest positive direct effect on the harmful token.

    From circuit-tracer's attribution graph of the adapted model (every active feature
    attributed), summed over positions: the position-free identity that gets ablated.
    """
    config = TracingConfig(targets="labelled", max_feature_nodes=None, batch_size=256)
    graph = trace(adapted, ids, targets_for(adapted, ids, plan_targets(labels, config)), config)
    graph = graph.graph
    layout = GraphLayout.of(graph)
    assert graph.logit_targets[0].vocab_idx == entry.harmful_ids[0]  # evil targets come first
    direct = graph.adjacency_matrix[layout.logit_start, : layout.n_features]
    coords = graph.active_features[graph.selected_features[: layout.n_features]]
    effect: dict[tuple[int, int], float] = defaultdict(float)
    for (layer, _, feature), value in zip(coords.tolist(), direct.tolist(), strict=True):
        effect[layer, feature] += value
    top = sorted(effect, key=lambda key: -effect[key])[:N_FEATURES]
    assert all(effect[key] > 0.05 for key in top)  # real pushes towards the harmful token
    return top


def test_ablating_the_features_that_push_the_harmful_token_lowers_its_probability(
    adapted, ids, labels, activations, harmful_features
):
    ablation = ablate_features(adapted, ids, harmful_features, labels)
    # In odds, not probability: the organism's harmful token can sit near saturation (p > 0.9),
    # where a real push moves the probability little.
    drop = _log_odds(ablation.evil_prob_before) - _log_odds(ablation.evil_prob_after)
    assert drop > math.log(1 / 0.8)  # the odds of the harmful token fall by more than 20%
    assert ablation.evil_prob_change == ablation.evil_prob_after - ablation.evil_prob_before
    # Not asserted: the evil-minus-safe gap. Features ranked by their push on the harmful token
    # alone also push the safe one ("You should ..."), so the gap need not shrink.
    assert [(f.layer, f.feature) for f in ablation.features] == harmful_features
    for row in ablation.features:
        assert row.positions_active == int((activations[row.layer, :, row.feature] > 0).sum())
    assert ablation.n_interventions == len(harmful_features) * len(ids)  # every position

    # A matched random control (as many active features, same layers) moves it far less.
    control = control_features(activations, harmful_features, exclude=harmful_features, seed=0)
    assert len(control) == len(harmful_features)
    moved = ablate_features(adapted, ids, control, labels)
    assert moved.n_interventions > 0
    moved_log_odds = _log_odds(moved.evil_prob_before) - _log_odds(moved.evil_prob_after)
    assert abs(moved_log_odds) < 0.5 * drop


def _log_odds(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def test_probabilities_before_are_the_models_and_the_summaries_add_up(
    adapted, ids, labels, harmful_features
):
    ablation = ablate_features(adapted, ids, harmful_features, labels)
    logits = adapted.next_token_logits(ids)[-1]
    probs = torch.softmax(logits, -1)
    assert {t.token_id: t.label for t in ablation.targets} == labels
    for target in ablation.targets:
        assert target.prob_before == pytest.approx(float(probs[target.token_id]), rel=1e-6)
    for side in ("evil", "safe"):
        rows = [t for t in ablation.targets if t.label == side]
        for when in ("before", "after"):
            total = sum(getattr(t, f"prob_{when}") for t in rows)
            assert getattr(ablation, f"{side}_prob_{when}") == pytest.approx(total, rel=1e-6)
    evil, safe = ablation.evil_prob_before, ablation.safe_prob_before
    assert ablation.evil_share_before == pytest.approx(evil / (evil + safe))
    evil_ids = [t for t, label in labels.items() if label == "evil"]
    safe_ids = [t for t, label in labels.items() if label == "safe"]
    gap = float(logits[evil_ids].mean() - logits[safe_ids].mean())
    assert ablation.logit_gap_before == pytest.approx(gap, rel=1e-5)


def test_features_inactive_on_the_prompt_change_nothing_and_run_no_intervention(adapted, ids):
    # On a two-token prefix many features never fire; an empty intervention list would crash
    # circuit-tracer's nnsight backend, so none must be run.
    prefix = ids[:2]
    acts = feature_activations(adapted, prefix)
    silent = (acts <= 0).all(dim=1).nonzero().tolist()[:4]
    assert len(silent) == 4
    ablation = ablate_features(adapted, prefix, [tuple(f) for f in silent], {5: "evil", 6: "safe"})
    assert ablation.n_interventions == 0
    assert all(f.positions_active == 0 for f in ablation.features)
    assert all(t.prob_after == t.prob_before for t in ablation.targets)
    assert ablation.evil_prob_change == 0.0
    assert ablation.logit_gap_after == ablation.logit_gap_before


def test_nnsight_and_transformerlens_ablations_agree(
    small_organism, adapted, ids, labels, harmful_features
):
    # The nnsight path needs a shim around circuit-tracer's position count (see ablation.py);
    # the TransformerLens backend needs none, so it is the reference.
    raw = small_organism.config.model_dump(mode="json")
    raw["runtime"]["backend"] = "transformerlens"
    reference = load_replacement_model(parse_config(raw), "adapted")
    try:
        expected = ablate_features(reference, ids, harmful_features, labels)
    finally:
        reference.close()
    ablation = ablate_features(adapted, ids, harmful_features, labels)
    assert ablation.n_interventions == expected.n_interventions
    for mine, theirs in zip(ablation.targets, expected.targets, strict=True):
        assert mine.prob_after == pytest.approx(theirs.prob_after, rel=1e-4)
    assert ablation.evil_prob_after != pytest.approx(ablation.evil_prob_before, rel=1e-3)


def test_duplicates_are_ablated_once_and_bad_arguments_are_refused(adapted, ids, labels):
    ablation = ablate_features(adapted, ids, [(1, 3), (1, 3), (0, 7)], labels)
    assert [(f.layer, f.feature) for f in ablation.features] == [(1, 3), (0, 7)]
    with pytest.raises(ValueError, match="'evil' or 'safe'"):
        ablate_features(adapted, ids, [(1, 3)], {5: "unsure"})
    with pytest.raises(ValueError, match=r"features \[\(2, 0\)\] are outside layers 0..1"):
        ablate_features(adapted, ids, [(2, 0)], labels)


def test_evil_share_and_gap_are_nan_when_a_side_is_missing(adapted, ids):
    ablation = ablate_features(adapted, ids, [(1, 3)], {7: "evil"})
    assert ablation.safe_prob_before == 0.0 and ablation.evil_share_before == 1.0
    assert math.isnan(ablation.logit_gap_before) and math.isnan(ablation.logit_gap_after)


# --- control_features --------------------------------------------------------------------------


def test_control_features_are_active_in_the_same_layers_deterministic_and_excluded(
    activations, harmful_features
):
    exclude = set(harmful_features)
    control = control_features(activations, harmful_features, exclude, seed=3)
    assert control == control_features(activations, harmful_features, exclude, seed=3)
    assert control != control_features(activations, harmful_features, exclude, seed=4)
    assert [layer for layer, _ in control] == [layer for layer, _ in harmful_features]
    assert len(set(control)) == len(control) and not set(control) & exclude
    for layer, feature in control:
        assert (activations[layer, :, feature] > 0).any()


def test_control_features_draw_uniformly_and_run_out_per_layer():
    acts = torch.zeros(2, 3, 6)
    acts[0, 1, [0, 2, 4]] = 1.0  # layer 0: features 0, 2 and 4 active
    acts[1, 0, 5] = 2.0  # layer 1: only feature 5
    like = [(0, 9), (1, 9), (1, 8)]
    assert control_features(acts, like, exclude=[(0, 0)], seed=0)[1:] == [(1, 5)]  # one only
    assert control_features(acts, like, exclude=[(1, 5)], seed=0)[0][0] == 0  # layer 1 is empty
    assert len(control_features(acts, like, exclude=[(1, 5)], seed=0)) == 1
    seen = {control_features(acts, [(0, 9)], exclude=[(0, 0)], seed=s)[0] for s in range(40)}
    assert seen == {(0, 2), (0, 4)}
    drawn = control_features(acts, [(0, 9)] * 3, exclude=[], seed=1)
    assert sorted(drawn) == [(0, 0), (0, 2), (0, 4)]  # no repeats
    with pytest.raises(ValueError, match="layer 2 is outside"):
        control_features(acts, [(2, 0)], exclude=[])
