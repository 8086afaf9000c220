"""How much memory a config needs, per device, before anything is loaded (`emc check --plan`).

Everything here reads file headers and config files only: safetensors headers give each
tensor's shape and dtype without reading the weights; a model whose weights are not on this
machine is estimated from its config.json (its architecture); one without either is unknown.
Nothing touches the network: hub references are looked up in the local caches.

Weights. A model's parameters at the precision the device gets (`runtime.precision`; auto:
fp32 on cpu, bf16 on cuda). An adapter is merged into a copy of the base at load, so the adapted
model weighs what the base does (the LoRA itself is shown, and is small). Each loaded
replacement model holds its own transcoders, at the same precision; big decoders
(more than `LAZY_DECODER_VALUES` values, as emc/models/transcoders.py decides) stay on disk and
are read row by row, so they are not counted. Discovery keeps both models loaded; tracing one.

Attribution (circuit-tracer 0.5.0, `attribution/attribute.py` and `context_nnsight.py`), for one
prompt of n tokens. Symbols: L layers, d = d_model, m = d_mlp, V vocabulary, H attention heads,
b bytes per value at the device's precision, B = tracing.batch_size, K = tracing.max_n_logits,
A active transcoder features = min(L·n·l0, L·n·d_transcoder) where l0 is an *assumed* number of
active features per layer and token (`ASSUMED_ACTIVE_PER_TOKEN`; real sets range from ~20 to a
few hundred), F = min(tracing.max_feature_nodes or A, A).

On the model's device:

- context, kept for the whole graph: active-feature encoder and decoder vectors, the sparse
  activation matrix, MLP inputs, outputs and errors: `A·(2·d·b + 28) + 3·L·n·d·b`
- forward caches of the batched pass, kept for every backward pass (residual stream and
  feature outputs at each layer, plus autograd's saved norm inputs): `4·(L+1)·B·n·d·b`
- phase 1 transient (the forward pass on B copies of the prompt; the largest of): the logits
  `B·n·V·b`, one layer's eager attention scores `B·H·n²·(2·b + 4)`, its MLP `3·B·n·m·b`
- per backward batch: circuit-tracer's row buffer `(A + (L+1)·n)·B·b` and the injected and
  cloned gradients `3·B·n·d·b`

Device peak = max(weights + transcoders + context + caches + phase 1 transient,
weights' + transcoders' + context + caches + backward batch); with `tracing.offload` the
transcoders leave the device after phase 0, and the MLPs, embedding and unembedding after
phases 1-2 (weights' = weights without them).

In host RAM (float32, whatever the device): the dense edge matrix `(F + K)·(A + (L+1)·n + K)`
while features are attributed, then the packaged adjacency `N²` with N = F + (L+1)·n + K (plus
two row-permuted copies of the edge matrix while packaging): `4·max((F+K)·(A+(L+1)·n+K),
2·(F+K)·N + N²)` bytes. On cpu all of it is the same memory; on cuda the adjacency (and weights
offloaded to cpu) are host RAM beside the GPU total.

These are estimates, meant to pick batch size and offload before a run: they omit allocator
slack, CUDA's context (~0.5 GiB) and framework overheads.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from emc.config import ExperimentConfig, TracingConfig

Device = Literal["cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("cpu", "cuda")
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
PROMPT_LENGTHS = (32, 128, 512)
ASSUMED_ACTIVE_PER_TOKEN = 128
GPU_REFERENCE_BYTES = 24 * 2**30  # advice targets this GPU size when none is attached
MIN_BATCH = 16  # EMC's own out-of-memory fallback stops halving here (emc/tracing/attribution)
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2,
    "I16": 2, "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
# Tensor-name fragments of the parts `tracing.offload` moves off the device after phase 1-2.
OFFLOADED_PARTS = (".mlp.", "embed_tokens", "lm_head", ".wte.", "embed_in", "embed_out")
NON_GATED_MLP = {"gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "gpt_bigcode"}
UNTIED_BY_DEFAULT = {"llama", "mistral", "mixtral", "qwen2", "qwen3", "olmo", "olmo2", "phi3"}


class PlanError(ValueError):
    """A file the plan reads that is not what it should be."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPE_BYTES.get(self.dtype, 4)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes from a safetensors file's header (the weights are not
    read: the header is an 8-byte length and a JSON object at the start of the file)."""
    try:
        with Path(path).open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100_000_000:
                raise PlanError(f"{path}: safetensors header of {length} bytes: not safetensors")
            header = json.loads(handle.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise PlanError(f"cannot read the safetensors header of {path}: {exc}") from exc
    return {
        name: TensorInfo(str(value["dtype"]), tuple(int(s) for s in value["shape"]))
        for name, value in header.items()
        if name != "__metadata__"
    }


@dataclass(frozen=True)
class Architecture:
    """What the attribution estimate needs from a model's config.json."""

    model_type: str
    n_layers: int
    d_model: int
    d_mlp: int
    vocab_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    tied_embeddings: bool
    gated_mlp: bool

    @classmethod
    def from_config(cls, raw: dict) -> Architecture:
        cfg = raw.get("text_config") or raw  # multimodal wrappers keep the LM in text_config

        def first(*names: str, default: int | None = None) -> int:
            for name in names:
                if isinstance(cfg.get(name), int):
                    return cfg[name]
            if default is None:
                raise PlanError(f"config.json has none of {', '.join(names)}")
            return default

        model_type = str(cfg.get("model_type") or raw.get("model_type") or "unknown")
        d_model = first("hidden_size", "n_embd", "d_model")
        n_heads = first("num_attention_heads", "n_head", "num_heads")
        tied = cfg.get("tie_word_embeddings", raw.get("tie_word_embeddings"))
        return cls(
            model_type=model_type,
            n_layers=first("num_hidden_layers", "n_layer", "num_layers"),
            d_model=d_model,
            d_mlp=first("intermediate_size", "n_inner", "ffn_dim", default=4 * d_model),
            vocab_size=first("vocab_size"),
            n_heads=n_heads,
            n_kv_heads=first("num_key_value_heads", default=n_heads),
            head_dim=first("head_dim", default=d_model // n_heads),
            tied_embeddings=bool(tied) if tied is not None else model_type not in UNTIED_BY_DEFAULT,
            gated_mlp=model_type not in NON_GATED_MLP,
        )

    def estimated_params(self) -> tuple[int, int]:
        """(parameters, of which the offloadable MLP/embedding/unembedding), from the shapes of
        a standard decoder: embeddings, attention, MLP and norms; biases are ignored."""
        d, h = self.d_model, self.head_dim
        attention = d * self.n_heads * h * 2 + d * self.n_kv_heads * h * 2
        mlp = (3 if self.gated_mlp else 2) * d * self.d_mlp
        embed = self.vocab_size * d
        unembed = 0 if self.tied_embeddings else embed
        total = embed + unembed + self.n_layers * (attention + mlp + 2 * d) + d
        return total, embed + unembed + self.n_layers * mlp


@dataclass(frozen=True)
class Weights:
    """A model's or adapter's parameters; None when neither weights nor config are here."""

    label: str
    params: int | None
    offloadable: int  # parameters `tracing.offload` moves to the host during attribution
    source: str  # where the numbers come from

    def at(self, dtype: str) -> int | None:
        return None if self.params is None else self.params * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class TranscoderWeights:
    kind: str  # per-layer | cross-layer
    n_layers: int
    d_model: int
    d_transcoder: int
    resident_params: int  # encoders, biases, thresholds, skip weights (and eager decoders)
    decoder_params: int
    lazy_decoder: bool
    source: str

    def at(self, dtype: str) -> int:
        """Bytes on the device: lazy decoders stay on disk."""
        loaded = self.resident_params + (0 if self.lazy_decoder else self.decoder_params)
        return loaded * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AttributionMemory:
    """One graph's memory beyond the loaded weights (see the module docstring)."""

    n_pos: int
    batch_size: int
    active_features: int
    feature_nodes: int
    context: int
    forward_cache: int
    phase1_transient: int
    backward_batch: int
    host_adjacency: int

    def device_peak(self, weights: int, offloadable: int, transcoders: int, offload: bool) -> int:
        shared = self.context + self.forward_cache
        if offload:
            phase1 = weights + shared + self.phase1_transient
            backward = weights - offloadable + shared + self.backward_batch
        else:
            phase1 = weights + transcoders + shared + self.phase1_transient
            backward = weights + transcoders + shared + self.backward_batch
        return max(phase1, backward)


def attribution_memory(
    arch: Architecture,
    d_transcoder: int | None,
    tracing: TracingConfig,
    n_pos: int,
    dtype: str,
    batch_size: int | None = None,
    active_per_token: int = ASSUMED_ACTIVE_PER_TOKEN,
) -> AttributionMemory:
    """The formula of the module docstring for one prompt of `n_pos` tokens."""
    b = DTYPE_BYTES[dtype]
    B = batch_size or tracing.batch_size
    L, d, n = arch.n_layers, arch.d_model, n_pos
    per_token = min(active_per_token, d_transcoder) if d_transcoder else active_per_token
    A = L * n * per_token
    F = min(tracing.max_feature_nodes or A, A)
    K = tracing.max_n_logits
    non_feature = (L + 1) * n
    N = F + non_feature + K
    return AttributionMemory(
        n_pos=n,
        batch_size=B,
        active_features=A,
        feature_nodes=F,
        context=A * (2 * d * b + 28) + 3 * L * n * d * b,
        forward_cache=4 * (L + 1) * B * n * d * b,
        phase1_transient=max(
            B * n * arch.vocab_size * b,
            B * arch.n_heads * n * n * (2 * b + 4),
            3 * B * n * arch.d_mlp * b,
        ),
        backward_batch=(A + non_feature) * B * b + 3 * B * n * d * b,
        host_adjacency=4 * max((F + K) * (A + non_feature + K), 2 * (F + K) * N + N * N),
    )


@dataclass(frozen=True)
class LengthTotal:
    n_pos: int
    attribution: AttributionMemory
    device_peak: int  # the device's memory (on cpu: RAM, adjacency included)
    host: int  # cuda only: host RAM beside the GPU (adjacency, offloaded weights); cpu: 0


@dataclass(frozen=True)
class DevicePlan:
    device: Device
    dtype: str
    base: int | None
    fine_tune: int | None
    transcoders: int | None
    one_model: int | None  # the larger model with its transcoders
    both_models: int | None  # base and adapted loaded together (discovery)
    lengths: tuple[LengthTotal, ...]  # empty when the architecture is unknown


@dataclass(frozen=True)
class MemoryPlan:
    name: str
    base_ref: str
    base: Weights
    fine_tune_kind: str | None  # adapter | adapted | None
    fine_tune_ref: str | None
    fine_tune: Weights | None
    adapted: Weights | None  # the adapted model as loaded (an adapter: a merged base copy)
    transcoders_ref: str
    transcoders: TranscoderWeights | None
    transcoders_source: str  # why unknown, when transcoders is None
    architecture: Architecture | None
    tracing: TracingConfig
    active_per_token: int
    chosen_device: Device
    devices: tuple[DevicePlan, ...]

    def device(self, device: Device) -> DevicePlan:
        return next(plan for plan in self.devices if plan.device == device)


def dtype_for(precision: str, device: Device) -> str:
    """The precision policy of emc/models/precision.py, for a device that may not be here."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" else "fp32"


def chosen_device(config: ExperimentConfig) -> Device:
    if config.runtime.device != "auto":
        return config.runtime.device
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "cpu"


def local_model_dir(ref: str, revision: str | None) -> Path | None:
    """A model reference's directory on this machine (a local path or the hub cache), or None."""
    from emc.models.fetch import cached_snapshot
    from emc.models.refs import looks_like_path

    if looks_like_path(ref):
        path = Path(ref).expanduser()
        return path if path.is_dir() else None
    return cached_snapshot(ref, revision)


def local_transcoder_dir(ref: str, revision: str | None) -> Path | None:
    from emc.models.fetch import transcoder_hub_ref
    from emc.models.refs import looks_like_path

    if looks_like_path(ref):
        path = Path(ref).expanduser()
        return path if path.is_dir() else None
    from circuit_tracer.utils.caching import get_cached_path, is_cached

    hub_ref = transcoder_hub_ref(ref, revision)
    return get_cached_path(hub_ref) if is_cached(hub_ref) else None


def weight_files(directory: Path, adapter: bool = False) -> list[Path]:
    """The safetensors files a load reads from `directory` (an index's shards, when sharded)."""
    if adapter:
        path = directory / "adapter_model.safetensors"
        return [path] if path.is_file() else []
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as exc:
            raise PlanError(f"{index}: not a safetensors index: {exc}") from exc
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if any(p.name.startswith("model") for p in files):
        files = [p for p in files if not p.name.startswith("consolidated")]
    return files


def model_weights(label: str, directory: Path | None, adapter: bool = False) -> Weights:
    """Parameters from safetensors headers when the weights are here, else from config.json."""
    if directory is None:
        return Weights(label, None, 0, "unknown: not on this machine")
    files = weight_files(directory, adapter)
    if files and all(p.is_file() for p in files):
        params = offloadable = 0
        for path in files:
            for name, tensor in read_safetensors_header(path).items():
                params += tensor.numel
                if any(part in f".{name}." for part in OFFLOADED_PARTS):
                    offloadable += tensor.numel
        plural = "s" if len(files) > 1 else ""
        return Weights(
            label, params, offloadable, f"safetensors headers ({len(files)} file{plural})"
        )
    if adapter:
        return Weights(label, None, 0, "unknown: adapter_model.safetensors is not here")
    arch = read_architecture(directory)
    if arch is None:
        return Weights(label, None, 0, "unknown: neither weights nor config.json here")
    params, offloadable = arch.estimated_params()
    return Weights(label, params, offloadable, "estimate from config.json (weights not here)")


def read_architecture(directory: Path | None) -> Architecture | None:
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        return Architecture.from_config(json.loads((directory / "config.json").read_text()))
    except ValueError as exc:
        raise PlanError(f"{directory / 'config.json'}: {exc}") from exc


def transcoder_weights(directory: Path) -> TranscoderWeights:
    """Sizes of a transcoder directory (per-layer `layer_{i}` or cross-layer `W_enc_{i}` and
    `W_dec_{i}` files), from their headers."""
    from emc.models.transcoders import LAZY_DECODER_VALUES

    layer_files = sorted(directory.glob("layer_*.safetensors"))
    clt_files = sorted(directory.glob("W_enc_*.safetensors")) + sorted(
        directory.glob("W_dec_*.safetensors")
    )
    files = layer_files or clt_files
    if not files:
        raise PlanError(f"{directory}: no layer_*.safetensors or W_enc_*/W_dec_* files")
    resident = decoder = 0
    d_model = d_transcoder = 0
    for path in files:
        for name, tensor in read_safetensors_header(path).items():
            if name.startswith("W_dec"):
                decoder += tensor.numel
            else:
                resident += tensor.numel
            if name in ("b_dec", "b_dec_0"):
                d_model = tensor.shape[-1]
            if name in ("b_enc", "b_enc_0"):
                d_transcoder = tensor.shape[-1]
    n_layers = len(layer_files) if layer_files else len(list(directory.glob("W_enc_*.safetensors")))
    return TranscoderWeights(
        kind="per-layer" if layer_files else "cross-layer",
        n_layers=n_layers,
        d_model=d_model,
        d_transcoder=d_transcoder,
        resident_params=resident,
        decoder_params=decoder,
        lazy_decoder=decoder > LAZY_DECODER_VALUES,
        source=f"safetensors headers ({len(files)} files)",
    )


def build_plan(
    config: ExperimentConfig,
    lengths: tuple[int, ...] = PROMPT_LENGTHS,
    active_per_token: int = ASSUMED_ACTIVE_PER_TOKEN,
) -> MemoryPlan:
    """The memory plan for `config`, from what is on this machine; nothing is loaded."""
    models = config.models
    base_dir = local_model_dir(models.base.ref, models.base.revision)
    base = model_weights("base", base_dir)
    arch = read_architecture(base_dir)
    fine_tune = adapted = None
    kind = ref = None
    if models.adapter is not None:
        kind, ref = "adapter", models.adapter.ref
        fine_tune = model_weights(
            "adapter", local_model_dir(ref, models.adapter.revision), adapter=True
        )
        adapted = Weights("adapted", base.params, base.offloadable, "the base, merged")
    elif models.adapted is not None:
        kind, ref = "adapted", models.adapted.ref
        fine_tune = model_weights("adapted", local_model_dir(ref, models.adapted.revision))
        adapted = fine_tune
    transcoder_dir = local_transcoder_dir(models.transcoders.ref, models.transcoders.revision)
    transcoders = transcoder_weights(transcoder_dir) if transcoder_dir is not None else None
    devices = tuple(
        _device_plan(
            device, dtype_for(config.runtime.precision, device), base, fine_tune, kind,
            adapted, transcoders, arch, config.tracing, lengths, active_per_token,
        )
        for device in DEVICES
    )  # fmt: skip
    return MemoryPlan(
        name=config.name,
        base_ref=models.base.ref,
        base=base,
        fine_tune_kind=kind,
        fine_tune_ref=ref,
        fine_tune=fine_tune,
        adapted=adapted,
        transcoders_ref=models.transcoders.ref,
        transcoders=transcoders,
        transcoders_source=transcoders.source if transcoders else "unknown: not on this machine",
        architecture=arch,
        tracing=config.tracing,
        active_per_token=active_per_token,
        chosen_device=chosen_device(config),
        devices=devices,
    )


def _device_plan(
    device: Device,
    dtype: str,
    base: Weights,
    fine_tune: Weights | None,
    kind: str | None,
    adapted: Weights | None,
    transcoders: TranscoderWeights | None,
    arch: Architecture | None,
    tracing: TracingConfig,
    lengths: tuple[int, ...],
    active_per_token: int,
) -> DevicePlan:
    base_bytes = base.at(dtype)
    tc = transcoders.at(dtype) if transcoders else None
    adapted_bytes = adapted.at(dtype) if adapted else None
    models = [base_bytes] + ([adapted_bytes] if adapted else [])
    known = None not in models and tc is not None
    one = max(models) + tc if known else None  # type: ignore[operator,type-var]
    both = sum(models) + tc * len(models) if known else None  # type: ignore[operator,arg-type]
    offloadable = max(base.offloadable, adapted.offloadable if adapted else 0)
    totals = []
    if one is not None and arch is not None and transcoders is not None:
        weights = one - tc  # type: ignore[operator]
        offload = tracing.offload is not None and device == "cuda"
        for n_pos in lengths:
            memory = attribution_memory(
                arch, transcoders.d_transcoder, tracing, n_pos, dtype,
                active_per_token=active_per_token,
            )  # fmt: skip
            totals.append(_length_total(memory, device, weights, offloadable, dtype, tc, offload))
    return DevicePlan(
        device=device,
        dtype=dtype,
        base=base_bytes,
        fine_tune=fine_tune.at(dtype) if fine_tune and kind == "adapter" else adapted_bytes,
        transcoders=tc,
        one_model=one,
        both_models=both,
        lengths=tuple(totals),
    )


def _length_total(
    memory: AttributionMemory,
    device: Device,
    weights: int,
    offloadable_params: int,
    dtype: str,
    transcoders: int | None,
    offload: bool,
) -> LengthTotal:
    offloadable = offloadable_params * DTYPE_BYTES[dtype]
    peak = memory.device_peak(weights, offloadable, transcoders or 0, offload)
    if device == "cpu":
        return LengthTotal(memory.n_pos, memory, peak + memory.host_adjacency, 0)
    host = memory.host_adjacency + ((offloadable + (transcoders or 0)) if offload else 0)
    return LengthTotal(memory.n_pos, memory, peak, host)


def peak_for(
    plan: MemoryPlan, device: Device, n_pos: int, batch_size: int, offload: bool
) -> int | None:
    """The device peak at other settings than the config's (for advice)."""
    dev = plan.device(device)
    if dev.one_model is None or plan.architecture is None or plan.transcoders is None:
        return None
    tracing = plan.tracing.model_copy(update={"batch_size": batch_size})
    memory = attribution_memory(
        plan.architecture, plan.transcoders.d_transcoder, tracing, n_pos, dev.dtype,
        active_per_token=plan.active_per_token,
    )  # fmt: skip
    offloadable = max(plan.base.offloadable, plan.adapted.offloadable if plan.adapted else 0)
    tc = dev.transcoders or 0
    total = _length_total(
        memory, device, dev.one_model - tc, offloadable, dev.dtype, tc, offload and device == "cuda"
    )
    return total.device_peak


def device_budget(device: Device) -> tuple[int, str]:
    """The memory to advise against: the attached GPU's (else a 24 GiB reference), or RAM."""
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                total = torch.cuda.get_device_properties(0).total_memory
                return total, f"this GPU's {human(total)}"
        except Exception:  # pragma: no cover - a broken CUDA setup: fall back to the reference
            pass
        return GPU_REFERENCE_BYTES, f"a {human(GPU_REFERENCE_BYTES)} GPU"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 64 * 2**30, "64 GiB of RAM"
    return total, f"this machine's {human(total)} of RAM"


def advise(plan: MemoryPlan, budgets: dict[Device, tuple[int, str]] | None = None) -> list[str]:
    """One line per device: what fits the budget at the config's settings, and what to change
    for the prompt lengths that do not fit."""
    lines = []
    batch = plan.tracing.batch_size
    for dev in plan.devices:
        budget, where = (budgets or {}).get(dev.device) or device_budget(dev.device)
        head = f"{dev.device} ({dev.dtype})"
        if dev.one_model is None or not dev.lengths:
            lines.append(f"{head}: unknown: {_unknown_reason(plan)}")
            continue
        if dev.one_model > budget:
            lines.append(
                f"{head}: the model and transcoders alone need {human(dev.one_model)}, more than "
                f"{where}"
            )
            continue
        offload = plan.tracing.offload is not None and dev.device == "cuda"
        setting = f"batch_size {batch}" + (f", offload {plan.tracing.offload}" if offload else "")
        fitting = [t for t in dev.lengths if t.device_peak <= budget]
        failing = [t for t in dev.lengths if t.device_peak > budget]
        parts = []
        if fitting:
            parts.append(
                f"fits in {where} with {setting} up to {fitting[-1].n_pos} tokens "
                f"({human(fitting[-1].device_peak)})"
            )
        for total in failing:
            parts.append(
                f"at {total.n_pos} tokens it needs {human(total.device_peak)}: "
                + _remedy(plan, dev.device, total.n_pos, budget, offload)
            )
        lines.append(f"{head}: " + "; ".join(parts))
    return lines


def _remedy(plan: MemoryPlan, device: Device, n_pos: int, budget: int, offload: bool) -> str:
    batch = plan.tracing.batch_size
    options = []
    if device == "cuda" and not offload:
        peak = peak_for(plan, device, n_pos, batch, True)
        if peak is not None and peak <= budget:
            options.append(f"tracing.offload: cpu ({human(peak)})")
    size = batch // 2
    while size >= MIN_BATCH:
        peak = peak_for(plan, device, n_pos, size, offload)
        if peak is not None and peak <= budget:
            options.append(f"tracing.batch_size: {size} ({human(peak)})")
            break
        size //= 2
    if not options and device == "cuda":
        for size in _halvings(batch):
            peak = peak_for(plan, device, n_pos, size, True)
            if peak is not None and peak <= budget:
                options.append(
                    f"tracing.batch_size: {size} with tracing.offload: cpu ({human(peak)})"
                )
                break
    if not options:
        return (
            "does not fit even at batch_size 16: shorten the prompts, use a bigger device, or "
            "lower tracing.max_feature_nodes (it shrinks the adjacency, and changes the graph)"
        )
    return "use " + " or ".join(options)


def _halvings(batch: int) -> list[int]:
    sizes = []
    while batch >= MIN_BATCH:
        sizes.append(batch)
        batch //= 2
    return sizes


def _unknown_reason(plan: MemoryPlan) -> str:
    missing = []
    if plan.base.params is None or plan.architecture is None:
        missing.append(f"base '{plan.base_ref}'")
    if plan.adapted is not None and plan.adapted.params is None:
        missing.append(f"{plan.fine_tune_kind} '{plan.fine_tune_ref}'")
    if plan.transcoders is None:
        missing.append(f"transcoders '{plan.transcoders_ref}'")
    return (
        f"{', '.join(missing) or 'a model'} not on this machine; `emc models fetch CONFIG` "
        "fetches them (--dry-run lists their sizes)"
    )


def human(n: float | None) -> str:
    """Bytes in binary units: 512 B, 3.5 KiB, 1.2 GiB."""
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
