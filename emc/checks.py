"""Probe a loaded model: top next tokens for a few prompts, the first flow's payload."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from emc.models import LoadedModel, NonFiniteActivationError
from emc.store import ModelCheckRecord


def probe_next_tokens(
    loaded: LoadedModel, prompts: Sequence[str], top_k: int, run_id: str
) -> list[ModelCheckRecord]:
    """One record per prompt; a NaN/inf forward pass becomes a failed record, not an exception."""
    return [_probe_one(loaded, prompt, top_k, run_id) for prompt in prompts]


def _probe_one(loaded: LoadedModel, prompt: str, top_k: int, run_id: str) -> ModelCheckRecord:
    input_ids = loaded.encode(prompt)
    common = {
        "run_id": run_id,
        "model_id": loaded.identity.model_id,
        "prompt": prompt,
        "input_ids": input_ids.tolist(),
        "dtype": loaded.identity.dtype,
        "backend": loaded.identity.backend,
    }
    try:
        logits = loaded.next_token_logits(input_ids)[-1]
    except NonFiniteActivationError as exc:
        empty = {"top_token_ids": [], "top_tokens": [], "top_probs": []}
        return ModelCheckRecord(**common, **empty, status="failed", error=str(exc))
    probs, ids = torch.softmax(logits, dim=-1).topk(min(top_k, logits.shape[-1]))
    return ModelCheckRecord(
        **common,
        top_token_ids=ids.tolist(),
        top_tokens=[loaded.tokenizer.decode([i]) for i in ids.tolist()],
        top_probs=probs.tolist(),
        status="ok",
    )
