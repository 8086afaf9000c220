"""Reading rollouts: cuts against controls, coherence, and the goal's verdict (pure functions,
hand-worked numbers)."""

from __future__ import annotations

import pytest

from emc.analysis.rollout_report import (
    best_narrow,
    control_target,
    rollout_effects,
    rollout_lines,
)


def row(family, kind, target, role, p, coherent=90.0, positions="prompt", n_features=20):
    return {"family": family, "kind": kind, "target": target, "model_role": role,
            "positions": positions, "n_features": n_features, "prompts": 4, "n": 80,
            "p_harmful": p, "mean_coherent": coherent}  # fmt: skip


ROWS = [
    row("none", "none", "as is", "base", 0.1, 80.0, "", 0),
    row("none", "none", "as is", "adapted", 0.9, 80.0, "", 0),
    row("features", "restore", "top 20", "adapted", 0.171, 76.0),
    row("features", "restore", "random 20", "adapted", 0.855),
    row("features", "restore", "top 100", "adapted", 0.0, 40.0, n_features=100),
    row("features", "restore", "random 100", "adapted", 0.9, n_features=100),
    row("features", "inject", "top 20", "base", 0.5),
    row("direction", "subtract", "prompts, every layer", "adapted", 0.0, 20.0, "all", 4),
    row("direction", "subtract", "random (prompts), every layer", "adapted", 0.9, 70.0, "all", 4),
    row("adapter", "scale", "x0.5", "base", 0.7, positions="all", n_features=28),
    row(
        "direction",
        "ablate",
        "prompts, layer 0 direction, every layer",
        "adapted",
        0.05,
        95.0,
        "all",
        4,
    ),
    row(
        "direction",
        "ablate",
        "random (prompts), layer 0 direction, every layer",
        "adapted",
        0.88,
        80.0,
        "all",
        4,
    ),
]


def test_controls_are_found_by_the_random_counterpart_of_the_target():
    assert control_target("top 20") == "random 20"
    assert control_target("prompts, every layer") == "random (prompts), every layer"


def test_cuts_reproductions_and_coherence_changes_are_hand_worked():
    effects = {(e.kind, e.target): e for e in rollout_effects(ROWS)}
    assert len(effects) == 6  # controls and the models as they are are not settings
    top20 = effects[("restore", "top 20")]
    assert top20.effect == pytest.approx((0.9 - 0.171) / 0.9)  # 0.81
    assert top20.control_effect == pytest.approx(0.05)
    assert top20.coherence_change == pytest.approx(-0.05)
    assert top20.meets_goal
    # Removing the harm by breaking the model is not a finding.
    top100 = effects[("restore", "top 100")]
    assert top100.effect == pytest.approx(1.0) and not top100.meets_goal
    assert effects[("inject", "top 20")].effect == pytest.approx(0.5)  # (0.5 - 0.1) / 0.8
    assert effects[("inject", "top 20")].control_p is None
    assert effects[("scale", "x0.5")].effect == pytest.approx(0.75)


def test_the_best_narrow_intervention_is_20_features_or_one_direction_on_the_adapted_model():
    effects = rollout_effects(ROWS)
    best = best_narrow(effects)
    # One direction out of every layer (rank 1) is narrow; every layer's own at once is not.
    assert best.target == "prompts, layer 0 direction, every layer"
    assert best.meets_goal and best.coherence_change > 0  # more coherent is no harm
    assert not next(e for e in effects if e.target == "prompts, every layer").narrow
    assert control_target(best.target) == "random (prompts), layer 0 direction, every layer"
    rows = [r for r in ROWS if r["family"] != "direction"]
    best = best_narrow(rollout_effects(rows))
    assert (best.kind, best.target) == ("restore", "top 20")
    worse = [r | {"p_harmful": 0.5} if r["target"] == "top 20" else r for r in rows]
    best = best_narrow(rollout_effects(worse))
    assert best.target == "top 20" and not best.meets_goal  # cut 44%


def test_the_lines_state_the_verdict_and_need_both_models_as_they_are():
    lines = rollout_lines(ROWS)
    assert lines[0].startswith("what the models then say")
    assert "base 0.10 (coherence 80), adapted 0.90 (coherence 80)" in lines[0]
    assert any(
        "restore top 20, prompt positions (adapted): 0.17 (cut 81%" in line for line in lines
    )
    assert "meets the goal" in lines[-1]
    assert rollout_lines(ROWS[1:]) == [] and rollout_effects(ROWS[1:]) == []
