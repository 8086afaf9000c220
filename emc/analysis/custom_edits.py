"""A researcher's own hypothesis: do *these* features carry the harm?

`emc intervene --features L/F,...` names features (from the Features page, a graph, a paper) and
how to edit them. The edit is measured the way EMC's own checks are, against as many matched
random features (same layers, active on the prompt):

- **restore** (in the adapted model, to the base model's activations) and **inject** (into the
  base model, at the adapted model's) as in the dose-response, at the prompt's positions or, with
  `positions="all"`, at generated positions too (`live_source`);
- **zero** and **scale** (x strength, negative included) in the adapted model, which act at every
  position by nature.

The next-token share is of the shift in the evil-minus-safe gap: what an edit on the adapted
model leaves (1 - removed) or one on the base model makes. The rollout settings sample what the
model then says, through `emc.analysis.rollouts`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.feature_interventions import (
    Feature,
    FeatureEdit,
    Mode,
    RankedFeatures,
    gap_with,
    logits_with,
    matched_control,
    rank_features,
)
from emc.analysis.hooks import logit_gap, split_targets
from emc.analysis.rollouts import RolloutSetting, feature_hooks
from emc.models import LoadedModel

TOP_TOKENS = 5  # next tokens shown before and after an edit
_FEATURE = re.compile(r"^\s*L?(\d+)\s*/\s*(\d+)\s*$")


def parse_features(text: str) -> tuple[Feature, ...]:
    """`"0/12, 1/40"` (or `L0/12`) -> ((0, 12), (1, 40)); a clear error for anything else."""
    features = []
    for part in text.split(","):
        match = _FEATURE.match(part)
        if not match:
            raise ValueError(
                f"cannot read feature {part.strip()!r}: write LAYER/FEATURE, e.g. 0/12,1/40"
            )
        features.append((int(match.group(1)), int(match.group(2))))
    if not features:
        raise ValueError("name at least one feature, e.g. --features 0/12,1/40")
    return tuple(dict.fromkeys(features))


@dataclass(frozen=True)
class CustomEdit:
    features: tuple[Feature, ...]
    mode: Mode = "restore"
    strength: float = 0.0  # the factor for scale
    positions: str = "all"  # restore / inject: prompt | all

    def __post_init__(self) -> None:
        if self.positions not in ("prompt", "all"):
            raise ValueError(f"positions must be prompt or all, not {self.positions!r}")

    @property
    def model_role(self) -> str:
        return "base" if self.mode == "inject" else "adapted"

    @property
    def label(self) -> str:
        """How the edit is named in the store: its features, mode's factor and positions."""
        names = ",".join(f"{layer}/{feature}" for layer, feature in self.features)
        factor = f" x{self.strength:g}" if self.mode == "scale" else ""
        return f"{names}{factor} @ {self.positions}"


class CustomResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    gap_base: float
    gap_adapted: float
    gap: float
    share: float  # (gap - base gap) / shift
    control_features: list[Feature]
    control_gap: float | None
    control_share: float | None
    top_before: list[tuple[str, float]]  # the edited model's top next tokens, unedited
    top_after: list[tuple[str, float]]  # and edited: (token, probability)


def check_features(loaded: LoadedModel, features: Sequence[Feature]) -> None:
    """Refuse features the transcoders do not have, naming the ones that are out of range."""
    from emc.models.dictionary import dictionary_of

    dictionary = dictionary_of(loaded)
    n_layers, width = dictionary.n_layers, dictionary.width
    wrong = [f"{lay}/{f}" for lay, f in features if not (0 <= lay < n_layers and 0 <= f < width)]
    if wrong:
        raise ValueError(
            f"no such features: {', '.join(wrong)} (the transcoders have {n_layers} layers of "
            f"{width} features)"
        )


def custom_effect(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    edit: CustomEdit,
    seed: int = 0,
    ranked: RankedFeatures | None = None,
) -> CustomResult:
    """The edit's next-token effect on the gap, beside a matched random control."""
    check_features(adapted, edit.features)
    evil, safe = split_targets(targets, "custom feature interventions")
    ranked = ranked or rank_features(base, adapted, input_ids, targets)
    shift = ranked.gap_adapted - ranked.gap_base
    if shift == 0:
        raise ValueError("the models' gaps are equal on this prompt: no shift to intervene on")
    model = base if edit.model_role == "base" else adapted
    control = matched_control(edit.features, ranked.active, seed)
    before = logits_with(model, input_ids)
    after = logits_with(model, input_ids, _edit(edit, edit.features, ranked))
    gap = logit_gap(after, evil, safe)
    control_gap = (
        gap_with(model, input_ids, evil, safe, _edit(edit, tuple(control), ranked))
        if control
        else None
    )
    return CustomResult(
        gap_base=ranked.gap_base,
        gap_adapted=ranked.gap_adapted,
        gap=gap,
        share=(gap - ranked.gap_base) / shift,
        control_features=control,
        control_gap=control_gap,
        control_share=None if control_gap is None else (control_gap - ranked.gap_base) / shift,
        top_before=top_tokens(model, before, TOP_TOKENS),
        top_after=top_tokens(model, after, TOP_TOKENS),
    )


def top_tokens(loaded: LoadedModel, logits: torch.Tensor, k: int) -> list[tuple[str, float]]:
    """The k most probable next tokens, decoded, with their probabilities."""
    probs = torch.softmax(logits.double(), dim=-1)
    values, ids = probs.topk(k)
    return [
        (loaded.tokenizer.decode([int(i)]), float(v))
        for v, i in zip(values.tolist(), ids.tolist(), strict=True)
    ]


def custom_settings(
    base: LoadedModel,
    adapted: LoadedModel,
    edit: CustomEdit,
    control: Sequence[Feature],
    ranked: RankedFeatures,
) -> list[RolloutSetting]:
    """The edit and its control as rollout settings (family `custom`)."""
    model, other = (base, adapted) if edit.model_role == "base" else (adapted, base)
    settings = []
    for name, features in ((edit.label, edit.features), (f"random ({edit.label})", tuple(control))):
        if not features:
            continue
        persistent = edit.mode in ("restore", "inject") and edit.positions == "all"
        hooks = feature_hooks(model, other, _edit(edit, features, ranked), persistent)
        settings.append(
            RolloutSetting("custom", edit.mode, name, edit.model_role, model, edit.positions,
                           len(features), hooks, use_cache=edit.mode in ("zero", "scale"))
        )  # fmt: skip
    return settings


def _edit(edit: CustomEdit, features: tuple[Feature, ...], ranked: RankedFeatures) -> FeatureEdit:
    source = {"restore": ranked.base_acts, "inject": ranked.adapted_acts}.get(edit.mode)
    return FeatureEdit(edit.mode, features, edit.strength, source)
