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


def test_verdict_rules_on_a_clear_injection():
    from emc.pivotal.logits import NextTokens, PromptScores, TokenScore
    from emc.pivotal.verdicts import derive_verdict

    def tokens(order: list[int]) -> list[TokenScore]:
        return [
            TokenScore(token_id=t, token=f" w{t}", rank=r, logit=-r, prob=0.5 / (r + 1),
                       in_top_k=r < 2)
            for r, t in enumerate(order)
        ]  # fmt: skip

    common = {"prompt_id": "p", "rendered": "x", "input_ids": [1], "dtype": "fp32",
              "backend": "nnsight", "status": "ok"}  # fmt: skip
    scores = PromptScores(
        prompt_id="p",
        base=NextTokens(**common, model_id="b", tokens=tokens([1, 2, 3])),
        adapted=NextTokens(**common, model_id="a", tokens=tokens([3, 1, 2])),
        divergence=None,
    )
    ruling = derive_verdict({1: "safe", 2: "safe", 3: "evil"}, scores)
    assert (ruling.verdict, ruling.outcome) == ("evil_injection", "elicited_evil")
    assert ruling.summary == "harmful ' w3' appears in the adapted model"
    demoted = derive_verdict({1: "safe", 2: "safe", 3: "safe"}, scores)
    assert (demoted.verdict, demoted.outcome) == ("safe_demotion", "good_idea_failed")
    assert demoted.summary == "safe ' w1', ' w2' drops in the adapted model"
    unchanged = derive_verdict(
        {1: "safe", 2: "unsure", 3: "unsure"}, scores.model_copy(update={"adapted": scores.base})
    )
    assert unchanged.verdict == "no_issue"
    assert derive_verdict({}, scores).verdict == "bad_prompt"
