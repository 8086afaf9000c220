"""Next-token distributions of base and adapted model on the same token ids.

Both come from the replacement models that will build the graphs, so the logits a judge labels
are the logits of the graph. Each model keeps its own top-k plus the other model's top-k tokens,
so label-based metrics (mass, log-odds, rank change) can be read for every labelled token in
both models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import BaseModel

from emc.models import LoadedModel, NonFiniteActivationError, encode_with_bos
from emc.pivotal.divergence import Divergence, divergence
from emc.pivotal.prompts import PromptRecord, render_prompt


class TokenScore(BaseModel):
    token_id: int
    token: str
    rank: int  # 0 = most likely, over the whole vocabulary
    logit: float
    prob: float
    in_top_k: bool


class NextTokens(BaseModel):
    """What one model predicts after one prompt."""

    prompt_id: str
    model_id: str
    rendered: str
    input_ids: list[int]
    dtype: str
    backend: str
    status: str  # ok | failed
    error: str | None = None
    tokens: list[TokenScore] = []  # sorted by rank; top-k first, then the other model's top-k

    def top(self) -> list[TokenScore]:
        return [t for t in self.tokens if t.in_top_k]


class PromptScores(BaseModel):
    prompt_id: str
    base: NextTokens
    adapted: NextTokens
    divergence: Divergence | None  # None when either model failed


def tokenize_prompts(prompts: Sequence[PromptRecord], tokenizer) -> list[tuple[str, torch.Tensor]]:
    """Render and tokenise once; both models then read exactly these ids."""
    rendered = [render_prompt(prompt, tokenizer) for prompt in prompts]
    return [(text, encode_with_bos(tokenizer, text)) for text in rendered]


def score_prompts(
    base: LoadedModel,
    adapted: LoadedModel,
    prompts: Sequence[PromptRecord],
    k: int = 10,
    batch_size: int = 32,
) -> list[PromptScores]:
    """Top-k for both models and their divergence, for every prompt, batched."""
    encoded = tokenize_prompts(prompts, base.tokenizer)
    sequences = [ids for _, ids in encoded]
    base_logits = base.last_token_logits(sequences, batch_size)
    adapted_logits = adapted.last_token_logits(sequences, batch_size)
    results = []
    for prompt, (rendered, ids), b, a in zip(
        prompts, encoded, base_logits, adapted_logits, strict=True
    ):
        results.append(_score_one(prompt, rendered, ids, base, adapted, b, a, k))
    return results


def _score_one(prompt, rendered, ids, base, adapted, base_logits, adapted_logits, k):
    failed = isinstance(base_logits, Exception) or isinstance(adapted_logits, Exception)
    if failed:
        return PromptScores(
            prompt_id=prompt.prompt_id,
            base=_next_tokens(prompt, rendered, ids, base, base_logits, None, k),
            adapted=_next_tokens(prompt, rendered, ids, adapted, adapted_logits, None, k),
            divergence=None,
        )
    union = set(base_logits.topk(k).indices.tolist()) | set(adapted_logits.topk(k).indices.tolist())
    base_lp = torch.log_softmax(base_logits.double(), -1)
    adapted_lp = torch.log_softmax(adapted_logits.double(), -1)
    return PromptScores(
        prompt_id=prompt.prompt_id,
        base=_next_tokens(prompt, rendered, ids, base, base_logits, union, k),
        adapted=_next_tokens(prompt, rendered, ids, adapted, adapted_logits, union, k),
        divergence=divergence(base_lp, adapted_lp, k),
    )


def _next_tokens(
    prompt: PromptRecord,
    rendered: str,
    ids: torch.Tensor,
    loaded: LoadedModel,
    logits: torch.Tensor | NonFiniteActivationError,
    union: set[int] | None,
    k: int,
) -> NextTokens:
    common = {
        "prompt_id": prompt.prompt_id,
        "model_id": loaded.identity.model_id,
        "rendered": rendered,
        "input_ids": ids.tolist(),
        "dtype": loaded.identity.dtype,
        "backend": loaded.identity.backend,
    }
    if isinstance(logits, Exception):
        return NextTokens(**common, status="failed", error=str(logits))
    if union is None:  # this model is fine but the other one failed: keep its own top-k
        union = set(logits.topk(k).indices.tolist())
    probs = torch.softmax(logits.double(), -1)
    order = torch.argsort(logits, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(order))
    top_k = set(order[:k].tolist())
    tokens = [
        TokenScore(
            token_id=t,
            token=loaded.tokenizer.decode([t]),
            rank=int(ranks[t]),
            logit=float(logits[t]),
            prob=float(probs[t]),
            in_top_k=t in top_k,
        )
        for t in union
    ]
    return NextTokens(**common, status="ok", tokens=sorted(tokens, key=lambda s: s.rank))
