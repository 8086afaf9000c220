"""The causal checks in numbers and sentences: what the decomposition explains, the best narrow
intervention against its control, and what the models then say.

A *narrow* intervention is at most 20 features, one direction (one layer's, at that layer or
projected out of every layer: rank 1) or one LoRA module; removing the whole adapter, a whole
layer of it, or every layer's own direction at once does not count (the causal-validation
issue's definition).
"""

from __future__ import annotations

import pandas as pd

from emc.analysis.rollout_report import best_narrow, rollout_effects, rollout_lines


def summarize_causal(
    explained: pd.DataFrame, interventions: pd.DataFrame, rollouts: pd.DataFrame
) -> dict:
    """The headline numbers: how much the decomposition explains, the best narrow intervention
    against its control, and what the models say under each setting.

    The frames are `emc.store.interventions`' `explained_per_prompt`, `intervention_summary`
    and `rollout_summary` of one model pair."""
    summary: dict = {
        "decomposed_prompts": len(explained),
        "explained": _mean(explained, "explained"),
        "unexplained": _mean(explained, "unexplained"),
        "attention_share": _mean(explained, "attn"),
        "mlp_features_share": _mean(explained, "mlp_features"),
        "mlp_error_share": _mean(explained, "mlp_error"),
    }
    removals = interventions[interventions["model_role"] == "adapted"]
    narrow = removals[
        ((removals["family"] == "features") & (removals["n_targets"] <= 20))
        | ((removals["family"] == "direction") & _one_direction(removals["target"]))
        | (removals["kind"] == "without_module")
    ]
    if not rollouts.empty:
        columns = ["family", "kind", "target", "model_role", "positions", "n_features",
                   "prompts", "n", "p_harmful", "mean_coherent"]  # fmt: skip
        rows = rollouts[columns].astype(object).where(rollouts[columns].notna(), None)
        summary["rollouts"] = rows.to_dict(orient="records")
        best_rollout = best_narrow(rollout_effects(summary["rollouts"]))
        if best_rollout is not None:
            summary["best_narrow_rollout"] = best_rollout.model_dump() | {
                "meets_goal": best_rollout.meets_goal
            }
    best = narrow.sort_values("removed", ascending=False).head(1)
    if len(best):
        row = best.iloc[0]
        summary["best_narrow"] = {
            "family": row["family"],
            "kind": row["kind"],
            "target": row["target"],
            "removed": float(row["removed"]),
            "control_removed": None
            if pd.isna(row["control_removed"])
            else float(row["control_removed"]),
            "prompts": int(row["prompts"]),
        }
    return summary


def _one_direction(targets: pd.Series) -> pd.Series:
    """One direction (rank 1): one layer's, at that layer or out of every layer; not every
    layer's own at once."""
    return ~targets.str.endswith("every layer") | targets.str.endswith("direction, every layer")


def _mean(frame: pd.DataFrame, column: str) -> float | None:
    values = frame[column].dropna() if column in frame else []
    return float(values.mean()) if len(values) else None


def headline(summary: dict) -> list[str]:
    """The decomposition's and the best narrow intervention's sentences, for people."""
    lines = []
    if summary.get("explained") is not None:
        lines.append(
            f"decomposition over {summary['decomposed_prompts']} prompts: the direct writes "
            f"explain {summary['explained']:.1%} of the shift on average (unexplained "
            f"{summary['unexplained']:.1%}); MLP features {summary['mlp_features_share']:.1%}, "
            f"MLP error nodes {summary['mlp_error_share']:.1%}, attention "
            f"{summary['attention_share']:.1%}"
        )
    best = summary.get("best_narrow")
    if best:
        control = best["control_removed"]
        lines.append(
            "best narrow intervention (at most 20 features, one direction or one LoRA "
            f"module): {best['family']} {best['kind']} {best['target']} removes "
            f"{best['removed']:.1%} of the shift"
            + ("" if control is None else f"; its matched control {control:.1%}")
        )
    lines += rollout_lines(summary.get("rollouts") or [])
    return lines
