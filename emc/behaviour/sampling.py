"""One generation path for every model EMC loads: base, adapted, and (with hooks) intervened.

Samples are drawn on the same token ids and at the same precision as discovery and the graphs:
the context is token ids (a prompt rendered and encoded once, perhaps with a forced token
appended), never re-tokenised text. Each sample has its own seeded generator, so sample i of a
context is the same whether it was drawn alone or in a batch (up to float rounding of batched
matmuls), and a re-run with the same seed reproduces it.

All samples of one context share its length, so a batch needs no padding: the nnsight backend
runs the wrapped Hugging Face model with its key-value cache; TransformerLens recomputes the
prefix each step (correct, slower).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from emc.models import LoadedModel
from emc.models.guard import finite_guard

FinishReason = Literal["eos", "stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    max_tokens: int = 48
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ValueError(f"invalid sampling parameters: {self}")

    @classmethod
    def from_config(cls, behaviour) -> SamplingParams:
        return cls(behaviour.temperature, behaviour.top_p, behaviour.max_tokens, behaviour.stop)


@dataclass(frozen=True)
class Sample:
    seed: int
    token_ids: list[int]  # generated ids only, up to (not including) EOS or the stop string
    text: str
    finish_reason: FinishReason


class ContextTooLongError(ValueError):
    """The context leaves no room to generate within the model's positions."""


def context_limit(loaded: LoadedModel) -> int | None:
    """How many positions the model has (None when it does not say)."""
    config = getattr(_hf_model(loaded), "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    cfg = getattr(loaded.model, "cfg", None)
    return getattr(cfg, "n_ctx", None)


def sample(
    loaded: LoadedModel,
    context_ids: torch.Tensor,
    seeds: Sequence[int],
    params: SamplingParams,
    use_cache: bool = True,
) -> list[Sample]:
    """One sample per seed, continuing `context_ids` (1-D, BOS included) as one batch.

    `use_cache=False` runs every step on the whole sequence: hooks that edit activations by
    position (restoring a prompt's features) need the positions of the full sequence each step.
    """
    if context_ids.dim() != 1 or len(context_ids) == 0:
        raise ValueError("context_ids must be one non-empty sequence of token ids")
    max_new = _room(loaded, len(context_ids), params.max_tokens)
    device = loaded.precision.device
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    n = len(seeds)
    eos = loaded.tokenizer.eos_token_id
    produced = torch.empty((n, 0), dtype=torch.long)
    done = torch.zeros(n, dtype=torch.bool)
    step = _Stepper(loaded, context_ids.to(device).unsqueeze(0).expand(n, -1), use_cache)
    with torch.inference_mode(), finite_guard(loaded._checkpoints):
        logits = step.first()
        for _ in range(max_new):
            chosen = _choose(logits.float().cpu(), generators, params)
            chosen[done] = eos if eos is not None else 0
            produced = torch.cat([produced, chosen[:, None]], dim=1)
            if eos is not None:
                done |= chosen == eos
            done |= torch.tensor([_stopped(loaded, row, params.stop) for row in produced])
            if bool(done.all()):
                break
            logits = step.next(chosen.to(device))
    return [_finish(loaded, seed, produced[row].tolist(), params) for row, seed in enumerate(seeds)]


def _room(loaded: LoadedModel, context_len: int, wanted: int) -> int:
    limit = context_limit(loaded)
    if limit is None:
        return wanted
    room = limit - context_len
    if room < 1:
        raise ContextTooLongError(
            f"the context is {context_len} tokens and {loaded.identity.model_id} has "
            f"{limit} positions: nothing can be generated; shorten the prompt"
        )
    return min(wanted, room)


def _choose(
    logits: torch.Tensor, generators: list[torch.Generator], params: SamplingParams
) -> torch.Tensor:
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.double() / params.temperature, dim=-1)
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return torch.stack(
        [
            torch.multinomial(row, 1, generator=g)[0]
            for row, g in zip(probs, generators, strict=True)
        ]
    )


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the most probable tokens whose mass first reaches top_p (at least one), renormalised."""
    ordered, order = probs.sort(dim=-1, descending=True)
    before = ordered.cumsum(-1) - ordered  # mass of the tokens ranked above each one
    ordered = ordered.masked_fill(before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, ordered)
    return kept / kept.sum(-1, keepdim=True)


def _stopped(loaded: LoadedModel, ids: torch.Tensor, stop: tuple[str, ...]) -> bool:
    if not stop:
        return False
    text = loaded.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
    return any(s in text for s in stop)


def _finish(loaded: LoadedModel, seed: int, ids: list[int], params: SamplingParams) -> Sample:
    eos = loaded.tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
        reason: FinishReason = "eos"
    else:
        reason = "length"
    text = loaded.tokenizer.decode(ids, skip_special_tokens=True)
    cut = min((text.find(s) for s in params.stop if s in text), default=-1)
    if cut >= 0:
        text = text[:cut]
        ids = _ids_within(loaded, ids, text)
        reason = "stop"
    return Sample(seed=int(seed), token_ids=ids, text=text, finish_reason=reason)


def _ids_within(loaded: LoadedModel, ids: list[int], text: str) -> list[int]:
    """The longest prefix of `ids` whose decoding stays within `text` (the part before a stop)."""
    for end in range(len(ids), -1, -1):
        if text.startswith(loaded.tokenizer.decode(ids[:end], skip_special_tokens=True)):
            return ids[:end]
    return []


def _hf_model(loaded: LoadedModel):
    return loaded.model._model if loaded.identity.backend == "nnsight" else None


class _Stepper:
    """Next-token logits for a growing batch of equal-length sequences."""

    def __init__(self, loaded: LoadedModel, batch: torch.Tensor, use_cache: bool = True) -> None:
        self.hf = _hf_model(loaded)
        self.use_cache = use_cache
        self.model = loaded.model
        self.batch = batch
        self.cache = None

    def first(self) -> torch.Tensor:
        if self.hf is not None and not self.use_cache:
            return self.hf(input_ids=self.batch, use_cache=False).logits[:, -1]
        if self.hf is not None:
            out = self.hf(input_ids=self.batch, use_cache=True)
            self.cache = out.past_key_values
            return out.logits[:, -1]
        return self.model(self.batch)[:, -1]

    def next(self, chosen: torch.Tensor) -> torch.Tensor:
        self.batch = torch.cat([self.batch, chosen[:, None]], dim=1)
        if self.hf is not None and not self.use_cache:
            return self.hf(input_ids=self.batch, use_cache=False).logits[:, -1]
        if self.hf is not None:
            out = self.hf(input_ids=chosen[:, None], past_key_values=self.cache, use_cache=True)
            self.cache = out.past_key_values
            return out.logits[:, -1]
        return self.model(self.batch)[:, -1]
