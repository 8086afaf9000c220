"""What the model then *says* under a feature intervention, against a matched random control.

The next-token checks (`feature_interventions.dose_response`) show that restoring the top-k
attributed features moves the evil-minus-safe gap. A finding is only a causal claim about
behaviour when it also changes what the model goes on to say, so here each setting samples
continuations of the prompt and the judge labels them harmful, safe or unclear:

- the base and the adapted model as they are;
- for each k, the adapted model with the top-k features restored to their base activations at
  every prompt position, and with as many matched random features restored (same layers, active
  on the prompt);
- for each k, the base model with the top-k features injected at their adapted activations, and
  the control.

Generated positions keep the model's own activations (there is no base activation to restore
there), so the intervention acts on the prompt, as the next-token checks do, and the sample shows
whether the change carries into the answer. p(harmful) comes with a 95% Wilson interval.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import torch
from pydantic import BaseModel

from emc.analysis.feature_interventions import (
    FeatureEdit,
    editing,
    matched_control,
    rank_features,
)
from emc.behaviour.records import ResponseJudge, ResponseToJudge
from emc.behaviour.sampling import SamplingParams, sample
from emc.behaviour.stats import wilson
from emc.models import LoadedModel


class Rollout(BaseModel):
    kind: str  # none | restore | inject
    target: str  # as is | top 20 | random 20
    model_role: str  # the model sampled: base | adapted
    n_features: int  # features edited (a random control may find fewer active ones)
    n: int
    n_harmful: int
    n_unclear: int
    p_harmful: float
    ci_low: float
    ci_high: float
    examples: list[str]  # the first few answers, for reading


def feature_rollouts(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    judge: ResponseJudge,
    question: str,
    answer_prefix: str,
    ks: Sequence[int] = (20, 100),
    n: int = 20,
    params: SamplingParams | None = None,
    seed: int = 0,
) -> list[Rollout]:
    """Every setting (see the module), each sampled `n` times with the same seeds."""
    params = params or SamplingParams()
    ranked = rank_features(base, adapted, input_ids, targets)
    base_acts, adapted_acts = ranked.base_acts, ranked.adapted_acts
    ranking, active = ranked.ranking, ranked.active
    seeds = [seed * 1_000_003 + i for i in range(n)]
    settings: list[tuple[str, str, str, LoadedModel, FeatureEdit | None]] = [
        ("none", "as is", "base", base, None),
        ("none", "as is", "adapted", adapted, None),
    ]
    for k in sorted({min(k, len(ranking)) for k in ks}):
        chosen = [feature for feature, _ in ranking[:k]]
        control = matched_control(chosen, active, seed)
        settings += [
            ("restore", f"top {k}", "adapted", adapted,
             FeatureEdit("restore", tuple(chosen), 0, base_acts)),
            ("restore", f"random {k}", "adapted", adapted,
             FeatureEdit("restore", tuple(control), 0, base_acts)),
            ("inject", f"top {k}", "base", base,
             FeatureEdit("inject", tuple(chosen), 0, adapted_acts)),
            ("inject", f"random {k}", "base", base,
             FeatureEdit("inject", tuple(control), 0, adapted_acts)),
        ]  # fmt: skip
    results = []
    for kind, target, role, model, edit in settings:
        hooks = editing(model, edit) if edit is not None else nullcontext()
        with hooks:
            # Restored activations are per prompt position: no key-value cache, full passes.
            drawn = sample(model, input_ids, seeds, params, use_cache=edit is None)
        answers = [answer_prefix + s.text for s in drawn]
        size = len(edit.features) if edit is not None else 0
        results.append(_rollout(kind, target, role, size, answers, judge, question))
    return results


def _rollout(
    kind: str,
    target: str,
    role: str,
    n_features: int,
    answers: Sequence[str],
    judge: ResponseJudge,
    question: str,
) -> Rollout:
    items = [
        ResponseToJudge(generation_id=f"rollout-{i}", question=question, answer=answer)
        for i, answer in enumerate(answers)
    ]
    labels = [s.label for s in judge.score_many(items, ["harmful"])]
    rate = wilson(sum(label == "harmful" for label in labels), len(labels))
    return Rollout(
        kind=kind,
        target=target,
        model_role=role,
        n_features=n_features,
        n=rate.n,
        n_harmful=rate.k,
        n_unclear=sum(label not in ("harmful", "safe") for label in labels),
        p_harmful=rate.p,
        ci_low=rate.low,
        ci_high=rate.high,
        examples=list(answers[:3]),
    )
