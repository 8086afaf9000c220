"""Do the top-ranked features agree with what the fine-tune demonstrably changed?

Three independent views of "what the adapter changed", compared with the ranking by evil-vs-safe
effect in the adapted graphs:
- activation deltas: features whose activation moved most between base and adapted forward passes;
- LoRA geometry: features the adapter's output directions align with beyond chance;
- ablation: zeroing the top features in the adapted model should lower the harmful-token
  probability more than zeroing as many random active features of the same layers.
On the model organism the misalignment was planted, so these are checks of the method itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

Feature = tuple[int, int]  # (layer, feature): position-free identity


@dataclass(frozen=True)
class AblationSummary:
    prompts: int
    top_mean_change: float  # mean change of the evil probability (after - before)
    control_mean_change: float | None
    top_lowered: int  # prompts where zeroing the top features lowered the evil probability
    top_mean_share_change: float | None  # mean change of evil / (evil + safe)
    control_mean_share_change: float | None
    # Mean change of (mean evil logit - mean safe logit): where the adapted model is near-certain
    # of an evil token, probabilities saturate and the logit gap is what still moves.
    top_mean_gap_change: float | None
    control_mean_gap_change: float | None


@dataclass(frozen=True)
class GroundTruth:
    k: int
    top: list[Feature]  # the ranking's top k
    changed: list[Feature]  # top k by mean |activation delta|
    ranked_features: int  # how many features the ranking holds: the draw for chance overlap
    overlap_changed: list[Feature]
    delta_ranks: dict[Feature, int | None]  # each top feature's rank by |activation delta|
    lora_aligned: list[Feature]  # beyond the 99th percentile of chance
    overlap_lora: list[Feature]
    ablation: AblationSummary | None

    @property
    def expected_overlap(self) -> float:
        """Overlap two random k-subsets of the ranked features would have on average."""
        n = self.ranked_features
        return self.k * min(self.k, len(self.changed)) / n if n else 0.0

    def markdown(self) -> str:
        ranks = ", ".join(
            f"{_name(f)} #{r}" if r else f"{_name(f)} -" for f, r in self.delta_ranks.items()
        )
        lines = [
            f"Top {self.k} features by evil-vs-safe effect (adapted): "
            + ", ".join(_name(f) for f in self.top),
            f"- {len(self.overlap_changed)} of them are among the {len(self.changed)} features "
            f"whose activation changed most (chance: {self.expected_overlap:.2f}); ranks by "
            f"|activation delta|: {ranks}",
            f"- {len(self.overlap_lora)} of them are among the {len(self.lora_aligned)} features "
            "the adapter's output directions align with beyond the 99th percentile of chance.",
        ]
        a = self.ablation
        if a is None:
            lines.append("- No ablation measured.")
        else:
            lines.append(
                f"- Zeroing them at every position changed the evil-token probability by "
                f"{a.top_mean_change:+.4f} and the evil-minus-safe logit gap by "
                f"{_signed(a.top_mean_gap_change)} on average over {a.prompts} prompts "
                f"(probability lowered in {a.top_lowered}); zeroing as many random active "
                f"features of the same layers: {_signed(a.control_mean_change, 4)} and "
                f"{_signed(a.control_mean_gap_change)}."
            )
        return "\n".join(lines)


def compare_with_ground_truth(
    ranking: pd.DataFrame,
    deltas: pd.DataFrame,
    lora_features: pd.DataFrame,
    ablations: pd.DataFrame,
    k: int = 5,
    aligned_percentile: float = 99.0,
) -> GroundTruth:
    """`ranking`: feature_ranking rows (top=None); `deltas`: activation_delta_summary rows;
    `lora_features`: stored top-aligned features; `ablations`: ablation_results rows."""
    top = _features(ranking.head(k))
    changed = _features(deltas.head(k))
    delta_rank = {
        (int(r.layer), int(r.feature)): int(r.rank) for r in deltas.itertuples(index=False)
    }
    aligned: list[Feature] = []
    if not lora_features.empty:
        beyond = lora_features[lora_features["null_percentile"] >= aligned_percentile]
        aligned = sorted(set(_features(beyond)))
    return GroundTruth(
        k=k,
        top=top,
        changed=changed,
        ranked_features=len(ranking),
        overlap_changed=[f for f in top if f in set(changed)],
        delta_ranks={f: delta_rank.get(f) for f in top},
        lora_aligned=aligned,
        overlap_lora=[f for f in top if f in set(aligned)],
        ablation=summarize_ablations(ablations),
    )


def summarize_ablations(ablations: pd.DataFrame) -> AblationSummary | None:
    if ablations.empty:
        return None
    top = ablations[ablations["kind"] == "top"]
    control = ablations[ablations["kind"] == "control"]
    if top.empty:
        return None
    return AblationSummary(
        prompts=int(top["prompt_id"].nunique()),
        top_mean_change=float(top["evil_prob_change"].mean()),
        control_mean_change=float(control["evil_prob_change"].mean()) if len(control) else None,
        top_lowered=int((top["evil_prob_change"] < 0).sum()),
        top_mean_share_change=_mean(top["evil_share_change"]),
        control_mean_share_change=_mean(control["evil_share_change"]) if len(control) else None,
        top_mean_gap_change=_mean(top["logit_gap_change"]),
        control_mean_gap_change=_mean(control["logit_gap_change"]) if len(control) else None,
    )


def _features(frame: pd.DataFrame) -> list[Feature]:
    return [(int(r.layer), int(r.feature)) for r in frame[["layer", "feature"]].itertuples()]


def _mean(values: pd.Series) -> float | None:
    present = values.dropna()
    return float(present.mean()) if len(present) else None


def _signed(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or value != value else f"{value:+.{digits}f}"


def _name(feature: Feature) -> str:
    return f"L{feature[0]}/{feature[1]}"
