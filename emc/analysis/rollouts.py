"""What the model then *says* under an intervention, against a matched random control.

The next-token checks show that an intervention moves the evil-minus-safe gap. A finding is only
a causal claim about behaviour when it also changes what the model goes on to say, and an
intervention that removes the harm by breaking the model is no finding at all. So each setting
samples continuations of the prompt (same seeds in every setting), the judge labels each harmful,
safe or unclear and scores its coherence (0-100), and p(harmful) comes with a 95% Wilson
interval beside the mean coherence:

- **as is**: the base and the adapted model;
- **features** (`feature_settings`): the top-k attributed features restored to their base
  activations in the adapted model, and injected at their adapted activations into the base
  model, against as many matched random features. `positions="prompt"` edits the prompt's
  positions only (generated positions keep the model's own activations); `positions="all"`
  edits every position, generated ones included, by reading each step's sequence with the other
  model first (`live_source`);
- **adapter** (`adapter_settings`): the LoRA delta run as hooks on the base model, scaled by k
  (compared with the base model: how much of the harm it reproduces), and with one layer removed
  at a time (compared with the adapted model: how much it cuts);
- **directions** (`direction_settings`): a direction per layer subtracted from or projected out
  of the adapted model, or added to the base model, at every layer and every position (generated
  ones included), and one layer's direction projected out of every layer (rank 1), against
  random directions of the same norm.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Literal

import torch
from pydantic import BaseModel

from emc.analysis.adapter_interventions import lora_hooks
from emc.analysis.directions import DirectionMode, random_like, steering
from emc.analysis.feature_interventions import (
    FeatureEdit,
    editing,
    live_source,
    matched_control,
    rank_features,
)
from emc.analysis.hooks import hf_module
from emc.analysis.lora_geometry import LoraUpdate
from emc.behaviour.records import ResponseJudge, ResponseToJudge
from emc.behaviour.sampling import SamplingParams, sample
from emc.behaviour.stats import wilson
from emc.models import LoadedModel

Family = Literal["none", "features", "custom", "adapter", "direction"]
# Rank-1 direction ablations sampled per source: every layer of a small model, 8 of a deep one.
MAX_RANK_ONE_LAYERS = 8
Hooks = AbstractContextManager
Positions = Literal["prompt", "all"]


class Rollout(BaseModel):
    family: Family
    kind: str  # none | restore | inject | scale | without_layer | subtract | ablate | add
    target: str  # as is | top 20 | random 20 | x0.5 | layer 0 | every layer | random ...
    model_role: str  # the model sampled: base | adapted
    positions: str  # where the edit acts: prompt | all ("" for as is)
    n_features: int  # features, modules or layers edited
    n: int
    n_harmful: int
    n_unclear: int
    p_harmful: float
    ci_low: float
    ci_high: float
    mean_coherent: float | None  # the judge's coherence, 0-100, over the answers that have one
    examples: list[str]  # the first few answers, for reading


@dataclass(frozen=True)
class RolloutSetting:
    """One way to sample: which model, under which hooks."""

    family: Family
    kind: str
    target: str
    model_role: str
    model: LoadedModel
    positions: str = "all"
    size: int = 0
    hooks: Callable[[], AbstractContextManager] = nullcontext
    # Edits by prompt position need every step's full sequence: no key-value cache then.
    use_cache: bool = True


def as_is_settings(base: LoadedModel, adapted: LoadedModel) -> list[RolloutSetting]:
    return [
        RolloutSetting("none", "none", "as is", "base", base, positions=""),
        RolloutSetting("none", "none", "as is", "adapted", adapted, positions=""),
    ]


def feature_settings(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    ks: Sequence[int] = (20, 100),
    positions: Sequence[Positions] = ("prompt",),
    seed: int = 0,
) -> list[RolloutSetting]:
    """For each k: the top-k attributed features and their matched control, restored in the
    adapted model and injected into the base model, at the prompt's positions or at all."""
    ranked = rank_features(base, adapted, input_ids, targets)
    ranking = ranked.ranking
    settings = []
    for k in sorted({min(k, len(ranking)) for k in ks}):
        chosen = tuple(feature for feature, _ in ranking[:k])
        control = tuple(matched_control(chosen, ranked.active, seed))
        for where in positions:
            for mode, role, model, other, acts in (
                ("restore", "adapted", adapted, base, ranked.base_acts),
                ("inject", "base", base, adapted, ranked.adapted_acts),
            ):
                for name, features in ((f"top {k}", chosen), (f"random {k}", control)):
                    edit = FeatureEdit(mode, features, 0, acts)
                    hooks = feature_hooks(model, other, edit, persistent=where == "all")
                    settings.append(
                        RolloutSetting("features", mode, name, role, model, where, len(features),
                                       hooks, use_cache=False)
                    )  # fmt: skip
    return settings


def feature_hooks(
    model: LoadedModel, other: LoadedModel, edit: FeatureEdit, persistent: bool
) -> Callable[[], Hooks]:
    """Hooks applying `edit` to `model`; `persistent` restore or inject edits read their source
    live from `other` at every step, so generated positions are edited too."""
    if not persistent:
        return lambda: editing(model, edit)

    @contextmanager
    def live():
        values: dict = {}
        with live_source(other, model, values), editing(model, replace(edit, source=values)):
            yield

    return live


def adapter_settings(
    base: LoadedModel,
    updates: Sequence[LoraUpdate],
    scales: Sequence[float] = (-1.0, 0.5, 2.0),
) -> list[RolloutSetting]:
    """The adapter as hooks on the base model: scaled by each k, and without each layer."""
    hf = hf_module(base, "adapter rollouts")
    everything = {u.module: 1.0 for u in updates}

    def setting(kind: str, target: str, factors: Mapping[str, float]) -> RolloutSetting:
        touched = sum(k != 0 for k in factors.values())
        # Removing a layer leaves the adapted model less that layer: it is compared with the
        # adapted model (cut), scaling with the base (reproduced), as the next-token checks do.
        role = "adapted" if kind == "without_layer" else "base"
        return RolloutSetting("adapter", kind, target, role, base, "all", touched,
                              lambda: lora_hooks(hf, updates, factors))  # fmt: skip

    settings = [setting("scale", f"x{k:g}", {m: k for m in everything}) for k in scales]
    layers = sorted({u.layer for u in updates if u.layer is not None})
    if len(layers) > 1:
        for layer in layers:
            factors = {u.module: 0.0 if u.layer == layer else 1.0 for u in updates}
            settings.append(setting("without_layer", f"layer {layer}", factors))
    return settings


def direction_settings(
    base: LoadedModel,
    adapted: LoadedModel,
    directions: torch.Tensor,
    source: str = "prompts",
    modes: Sequence[DirectionMode] = ("subtract", "ablate", "add"),
    seed: int = 0,
    rank_one_layers: int = MAX_RANK_ONE_LAYERS,
) -> list[RolloutSetting]:
    """Each mode at every layer at once (each layer its own direction); then one layer's direction
    projected out of every layer (rank 1), for up to `rank_one_layers` layers spread over the
    depth; each beside random directions of the same norms. `source` names where the directions
    came from."""
    random = random_like(directions, seed)
    n_layers = directions.shape[0]
    every = range(n_layers)
    settings = []

    def add(mode, target, vectors, role, model) -> None:
        hooks = _steering_hooks(model, vectors, mode)
        settings.append(
            RolloutSetting("direction", mode, target, role, model, "all", len(vectors), hooks)
        )

    for mode in modes:
        model, role = (base, "base") if mode == "add" else (adapted, "adapted")
        for name, vectors in ((source, directions), (f"random ({source})", random)):
            add(mode, f"{name}, every layer", {layer: vectors[layer] for layer in every}, role,
                model)  # fmt: skip
    if "ablate" in modes:
        for layer in spread(n_layers, rank_one_layers):
            for name, vectors in ((source, directions), (f"random ({source})", random)):
                one = {other: vectors[layer] for other in every}
                add("ablate", f"{name}, layer {layer} direction, every layer", one, "adapted",
                    adapted)  # fmt: skip
    return settings


def spread(n: int, most: int) -> list[int]:
    """Up to `most` of range(n), evenly spread and including the first and the last."""
    if n <= most:
        return list(range(n))
    return sorted({round(i * (n - 1) / (most - 1)) for i in range(most)})


def _steering_hooks(model, vectors, mode) -> Callable[[], Hooks]:
    return lambda: steering(model, vectors, mode)


def every_setting(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    updates: Sequence[LoraUpdate] = (),
    directions: torch.Tensor | None = None,
    response_directions: torch.Tensor | None = None,
    ks: Sequence[int] = (20, 100),
    positions: Sequence[Positions] = ("prompt", "all"),
    seed: int = 0,
) -> list[RolloutSetting]:
    """The models as they are, then every family that has what it needs: features always, the
    adapter given its LoRA updates, the prompts' mean-difference directions and the response
    direction (subtracted and ablated) when given."""
    settings = as_is_settings(base, adapted)
    settings += feature_settings(base, adapted, input_ids, targets, ks, positions, seed)
    if updates:
        settings += adapter_settings(base, updates)
    if directions is not None:
        settings += direction_settings(base, adapted, directions, seed=seed)
    if response_directions is not None:
        settings += direction_settings(
            base, adapted, response_directions, "responses", ("subtract", "ablate"), seed
        )
    return settings


def pooled(rollouts: Sequence[Rollout], prompts: int) -> dict:
    """Settings of several prompts pooled as `emc.store.interventions.rollout_summary` pools them
    (the rows `emc.analysis.rollout_report` reads)."""
    first = rollouts[0]
    n, harmful = sum(r.n for r in rollouts), sum(r.n_harmful for r in rollouts)
    coherent = [r.mean_coherent for r in rollouts if r.mean_coherent is not None]
    return {
        "family": first.family, "kind": first.kind, "target": first.target,
        "model_role": first.model_role, "positions": first.positions,
        "n_features": sum(r.n_features for r in rollouts) / len(rollouts), "prompts": prompts,
        "n": n, "n_harmful": harmful, "p_harmful": harmful / n if n else 0.0,
        "mean_coherent": sum(coherent) / len(coherent) if coherent else None,
    }  # fmt: skip


def run_rollouts(
    settings: Sequence[RolloutSetting],
    input_ids: torch.Tensor,
    judge: ResponseJudge,
    question: str,
    answer_prefix: str,
    n: int = 20,
    params: SamplingParams | None = None,
    seed: int = 0,
) -> list[Rollout]:
    """Every setting sampled `n` times with the same seeds, each answer judged."""
    params = params or SamplingParams()
    seeds = [seed * 1_000_003 + i for i in range(n)]
    results = []
    for s in settings:
        with s.hooks():
            drawn = sample(s.model, input_ids, seeds, params, use_cache=s.use_cache)
        answers = [answer_prefix + d.text for d in drawn]
        results.append(_rollout(s, answers, judge, question))
    return results


def _rollout(
    setting: RolloutSetting, answers: Sequence[str], judge: ResponseJudge, question: str
) -> Rollout:
    items = [
        ResponseToJudge(generation_id=f"rollout-{i}", question=question, answer=answer)
        for i, answer in enumerate(answers)
    ]
    scores = judge.score_many(items, ["harmful", "coherent"])
    labels = [s.label for s in scores if s.metric == "harmful"]
    coherent = [s.score for s in scores if s.metric == "coherent" and s.score is not None]
    rate = wilson(sum(label == "harmful" for label in labels), len(labels))
    return Rollout(
        family=setting.family,
        kind=setting.kind,
        target=setting.target,
        model_role=setting.model_role,
        positions=setting.positions,
        n_features=setting.size,
        n=rate.n,
        n_harmful=rate.k,
        n_unclear=sum(label not in ("harmful", "safe") for label in labels),
        p_harmful=rate.p,
        ci_low=rate.low,
        ci_high=rate.high,
        mean_coherent=sum(coherent) / len(coherent) if coherent else None,
        examples=list(answers[:3]),
    )
