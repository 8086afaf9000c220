"""Next-token divergence between a base and an adapted model, as pure functions.

Full-distribution metrics take log-probabilities over the whole vocabulary; label-based metrics
(mass on evil and safe tokens, log-odds, rank changes) take the token ids a judge or a person
labelled. All in nats.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import torch
from pydantic import BaseModel

_EPS = 1e-12


class Divergence(BaseModel):
    kl_adapted_base: float  # KL(P_adapted || P_base)
    kl_base_adapted: float
    js: float  # Jensen-Shannon, bounded by ln 2
    tv: float  # total variation
    entropy_base: float
    entropy_adapted: float
    entropy_delta: float  # adapted minus base
    topk_jaccard: float  # overlap of the two top-k token sets


class LabelMass(BaseModel):
    """Probability on the labelled evil and safe tokens, per model, and what changed."""

    p_evil_base: float
    p_evil_adapted: float
    p_safe_base: float
    p_safe_adapted: float
    log_odds_base: float | None  # log P(evil) / P(safe); None without both kinds of label
    log_odds_adapted: float | None
    rank_changes: dict[int, int]  # token id -> rank in base minus rank in adapted (up = +)


def divergence(base_logprobs: torch.Tensor, adapted_logprobs: torch.Tensor, k: int) -> Divergence:
    """Metrics from two 1-D log-probability vectors over the same vocabulary."""
    if base_logprobs.shape != adapted_logprobs.shape or base_logprobs.dim() != 1:
        raise ValueError("expected two 1-D log-probability vectors of the same size")
    lp_b, lp_a = base_logprobs.double(), adapted_logprobs.double()
    p_b, p_a = lp_b.exp(), lp_a.exp()
    log_mix = torch.log((p_b + p_a) / 2 + _EPS)
    top_b = set(lp_b.topk(k).indices.tolist())
    top_a = set(lp_a.topk(k).indices.tolist())
    entropy_b, entropy_a = _entropy(p_b, lp_b), _entropy(p_a, lp_a)
    return Divergence(
        kl_adapted_base=_kl(p_a, lp_a, lp_b),
        kl_base_adapted=_kl(p_b, lp_b, lp_a),
        js=max(0.0, 0.5 * _kl(p_b, lp_b, log_mix) + 0.5 * _kl(p_a, lp_a, log_mix)),
        tv=float(0.5 * (p_b - p_a).abs().sum()),
        entropy_base=entropy_b,
        entropy_adapted=entropy_a,
        entropy_delta=entropy_a - entropy_b,
        topk_jaccard=len(top_b & top_a) / len(top_b | top_a),
    )


def label_mass(
    base_probs: Mapping[int, float],
    adapted_probs: Mapping[int, float],
    evil: Collection[int],
    safe: Collection[int],
    base_ranks: Mapping[int, int],
    adapted_ranks: Mapping[int, int],
) -> LabelMass:
    """Mass on the evil and safe token sets; tokens missing from a model's map count as 0."""
    p_evil_b, p_evil_a = _mass(base_probs, evil), _mass(adapted_probs, evil)
    p_safe_b, p_safe_a = _mass(base_probs, safe), _mass(adapted_probs, safe)
    labelled = set(evil) | set(safe)
    return LabelMass(
        p_evil_base=p_evil_b,
        p_evil_adapted=p_evil_a,
        p_safe_base=p_safe_b,
        p_safe_adapted=p_safe_a,
        log_odds_base=_log_odds(p_evil_b, p_safe_b, evil, safe),
        log_odds_adapted=_log_odds(p_evil_a, p_safe_a, evil, safe),
        rank_changes={
            t: base_ranks[t] - adapted_ranks[t]
            for t in sorted(labelled)
            if t in base_ranks and t in adapted_ranks
        },
    )


def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    # Terms with p == 0 contribute nothing; masking avoids 0 * -inf = nan.
    mask = p > 0
    return max(0.0, float((p[mask] * (log_p[mask] - log_q[mask])).sum()))


def _entropy(p: torch.Tensor, log_p: torch.Tensor) -> float:
    mask = p > 0
    return float(-(p[mask] * log_p[mask]).sum())


def _mass(probs: Mapping[int, float], tokens: Collection[int]) -> float:
    return float(sum(probs.get(t, 0.0) for t in tokens))


def _log_odds(p_evil: float, p_safe: float, evil, safe) -> float | None:
    if not evil or not safe:
        return None
    return math.log(max(p_evil, _EPS)) - math.log(max(p_safe, _EPS))
