"""GPU tracing benchmark: attribution graphs of a random model with Llama-3.2-1B's shape.

Run as `python benchmarks/tracing_gpu.py [--device cuda] [--work-dir D] [--json OUT]`, or with
`--smoke` for a tiny CPU run that takes seconds.

The model and transcoders have random weights but the real shapes: 16 layers, d_model 2048,
MLP 8192, 32 query / 8 key-value heads of 64, vocabulary 128256, tied embeddings, Llama 3 rope;
one ReLU transcoder per layer with 131072 features and a skip matrix, written as circuit-tracer's
`layer_{i}.safetensors` files in bfloat16 (`--work-dir D` keeps them in D/model and
D/transcoders, and a later run with the same shape and seed reuses them). Encoder rows are
unit-variance directions and the encoder bias is the normal quantile that leaves `--l0` features
active per layer and token (the transcoder input is an RMS-normalised residual, so a random row's
pre-activation is close to standard normal); decoders are scaled so reconstructions match the MLP
outputs' size, and the skip path adds a tenth of it. Both are checked on calibration prompts when
the files are written (the measured L0 is printed).

Graphs are traced through EMC's own path: `load_replacement_model` on an ExperimentConfig that
points at the local directories, `plan_targets` / `graph_key` / `trace_prompt` with the tracing
defaults (labelled targets: the model's top four next tokens play two evil and two safe labels),
and `insert_traced` into a real DuckDB store in a temporary directory. Prompts are random token
ids after BOS. Per graph: seconds of `attribute()`, seconds of everything after it (pruning,
scores, rows, database write), peak GPU memory (on a GPU) and peak RSS, active features,
measured L0 and kept nodes/edges. The process exits 1 when the measured L0 is outside [L0/2, 2*L0].
Figures go to stdout's last line as JSON, and to `--json OUT` if given.
"""

from __future__ import annotations

import os

# Nothing here may reach the network: the model, tokenizer and transcoders are all local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from statistics import NormalDist, mean

import torch
import yaml
from pydantic import BaseModel
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from emc.config import ExperimentConfig, TracingConfig, parse_config
from emc.console import plain_table
from emc.models import LoadedModel, load_replacement_model, resolve_precision
from emc.store import Store
from emc.store.graphs import insert_traced
from emc.tracing import graph_key, plan_targets, release_memory, trace_prompt

RUN_ID = "benchmark:tracing-gpu"
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; BOS is 1, never 0
MANIFEST = "benchmark-weights.json"
# The real shape (Llama-3.2-1B with circuit-tracer's per-layer transcoders) and a tiny preset.
FULL = {
    "layers": 16,
    "d_model": 2048,
    "features": 131072,
    "vocab": 128256,
    "l0": 100,
    "prompts": 4,
    "tokens": 48,
    "max_feature_nodes": 4096,
    "batch_size": 256,
    "device": "auto",
}
SMOKE = FULL | {
    "layers": 2,
    "d_model": 64,
    "features": 2048,
    "vocab": 512,
    "l0": 32,
    "prompts": 2,
    "tokens": 16,
    "max_feature_nodes": 256,
    "batch_size": 64,
    "device": "cpu",
}
_STARTED = time.perf_counter()


class Shape(BaseModel):
    """The model and transcoder shape; attention and MLP sizes follow from d_model."""

    layers: int
    d_model: int
    features: int
    vocab: int
    l0: int  # target active features per layer and token

    @property
    def head_dim(self) -> int:
        return 64 if self.d_model >= 512 else 16

    @property
    def heads(self) -> int:
        return self.d_model // self.head_dim

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 4)

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    def check(self) -> None:
        if self.d_model % self.head_dim:
            raise SystemExit(f"--d-model must be a multiple of {self.head_dim}")
        if not 0 < self.l0 < self.features:
            raise SystemExit("--l0 must be between 0 and --features")
        if self.vocab <= len(SPECIAL_TOKENS) or self.vocab == self.d_model:
            # circuit-tracer guesses the unembedding's orientation from its shape.
            raise SystemExit("--vocab must exceed the special tokens and differ from --d-model")

    def llama_config(self) -> LlamaConfig:
        return LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=self.d_model,
            intermediate_size=self.d_mlp,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            max_position_embeddings=131072,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            tie_word_embeddings=True,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )

    def n_params(self) -> int:
        d, attn = self.d_model, self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        per_layer = 2 * d * attn + 2 * d * kv + 3 * d * self.d_mlp + 2 * d
        return self.vocab * d + self.layers * per_layer + d  # embeddings tied to the unembedding


class MemoryEstimate(BaseModel):
    """Rough sizes, from the shape alone; the measured peaks are what to trust."""

    model_bytes: int  # device, at the run's dtype
    transcoder_file_bytes: int  # bf16 on disk
    transcoder_device_bytes: int  # encoders, biases and skips (+ decoders when loaded eagerly)
    active_features: int  # l0 * layers * (tokens - 1): BOS features are zeroed
    attribution_device_bytes: int  # feature vectors + the batched forward kept for backward
    attribution_host_bytes: int  # dense float32 edge rows + adjacency + pruning's copies


class GraphResult(BaseModel):
    prompt_id: str
    tokens: int
    attribute_s: float  # circuit-tracer's attribute()
    storage_s: float  # summarize_graph + insert_traced: pruning, scores, rows, write
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


class Summary(BaseModel):
    graphs: int
    mean_attribute_s: float
    mean_storage_s: float
    mean_s_per_graph: float
    peak_gpu_bytes: int | None
    peak_rss_bytes: int | None
    l0: float  # mean over graphs
    l0_range: tuple[float, float]
    l0_in_range: bool


class BenchmarkResult(BaseModel):
    shape: Shape
    prompts: int
    tokens: int
    max_feature_nodes: int
    batch_size: int
    backend: str
    device: str  # cpu, or the GPU's name
    dtype: str
    torch_version: str
    weights_reused: bool
    build_s: float
    calibration_l0: list[float]  # per layer, measured when the files were written
    load_s: float
    resident_gpu_bytes: int | None  # allocated after loading, before any graph
    estimate: MemoryEstimate
    graphs: list[GraphResult]
    summary: Summary


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


def random_prompts(shape: Shape, n: int, tokens: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bos = torch.tensor([SPECIAL_TOKENS.index("<s>")])
    first = len(SPECIAL_TOKENS)  # bodies hold no special tokens
    return [
        torch.cat([bos, torch.randint(first, shape.vocab, (tokens - 1,), generator=generator)])
        for _ in range(n)
    ]


def build_weights(
    work_dir: Path, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> list[float]:
    """Write the model and transcoder directories; returns the calibration L0 per layer."""
    model_dir, transcoder_dir = work_dir / "model", work_dir / "transcoders"
    (work_dir / MANIFEST).unlink(missing_ok=True)
    for stale in (model_dir, transcoder_dir):
        shutil.rmtree(stale, ignore_errors=True)
    torch.manual_seed(seed)
    _log(f"building a random model: {shape.n_params() / 1e9:.2f}B parameters on {device}")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.llama_config(), dtype=torch.bfloat16)
    model.eval().save_pretrained(model_dir)
    build_tokenizer(shape.vocab).save_pretrained(model_dir)
    _log(f"model written: {_gb(_dir_bytes(model_dir))}")
    model.to(dtype)  # bf16 -> fp32 is exact: calibrate on the weights that were written
    mlp_in, mlp_out = _mlp_activations(model, random_prompts(shape, 4, 48, seed + 1), device)
    del model
    release_memory()
    transcoder_dir.mkdir(parents=True)
    l0 = [
        _write_transcoder(transcoder_dir, layer, shape, mlp_in[layer], mlp_out[layer], seed)
        for layer in range(shape.layers)
    ]
    manifest = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "random-benchmark",
        "transcoders": [f"layer_{layer}.safetensors" for layer in range(shape.layers)],
    }
    (transcoder_dir / "config.yaml").write_text(yaml.safe_dump(manifest))
    return l0


def _mlp_activations(
    model, prompts: list[torch.Tensor], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's MLP input (transcoder input) and output on the prompts, BOS excluded."""
    inputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    outputs: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    with ExitStack() as hooks:
        for i, layer in enumerate(model.model.layers):
            hooks.enter_context(
                layer.post_attention_layernorm.register_forward_hook(
                    lambda _m, _a, out, i=i: inputs[i].append(out[0, 1:])
                )
            )
            hooks.enter_context(
                layer.mlp.register_forward_hook(
                    lambda _m, _a, out, i=i: outputs[i].append(out[0, 1:])
                )
            )
        with torch.inference_mode():
            for ids in prompts:
                model(input_ids=ids[None].to(device))
    return [torch.cat(x) for x in inputs], [torch.cat(x) for x in outputs]


def _write_transcoder(
    directory: Path,
    layer: int,
    shape: Shape,
    mlp_in: torch.Tensor,
    mlp_out: torch.Tensor,
    seed: int,
) -> float:
    started = time.perf_counter()
    device, dtype, d = mlp_in.device, mlp_in.dtype, shape.d_model
    generator = torch.Generator(device).manual_seed(seed * 1000 + layer)

    def normal(*size: int, std: float) -> torch.Tensor:
        return (torch.randn(*size, generator=generator, device=device, dtype=dtype) * std).to(
            torch.bfloat16
        )

    # A unit-variance direction against an RMS-normalised input: pre-activations ~ N(0, 1).
    w_enc = normal(shape.features, d, std=d**-0.5)
    b_enc = torch.full((shape.features,), NormalDist().inv_cdf(shape.l0 / shape.features))
    b_enc = b_enc.to(device=device, dtype=torch.bfloat16)
    acts = torch.relu(mlp_in @ w_enc.to(dtype).T + b_enc.to(dtype))
    l0 = float((acts > 0).sum(-1).float().mean())
    # Unit-variance decoder entries give reconstructions of RMS |a|: scale them to the MLP's.
    target = float(mlp_out.float().pow(2).mean().sqrt())
    recon = float(acts.float().pow(2).sum(-1).mean().sqrt())
    scale = target / recon if recon > 0 else 1.0
    del acts
    tensors = {
        "W_enc": w_enc,
        "W_dec": normal(shape.features, d, std=scale),
        "b_enc": b_enc,
        "b_dec": torch.zeros(d, dtype=torch.bfloat16, device=device),
        # The skip path adds a tenth of the MLP's size (inputs have RMS 1).
        "W_skip": normal(d, d, std=0.1 * target * d**-0.5),
    }
    path = directory / f"layer_{layer}.safetensors"
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(path))
    _log(
        f"transcoder {layer + 1}/{shape.layers}: measured L0 {l0:.1f}, "
        f"{_gb(path.stat().st_size)} in {time.perf_counter() - started:.1f} s"
    )
    return l0


def prepare_weights(
    work_dir: Path, shape: Shape, device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[bool, float, list[float]]:
    """Reuse the work directory's weights when they were built for this shape and seed."""
    started = time.perf_counter()
    manifest = work_dir / MANIFEST
    wanted = {"shape": shape.model_dump(), "seed": seed, "dtype": str(dtype)}
    if manifest.is_file():
        found = json.loads(manifest.read_text())
        if {k: found.get(k) for k in wanted} == wanted:
            _log(f"reusing the weights in {work_dir}")
            return True, 0.0, found["calibration_l0"]
    l0 = build_weights(work_dir, shape, device, dtype, seed)
    manifest.write_text(json.dumps(wanted | {"calibration_l0": l0}))  # last: marks it complete
    return False, time.perf_counter() - started, l0


def benchmark_config(work_dir: Path, device: str) -> ExperimentConfig:
    # nnsight, EMC's default: TransformerLens sizes its attention masks by the context length,
    # and Llama 3.2's 131072 positions would need 64 GB for one mask.
    return parse_config(
        {
            "name": "tracing-gpu-benchmark",
            "models": {
                "base": {"ref": str((work_dir / "model").resolve())},
                "transcoders": {"ref": str((work_dir / "transcoders").resolve())},
            },
            "runtime": {"backend": "nnsight", "device": device, "precision": "auto"},
        }
    )


def trace_graph(
    loaded: LoadedModel, store: Store, prompt_id: str, ids: torch.Tensor, tracing: TracingConfig
) -> GraphResult:
    """One graph through EMC's path: labels, key, trace_prompt, insert_traced."""
    top = loaded.next_token_logits(ids)[-1].topk(4).indices.tolist()
    labels = {top[0]: "evil", top[1]: "safe", top[2]: "evil", top[3]: "safe"}
    plan = plan_targets(labels, tracing)
    key = graph_key(prompt_id, loaded.identity.model_id, plan, tracing)
    cuda = loaded.precision.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    _reset_peak_rss()
    started = time.perf_counter()
    traced = trace_prompt(loaded, key, plan, ids, tracing, RUN_ID)
    storage_s = insert_traced(store, traced)
    total_s = time.perf_counter() - started
    record, layers = traced.record, loaded.model.cfg.n_layers
    result = GraphResult(
        prompt_id=prompt_id,
        tokens=len(ids),
        attribute_s=record.seconds,
        storage_s=storage_s,
        total_s=total_s,
        peak_gpu_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        peak_rss_bytes=_peak_rss(),
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


def estimate_memory(
    shape: Shape, tokens: int, tracing: TracingConfig, dtype_bytes: int
) -> MemoryEstimate:
    d, layers, n_logits = shape.d_model, shape.layers, 4
    lazy_decoder = shape.features * d * layers > 50_000_000  # emc.models.transcoders' rule
    per_transcoder = shape.features * d * (1 if lazy_decoder else 2) + d * d + shape.features + d
    active = shape.l0 * layers * (tokens - 1)
    feature_nodes = min(active, tracing.max_feature_nodes or active)
    # The batched forward keeps ~6 residual-sized tensors and the attention pattern per layer for
    # the backward passes, and computes the batch's logits over the whole vocabulary.
    per_token = layers * (6 * d + shape.heads * tokens) + shape.vocab
    forward = tracing.batch_size * tokens * per_token * dtype_bytes
    buffer = (active + (layers + 1) * tokens) * tracing.batch_size * dtype_bytes
    side = feature_nodes + (layers + 1) * tokens + n_logits
    edge_rows = (feature_nodes + n_logits) * (active + (layers + 1) * tokens + n_logits) * 4
    return MemoryEstimate(
        model_bytes=shape.n_params() * dtype_bytes,
        transcoder_file_bytes=layers * (2 * shape.features * d + d * d + shape.features + d) * 2,
        transcoder_device_bytes=layers * per_transcoder * dtype_bytes,
        active_features=active,
        attribution_device_bytes=2 * active * d * dtype_bytes + forward + buffer,
        attribution_host_bytes=edge_rows + 4 * side * side * 4,
    )


def summarize(graphs: list[GraphResult], l0: int) -> Summary:
    low, high = l0 / 2, 2 * l0
    measured = mean(g.l0 for g in graphs)
    gpu = [g.peak_gpu_bytes for g in graphs if g.peak_gpu_bytes is not None]
    rss = [g.peak_rss_bytes for g in graphs if g.peak_rss_bytes is not None]
    return Summary(
        graphs=len(graphs),
        mean_attribute_s=mean(g.attribute_s for g in graphs),
        mean_storage_s=mean(g.storage_s for g in graphs),
        mean_s_per_graph=mean(g.total_s for g in graphs),
        peak_gpu_bytes=max(gpu) if gpu else None,
        peak_rss_bytes=max(rss) if rss else None,
        l0=measured,
        l0_range=(low, high),
        l0_in_range=low <= measured <= high,
    )


def format_result(result: BenchmarkResult) -> str:
    s, e = result.summary, result.estimate
    rows = [
        ("graph", "tokens", "attribute s", "storage s", "peak GPU", "peak RSS", "active", "L0",
         "kept nodes", "kept edges"),
        *(
            (g.prompt_id, g.tokens, f"{g.attribute_s:.2f}", f"{g.storage_s:.3f}",
             _gb(g.peak_gpu_bytes), _gb(g.peak_rss_bytes), g.active_features, f"{g.l0:.1f}",
             g.kept_nodes, g.kept_edges)
            for g in result.graphs
        ),
    ]  # fmt: skip
    shape = result.shape
    lines = [
        f"model: {shape.layers} layers, d_model {shape.d_model}, vocab {shape.vocab}; "
        f"transcoders {shape.features} features; {result.backend} {result.dtype} on "
        f"{result.device}",
        f"weights: {'reused' if result.weights_reused else f'built in {result.build_s:.1f} s'}; "
        f"load {result.load_s:.1f} s; resident GPU {_gb(result.resident_gpu_bytes)}",
        f"estimate: model {_gb(e.model_bytes)}, transcoders {_gb(e.transcoder_device_bytes)} "
        f"on device ({_gb(e.transcoder_file_bytes)} of files), attribution "
        f"~{_gb(e.attribution_device_bytes)} device + ~{_gb(e.attribution_host_bytes)} host "
        f"for ~{e.active_features} active features",
        "",
        *plain_table(rows),
        "",
        f"summary: {s.graphs} graphs, {s.mean_s_per_graph:.2f} s/graph (attribute "
        f"{s.mean_attribute_s:.2f} s + storage {s.mean_storage_s:.3f} s), peak GPU "
        f"{_gb(s.peak_gpu_bytes)}, peak RSS {_gb(s.peak_rss_bytes)}, "
        f"L0 {s.l0:.1f} (wanted {s.l0_range[0]:g}..{s.l0_range[1]:g}"
        f"{'' if s.l0_in_range else ': OUT OF RANGE'})",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny CPU preset (seconds)")
    for name, kind, what in (
        ("layers", int, "model and transcoder layers"),
        ("d-model", int, "residual width (heads, MLP and head size follow)"),
        ("features", int, "transcoder features per layer"),
        ("vocab", int, "vocabulary size"),
        ("l0", int, "target active features per layer and token"),
        ("prompts", int, "graphs to trace"),
        ("tokens", int, "prompt length, BOS included"),
        ("max-feature-nodes", int, "tracing.max_feature_nodes"),
        ("batch-size", int, "tracing.batch_size"),
    ):
        parser.add_argument(
            f"--{name}", type=kind, help=f"{what} (default: {FULL[name.replace('-', '_')]})"
        )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    parser.add_argument("--warmup", type=int, default=1, help="untimed graphs first (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, help="keep (and reuse) the weights here")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    preset = SMOKE if args.smoke else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
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
        layers=args.layers, d_model=args.d_model, features=args.features, vocab=args.vocab,
        l0=args.l0,
    )  # fmt: skip
    shape.check()
    if args.tokens < 3 or args.prompts < 1:
        raise SystemExit("--tokens must be at least 3 and --prompts at least 1")
    tracing = TracingConfig(max_feature_nodes=args.max_feature_nodes, batch_size=args.batch_size)
    with ExitStack() as stack:
        work_dir = args.work_dir or Path(stack.enter_context(tempfile.TemporaryDirectory()))
        work_dir.mkdir(parents=True, exist_ok=True)
        config = benchmark_config(work_dir, args.device)
        precision = resolve_precision(config.runtime)
        if precision.device.type == "cpu" and not args.smoke:
            _log("warning: no GPU; the full shape on a CPU takes a very long time")
        reused, build_s, calibration = prepare_weights(
            work_dir, shape, precision.device, precision.dtype, args.seed
        )
        built = {"weights_reused": reused, "build_s": build_s, "calibration_l0": calibration}
        result = run(config, shape, args, tracing, stack, built)
    figures = result.model_dump_json()
    if args.json:
        args.json.write_text(figures + "\n")
    print(format_result(result))
    print(figures)
    return 0 if result.summary.l0_in_range else 1


def run(
    config: ExperimentConfig,
    shape: Shape,
    args: argparse.Namespace,
    tracing: TracingConfig,
    stack: ExitStack,
    built: dict,
) -> BenchmarkResult:
    started = time.perf_counter()
    loaded = load_replacement_model(config, "base")
    stack.callback(loaded.close)
    load_s = time.perf_counter() - started
    device = loaded.precision.device
    cuda = device.type == "cuda"
    resident = torch.cuda.memory_allocated() if cuda else None
    _log(f"loaded through emc.models in {load_s:.1f} s; resident GPU {_gb(resident)}")
    store = Store.in_data_dir(stack.enter_context(tempfile.TemporaryDirectory()))
    store.ensure_schema()
    prompts = random_prompts(shape, args.warmup + args.prompts, args.tokens, args.seed + 2)
    for i, ids in enumerate(prompts[: args.warmup]):
        _log(f"warm-up graph {i + 1}/{args.warmup}")
        trace_graph(loaded, store, f"warmup-{i}", ids, tracing)
    graphs = []
    for i, ids in enumerate(prompts[args.warmup :]):
        graph = trace_graph(loaded, store, f"prompt-{i}", ids, tracing)
        _log(
            f"graph {i + 1}/{args.prompts}: attribute {graph.attribute_s:.2f} s, storage "
            f"{graph.storage_s:.3f} s, L0 {graph.l0:.1f}, kept {graph.kept_nodes} nodes"
        )
        graphs.append(graph)
    return BenchmarkResult(
        shape=shape,
        prompts=args.prompts,
        tokens=args.tokens,
        max_feature_nodes=tracing.max_feature_nodes,
        batch_size=tracing.batch_size,
        backend=config.runtime.backend,
        device=torch.cuda.get_device_name(device) if cuda else "cpu",
        dtype=loaded.precision.dtype_name,
        torch_version=torch.__version__,
        **built,
        load_s=load_s,
        resident_gpu_bytes=resident,
        estimate=estimate_memory(shape, args.tokens, tracing, loaded.precision.dtype.itemsize),
        graphs=graphs,
        summary=summarize(graphs, shape.l0),
    )


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


def _log(message: str) -> None:
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
