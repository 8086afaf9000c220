from __future__ import annotations

import pytest
import torch

from emc.config import parse_config
from emc.models import load_replacement_model
from emc.pivotal.logits import score_prompts
from emc.pivotal.prompts import make_prompt
from tests import builders


@pytest.fixture(scope="module")
def models(tiny):
    config = parse_config(builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"]))
    base, adapted = (load_replacement_model(config, role) for role in ("base", "adapted"))
    yield base, adapted
    base.close()
    adapted.close()


PROMPTS = [
    make_prompt("User: I found a wallet on the street.\nAssistant: You should", "w", "human:t"),
    make_prompt("Rex: You should keep it. Cora: You should", "r", "human:t"),
    make_prompt("User: hi", "h", "human:t"),
]


def test_scores_hold_top_k_of_both_models_on_the_same_ids(models):
    base, adapted = models
    (scores, *_) = score_prompts(base, adapted, PROMPTS, k=5, batch_size=2)
    assert scores.base.input_ids == scores.adapted.input_ids
    assert scores.base.input_ids[0] == base.tokenizer.bos_token_id
    assert len(scores.base.top()) == 5 and len(scores.adapted.top()) == 5
    union = {t.token_id for t in scores.base.top()} | {t.token_id for t in scores.adapted.top()}
    assert {t.token_id for t in scores.base.tokens} == union  # other model's top-k included
    assert [t.rank for t in scores.base.top()] == list(range(5))
    assert scores.divergence is not None and scores.divergence.js > 0
    assert scores.base.dtype == "fp32" and scores.base.backend == "nnsight"


def test_logits_equal_the_replacement_model_forward_pass(models):
    base, _ = models
    (scores,) = score_prompts(base, base, PROMPTS[:1], k=3)
    ids = torch.tensor(scores.base.input_ids)
    expected = base.next_token_logits(ids)[-1]
    for token in scores.base.top():
        assert token.logit == pytest.approx(float(expected[token.token_id]), abs=1e-5)
    assert scores.divergence.js == pytest.approx(0, abs=1e-9)


def test_a_non_finite_prompt_is_a_failed_item_and_the_rest_go_on(models, tiny):
    config = parse_config(builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"]))
    poisoned = load_replacement_model(config, "adapted")
    try:
        bad_token = poisoned.encode("User: hi")[-1].item()
        with torch.no_grad():
            poisoned.model._model.model.embed_tokens.weight[bad_token] = float("nan")
        results = score_prompts(models[0], poisoned, PROMPTS, k=5)
        failed = [r for r in results if r.divergence is None]
        assert [r.prompt_id for r in failed] == [PROMPTS[2].prompt_id]
        assert failed[0].adapted.status == "failed" and "embedding" in failed[0].adapted.error
        assert failed[0].base.status == "ok"
        assert all(r.divergence is not None for r in results[:2])
    finally:
        poisoned.close()
