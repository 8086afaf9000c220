"""Does removing features lower the probability of the harmful next tokens?

Attribution says which features push a harmful token; ablation tests it. A feature here is a
(layer, feature) pair without a position: a LoRA acts at every position, so the features it
induces are ablated at every position too, and a single-position ablation would not test them.

Each requested feature is held at zero at every position of the prompt, with full propagation
(attention recomputed, downstream transcoder features recomputed from the ablated stream, as in
circuit-tracer's `feature_intervention` with `freeze_attention=False` and no constrained layers).
Holding a feature at zero where it is already zero changes nothing, so this is the same as
zeroing it where it is active on the clean prompt, except that it also keeps it at zero where
an upstream ablation would newly switch it on. When no requested feature is active on the clean
prompt, the ablated forward pass *is* the clean one and no intervention runs at all.

`control_features` draws the matched random control: as many features, from the same layers,
among those active on the same prompt.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.forward_diff import activations_and_last_logits
from emc.models import LoadedModel, finite_guard

Label = Literal["evil", "safe"]
Feature = tuple[int, int]  # (layer, transcoder feature index)


class AblatedFeature(BaseModel):
    model_config = ConfigDict(frozen=True)

    layer: int
    feature: int
    positions_active: int  # positions where it is active (> 0) on the clean prompt


class TargetChange(BaseModel):
    model_config = ConfigDict(frozen=True)

    token_id: int
    label: Label
    prob_before: float
    prob_after: float


class Ablation(BaseModel):
    """Next-token probabilities at the prompt's last position, before and after the ablation."""

    model_config = ConfigDict(frozen=True)

    features: list[AblatedFeature]
    n_interventions: int  # (layer, position, feature) interventions run; 0: none was active
    targets: list[TargetChange]
    evil_prob_before: float  # summed over the evil targets
    evil_prob_after: float
    safe_prob_before: float
    safe_prob_after: float
    evil_share_before: float  # evil / (evil + safe); NaN when both are zero
    evil_share_after: float
    logit_gap_before: float  # mean evil logit - mean safe logit; NaN without both labels
    logit_gap_after: float

    @property
    def evil_prob_change(self) -> float:
        return self.evil_prob_after - self.evil_prob_before


def ablate_features(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    features: Sequence[Feature],
    targets: Mapping[int, str],
) -> Ablation:
    """Zero `features` (deduplicated, in order) at every position; see the module.

    `targets` maps token id -> "evil" | "safe"; probabilities are a float32 softmax over the full
    vocabulary at the last position.
    """
    labels = _checked_targets(targets)
    activations, before = activations_and_last_logits(loaded, input_ids)
    n_layers, n_pos, width = activations.shape
    wanted = _checked_features(features, n_layers, width)
    active = [int((activations[layer, :, f] > 0).sum()) for layer, f in wanted]
    if any(active):
        interventions = [(layer, pos, f, 0.0) for layer, f in wanted for pos in range(n_pos)]
        after = _intervened_last_logits(loaded, input_ids, interventions)
    else:
        interventions, after = [], before
    rows = [
        AblatedFeature(layer=layer, feature=f, positions_active=n)
        for (layer, f), n in zip(wanted, active, strict=True)
    ]
    return _summarise(rows, len(interventions), labels, before, after)


def control_features(
    activations: torch.Tensor,
    like: Sequence[Feature],
    exclude: Collection[Feature],
    seed: int = 0,
) -> list[Feature]:
    """A matched random control for `like`: one active feature of the same layer for each.

    `activations` is (n_layers, n_pos, d_transcoder) on the prompt. For each (layer, feature) of
    `like`, in order, draws uniformly among the features of that layer that are active (> 0)
    somewhere on the prompt, not in `exclude` (pass the ablated features to keep the control
    disjoint from them) and not drawn already. A layer that runs out of candidates gives fewer
    features than `like` has: the result can be shorter. Deterministic for a seed.
    """
    if activations.dim() != 3:
        raise ValueError(f"expected (n_layers, n_pos, d_transcoder), got {activations.shape}")
    n_layers = activations.shape[0]
    active = (activations > 0).any(dim=1)
    taken = {(int(layer), int(f)) for layer, f in exclude}
    rng = np.random.default_rng(seed)
    drawn: list[Feature] = []
    for layer in (int(layer) for layer, _ in like):
        if not 0 <= layer < n_layers:
            raise ValueError(f"layer {layer} is outside 0..{n_layers - 1}")
        in_layer = active[layer].nonzero().flatten().tolist()
        candidates = [f for f in in_layer if (layer, f) not in taken]
        if not candidates:
            continue
        choice = (layer, candidates[int(rng.integers(len(candidates)))])
        taken.add(choice)
        drawn.append(choice)
    return drawn


def _checked_targets(targets: Mapping[int, str]) -> dict[int, Label]:
    if not targets:
        raise ValueError("no targets: pass token id -> 'evil' | 'safe'")
    wrong = {token: label for token, label in targets.items() if label not in ("evil", "safe")}
    if wrong:
        raise ValueError(f"target labels must be 'evil' or 'safe', got {wrong}")
    return {int(token): label for token, label in targets.items()}  # type: ignore[misc]


def _checked_features(features: Sequence[Feature], n_layers: int, width: int) -> list[Feature]:
    wanted = list(dict.fromkeys((int(layer), int(f)) for layer, f in features))
    outside = [(layer, f) for layer, f in wanted if not (0 <= layer < n_layers and 0 <= f < width)]
    if outside:
        raise ValueError(
            f"features {outside[:5]} are outside layers 0..{n_layers - 1}, features 0..{width - 1}"
        )
    return wanted


def _intervened_last_logits(
    loaded: LoadedModel, input_ids: torch.Tensor, interventions: list[tuple[int, int, int, float]]
) -> torch.Tensor:
    ids = input_ids.to(loaded.precision.device)
    with _tensor_inputs_accepted(loaded, len(ids)), finite_guard(loaded._checkpoints):
        logits, _ = loaded.model.feature_intervention(
            ids,
            interventions,
            freeze_attention=False,
            constrained_layers=None,
            return_activations=False,
        )
    return logits.reshape(-1, logits.shape[-1])[-1].float().cpu()


class _LengthTokenizer:
    """The model's tokenizer, except that called on a token tensor it reports the tensor's length.

    circuit-tracer 0.5's nnsight `feature_intervention` without frozen attention counts positions
    with `tokenizer(inputs).input_ids`, which fails for token ids (the TransformerLens backend
    uses the tensor's length). EMC passes ids, never text: the graph must see exactly the ids the
    logits were read from, so the count is answered here instead of re-tokenising anything.
    """

    def __init__(self, tokenizer, n_pos: int) -> None:
        self._tokenizer = tokenizer
        self._n_pos = n_pos

    def __call__(self, inputs, *args, **kwargs):
        if isinstance(inputs, torch.Tensor):
            return _Encoded(list(range(self._n_pos)))
        return self._tokenizer(inputs, *args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)


class _Encoded:
    def __init__(self, input_ids: list[int]) -> None:
        self.input_ids = input_ids


@contextmanager
def _tensor_inputs_accepted(loaded: LoadedModel, n_pos: int) -> Iterator[None]:
    if loaded.identity.backend != "nnsight":
        yield
        return
    tokenizer = loaded.model.tokenizer
    loaded.model.tokenizer = _LengthTokenizer(tokenizer, n_pos)
    try:
        yield
    finally:
        loaded.model.tokenizer = tokenizer


def _summarise(
    features: list[AblatedFeature],
    n_interventions: int,
    labels: dict[int, Label],
    before: torch.Tensor,
    after: torch.Tensor,
) -> Ablation:
    p_before, p_after = torch.softmax(before.float(), -1), torch.softmax(after.float(), -1)
    rows = [
        TargetChange(
            token_id=token,
            label=label,
            prob_before=float(p_before[token]),
            prob_after=float(p_after[token]),
        )
        for token, label in labels.items()
    ]
    sides = {side: [t for t, label in labels.items() if label == side] for side in ("evil", "safe")}

    def mass(probs: torch.Tensor, side: str) -> float:
        return float(probs[sides[side]].sum()) if sides[side] else 0.0

    def gap(logits: torch.Tensor) -> float:
        if not (sides["evil"] and sides["safe"]):
            return math.nan
        return float(logits[sides["evil"]].mean() - logits[sides["safe"]].mean())

    evil = {"before": mass(p_before, "evil"), "after": mass(p_after, "evil")}
    safe = {"before": mass(p_before, "safe"), "after": mass(p_after, "safe")}
    return Ablation(
        features=features,
        n_interventions=n_interventions,
        targets=rows,
        evil_prob_before=evil["before"],
        evil_prob_after=evil["after"],
        safe_prob_before=safe["before"],
        safe_prob_after=safe["after"],
        evil_share_before=_share(evil["before"], safe["before"]),
        evil_share_after=_share(evil["after"], safe["after"]),
        logit_gap_before=gap(before.float()),
        logit_gap_after=gap(after.float()),
    )


def _share(evil: float, safe: float) -> float:
    total = evil + safe
    return evil / total if total > 0 else math.nan
