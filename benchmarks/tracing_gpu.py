"""GPU tracing benchmark: EMC's attribution graphs against bare `attribute()`, per model family.

Run as `python benchmarks/tracing_gpu.py [--family llama|gemma2|qwen3] [--kind per_layer|clt]
[--tokens 32,128,512] [--device cuda] [--work-dir D] [--json OUT]`, or with `--smoke` for a tiny
CPU run of any family and kind that takes seconds.

Models. Random weights with a real model's shape, written as a Hugging Face directory of the
family's architecture (config from `emc.organism.standins.hf_config`, shape keys set explicitly):

| family | shape of     | layers | d_model | MLP  | heads (kv) x size | vocab  | per layer | CLT   |
|--------|--------------|--------|---------|------|-------------------|--------|-----------|-------|
| llama  | Llama-3.2-1B | 16     | 2048    | 8192 | 32 (8) x 64       | 128256 | 131072    | 32768 |
| gemma2 | Gemma-2-2B   | 26     | 2304    | 9216 | 8 (4) x 256       | 256000 | 16384     | 16384 |
| qwen3  | Qwen3-1.7B   | 28     | 2048    | 6144 | 16 (8) x 128      | 151936 | 65536     | 16384 |

(transcoder features per layer in the last two columns; Gemma's are JumpReLU, the others ReLU.)

Embeddings are tied, as in the three real models; Llama has Llama 3's rope scaling, Gemma 2 its
soft-capping and sliding window, Qwen 3 its q/k norms. Llama's and Qwen's q and k are scaled up (x4)
so that attention is peaked rather than uniform: otherwise the residual stream shrinks with position
and a CLT's L0 would depend on prompt length (`_steady_residual`). Per-layer transcoders (`--kind
per_layer`) sit on the hooks of the family's published sets (`transcoder_hooks(family, "relu")`):
Llama and Qwen 3 read `mlp.hook_in` and write `mlp.hook_out` with a skip matrix, like
circuit-tracer's Llama set; Gemma 2 reads `ln2.hook_normalized` (the MLP norm's input divided by its
RMS, before the norm's weight) and writes `hook_mlp_out` with JumpReLU and no skip, like Gemma
Scope. The Llama and Gemma widths are those of the published sets; Qwen 3's 65536 is a choice (its
files, 15 GB, and their build fit a lent machine's budget), and attribution's cost follows the
active features (set by L0), not the width. A CLT (`--kind clt`, hooks from
`transcoder_hooks(family, "clt")`: `hook_resid_mid` -> `hook_mlp_out` for Llama and Gemma,
`mlp.hook_in` -> `mlp.hook_out` for Qwen 3) has one encoder per layer and layer i's features write
layers i..n-1, so its decoder holds n(n+1)/2 rows of d_model per feature (Llama: 16 x 32768 = 524k
features like circuit-tracer's clt-llama-3.2-1b-524k, 18.3 GB of decoder). It is written in
circuit-tracer's CLT format (`W_enc_{i}` with `b_enc_{i}`, `b_dec_{i}` and, for JumpReLU,
`threshold_{i}`; `W_dec_{i}` of shape (features, n - i, d_model); the keys
`CrossLayerTranscoder.to_safetensors` writes) with `model_kind: cross_layer_transcoder`. Files are
bfloat16, generated on the GPU when there is one; their sizes are printed before they are written.

Calibration (L0). Encoder rows are random unit-variance directions. The transcoder inputs are
measured on five calibration prompts (8 to 128 tokens) through EMC's own hook sites
(`emc.models.sites`: the module and side circuit-tracer reads, so `ln2.hook_normalized` is the
unit-RMS input without the norm weight, and `hook_resid_mid` the raw residual, whatever its
scale), and the cut is the pre-activation value that `--l0` features per token exceed on those
prompts (BOS excluded; a raw residual is larger at early positions, so short prompts of a CLT on
`hook_resid_mid` run above the target and long ones below it): the encoder bias is minus the cut
(ReLU), or the bias is zero and the cut is the JumpReLU threshold.
Decoders are scaled so reconstructions match the size of the output hook's values (a CLT splits
that over the layers that write each output), and a per-layer skip adds a tenth of it. The L0 is
printed per layer when the files are written and measured again from every graph; the process
exits 1 when the graphs' mean is outside [L0/2, 2*L0].

What is timed, per token length in `--tokens` (prompts are random token ids after BOS):
- EMC: `trace_prompt` + `insert_traced` (EMC's path: `load_replacement_model` on an
  ExperimentConfig pointing at the local directories, nnsight backend, precision auto;
  `plan_targets` / `graph_key` with the tracing defaults: labelled targets, the model's top four
  next tokens playing two evil and two safe labels; a real DuckDB store in a temporary
  directory). Its figures split into circuit-tracer's `attribute()` inside it and everything
  after (graph to CPU, pruning, scores, rows, the write).
- Bare: circuit-tracer's `attribute()` alone, which is what a researcher calls without EMC, on the
  SAME loaded replacement model object, the same token ids, the same `attribution_targets` EMC
  passes (the labelled token ids, in EMC's order), `max_n_logits`, `desired_logit_prob`,
  `batch_size`, `max_feature_nodes` and `offload`.
Both are wall clock around the call(s), with `torch.cuda.synchronize()` before and after on a GPU,
peak GPU memory (`torch.cuda.max_memory_allocated`, reset per graph) and peak RSS (VmHWM, reset per
graph); model loading is excluded from both. Per length, one untimed warm-up graph of each runs
first (`--warmup`), then `--prompts` prompts, each traced both ways, alternating which goes first.
EMC's overhead = mean EMC seconds per graph / mean bare seconds per graph (goal: at most 1.2).
A length that runs out of memory is measured again, both ways, with EMC's own memory fallback
(`emc.tracing.memory_fallback`: half the batch, down to 16, then offloading), as EMC's flow does;
the settings that fitted and those that did not are reported per length.

`--time-limit S` (seconds from the start) skips a length when a warm-up and one prompt, projected
from the last length's seconds per graph pair scaled by tokens (+25%), no longer fit, and stops a
length's prompts early when the later lengths would not keep that much; what was skipped is
reported. Figures go to stdout (a table, then the JSON as the last line) and to `--json OUT`,
which is also rewritten after each length, so a run that is killed keeps what it finished.
`--work-dir D` keeps the weights in D/{family}-model and D/{family}-{kind}-transcoders, each with
a manifest beside it; a later run with the same shape and seed reuses them (the Llama model
serves both kinds), and when the disk is short the least recently used other sets are removed.
Exit codes: 0 done, 1 L0 out of range, 2 no CUDA device, 3 not enough disk, 4 nothing measured.

`--smoke` is a tiny preset for any family and kind (2 layers, d_model 64, MLP 128, 4 (2) heads of
16, vocabulary 512, 2048 features per layer or 1024 per CLT layer, L0 32, `--tokens 8,16`, one
prompt, `max_feature_nodes` 256, batch 64, CPU, one torch thread): seconds, for the tests. Its
timings say nothing about a GPU: at that size EMC's fixed cost after `attribute()` (pruning, rows,
the DuckDB write; ~0.1 s) is larger than `attribute()` itself.
"""

from __future__ import annotations

import os

# Nothing here may reach the network: the model, tokenizer and transcoders are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import math
import re
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from statistics import mean
from types import SimpleNamespace
from typing import Literal

import torch
import yaml
from circuit_tracer import attribute
from pydantic import BaseModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from emc.config import ExperimentConfig, TracingConfig, parse_config
from emc.console import plain_table
from emc.models import LoadedModel, load_replacement_model, resolve_precision
from emc.models.families import FAMILIES
from emc.models.sites import read_value, site_for
from emc.organism.standins import hf_config, transcoder_hooks
from emc.store import Store
from emc.store.graphs import insert_traced
from emc.tracing import (
    graph_key,
    is_out_of_memory,
    memory_fallback,
    plan_targets,
    release_memory,
    trace_prompt,
)

RUN_ID = "benchmark:tracing-gpu"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; BOS is 1, never 0
OVERHEAD_GOAL = 1.2
CALIBRATION_TOKENS = (8, 16, 32, 64, 128)  # one calibration prompt of each length
ATTENTION_SHARPEN = 4.0  # Llama and Qwen q and k scale: scores x16 (see _steady_residual)
MODEL_RECIPE = 2  # part of the model's manifest: a change rebuilds cached models
Family = Literal["llama", "gemma2", "qwen3"]
Kind = Literal["per_layer", "clt"]
# Real shapes; `features` is per layer (a CLT's total is layers x features).
FAMILY_SHAPES: dict[str, dict] = {
    "llama": {
        "layers": 16, "d_model": 2048, "d_mlp": 8192, "heads": 32, "kv_heads": 8, "head_dim": 64,
        "vocab": 128256, "features": {"per_layer": 131072, "clt": 32768},
    },
    "gemma2": {
        "layers": 26, "d_model": 2304, "d_mlp": 9216, "heads": 8, "kv_heads": 4, "head_dim": 256,
        "vocab": 256000, "features": {"per_layer": 16384, "clt": 16384},
    },
    "qwen3": {
        "layers": 28, "d_model": 2048, "d_mlp": 6144, "heads": 16, "kv_heads": 8,
        "head_dim": 128, "vocab": 151936, "features": {"per_layer": 65536, "clt": 16384},
    },
}  # fmt: skip
SMOKE_SHAPE = {
    "layers": 2, "d_model": 64, "d_mlp": 128, "heads": 4, "kv_heads": 2, "head_dim": 16,
    "vocab": 512, "features": {"per_layer": 2048, "clt": 1024},
}  # fmt: skip
FULL = {
    "l0": 100,
    "prompts": 2,
    "tokens": "32,128,512",
    "max_feature_nodes": 4096,
    "batch_size": 256,
    "device": "auto",
}
SMOKE = FULL | {"l0": 32, "prompts": 1, "tokens": "8,16", "max_feature_nodes": 256,
                "batch_size": 64, "device": "cpu"}  # fmt: skip
SHAPE_OPTIONS = ("layers", "d_model", "d_mlp", "heads", "kv_heads", "head_dim", "vocab", "features")
# Per family, beyond the shape: what the real config sets (positions, rope, norms).
_FAMILY_CONFIG = {
    "llama": {
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
    },
    "gemma2": {"max_position_embeddings": 8192, "sliding_window": 4096, "rms_norm_eps": 1e-6},
    "qwen3": {"max_position_embeddings": 40960, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6},
}
_STARTED = time.perf_counter()


class DiskFull(Exception):
    """Not enough free disk for the weights, even after removing other sets."""


class Shape(BaseModel):
    """The model and transcoder shape."""

    family: Family
    kind: Kind
    layers: int
    d_model: int
    d_mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    features: int  # per layer
    l0: int  # target active features per layer and token

    @property
    def hooks(self) -> tuple[str, str]:
        return transcoder_hooks(self.family, "clt" if self.kind == "clt" else "relu")

    @property
    def activation(self) -> str:
        return "jump_relu" if self.family == "gemma2" else "relu"  # Gemma Scope: JumpReLU

    @property
    def skip(self) -> bool:
        # circuit-tracer's CLT files carry no skip; Gemma Scope's transcoders have none.
        return self.kind == "per_layer" and self.family != "gemma2"

    @property
    def decoder_rows(self) -> int:
        """Decoder rows of d_model per feature index: n(n+1)/2 for a CLT, n for per-layer."""
        return self.layers * (self.layers + 1) // 2 if self.kind == "clt" else self.layers

    def model_key(self) -> dict:
        return self.model_dump(include={"family", *SHAPE_OPTIONS} - {"features"})

    def transcoder_key(self) -> dict:
        return self.model_dump(include={"kind", "features", "l0"})

    def check(self) -> None:
        if not 0 < self.l0 < self.features // 2:
            raise SystemExit("--l0 must be between 0 and half of --features")
        if self.vocab <= len(SPECIAL_TOKENS) or self.vocab == self.d_model:
            # circuit-tracer guesses the unembedding's orientation from its shape.
            raise SystemExit("--vocab must exceed the special tokens and differ from --d-model")
        if self.heads % self.kv_heads:
            raise SystemExit("--heads must be a multiple of --kv-heads")

    def hf_config(self):
        ids = SimpleNamespace(bos_token_id=1, eos_token_id=2, pad_token_id=0)
        config = hf_config(self.family, self.vocab, self.layers, self.d_model, ids)
        overrides = {
            "intermediate_size": self.d_mlp,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "tie_word_embeddings": True,
            **_FAMILY_CONFIG[self.family],
        }
        if self.family == "gemma2":
            overrides["query_pre_attn_scalar"] = self.head_dim
        for key, value in overrides.items():
            setattr(config, key, value)
        config.architectures = [next(f for f in FAMILIES if f.name == self.family).architectures[0]]
        return config

    def n_params(self) -> int:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config())
        return sum(p.numel() for p in model.parameters())  # tied embeddings counted once

    def transcoder_values(self) -> int:
        """Values in the transcoder files (2 bytes each in bf16)."""
        f, d, n = self.features, self.d_model, self.layers
        per_layer = f * d + f + d + (f if self.activation == "jump_relu" else 0)
        skip = d * d if self.skip else 0
        return n * (per_layer + skip) + self.decoder_rows * f * d


class MemoryEstimate(BaseModel):
    """Rough sizes, from the shape alone; the measured peaks are what to trust."""

    model_bytes: int  # device, at the run's dtype
    transcoder_file_bytes: int  # bf16 on disk
    transcoder_device_bytes: int  # encoders, biases and skips (+ decoders when loaded eagerly)
    active_features: int  # l0 * layers * (tokens - 1): BOS features are zeroed
    attribution_device_bytes: int  # feature vectors + the batched forward kept for backward
    attribution_host_bytes: int  # dense float32 edge rows + adjacency + pruning's copies


class GraphResult(BaseModel):
    """One graph through EMC's path."""

    prompt_id: str
    tokens: int
    attribute_s: float  # circuit-tracer's attribute() inside trace_prompt
    storage_s: float  # the rest of EMC's path: graph to CPU, pruning, scores, rows, write
    total_s: float  # wall time of trace_prompt + insert_traced
    peak_gpu_bytes: int | None  # torch.cuda.max_memory_allocated, reset per graph
    peak_rss_bytes: int | None  # VmHWM, reset per graph
    active_features: int
    l0: float  # active features per layer and non-BOS token
    feature_nodes: int  # attributed (max_feature_nodes caps them)
    kept_nodes: int
    kept_features: int
    kept_edges: int
    replacement: float
    completeness: float


class BareResult(BaseModel):
    """One graph from circuit-tracer's attribute() alone."""

    prompt_id: str
    tokens: int
    attribute_s: float
    peak_gpu_bytes: int | None
    peak_rss_bytes: int | None
    active_features: int
    feature_nodes: int


class LengthSummary(BaseModel):
    tokens: int
    graphs: int  # timed prompts, each traced both ways
    emc_s_per_graph: float
    emc_attribute_s: float
    emc_after_s: float  # EMC's seconds beyond its attribute() call
    bare_s_per_graph: float
    overhead: float  # emc_s_per_graph / bare_s_per_graph
    within_goal: bool  # overhead <= OVERHEAD_GOAL
    emc_peak_gpu_bytes: int | None
    bare_peak_gpu_bytes: int | None
    emc_peak_rss_bytes: int | None
    bare_peak_rss_bytes: int | None
    l0: float
    kept_nodes: float
    kept_edges: float


class LengthResult(BaseModel):
    tokens: int
    batch_size: int  # what fitted: EMC's memory fallback halves it on out-of-memory, for both
    offload: str | None
    out_of_memory: list[str]  # the settings that did not fit, first to last
    estimate: MemoryEstimate
    graphs: list[GraphResult]
    bare: list[BareResult]
    summary: LengthSummary


class Skipped(BaseModel):
    tokens: int
    reason: str


class Summary(BaseModel):
    graphs: int  # timed EMC graphs over all lengths
    l0: float | None  # mean over EMC graphs
    l0_range: tuple[float, float]
    l0_in_range: bool
    max_overhead: float | None
    overhead_goal: float
    within_goal: bool  # every measured length within the goal


class BenchmarkResult(BaseModel):
    family: str
    kind: str
    shape: Shape
    hooks: tuple[str, str]
    activation: str
    skip: bool
    n_params: int
    prompts: int
    warmup: int
    tokens: list[int]
    max_feature_nodes: int
    batch_size: int
    backend: str
    device: str  # cpu, or the GPU's name
    dtype: str
    torch_version: str
    circuit_tracer_version: str
    baseline: str
    weights_reused: bool
    build_s: float
    calibration_l0: list[float]  # per layer, measured when the files were written
    load_s: float
    resident_gpu_bytes: int | None  # allocated after loading, before any graph
    lengths: list[LengthResult]
    skipped: list[Skipped]
    complete: bool  # every length of --tokens measured
    summary: Summary


BASELINE = (
    "circuit_tracer.attribute() on the same loaded replacement model, same token ids, same "
    "attribution_targets (the labelled token ids EMC passes), max_n_logits, desired_logit_prob, "
    "batch_size, max_feature_nodes and offload; wall clock around the call with "
    "torch.cuda.synchronize on a GPU; model loading excluded for both; one untimed warm-up each"
)


def build_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer that decodes every id of the vocabulary (tokens w4, w5, ...)."""
    words = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    words |= {f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def random_prompts(vocab: int, n: int, tokens: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bos = torch.tensor([SPECIAL_TOKENS.index("<s>")])
    first = len(SPECIAL_TOKENS)  # bodies hold no special tokens
    return [
        torch.cat([bos, torch.randint(first, vocab, (tokens - 1,), generator=generator)])
        for _ in range(n)
    ]


# --- weights ---------------------------------------------------------------------------------


class Built(BaseModel):
    weights_reused: bool
    build_s: float
    calibration_l0: list[float]


def weight_dirs(work_dir: Path, shape: Shape) -> tuple[Path, Path]:
    return work_dir / f"{shape.family}-model", work_dir / f"{shape.family}-{shape.kind}-transcoders"


def prepare_weights(
    work_dir: Path, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> Built:
    """Reuse the work directory's weights when they were built for this shape and seed."""
    started = time.perf_counter()
    model_dir, transcoder_dir = weight_dirs(work_dir, shape)
    model_wanted = {"model": shape.model_key(), "seed": seed, "recipe": MODEL_RECIPE}
    transcoders_wanted = model_wanted | {"transcoders": shape.transcoder_key(), "dtype": str(dtype)}
    model_ok = _manifest(model_dir) == model_wanted
    found = _manifest(transcoder_dir)
    if model_ok and found and {k: found.get(k) for k in transcoders_wanted} == transcoders_wanted:
        _log(f"reusing the weights in {model_dir} and {transcoder_dir}")
        for directory in (model_dir, transcoder_dir):
            _manifest_path(directory).touch()  # most recently used: evicted last
        return Built(weights_reused=True, build_s=0.0, calibration_l0=found["calibration_l0"])

    n_params = shape.n_params()
    model_bytes = 0 if model_ok else n_params * 2
    transcoder_bytes = shape.transcoder_values() * 2
    f, n = shape.features, shape.layers
    what = (
        f"CLT: {n} layers x {f} features, decoder {shape.decoder_rows} rows of {shape.d_model} "
        "per feature"
        if shape.kind == "clt"
        else f"per-layer transcoders: {n} x {f} features"
    )
    _log(
        f"to write: {'' if model_ok else f'model {_gb(model_bytes)} ({_count(n_params)}), '}"
        f"{what}, {_gb(transcoder_bytes)}; {_gb(shutil.disk_usage(work_dir).free)} free in "
        f"{work_dir}"
    )
    for stale in (transcoder_dir,) if model_ok else (transcoder_dir, model_dir):
        _manifest_path(stale).unlink(missing_ok=True)
        shutil.rmtree(stale, ignore_errors=True)
    _ensure_disk(work_dir, model_bytes + transcoder_bytes, keep={model_dir} if model_ok else set())
    torch.manual_seed(seed)
    if model_ok:
        _log(f"reusing the model in {model_dir}")
        _manifest_path(model_dir).touch()
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        _log(f"building a random model: {shape.family}, {_count(n_params)} parameters on {device}")
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(shape.hf_config(), dtype=torch.bfloat16)
        _steady_residual(model, shape)
        model.eval().save_pretrained(model_dir)
        build_tokenizer(shape.vocab).save_pretrained(model_dir)
        _write_manifest(model_dir, model_wanted)
        _log(f"model written: {_gb(_dir_bytes(model_dir))}")
        model.to(dtype)  # bf16 -> fp32 is exact: calibrate on the weights that were written
    # Lengths from 8 to 128: early positions, whose raw residual is larger, weigh in too.
    prompts = [p for n in CALIBRATION_TOKENS for p in random_prompts(shape.vocab, 1, n, seed + n)]
    inputs, outputs = _hook_activations(model, shape, prompts, device)
    del model
    release_memory()
    transcoder_dir.mkdir(parents=True)
    writer = _write_clt if shape.kind == "clt" else _write_transcoder_set
    l0 = writer(transcoder_dir, shape, inputs, outputs, seed)
    input_hook, output_hook = shape.hooks
    manifest = {
        "model_kind": "cross_layer_transcoder" if shape.kind == "clt" else "transcoder_set",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": f"random-benchmark-{shape.family}-{shape.kind}",
    }
    if shape.kind == "per_layer":
        manifest["transcoders"] = [f"layer_{layer}.safetensors" for layer in range(n)]
    (transcoder_dir / "config.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    _write_manifest(transcoder_dir, transcoders_wanted | {"calibration_l0": l0})  # marks it done
    return Built(weights_reused=False, build_s=time.perf_counter() - started, calibration_l0=l0)


def _steady_residual(model, shape: Shape) -> None:
    """Sharper attention in the families without sandwich norms: q and k scaled by
    ATTENTION_SHARPEN (Qwen 3 normalises q and k per head, so its q/k norm weights are).

    With the initialiser's weights, random attention is nearly uniform, so its output at
    position p averages p + 1 random values and shrinks like 1 / sqrt(p + 1): the residual stream
    is several times larger on short prompts than on long ones, and a CLT reading it raw
    (`hook_resid_mid`) would have a length-dependent L0. Peaked attention, as trained models
    have, copies one position's value at any length. Gemma's norm after attention already makes
    its output's size independent of position.
    """
    family = next(f for f in FAMILIES if f.name == shape.family)
    if family.sandwich_norms:
        return
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            if hasattr(attention, "q_norm"):
                attention.q_norm.weight.mul_(ATTENTION_SHARPEN)
                attention.k_norm.weight.mul_(ATTENTION_SHARPEN)
            else:
                attention.q_proj.weight.mul_(ATTENTION_SHARPEN)
                attention.k_proj.weight.mul_(ATTENTION_SHARPEN)


def _hook_activations(
    model, shape: Shape, prompts: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, what the transcoders read and what they reconstruct, BOS excluded.

    Read through EMC's hook sites: the module and side circuit-tracer reads for each hook.
    """
    family = next(f for f in FAMILIES if f.name == shape.family)
    sites = [site_for(family, hook) for hook in shape.hooks]
    values: list[list[list[torch.Tensor]]] = [[[] for _ in range(shape.layers)] for _ in sites]
    with ExitStack() as hooks:
        for layer in range(shape.layers):
            for side, site in enumerate(sites):
                module = site.at(model, layer)

                def hook(module, args, output, site=site, side=side, layer=layer):
                    values[side][layer].append(read_value(site, module, args, output)[0, 1:])

                hooks.enter_context(module.register_forward_hook(hook))
        with torch.inference_mode():
            for ids in prompts:
                model(input_ids=ids[None].to(device))
    inputs, outputs = ([torch.cat(x) for x in side] for side in values)
    return inputs, outputs


@dataclass
class _Encoder:
    w_enc: torch.Tensor  # bf16 (features, d_model)
    b_enc: torch.Tensor  # bf16 (features,)
    threshold: torch.Tensor | None  # bf16 (features,), JumpReLU only
    acts: torch.Tensor | None  # calibration activations (tokens, features), run dtype
    l0: float


def _random(generator: torch.Generator, *size: int, std: float, like: torch.Tensor):
    """Normal entries in bfloat16, generated where `like` lives (the GPU when there is one)."""
    out = torch.randn(*size, generator=generator, device=like.device, dtype=like.dtype)
    return out.mul_(std).to(torch.bfloat16)


def _encoder(shape: Shape, x: torch.Tensor, generator: torch.Generator) -> _Encoder:
    """Random unit-variance rows; the cut leaves `l0` features per token active on `x`."""
    w_enc = _random(generator, shape.features, shape.d_model, std=shape.d_model**-0.5, like=x)
    pre = x @ w_enc.to(x.dtype).T
    values = pre.flatten().float()
    keep = max(1, round(values.numel() * shape.l0 / shape.features))
    cut = values.kthvalue(values.numel() - keep + 1).values.to(torch.bfloat16)
    full = torch.full((shape.features,), float(cut), device=x.device, dtype=torch.bfloat16)
    if shape.activation == "jump_relu":  # bias 0, the cut is the threshold
        b_enc, threshold = torch.zeros_like(full), full
        acts = pre * (pre > cut.to(pre.dtype))
    else:  # ReLU: the bias moves the cut to 0
        b_enc, threshold = -full, None
        acts = torch.relu(pre + b_enc.to(pre.dtype))
    l0 = float((acts != 0).sum(-1).float().mean())
    return _Encoder(w_enc=w_enc, b_enc=b_enc, threshold=threshold, acts=acts, l0=l0)


def _rms(x: torch.Tensor) -> float:
    return float(x.float().pow(2).mean().sqrt())


def _recon_rms(acts: torch.Tensor) -> float:
    """Per-coordinate RMS of a reconstruction with unit-variance decoder entries."""
    value = float(acts.float().pow(2).sum(-1).mean().sqrt())
    return value if value > 0 else 1.0


def _write_transcoder_set(
    directory: Path, shape: Shape, inputs: list[torch.Tensor], outputs: list[torch.Tensor], seed
) -> list[float]:
    l0 = []
    for layer in range(shape.layers):
        started = time.perf_counter()
        x, d = inputs[layer], shape.d_model
        generator = torch.Generator(x.device).manual_seed(seed * 1000 + layer)
        enc = _encoder(shape, x, generator)
        target = _rms(outputs[layer])
        tensors = {
            "W_enc": enc.w_enc,
            "W_dec": _random(
                generator, shape.features, d, std=target / _recon_rms(enc.acts), like=x
            ),
            "b_enc": enc.b_enc,
            "b_dec": torch.zeros(d, dtype=torch.bfloat16, device=x.device),
        }
        if enc.threshold is not None:
            tensors["activation_function.threshold"] = enc.threshold
        if shape.skip:  # a tenth of the output's size
            tensors["W_skip"] = _random(
                generator, d, d, std=0.1 * target / (_rms(x) * d**0.5), like=x
            )
        path = directory / f"layer_{layer}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))
        del tensors
        enc.acts = None
        l0.append(enc.l0)
        _log(
            f"transcoder {layer + 1}/{shape.layers}: measured L0 {enc.l0:.1f}, "
            f"{_gb(path.stat().st_size)} in {time.perf_counter() - started:.1f} s"
        )
    return l0


def _write_clt(
    directory: Path, shape: Shape, inputs: list[torch.Tensor], outputs: list[torch.Tensor], seed
) -> list[float]:
    """circuit-tracer's CLT files; layer i's decoder writes layers i..n-1."""
    n, d = shape.layers, shape.d_model
    targets = [_rms(out) for out in outputs]
    l0 = []
    for layer in range(n):
        started = time.perf_counter()
        x = inputs[layer]
        generator = torch.Generator(x.device).manual_seed(seed * 1000 + layer)
        enc = _encoder(shape, x, generator)
        encoder = {
            f"W_enc_{layer}": enc.w_enc,
            f"b_enc_{layer}": enc.b_enc,
            f"b_dec_{layer}": torch.zeros(d, dtype=torch.bfloat16, device=x.device),
        }
        if enc.threshold is not None:
            encoder[f"threshold_{layer}"] = enc.threshold
        enc_path = directory / f"W_enc_{layer}.safetensors"
        save_file({k: v.cpu().contiguous() for k, v in encoder.items()}, str(enc_path))
        # Output layer m sums the writes of layers 0..m: each gets 1/sqrt(m + 1) of its size.
        recon = _recon_rms(enc.acts)
        scale = torch.tensor(
            [targets[m] / (recon * math.sqrt(m + 1)) for m in range(layer, n)],
            device=x.device,
            dtype=x.dtype,
        )
        w_dec = _random(generator, shape.features, n - layer, d, std=1.0, like=x)
        w_dec.mul_(scale.to(torch.bfloat16)[None, :, None])
        dec_path = directory / f"W_dec_{layer}.safetensors"
        save_file({f"W_dec_{layer}": w_dec.cpu().contiguous()}, str(dec_path))
        del w_dec, encoder
        enc.acts = None
        release_memory()
        l0.append(enc.l0)
        size = enc_path.stat().st_size + dec_path.stat().st_size
        _log(
            f"CLT layer {layer + 1}/{n}: measured L0 {enc.l0:.1f}, writes {n - layer} layers, "
            f"{_gb(size)} in {time.perf_counter() - started:.1f} s"
        )
    return l0


def _manifest_path(directory: Path) -> Path:
    return directory.with_name(directory.name + ".json")


def _manifest(directory: Path) -> dict | None:
    path = _manifest_path(directory)
    if not (path.is_file() and directory.is_dir()):
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def _write_manifest(directory: Path, content: dict) -> None:
    _manifest_path(directory).write_text(json.dumps(content))


def _ensure_disk(work_dir: Path, needed: int, keep: set[Path]) -> None:
    """Remove other weight sets of the work directory, least recently used first, until `needed`
    bytes (plus a margin) are free; raise DiskFull when that is not enough."""
    margin = 2_000_000_000 + needed // 20
    others = sorted(
        (p for p in work_dir.glob("*.json") if p.with_suffix("").is_dir()),
        key=lambda p: p.stat().st_mtime,
    )
    for manifest in others:
        if shutil.disk_usage(work_dir).free >= needed + margin:
            return
        directory = manifest.with_suffix("")
        if directory in keep:
            continue
        _log(f"disk short: removing {directory} ({_gb(_dir_bytes(directory))})")
        manifest.unlink()
        shutil.rmtree(directory, ignore_errors=True)
    free = shutil.disk_usage(work_dir).free
    if free < needed + margin:
        raise DiskFull(
            f"the weights need {_gb(needed)} (+{_gb(margin)} margin) in {work_dir}, "
            f"{_gb(free)} free"
        )


# --- tracing ---------------------------------------------------------------------------------


def benchmark_config(work_dir: Path, shape: Shape, device: str) -> ExperimentConfig:
    # nnsight, EMC's default and the only backend for Gemma: TransformerLens sizes its attention
    # masks by the context length, and Llama 3.2's 131072 positions would need 64 GB for one.
    model_dir, transcoder_dir = weight_dirs(work_dir, shape)
    return parse_config(
        {
            "name": "tracing-gpu-benchmark",
            "models": {
                "base": {"ref": str(model_dir.resolve())},
                "transcoders": {"ref": str(transcoder_dir.resolve())},
            },
            "runtime": {"backend": "nnsight", "device": device, "precision": "auto"},
        }
    )


def _start_graph(cuda: bool) -> float:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    return time.perf_counter()


def _end_graph(cuda: bool, started: float) -> tuple[float, int | None, int | None]:
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    return seconds, (torch.cuda.max_memory_allocated() if cuda else None), _peak_rss()


def emc_graph(
    loaded: LoadedModel, store: Store, prompt_id: str, ids: torch.Tensor, plan, tracing
) -> GraphResult:
    """One graph through EMC's path: key, trace_prompt, insert_traced."""
    key = graph_key(prompt_id, loaded.identity.model_id, plan, tracing)
    cuda = loaded.precision.device.type == "cuda"
    started = _start_graph(cuda)
    traced = trace_prompt(loaded, key, plan, ids, tracing, RUN_ID)
    insert_traced(store, traced)
    total_s, peak_gpu, peak_rss = _end_graph(cuda, started)
    record, layers = traced.record, loaded.model.cfg.n_layers
    result = GraphResult(
        prompt_id=prompt_id,
        tokens=len(ids),
        attribute_s=record.seconds,
        storage_s=total_s - record.seconds,
        total_s=total_s,
        peak_gpu_bytes=peak_gpu,
        peak_rss_bytes=peak_rss,
        active_features=record.n_active_features,
        l0=record.n_active_features / (layers * (len(ids) - 1)),
        feature_nodes=record.n_features,
        kept_nodes=len(traced.compact.nodes),
        kept_features=record.kept_features,
        kept_edges=record.kept_edges,
        replacement=record.replacement,
        completeness=record.completeness,
    )
    del traced
    release_memory()
    return result


def bare_graph(
    loaded: LoadedModel, prompt_id: str, ids: torch.Tensor, plan, tracing: TracingConfig
) -> BareResult:
    """The same graph from circuit-tracer's attribute() alone (see the module docstring)."""
    device = loaded.precision.device
    ids = ids.to(device)
    targets = torch.tensor(plan.token_ids, dtype=torch.long, device=device)
    cuda = device.type == "cuda"
    started = _start_graph(cuda)
    graph = attribute(
        ids,
        loaded.model,
        attribution_targets=targets,
        max_n_logits=tracing.max_n_logits,
        desired_logit_prob=tracing.desired_logit_prob,
        batch_size=tracing.batch_size,
        max_feature_nodes=tracing.max_feature_nodes,
        offload=tracing.offload,
        verbose=False,
    )
    seconds, peak_gpu, peak_rss = _end_graph(cuda, started)
    result = BareResult(
        prompt_id=prompt_id,
        tokens=len(ids),
        attribute_s=seconds,
        peak_gpu_bytes=peak_gpu,
        peak_rss_bytes=peak_rss,
        active_features=len(graph.active_features),
        feature_nodes=len(graph.selected_features),
    )
    del graph
    release_memory()
    return result


def _plan(loaded: LoadedModel, ids: torch.Tensor, tracing: TracingConfig):
    """Labels from the model's top four next tokens (untimed, as discovery would give them)."""
    top = loaded.next_token_logits(ids)[-1].topk(4).indices.tolist()
    return plan_targets({top[0]: "evil", top[1]: "safe", top[2]: "evil", top[3]: "safe"}, tracing)


def measure_length(
    loaded: LoadedModel,
    store: Store,
    shape: Shape,
    n_tokens: int,
    args: argparse.Namespace,
    tracing: TracingConfig,
    estimate: MemoryEstimate,
    deadline: float | None,
    later: list[int],
) -> tuple[LengthResult | None, list[str]]:
    """`run_length`, retried with EMC's memory fallback (`emc.tracing.memory_fallback`: half the
    batch down to 16, then offloading) while it runs out of memory; EMC and bare always share the
    settings. None when nothing fits, or the time limit passed."""
    failed: list[str] = []
    config = tracing
    while True:
        error = None
        try:
            length = run_length(
                loaded, store, shape, n_tokens, args, config, estimate, deadline, later
            )
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            error = (
                str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            )
        else:
            length.out_of_memory = failed
            return length, failed
        # Outside the handler: its traceback held the failed graph's tensors.
        release_memory()
        setting = f"batch {config.batch_size}" + (
            f", offload {config.offload}" if config.offload else ""
        )
        failed.append(setting)
        _log(f"{n_tokens} tokens: out of memory at {setting}: {error}")
        config = memory_fallback(config)
        if config is None or (deadline is not None and time.perf_counter() > deadline):
            return None, failed
        _log(f"{n_tokens} tokens: retrying at batch {config.batch_size}, offload {config.offload}")


def _out_of_memory(exc: BaseException) -> bool:
    """EMC's test, along the cause chain (nnsight may wrap the allocator's error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if is_out_of_memory(exc) or "out of memory" in str(exc).lower():
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def run_length(
    loaded: LoadedModel,
    store: Store,
    shape: Shape,
    n_tokens: int,
    args: argparse.Namespace,
    tracing: TracingConfig,
    estimate: MemoryEstimate,
    deadline: float | None,
    later: list[int],
) -> LengthResult:
    prompts = random_prompts(
        shape.vocab, args.warmup + args.prompts, n_tokens, args.seed + n_tokens
    )
    for i, ids in enumerate(prompts[: args.warmup]):
        _log(f"{n_tokens} tokens: warm-up graph {i + 1}/{args.warmup} (EMC and bare)")
        plan = _plan(loaded, ids, tracing)
        emc_graph(loaded, store, f"warmup-{n_tokens}-{i}", ids, plan, tracing)
        bare_graph(loaded, f"warmup-{n_tokens}-{i}", ids, plan, tracing)
    graphs: list[GraphResult] = []
    bare: list[BareResult] = []
    for i, ids in enumerate(prompts[args.warmup :]):
        started = time.perf_counter()
        plan = _plan(loaded, ids, tracing)
        prompt_id = f"prompt-{n_tokens}-{i}"
        # Alternate which goes first, so neither always meets a warmer cache.
        if i % 2 == 0:
            bare.append(bare_graph(loaded, prompt_id, ids, plan, tracing))
            graphs.append(emc_graph(loaded, store, prompt_id, ids, plan, tracing))
        else:
            graphs.append(emc_graph(loaded, store, prompt_id, ids, plan, tracing))
            bare.append(bare_graph(loaded, prompt_id, ids, plan, tracing))
        g, b = graphs[-1], bare[-1]
        _log(
            f"{n_tokens} tokens, graph {i + 1}/{args.prompts}: EMC {g.total_s:.2f} s (attribute "
            f"{g.attribute_s:.2f} s + {g.storage_s:.3f} s), bare {b.attribute_s:.2f} s, "
            f"L0 {g.l0:.1f}, kept {g.kept_nodes} nodes"
        )
        if deadline is not None and i + 1 < args.prompts:
            # Another prompt only if the later lengths keep time for a warm-up and one prompt
            # each (projected from this pair, scaled by tokens).
            pair_s = time.perf_counter() - started
            later_s = pair_s * (args.warmup + 1) * sum(later) / n_tokens
            if time.perf_counter() + pair_s + later_s > deadline:
                _log(f"{n_tokens} tokens: time limit near, stopping after {i + 1} prompts")
                break
    return LengthResult(
        tokens=n_tokens,
        batch_size=tracing.batch_size,
        offload=tracing.offload,
        out_of_memory=[],
        estimate=estimate,
        graphs=graphs,
        bare=bare,
        summary=summarize_length(n_tokens, graphs, bare),
    )


def summarize_length(
    tokens: int, graphs: list[GraphResult], bare: list[BareResult]
) -> LengthSummary:
    emc_s = mean(g.total_s for g in graphs)
    bare_s = mean(b.attribute_s for b in bare)
    overhead = emc_s / bare_s
    return LengthSummary(
        tokens=tokens,
        graphs=len(graphs),
        emc_s_per_graph=emc_s,
        emc_attribute_s=mean(g.attribute_s for g in graphs),
        emc_after_s=mean(g.storage_s for g in graphs),
        bare_s_per_graph=bare_s,
        overhead=overhead,
        within_goal=overhead <= OVERHEAD_GOAL,
        emc_peak_gpu_bytes=_max(g.peak_gpu_bytes for g in graphs),
        bare_peak_gpu_bytes=_max(b.peak_gpu_bytes for b in bare),
        emc_peak_rss_bytes=_max(g.peak_rss_bytes for g in graphs),
        bare_peak_rss_bytes=_max(b.peak_rss_bytes for b in bare),
        l0=mean(g.l0 for g in graphs),
        kept_nodes=mean(g.kept_nodes for g in graphs),
        kept_edges=mean(g.kept_edges for g in graphs),
    )


def summarize(lengths: list[LengthResult], l0: int) -> Summary:
    low, high = l0 / 2, 2 * l0
    graphs = [g for length in lengths for g in length.graphs]
    measured = mean(g.l0 for g in graphs) if graphs else None
    overheads = [length.summary.overhead for length in lengths]
    return Summary(
        graphs=len(graphs),
        l0=measured,
        l0_range=(low, high),
        l0_in_range=measured is not None and low <= measured <= high,
        max_overhead=max(overheads) if overheads else None,
        overhead_goal=OVERHEAD_GOAL,
        within_goal=bool(overheads) and all(length.summary.within_goal for length in lengths),
    )


def estimate_memory(
    shape: Shape, n_params: int, tokens: int, tracing: TracingConfig, dtype_bytes: int
) -> MemoryEstimate:
    d, layers, f, n_logits = shape.d_model, shape.layers, shape.features, 4
    decoder = shape.decoder_rows * f * d
    lazy_decoder = decoder > 50_000_000  # emc.models.transcoders' rule
    encoders = layers * (f * d + f + d + (d * d if shape.skip else 0))
    active = shape.l0 * layers * (tokens - 1)
    feature_nodes = min(active, tracing.max_feature_nodes or active)
    # A CLT feature of layer i carries n - i decoder rows: (n + 1) / 2 on average.
    writes = (layers + 1) / 2 if shape.kind == "clt" else 1
    # The batched forward (batch_size copies of the prompt) keeps ~6 residual-sized tensors and
    # the attention pattern per layer for the backward passes, and computes the batch's logits
    # over the whole vocabulary (Gemma's soft-capping makes two more copies of them).
    logits = shape.vocab * (3 if shape.family == "gemma2" else 1)
    per_token = layers * (6 * d + shape.heads * tokens) + logits
    forward = tracing.batch_size * tokens * per_token * dtype_bytes
    buffer = (active + (layers + 1) * tokens) * tracing.batch_size * dtype_bytes
    side = feature_nodes + (layers + 1) * tokens + n_logits
    edge_rows = (feature_nodes + n_logits) * (active + (layers + 1) * tokens + n_logits) * 4
    return MemoryEstimate(
        model_bytes=n_params * dtype_bytes,
        transcoder_file_bytes=shape.transcoder_values() * 2,
        transcoder_device_bytes=(encoders + (0 if lazy_decoder else decoder)) * dtype_bytes,
        active_features=active,
        attribution_device_bytes=int((1 + writes) * active * d * dtype_bytes) + forward + buffer,
        attribution_host_bytes=edge_rows + 4 * side * side * 4,
    )


# --- output ----------------------------------------------------------------------------------


def format_result(result: BenchmarkResult) -> str:
    s = result.summary
    shape = result.shape
    per_length = [
        ("tokens", "batch", "graphs", "EMC s/graph", "= attribute", "+ after", "bare s/graph",
         "overhead", "GPU EMC", "GPU bare", "RSS EMC", "RSS bare", "L0", "kept nodes",
         "kept edges"),
        *(
            (x.tokens, f"{y.batch_size}{'+offload' if y.offload else ''}", x.graphs,
             f"{x.emc_s_per_graph:.3f}", f"{x.emc_attribute_s:.3f}", f"{x.emc_after_s:.3f}",
             f"{x.bare_s_per_graph:.3f}", f"{x.overhead:.2f}x", _gb(x.emc_peak_gpu_bytes),
             _gb(x.bare_peak_gpu_bytes), _gb(x.emc_peak_rss_bytes), _gb(x.bare_peak_rss_bytes),
             f"{x.l0:.1f}", f"{x.kept_nodes:.0f}", f"{x.kept_edges:.0f}")
            for y in result.lengths
            for x in (y.summary,)
        ),
    ]  # fmt: skip
    per_graph = [
        ("graph", "tokens", "EMC s", "attribute s", "bare s", "GPU EMC", "GPU bare", "active",
         "nodes", "kept nodes", "kept edges"),
        *(
            (g.prompt_id, g.tokens, f"{g.total_s:.3f}", f"{g.attribute_s:.3f}",
             f"{b.attribute_s:.3f}", _gb(g.peak_gpu_bytes), _gb(b.peak_gpu_bytes),
             g.active_features, g.feature_nodes, g.kept_nodes, g.kept_edges)
            for length in result.lengths
            for g, b in zip(length.graphs, length.bare, strict=True)
        ),
    ]  # fmt: skip
    kind = (
        f"CLT {shape.layers} x {shape.features} features"
        if shape.kind == "clt"
        else f"per-layer transcoders {shape.layers} x {shape.features} features"
    )
    built = "reused" if result.weights_reused else f"built in {result.build_s:.1f} s"
    estimates = ", ".join(
        f"{x.tokens} tokens ~{_gb(x.estimate.attribution_device_bytes)} device + "
        f"~{_gb(x.estimate.attribution_host_bytes)} host"
        for x in result.lengths
    )
    lines = [
        f"model: {result.family}, {shape.layers} layers, d_model {shape.d_model}, MLP "
        f"{shape.d_mlp}, {shape.heads} ({shape.kv_heads}) heads x {shape.head_dim}, vocab "
        f"{shape.vocab}, {_count(result.n_params)} parameters; {kind}, {result.activation}"
        f"{', skip' if result.skip else ''}, {result.hooks[0]} -> {result.hooks[1]}",
        f"run: {result.backend} {result.dtype} on {result.device}; weights {built}; load "
        f"{result.load_s:.1f} s; resident GPU {_gb(result.resident_gpu_bytes)}; "
        f"max_feature_nodes {result.max_feature_nodes}, batch {result.batch_size}",
        f"baseline: {result.baseline}",
        f"estimate: transcoders {_gb(result.lengths[0].estimate.transcoder_device_bytes)} on "
        f"device, attribution {estimates}"
        if result.lengths
        else "estimate: -",
        "",
        *plain_table(per_length),
        "",
        *plain_table(per_graph),
        "",
        *(
            f"out of memory at {x.tokens} tokens: {'; '.join(x.out_of_memory)} (then batch "
            f"{x.batch_size}{', offload ' + x.offload if x.offload else ''} fitted)"
            for x in result.lengths
            if x.out_of_memory
        ),
        *(f"skipped: {x.tokens} tokens: {x.reason}" for x in result.skipped),
        f"summary: {result.family} {result.kind}, {s.graphs} graphs each way; overhead "
        + ", ".join(f"{x.tokens}: {x.summary.overhead:.2f}x" for x in result.lengths)
        + f" (goal <= {s.overhead_goal}x: {'met' if s.within_goal else 'NOT MET'}); "
        + (
            f"L0 {s.l0:.1f} (wanted {s.l0_range[0]:g}..{s.l0_range[1]:g}"
            f"{'' if s.l0_in_range else ': OUT OF RANGE'})"
            if s.l0 is not None
            else "nothing measured"
        ),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU preset (seconds)")
    parser.add_argument("--family", choices=list(FAMILY_SHAPES), default="llama")
    parser.add_argument("--kind", choices=["per_layer", "clt"], default="per_layer")
    for name, what in (
        ("layers", "model and transcoder layers"),
        ("d-model", "residual width"),
        ("d-mlp", "MLP width"),
        ("heads", "attention heads"),
        ("kv-heads", "key-value heads"),
        ("head-dim", "attention head size"),
        ("vocab", "vocabulary size"),
        ("features", "transcoder features per layer"),
    ):
        parser.add_argument(f"--{name}", type=int, help=f"{what} (default: the family's)")
    for name, kind, what in (
        ("l0", int, "target active features per layer and token"),
        ("prompts", int, "timed prompts per length, each traced by EMC and bare"),
        ("tokens", str, "prompt lengths, BOS included, comma-separated"),
        ("max-feature-nodes", int, "tracing.max_feature_nodes"),
        ("batch-size", int, "tracing.batch_size"),
    ):
        parser.add_argument(
            f"--{name}", type=kind, help=f"{what} (default: {FULL[name.replace('-', '_')]})"
        )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed graphs per length (1)")
    parser.add_argument("--time-limit", type=float, help="seconds from start; skip what won't fit")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep (and reuse) the weights here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    for key, value in (SMOKE if args.smoke else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    shape = SMOKE_SHAPE if args.smoke else FAMILY_SHAPES[args.family]
    for key in SHAPE_OPTIONS:
        if getattr(args, key) is None:
            value = shape[key]
            setattr(args, key, value[args.kind] if key == "features" else value)
    try:
        args.tokens = [int(t) for t in str(args.tokens).split(",") if t.strip()]
    except ValueError:
        parser.error("--tokens takes comma-separated integers, e.g. 32,128,512")
    if not args.tokens or min(args.tokens) < 3 or args.prompts < 1 or args.warmup < 0:
        parser.error("--tokens must be at least 3, --prompts at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda, but torch sees no CUDA device "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})",
            file=sys.stderr,
        )
        return 2
    shape = Shape(
        family=args.family, kind=args.kind, l0=args.l0,
        **{key: getattr(args, key) for key in SHAPE_OPTIONS},
    )  # fmt: skip
    shape.check()
    if args.smoke:
        # Tiny matrices: one thread is faster and steadier than several fighting for shared cores.
        torch.set_num_threads(1)
    positions = _FAMILY_CONFIG[shape.family]["max_position_embeddings"]
    if max(args.tokens) > positions:
        raise SystemExit(f"--tokens: {shape.family} reads at most {positions} positions")
    tracing = TracingConfig(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    with ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work_dir.mkdir(parents=True, exist_ok=True)
        config = benchmark_config(work_dir, shape, args.device)
        precision = resolve_precision(config.runtime)
        if precision.device.type == "cpu" and not args.smoke:
            _log("warning: no GPU; the full shape on a CPU takes a very long time")
        try:
            built = prepare_weights(work_dir, shape, precision.device, precision.dtype, args.seed)
        except DiskFull as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 3
        result = run(config, shape, args, tracing, stack, built)
    figures = result.model_dump_json()
    if args.json:
        args.json.write_text(figures + "\n")
    print(format_result(result))
    print(figures)
    if not result.lengths:
        return 4
    return 0 if result.summary.l0_in_range else 1


def run(
    config: ExperimentConfig,
    shape: Shape,
    args: argparse.Namespace,
    tracing: TracingConfig,
    stack: ExitStack,
    built: Built,
) -> BenchmarkResult:
    started = time.perf_counter()
    loaded = load_replacement_model(config, "base")
    stack.callback(loaded.close)
    load_s = time.perf_counter() - started
    device = loaded.precision.device
    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated() if cuda else None
    _log(f"loaded through emc.models in {load_s:.1f} s; resident GPU {_gb(resident)}")
    n_params = shape.n_params()
    store = Store.in_data_dir(stack.enter_context(tempfile.TemporaryDirectory()))
    store.ensure_schema()
    deadline = _STARTED + args.time_limit if args.time_limit else None
    lengths: list[LengthResult] = []
    skipped: list[Skipped] = []

    def result() -> BenchmarkResult:
        return BenchmarkResult(
            family=shape.family,
            kind=shape.kind,
            shape=shape,
            hooks=shape.hooks,
            activation=shape.activation,
            skip=shape.skip,
            n_params=n_params,
            prompts=args.prompts,
            warmup=args.warmup,
            tokens=args.tokens,
            max_feature_nodes=tracing.max_feature_nodes,
            batch_size=tracing.batch_size,
            backend=config.runtime.backend,
            device=torch.cuda.get_device_name(device) if cuda else "cpu",
            dtype=loaded.precision.dtype_name,
            torch_version=torch.__version__,
            circuit_tracer_version=version("circuit-tracer"),
            baseline=BASELINE,
            **built.model_dump(),
            load_s=load_s,
            resident_gpu_bytes=resident,
            lengths=lengths,
            skipped=skipped,
            complete=len(lengths) == len(args.tokens),
            summary=summarize(lengths, shape.l0),
        )

    last: tuple[int, float] | None = None  # tokens, seconds per graph pair at the last length
    for index, n_tokens in enumerate(args.tokens):
        later = args.tokens[index + 1 :]
        now = time.perf_counter()
        if deadline is not None and last is not None:
            # A warm-up and one prompt at least, scaled by tokens, with a quarter to spare.
            projected = 1.25 * last[1] * (args.warmup + 1) * n_tokens / last[0]
            if now + projected > deadline:
                reason = (
                    f"projected {projected:.0f} s, {max(0.0, deadline - now):.0f} s left of "
                    f"--time-limit {args.time_limit:g}"
                )
                _log(f"skipping {n_tokens} tokens: {reason}")
                skipped.append(Skipped(tokens=n_tokens, reason=reason))
                continue
        estimate = estimate_memory(
            shape, n_params, n_tokens, tracing, loaded.precision.dtype.itemsize
        )
        length, failed = measure_length(
            loaded, store, shape, n_tokens, args, tracing, estimate, deadline, later
        )
        if length is None:
            reason = "out of memory at " + "; ".join(failed)
            _log(f"skipping {n_tokens} tokens: {reason}")
            skipped.append(Skipped(tokens=n_tokens, reason=reason))
            continue
        lengths.append(length)
        pairs = args.warmup + len(lengths[-1].graphs)
        last = (n_tokens, (time.perf_counter() - now) / pairs)
        if args.json:  # a run killed later still leaves what it finished
            args.json.write_text(result().model_dump_json() + "\n")
    return result()


def _max(values) -> int | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux); elsewhere the peak covers the whole run.
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss() -> int | None:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(found.group(1)) * 1024 if found else None


def _dir_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def _gb(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
