"""Does a graph explain the distribution that was labelled? Compare it with discovery's logits.

The original pipeline's graphs and labelled logits came from different models and precisions
(19.125 vs 19.875). EMC reads both from the same replacement model on the same token ids, so the
graph's target probabilities must equal the stored ones up to float rounding; this checks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydantic import BaseModel

from emc.pivotal.logits import NextTokens
from emc.tracing.compact import GraphTarget


class LogitAgreement(BaseModel):
    input_ids_match: bool
    compared: int  # targets with a stored probability
    missing: list[str]  # targets whose tokens discovery did not store (not in either top-k)
    max_abs_diff: float | None  # over compared targets; None when nothing was compared
    exceeds: bool  # ids differ, or a difference above the tolerance


def logit_agreement(
    targets: Sequence[GraphTarget],
    input_ids: Sequence[int],
    discovery: NextTokens,
    tolerance: float,
    components: Mapping[str, Sequence[int]] | None = None,
) -> LogitAgreement:
    """Max |graph prob - discovery prob| over the graph's targets, and whether ids agree.

    A custom target is compared through `components` (its label -> the tokens whose summed
    probability is its weight, as `TargetPlan.components()` gives); one without is skipped.
    """
    stored = {t.token_id: t.prob for t in discovery.tokens}
    components = components or {}
    diffs, missing = [], []
    for target in targets:
        ids = [target.token_id] if target.token_id is not None else components.get(target.label)
        if ids is None:
            continue
        if any(i not in stored for i in ids):
            missing.append(target.label)
            continue
        diffs.append(abs(target.prob - sum(stored[i] for i in ids)))
    ids_match = list(input_ids) == list(discovery.input_ids)
    worst = max(diffs) if diffs else None
    return LogitAgreement(
        input_ids_match=ids_match,
        compared=len(diffs),
        missing=missing,
        max_abs_diff=worst,
        exceeds=not ids_match or (worst is not None and worst > tolerance),
    )
