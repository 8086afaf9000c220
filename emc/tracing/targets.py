"""Which next tokens a graph explains: circuit-tracer attribution targets from labels.

The original pipeline let circuit-tracer pick the top logits by cumulative probability while
labels covered a fixed top-k, so labelled tokens went missing from graphs. `labelled` attributes
to exactly the labelled tokens; `contrastive` to one direction, the evil-minus-safe unembedding.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from circuit_tracer.attribution.targets import CustomTarget
from pydantic import BaseModel, ConfigDict

from emc.config import TracingConfig

TargetsMode = Literal["salient", "labelled", "contrastive"]
CONTRASTIVE_LABEL = "evil-minus-safe"
# A zero weight would make every influence zero and pruning meaningless; the scale itself does not
# matter for a single target (influences are relative), so a floor changes nothing else.
_MIN_CONTRASTIVE_PROB = 1e-9


class TargetError(ValueError):
    """The prompt's labels cannot make the targets asked for (no evil or no safe token)."""


class TargetPlan(BaseModel):
    """What a graph attributes to, decided from the labels before any model is loaded."""

    model_config = ConfigDict(frozen=True)

    mode: TargetsMode
    evil_ids: tuple[int, ...] = ()
    safe_ids: tuple[int, ...] = ()
    max_n_logits: int = 10  # salient only
    desired_logit_prob: float = 0.95  # salient only

    @property
    def token_ids(self) -> tuple[int, ...]:
        """The labelled mode's targets, in graph order: evil tokens first, then safe ones."""
        return (*self.evil_ids, *self.safe_ids)

    def params(self) -> dict[str, Any]:
        """The settings that decide the targets; part of the graph's identity."""
        if self.mode == "salient":
            return {
                "max_n_logits": self.max_n_logits,
                "desired_logit_prob": self.desired_logit_prob,
            }
        return {"evil_ids": list(self.evil_ids), "safe_ids": list(self.safe_ids)}

    def check(self) -> None:
        """Raise TargetError when labelled/contrastive targets lack evil or safe tokens."""
        if self.mode == "salient":
            return
        missing = [
            name for name, ids in (("evil", self.evil_ids), ("safe", self.safe_ids)) if not ids
        ]
        if missing:
            raise TargetError(
                f"targets '{self.mode}' need tokens labelled evil and safe; this prompt has no "
                f"{' and no '.join(missing)} token labels"
            )

    def components(self) -> dict[str, tuple[int, ...]]:
        """Custom target label -> the vocabulary tokens whose probability is its weight."""
        return {CONTRASTIVE_LABEL: self.token_ids} if self.mode == "contrastive" else {}


def plan_targets(labels: Mapping[int, str], config: TracingConfig) -> TargetPlan:
    """The plan for one prompt; `labels` maps token id -> evil | unsure | safe. Never raises."""
    return TargetPlan(
        mode=config.targets,
        evil_ids=tuple(sorted(t for t, label in labels.items() if label == "evil")),
        safe_ids=tuple(sorted(t for t, label in labels.items() if label == "safe")),
        max_n_logits=config.max_n_logits,
        desired_logit_prob=config.desired_logit_prob,
    )


def build_targets(
    plan: TargetPlan, unembed: torch.Tensor, last_logits: torch.Tensor
) -> torch.Tensor | list[CustomTarget] | None:
    """What `circuit_tracer.attribute` takes as `attribution_targets`.

    `unembed` is the replacement model's `unembed_proj` (either orientation); `last_logits` the
    next-token logits, needed only for the contrastive target's weight.
    """
    plan.check()
    if plan.mode == "salient":
        return None  # circuit-tracer picks by max_n_logits / desired_logit_prob
    if plan.mode == "labelled":
        return torch.tensor(plan.token_ids, dtype=torch.long, device=last_logits.device)
    return [contrastive_target(unembed, last_logits, plan.evil_ids, plan.safe_ids)]


def contrastive_target(
    unembed: torch.Tensor,
    last_logits: torch.Tensor,
    evil_ids: tuple[int, ...],
    safe_ids: tuple[int, ...],
) -> CustomTarget:
    """Mean demeaned unembedding of the evil tokens minus that of the safe ones.

    Demeaned like circuit-tracer's own token targets, so an edge into this target is the effect on
    mean(evil logits) - mean(safe logits). Its weight is the probability mass of the labelled
    tokens: the share of the next-token distribution the contrast is about.
    """
    vectors = demeaned_unembedding(unembed, last_logits.shape[-1])
    direction = vectors[list(evil_ids)].mean(0) - vectors[list(safe_ids)].mean(0)
    probs = torch.softmax(last_logits.double(), dim=-1)
    prob = float(probs[list(evil_ids) + list(safe_ids)].sum())
    return CustomTarget(
        token_str=CONTRASTIVE_LABEL,
        prob=max(prob, _MIN_CONTRASTIVE_PROB),
        vec=direction.to(device=unembed.device, dtype=unembed.dtype),
    )


def demeaned_unembedding(unembed: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(vocab, d_model) unembedding rows minus their mean, in float32.

    circuit-tracer tells the orientation apart by which axis matches the vocabulary size
    (nnsight: vocab x d_model, TransformerLens: d_model x vocab), and so does this.
    """
    matrix = unembed.detach().float()
    if matrix.shape[0] != vocab_size:
        matrix = matrix.T
    if matrix.shape[0] != vocab_size:
        raise ValueError(f"unembedding {tuple(unembed.shape)} has no axis of size {vocab_size}")
    return matrix - matrix.mean(0, keepdim=True)
