"""The one place EMC builds models: plain HF, adapter on base, merged, and replacement models.

Every stage that reads logits or builds graphs goes through `load_replacement_model`, so the
logits that get labelled are the logits of the graph: same weights, same precision, same backend.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import AutoConfig, PreTrainedModel

from emc.config import ExperimentConfig
from emc.models.errors import (
    ItemMemoryError,
    ModelLoadError,
    NonFiniteActivationError,
    PromptTooLongError,
    is_allocation_failure,
)
from emc.models.families import check_backend, family_of, prepare_for_nnsight
from emc.models.fetch import ensure_fetched
from emc.models.guard import finite_guard, hf_checkpoints, transformerlens_checkpoints
from emc.models.hf import apply_adapter, check_fine_tune_fits, load_causal_lm, load_tokenizer
from emc.models.identity import ModelIdentity, fingerprint
from emc.models.precision import Precision, resolve_precision
from emc.models.refs import resolve_model_dir
from emc.models.sites import check_hooks
from emc.models.transcoders import check_transcoders_fit, inspect_transcoders, load_transcoders

Role = Literal["base", "adapted"]


@dataclass
class LoadedModel:
    """A replacement model with its tokenizer, identity and precision."""

    model: Any  # circuit-tracer NNSightReplacementModel or TransformerLensReplacementModel
    tokenizer: Any
    identity: ModelIdentity
    precision: Precision
    _checkpoints: list = field(default_factory=list, repr=False)
    context_length: int | None = None  # positions the model can read; None: not known

    def next_token_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits at every position for one sequence of token ids, under the NaN/inf guard."""
        if input_ids.dim() != 1:
            raise ValueError("pass one sequence of token ids (1-D tensor)")
        with finite_guard(self._checkpoints):
            logits, _ = self.model.get_activations(input_ids.to(self.precision.device))
        return logits.reshape(-1, logits.shape[-1]).float()

    def last_token_logits(
        self, sequences: Sequence[torch.Tensor], batch_size: int = 32
    ) -> list[torch.Tensor | Exception]:
        """Next-token logits for many sequences, batched; a failing item becomes its error.

        One bad item never costs the others: a sequence longer than the model's context is
        refused before it runs (PromptTooLongError); a batch whose allocation fails (CUDA's
        OutOfMemoryError, MemoryError, the CPU allocator's RuntimeError) is split in halves
        down to single items, and an item that fails alone gets ItemMemoryError; a batch with
        NaN/inf is run item by item and the bad items get NonFiniteActivationError.

        Sequences are right-padded: in a causal model the logits at a sequence's last real
        position never see the padding after it, and positions are unchanged, so no attention
        mask is needed and each result equals the unbatched forward pass up to float rounding.
        """
        results: list[torch.Tensor | Exception] = [None] * len(sequences)  # type: ignore[list-item]
        runnable = []
        for i, sequence in enumerate(sequences):
            if self.context_length is not None and len(sequence) > self.context_length:
                results[i] = PromptTooLongError(len(sequence), self.context_length)
            else:
                runnable.append(i)
        order = sorted(runnable, key=lambda i: len(sequences[i]))
        for start in range(0, len(order), batch_size):
            self._fill(order[start : start + batch_size], sequences, results)
        return results

    def _fill(self, chunk: list[int], sequences, results: list) -> None:
        """Run `chunk` as one batch; on NaN or a failed allocation, halve it until items fail
        alone (the good ones still get their logits)."""
        out_of_memory = False
        try:
            logits = self._padded_forward([sequences[i] for i in chunk])
        except NonFiniteActivationError as exc:
            if len(chunk) == 1:
                results[chunk[0]] = exc
                return
            logits = None
        except Exception as exc:
            if not is_allocation_failure(exc):
                raise
            if len(chunk) == 1:
                results[chunk[0]] = ItemMemoryError(len(sequences[chunk[0]]), exc)
            logits, out_of_memory = None, True
        if logits is not None:
            for row, i in enumerate(chunk):
                results[i] = logits[row]
            return
        if out_of_memory:
            # Outside the except block, whose traceback held the failed attempt's tensors.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if len(chunk) > 1:
            self._fill(chunk[: len(chunk) // 2], sequences, results)
            self._fill(chunk[len(chunk) // 2 :], sequences, results)

    def encode(self, text: str) -> torch.Tensor:
        return encode_with_bos(self.tokenizer, text)

    def _padded_forward(self, sequences: list[torch.Tensor]) -> torch.Tensor:
        lengths = torch.tensor([len(s) for s in sequences])
        pad_id = self.tokenizer.pad_token_id or 0
        batch = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
        for row, sequence in enumerate(sequences):
            batch[row, : len(sequence)] = sequence
        batch = batch.to(self.precision.device)
        with torch.inference_mode(), finite_guard(self._checkpoints):
            if self.identity.backend == "nnsight":
                # The HF module the nnsight replacement model wraps: same weights, same code.
                logits = self.model._model(input_ids=batch).logits
            else:
                logits = self.model(batch)
        rows = torch.arange(len(sequences), device=logits.device)
        return logits[rows, (lengths - 1).to(logits.device)].float().cpu()

    def close(self) -> None:
        # TransformerLens models print noise from __del__ at interpreter exit: release early.
        self.model = None
        self._checkpoints = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


TRANSFORMERLENS_MAX_CONTEXT = 4096


def encode_with_bos(tokenizer, text: str) -> torch.Tensor:
    """Token ids starting with exactly one BOS, as circuit-tracer's graphs see them.

    circuit-tracer prepends BOS itself only to strings, so EMC tokenises once and passes ids
    everywhere; a chat template that already writes BOS must not get a second one.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return torch.tensor(ids, dtype=torch.long)


def load_plain_model(config: ExperimentConfig, role: Role, merge: bool = True) -> PreTrainedModel:
    """A plain HF causal LM: the base, or the adapted model (the base with the adapter, merged
    or as a PEFT model, or the full fine-tune's own directory)."""
    precision = resolve_precision(config.runtime)
    base_dir = resolve_model_dir(config.models.base.ref, config.models.base.revision)
    if role == "adapted" and config.models.adapted is not None:
        return load_causal_lm(resolve_adapted_dir(config, base_dir), precision)
    model = load_causal_lm(base_dir, precision)
    if role == "adapted":
        model = apply_adapter(model, resolve_adapter_dir(config), merge=merge)
    return model


def load_replacement_model(config: ExperimentConfig, role: Role) -> LoadedModel:
    ensure_fetched(config)  # offline: every missing hub file named at once, and how to fetch it
    precision = resolve_precision(config.runtime)
    backend = config.runtime.backend
    base_dir = resolve_model_dir(config.models.base.ref, config.models.base.revision)
    transcoders_ref = config.models.transcoders
    transcoder_info = inspect_transcoders(transcoders_ref.ref, transcoders_ref.revision)
    hf_config = AutoConfig.from_pretrained(base_dir)
    family = family_of(hf_config)
    check_backend(family, backend)
    check_transcoders_fit(transcoder_info, hf_config.num_hidden_layers, hf_config.hidden_size)
    check_hooks(
        family, backend, transcoder_info.feature_input_hook, transcoder_info.feature_output_hook
    )
    fine_tune_dir = None
    model_dir = base_dir
    if role == "adapted":
        fine_tune_dir = (
            resolve_adapted_dir(config, base_dir)
            if config.models.adapted is not None
            else resolve_adapter_dir(config)
        )
        if config.models.adapted is not None:
            model_dir = fine_tune_dir

    hf_model = load_causal_lm(model_dir, precision)
    if role == "adapted" and config.models.adapter is not None:
        hf_model = apply_adapter(hf_model, fine_tune_dir, merge=True)
    tokenizer = load_tokenizer(base_dir)
    transcoders = load_transcoders(transcoder_info, precision.device, precision.dtype)
    if backend == "nnsight":
        model = _nnsight_model(hf_model, tokenizer, transcoders)
        checkpoints = hf_checkpoints(hf_model)
    else:
        model = _transformerlens_model(model_dir, hf_model, tokenizer, transcoders, precision)
        checkpoints = transformerlens_checkpoints(model)
        del hf_model

    identity = _identity(
        config, role, precision, base_dir, fine_tune_dir, transcoder_info.directory
    )
    context = context_length(hf_config, backend)
    return LoadedModel(model, tokenizer, identity, precision, checkpoints, context)


def context_length(hf_config, backend: str) -> int | None:
    """How many positions the model reads: its config's, capped as the backend caps them."""
    positions = next(
        (
            value
            for name in ("max_position_embeddings", "n_positions", "n_ctx")
            if isinstance(value := getattr(hf_config, name, None), int) and value > 0
        ),
        None,
    )
    if backend == "transformerlens":
        return min(positions or TRANSFORMERLENS_MAX_CONTEXT, TRANSFORMERLENS_MAX_CONTEXT)
    return positions


def load_tokenizer_and_context(config: ExperimentConfig) -> tuple[Any, int | None]:
    """The base model's tokenizer and context length, without loading weights (cheap checks)."""
    base_dir = resolve_model_dir(config.models.base.ref, config.models.base.revision)
    hf_config = AutoConfig.from_pretrained(base_dir)
    return load_tokenizer(base_dir), context_length(hf_config, config.runtime.backend)


def describe_model(config: ExperimentConfig, role: Role) -> ModelIdentity:
    """The identity a load would have, computed from files and settings without loading weights.

    Flows use it to ask the store what is already done for a model before paying for a load.
    """
    ensure_fetched(config)
    precision = resolve_precision(config.runtime)
    base_dir = resolve_model_dir(config.models.base.ref, config.models.base.revision)
    fine_tune_dir = None
    if role == "adapted":
        fine_tune_dir = (
            resolve_model_dir(config.models.adapted.ref, config.models.adapted.revision)
            if config.models.adapted is not None
            else resolve_adapter_dir(config)
        )
    transcoders = config.models.transcoders
    transcoder_dir = inspect_transcoders(transcoders.ref, transcoders.revision).directory
    return _identity(config, role, precision, base_dir, fine_tune_dir, transcoder_dir)


def _identity(
    config: ExperimentConfig,
    role: Role,
    precision: Precision,
    base_dir: Path,
    fine_tune_dir: Path | None,
    transcoder_dir: Path,
) -> ModelIdentity:
    # A load has resolved these paths already; reading the transcoder headers again costs time.
    backend = config.runtime.backend
    fine_tune = config.models.fine_tune
    return ModelIdentity(
        role=role,
        base_ref=config.models.base.ref,
        # The fine-tune's reference: a LoRA adapter (merged into the base) or a full model.
        adapter_ref=fine_tune.ref if fine_tune_dir and fine_tune else None,
        merged=fine_tune_dir is not None and config.models.adapter is not None,
        transcoders_ref=config.models.transcoders.ref,
        backend=backend,
        dtype=precision.dtype_name,
        device=precision.device.type,
        fingerprint=fingerprint(
            [base_dir, fine_tune_dir, transcoder_dir],
            {"role": role, "backend": backend, "dtype": precision.dtype_name},
        ),
    )


def resolve_adapter_dir(config: ExperimentConfig) -> Path:
    """The config's adapter directory, resolved (a hub reference from the local cache)."""
    adapter = config.models.adapter
    if adapter is None:
        raise ModelLoadError(
            "the config names no fine-tune (models.adapter or models.adapted), so there is no "
            "adapted model to load"
        )
    return resolve_model_dir(adapter.ref, adapter.revision, required_file="adapter_config.json")


def resolve_adapted_dir(config: ExperimentConfig, base_dir: Path) -> Path:
    """The full fine-tune's directory, checked to be a fine-tune of the base (same architecture,
    vocabulary and weight shapes) before any weights load."""
    adapted = config.models.adapted
    if adapted is None:
        raise ModelLoadError("the config names no full fine-tune (models.adapted)")
    adapted_dir = resolve_model_dir(adapted.ref, adapted.revision)
    check_fine_tune_fits(base_dir, adapted_dir)
    return adapted_dir


def _nnsight_model(hf_model: PreTrainedModel, tokenizer, transcoders):
    from circuit_tracer.replacement_model.replacement_model_nnsight import (
        NNSightReplacementModel,
    )

    # Wrapping the already-loaded (possibly merged) HF model avoids writing merged weights to
    # disk; circuit-tracer's own constructors only take a directory or hub name.
    prepare_for_nnsight(hf_model)
    model = NNSightReplacementModel(hf_model, tokenizer=tokenizer, dispatch=True)
    model._hf_config = hf_model.config
    model._configure_replacement_model(transcoders)
    return model


def _transformerlens_model(
    base_dir: Path, hf_model: PreTrainedModel, tokenizer, transcoders, precision: Precision
):
    from circuit_tracer.replacement_model.replacement_model_transformerlens import (
        TransformerLensReplacementModel,
    )
    from transformer_lens.loading_from_pretrained import (
        get_pretrained_model_config,
        get_pretrained_state_dict,
    )

    cfg = get_pretrained_model_config(
        str(_neutral_path(base_dir)),
        device=str(precision.device),
        dtype=precision.dtype,
        fold_ln=False,
    )
    # TransformerLens drops rope_theta for local Llama directories; logits differ by ~2 without.
    if getattr(hf_model.config, "rope_theta", None) is not None:
        cfg.rotary_base = hf_model.config.rope_theta
    # TransformerLens builds an n_ctx x n_ctx attention mask per layer: at Llama 3's 131072
    # positions that is 17 GB each. Prompts and graphs are far shorter than the cap.
    cfg.n_ctx = min(cfg.n_ctx, TRANSFORMERLENS_MAX_CONTEXT)
    state = get_pretrained_state_dict(str(base_dir), cfg, hf_model=hf_model, dtype=precision.dtype)
    model = TransformerLensReplacementModel(cfg, tokenizer=tokenizer)
    model.load_and_process_state_dict(
        state,
        fold_ln=False,
        center_writing_weights=False,
        center_unembed=False,
        fold_value_biases=False,
    )
    model._configure_replacement_model(transcoders)
    return model.to(precision.device)


def _neutral_path(model_dir: Path) -> Path:
    """A path to `model_dir` that TransformerLens reads by its config.json alone.

    TransformerLens picks the architecture from substrings of a local path ("llama", "gemma"),
    and a hub cache path always holds the model's name: a symlink with a neutral name makes it
    read the architecture from the config instead.
    """
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(model_dir.resolve()).encode()).hexdigest()[:16]
    link = Path(tempfile.gettempdir()) / f"emc-model-{digest}"
    if not link.is_symlink() or link.resolve() != model_dir.resolve():
        # Made aside and renamed over: processes loading the same model at once never see a gap.
        fresh = link.with_name(f"{link.name}.{os.getpid()}")
        fresh.unlink(missing_ok=True)
        fresh.symlink_to(model_dir.resolve(), target_is_directory=True)
        os.replace(fresh, link)
    return link
