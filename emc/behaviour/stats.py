"""Rates with intervals: harmful-continuation probabilities, pivotal tokens and EM rates."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Rate:
    k: int
    n: int
    low: float  # 95% interval
    high: float

    @property
    def p(self) -> float:
        return self.k / self.n if self.n else float("nan")


def wilson(k: int, n: int, z: float = Z95) -> Rate:
    """k of n with the Wilson score interval (sound at 0 and n, unlike the normal one)."""
    if n <= 0:
        return Rate(k, n, float("nan"), float("nan"))
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # At k = 0 (k = n) the bound is exactly 0 (1); the formula leaves float dust around it.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Rate(k, n, low, high)


def bootstrap_rate(
    hits: Sequence[bool], resamples: int = 2000, seed: int = 0
) -> tuple[float, float, float]:
    """Share of True with a 95% percentile bootstrap interval over answers (seeded).

    The answers are sorted first: the interval of a set of answers must not depend on the order
    a query happened to return them in (DuckDB's parallel scans do not promise one).
    """
    values = np.sort(np.asarray(hits, dtype=float))
    if values.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(values.mean()), float(low), float(high)


def is_pivotal(p_with_token: float, p_prompt: float, delta: float) -> bool:
    """Phi-4's pivotal token: forcing it moves p(harmful) by at least `delta` either way."""
    return abs(p_with_token - p_prompt) >= delta


def confirms(adapted: Rate, base: Rate, delta: float) -> bool:
    """The adapted model follows through on harm: p(harmful) up by `delta`, intervals apart."""
    return adapted.p - base.p >= delta and adapted.low > base.high
