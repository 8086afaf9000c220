from __future__ import annotations

import math

import pytest
import torch

from emc.pivotal.divergence import divergence, label_mass


def _logprobs(values: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(values, dtype=torch.float64))


def test_identical_distributions_have_zero_divergence():
    lp = torch.log_softmax(torch.randn(50), dim=-1)
    result = divergence(lp, lp.clone(), k=5)
    assert result.kl_adapted_base == pytest.approx(0, abs=1e-9)
    assert result.js == pytest.approx(0, abs=1e-9) and result.tv == pytest.approx(0, abs=1e-9)
    assert result.topk_jaccard == 1 and result.entropy_delta == pytest.approx(0, abs=1e-9)


def test_known_values_on_two_token_distributions():
    base, adapted = _logprobs([0.9, 0.1]), _logprobs([0.1, 0.9])
    result = divergence(base, adapted, k=1)
    expected_kl = 0.1 * math.log(0.1 / 0.9) + 0.9 * math.log(0.9 / 0.1)
    assert result.kl_adapted_base == pytest.approx(expected_kl)
    assert result.kl_base_adapted == pytest.approx(expected_kl)
    assert result.tv == pytest.approx(0.8)
    assert result.topk_jaccard == 0
    # JS against the mixture (0.5, 0.5).
    half_kl = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)
    assert result.js == pytest.approx(half_kl)


def test_kl_is_asymmetric_and_js_bounded_by_ln2():
    base = _logprobs([0.98, 0.01, 0.01])
    adapted = _logprobs([0.34, 0.33, 0.33])
    result = divergence(base, adapted, k=2)
    assert result.kl_adapted_base != pytest.approx(result.kl_base_adapted)
    disjoint = divergence(_logprobs([1.0, 1e-30]), _logprobs([1e-30, 1.0]), k=1)
    assert disjoint.js <= math.log(2) + 1e-9 and disjoint.js == pytest.approx(math.log(2), 1e-6)


def test_label_mass_log_odds_and_rank_changes():
    base = {10: 0.7, 11: 0.05, 12: 0.2}
    adapted = {10: 0.1, 11: 0.8, 12: 0.05}
    result = label_mass(
        base, adapted, evil=[11], safe=[10, 12], base_ranks={10: 0, 11: 2, 12: 1},
        adapted_ranks={10: 1, 11: 0, 12: 2},
    )  # fmt: skip
    assert result.p_evil_base == pytest.approx(0.05) and result.p_evil_adapted == pytest.approx(0.8)
    assert result.p_safe_base == pytest.approx(0.9)
    assert result.log_odds_adapted == pytest.approx(math.log(0.8 / 0.15))
    assert result.rank_changes == {10: -1, 11: 2, 12: -1}
    no_safe = label_mass(base, adapted, evil=[11], safe=[], base_ranks={}, adapted_ranks={})
    assert no_safe.log_odds_base is None
