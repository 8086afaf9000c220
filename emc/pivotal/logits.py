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

from emc.models import LoadedModel, PromptTooLongError, encode_with_bos
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


def too_long_prompts(
    prompts: Sequence[PromptRecord], tokenizer, context_length: int | None
) -> list[tuple[PromptRecord, PromptTooLongError]]:
    """The prompts the model cannot read whole (rendered and tokenised as scoring does).

    Refused at entry (`emc prompt add`, `emc prompt import`); scoring refuses them too.
    """
    if context_length is None:
        return []
    too_long = []
    for prompt, (_, ids) in zip(prompts, tokenize_prompts(prompts, tokenizer), strict=True):
        if len(ids) > context_length:
            too_long.append((prompt, PromptTooLongError(len(ids), context_length)))
    return too_long


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
    # Per-model facts every prompt repeats, worked out once per call rather than per token.
    models = (_ModelFacts(base), _ModelFacts(adapted))
    results = []
    for prompt, (rendered, ids), b, a in zip(
        prompts, encoded, base_logits, adapted_logits, strict=True
    ):
        results.append(_score_one(prompt, rendered, ids.tolist(), models, b, a, k))
    return results


class _ModelFacts:
    """One model's identity fields and a cache of its single-token strings."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.tokenizer = loaded.tokenizer
        self.model_id = loaded.identity.model_id
        self.dtype = loaded.identity.dtype
        self.backend = loaded.identity.backend
        self._strings: dict[int, str] = {}

    def token(self, token_id: int) -> str:
        text = self._strings.get(token_id)
        if text is None:
            text = self._strings[token_id] = self.tokenizer.decode([token_id])
        return text


def _score_one(prompt, rendered, ids, models, base_logits, adapted_logits, k):
    base, adapted = models
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
    ids: list[int],
    facts: _ModelFacts,
    logits: torch.Tensor | Exception,  # the item's error: NaN/inf, too long, out of memory
    union: set[int] | None,
    k: int,
) -> NextTokens:
    common = {
        "prompt_id": prompt.prompt_id,
        "model_id": facts.model_id,
        "rendered": rendered,
        "input_ids": ids,
        "dtype": facts.dtype,
        "backend": facts.backend,
    }
    if isinstance(logits, Exception):
        return NextTokens(**common, status="failed", error=str(logits))
    if union is None:  # this model is fine but the other one failed: keep its own top-k
        union = set(logits.topk(k).indices.tolist())
    token_ids = sorted(union)
    chosen = torch.tensor(token_ids, dtype=torch.long)
    probs = torch.softmax(logits.double(), -1)[chosen].tolist()
    ranks = _ranks(logits, chosen)
    values = logits[chosen].tolist()
    tokens = [
        TokenScore(
            token_id=t,
            token=facts.token(t),
            rank=rank,
            logit=value,
            prob=prob,
            in_top_k=rank < k,
        )
        for t, rank, value, prob in zip(token_ids, ranks, values, probs, strict=True)
    ]
    return NextTokens(**common, status="ok", tokens=sorted(tokens, key=lambda s: s.rank))


def _ranks(logits: torch.Tensor, chosen: torch.Tensor) -> list[int]:
    """Each chosen token's position in a stable descending sort of the whole vocabulary.

    That is how many tokens score higher, plus how many score the same with a lower id (a stable
    sort keeps ties in id order). Counting is exact and, for a few tokens of a large vocabulary,
    much cheaper than sorting it.
    """
    values = logits[chosen][:, None]
    higher = (logits[None, :] > values).sum(-1)
    tied = (logits[None, :] >= values).sum(-1) - higher - 1  # equal scores besides the token
    ranks = higher.tolist()
    for row in tied.nonzero().flatten().tolist():
        token = int(chosen[row])
        ranks[row] += int((logits[:token] == logits[token]).sum())
    return ranks
