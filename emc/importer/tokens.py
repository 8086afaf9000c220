"""Token ids and probabilities for the original's top-k lists.

Older files recorded only the token string. Such a token gets the id another file of the same
prompt recorded for that string (base and adapted share a tokenizer), or else a stable negative
id derived from the string. Negative ids never clash with a vocabulary id, are the same in every
file and every import, and so still join a token's labels with its logits; skipping the tokens
instead would drop exactly the labels the original already lost once.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Iterable

from emc.importer.readers import LegacyToken
from emc.pivotal.logits import NextTokens, TokenScore


def derived_token_id(token: str) -> int:
    """-1 .. -2**28 from the string's sha256: fits the store's INTEGER, collisions ~1e-7/pair."""
    return -1 - int(hashlib.sha256(token.encode()).hexdigest()[:7], 16)


class TokenIds:
    """Token string -> id, per legacy prompt, learnt from every file that recorded ids."""

    def __init__(self) -> None:
        self._seen: dict[str, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))

    def learn(self, legacy_prompt_id: str, tokens: Iterable[LegacyToken]) -> None:
        for token in tokens:
            if token.token_id is not None:
                self._seen[legacy_prompt_id][token.token].add(token.token_id)

    def resolve(self, legacy_prompt_id: str, token: LegacyToken) -> int:
        if token.token_id is not None:
            return token.token_id
        known = self._seen.get(legacy_prompt_id, {}).get(token.token, set())
        # Two ids for one string means two tokenizers met here: guessing would mislabel.
        return next(iter(known)) if len(known) == 1 else derived_token_id(token.token)


def shown_probabilities(logits: list[float]) -> list[float]:
    """Softmax over the shown top-k only: the original kept no full-vocabulary normaliser, so
    these overstate every probability by the mass outside the top-k (small at k=10 for a
    confident model, not small for a flat one)."""
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    total = sum(weights)
    return [weight / total for weight in weights]


def legacy_next_tokens(
    prompt_id: str,
    model_id: str,
    rendered: str,
    tokens: list[LegacyToken],
    ids: list[int],
) -> tuple[NextTokens, list[str]]:
    """A NextTokens record (rank = list position); duplicate ids keep the first and are named."""
    probs = shown_probabilities([t.logit for t in tokens])
    scores, seen, problems = [], set(), []
    for rank, (token, token_id, prob) in enumerate(zip(tokens, ids, probs, strict=True)):
        if token_id in seen:
            problems.append(f"top_k.{rank}: token {token.token!r} repeats id {token_id}; dropped")
            continue
        seen.add(token_id)
        scores.append(
            TokenScore(
                token_id=token_id,
                token=token.token,
                rank=rank,
                logit=token.logit,
                prob=prob,
                in_top_k=True,
            )
        )
    next_tokens = NextTokens(
        prompt_id=prompt_id,
        model_id=model_id,
        rendered=rendered,
        input_ids=[],  # the original did not keep the token ids it fed the model
        dtype="unknown",
        backend="legacy",
        status="ok",
        tokens=scores,
    )
    return next_tokens, problems
