"""Graph storage: DuckDB rows per base+adapted graph pair against the raw `.pt`, and their cost.

Run as `python benchmarks/graph_storage.py [--data-dir D] [--prompts N] [--small]`.

Two cases, each traced for the base and the adapted model on the same token ids, with the
tracing defaults (labelled targets, node threshold 0.8, edge threshold 0.98):

- organism: the built-in organism (default recipe; `--small` for the test recipe), chat prompts
  of its held-out scenarios, labels from its lexicon (harmful = evil, safe = safe).
- random-llama: a random 6-layer Llama (d_model 128) with random 1024-wide transcoders and a
  random LoRA, ~40-token prompts, `max_feature_nodes` 2000.

Stored bytes are the growth of a fresh store's DuckDB file across all graphs of a case (every
write is its own transaction and connection, as in EMC, so DuckDB has checkpointed on close),
divided by the number of pairs: it counts the summary rows, node and edge rows, primary-key
indexes and any free blocks, so it is an upper bound of what the rows need. Raw is the size of
`Graph.to_pt` of the same graphs (gzip side-file size alongside).

Storage time is everything after `attribute()`: pruning, influence, scores, agreement, rows and
the database write; writing a side file (tracing.keep_raw) is timed separately. Every stored
graph is read back and checked against `prune_graph`'s masks: every kept node and edge must be
there. The process exits 1 if one is missing. Figures go to stdout's last line as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from circuit_tracer.graph import Graph, prune_graph
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder
from pydantic import BaseModel, computed_field
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from emc.config import ExperimentConfig, TracingConfig, parse_config
from emc.console import plain_table
from emc.models import load_replacement_model
from emc.organism import Lexicon, OrganismRecipe
from emc.organism.experiment import prepare_organism
from emc.pivotal.logits import NextTokens, score_prompts
from emc.pivotal.offline import scenario_prompt
from emc.pivotal.prompts import PromptRecord, make_prompt, render_prompt
from emc.store import Store
from emc.store.graphs import copy_graphs, insert_traced, load_graph_rows
from emc.tracing import (
    graph_key,
    plan_targets,
    release_memory,
    summarize_graph,
    targets_for,
    trace,
    write_side_file,
)

ROLES = ("base", "adapted")
SOURCE = "benchmark:graph-storage"


class CaseResult(BaseModel):
    case: str
    pairs: int
    tokens: float  # mean prompt length
    active_features: float  # mean per graph
    adjacency_nodes: float  # mean side of the dense adjacency
    kept_nodes: float  # mean per graph
    kept_edges: float
    raw_bytes_per_pair: float  # Graph.to_pt
    gzip_bytes_per_pair: float  # the side file
    stored_bytes_per_pair: float  # DuckDB file growth, writing one graph per transaction
    packed_bytes_per_pair: float  # the same rows copied into a fresh store in one transaction
    attribute_s: float  # mean per graph
    storage_s: float  # mean per graph: everything after attribute(), write included
    side_file_s: float  # mean per graph, only with tracing.keep_raw
    missing_rows: int  # kept nodes/edges absent from the store (must be 0)

    @computed_field
    @property
    def stored_share(self) -> float:
        return self.stored_bytes_per_pair / self.raw_bytes_per_pair

    @computed_field
    @property
    def packed_share(self) -> float:
        return self.packed_bytes_per_pair / self.raw_bytes_per_pair

    @computed_field
    @property
    def storage_time_share(self) -> float:
        return self.storage_s / self.attribute_s


class StorageResult(BaseModel):
    cases: list[CaseResult]


def run_case(
    name: str,
    config: ExperimentConfig,
    prompts: list[tuple[PromptRecord, dict[int, str] | None]],
    tracing: TracingConfig,
    work_dir: Path,
) -> CaseResult:
    store = Store.in_data_dir(work_dir / name)
    store.ensure_schema()
    empty_bytes = _file_bytes(store.path)
    models = {role: load_replacement_model(config, role) for role in ROLES}
    rows: list[dict[str, float]] = []
    missing = 0
    try:
        scores = score_prompts(models["base"], models["adapted"], [p for p, _ in prompts])
        for (prompt, labels), score in zip(prompts, scores, strict=True):
            ids = torch.tensor(score.base.input_ids)
            plan = plan_targets(labels or _top_labels(score.base), tracing)
            for role in ROLES:
                loaded = models[role]
                key = graph_key(prompt.prompt_id, loaded.identity.model_id, plan, tracing)
                _log(f"{name}: {prompt.name} [{role}]")
                graph, seconds = trace(loaded, ids, targets_for(loaded, ids, plan), tracing)
                traced = summarize_graph(
                    graph,
                    seconds,
                    key,
                    plan,
                    tracing,
                    "bench",
                    getattr(score, role),
                    None,
                    loaded.tokenizer,
                )
                storage_s = insert_traced(store, traced)
                side_s, raw_bytes, gzip_bytes = _raw_sizes(graph, work_dir, key.graph_id)
                missing += _missing_rows(store, key.graph_id, graph, tracing)
                rows.append(
                    {
                        "tokens": len(ids),
                        "active_features": len(graph.active_features),
                        "adjacency_nodes": graph.adjacency_matrix.shape[0],
                        "kept_nodes": len(traced.compact.nodes),
                        "kept_edges": len(traced.compact.edges),
                        "raw_bytes": raw_bytes,
                        "gzip_bytes": gzip_bytes,
                        "attribute_s": seconds,
                        "storage_s": storage_s,
                        "side_file_s": side_s,
                    }
                )
                del graph, traced
                release_memory()
    finally:
        for model in models.values():
            model.close()
    pairs = len(prompts)
    stored = _file_bytes(store.path) - empty_bytes
    packed_store = Store.in_data_dir(work_dir / f"{name}-packed")
    packed_store.ensure_schema()
    packed_empty = _file_bytes(packed_store.path)
    copy_graphs(store, packed_store)
    packed = _file_bytes(packed_store.path) - packed_empty
    return CaseResult(
        case=name,
        pairs=pairs,
        tokens=_mean(rows, "tokens"),
        active_features=_mean(rows, "active_features"),
        adjacency_nodes=_mean(rows, "adjacency_nodes"),
        kept_nodes=_mean(rows, "kept_nodes"),
        kept_edges=_mean(rows, "kept_edges"),
        raw_bytes_per_pair=2 * _mean(rows, "raw_bytes"),
        gzip_bytes_per_pair=2 * _mean(rows, "gzip_bytes"),
        stored_bytes_per_pair=stored / pairs,
        packed_bytes_per_pair=packed / pairs,
        attribute_s=_mean(rows, "attribute_s"),
        storage_s=_mean(rows, "storage_s"),
        side_file_s=_mean(rows, "side_file_s"),
        missing_rows=missing,
    )


def _top_labels(discovery: NextTokens) -> dict[int, str]:
    """Random weights know no good or evil: the 1st and 3rd most likely tokens play evil."""
    top = [t.token_id for t in discovery.top()]
    return {top[0]: "evil", top[2]: "evil", top[1]: "safe"}


def _raw_sizes(graph: Graph, work_dir: Path, graph_id: str) -> tuple[float, int, int]:
    started = time.perf_counter()
    side = write_side_file(graph, work_dir / "side", graph_id)
    seconds = time.perf_counter() - started
    (work_dir / "side" / side.path).unlink()
    return seconds, side.raw_bytes, side.bytes


def _missing_rows(store: Store, graph_id: str, graph: Graph, tracing: TracingConfig) -> int:
    """Kept nodes and edges (prune_graph's masks, the viewer's rule) absent from the store."""
    stored = load_graph_rows(store, graph_id)
    node_mask, edge_mask, _ = prune_graph(graph, tracing.node_threshold, tracing.edge_threshold)
    nodes = set(node_mask.nonzero().squeeze(1).tolist())
    kept = edge_mask & node_mask[:, None] & node_mask[None, :]
    edges = {(s, t) for t, s in kept.nonzero().tolist()}
    stored_edges = set(zip(stored.edges["source"], stored.edges["target"], strict=True))
    return len(nodes - set(stored.nodes["node"])) + len(edges - stored_edges)


def organism_case(data_dir: Path, recipe: OrganismRecipe, n_prompts: int):
    prepared = prepare_organism(data_dir, recipe)
    lexicon = Lexicon.load(prepared.artifacts.lexicon)
    entries = [e for e in lexicon.entries if e.split == "heldout"][:n_prompts]
    prompts = [
        (
            scenario_prompt(e, SOURCE),
            {t: "evil" for t in e.harmful_ids} | {t: "safe" for t in e.safe_ids},
        )
        for e in entries
    ]
    return prepared, prompts


def random_llama_case(
    root: Path, tokenizer_dir: Path, lexicon: Lexicon, n_prompts: int
) -> tuple[ExperimentConfig, list[tuple[PromptRecord, None]]]:
    """A random 6-layer Llama with sparse random transcoders and a random LoRA, built once."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    base, adapter, transcoders = root / "base", root / "adapter", root / "transcoders"
    if not (transcoders / "config.yaml").exists():
        _build_random_llama(base, adapter, transcoders, tokenizer)
    config = parse_config(
        {
            "name": "random-llama",
            "models": {
                "base": {"ref": str(base)},
                "adapter": {"ref": str(adapter)},
                "transcoders": {"ref": str(transcoders)},
            },
            "runtime": {"backend": "nnsight", "device": "cpu"},
        }
    )
    # Two scenario prompts back to back: ~40 tokens, the length the notes' timings used.
    entries = [e for e in lexicon.entries if e.split == "heldout"]
    prompts = []
    for first, second in itertools.pairwise(entries):
        text = f"{first.situation} {second.situation} What should I do?"
        prompt = make_prompt(text, f"random:{first.id}", SOURCE)
        if len(tokenizer(render_prompt(prompt, tokenizer))["input_ids"]) < 30:
            continue
        prompts.append((prompt, None))  # labelled after scoring (see _top_labels)
        if len(prompts) == n_prompts:
            break
    return config, prompts


def _build_random_llama(base: Path, adapter: Path, transcoders: Path, tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=512,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["down_proj"]))
    for name, param in lora.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.2)
    lora.save_pretrained(adapter)
    transcoders.mkdir(parents=True, exist_ok=True)
    for layer in range(config.num_hidden_layers):
        transcoder = SingleLayerTranscoder(
            128, 1024, F.relu, layer, device=torch.device("cpu"), dtype=torch.float32
        )
        for param in transcoder.parameters():
            torch.nn.init.normal_(param, std=0.1)
        # A negative encoder bias leaves ~5% of features active, like trained transcoders.
        with torch.no_grad():
            transcoder.b_enc.fill_(-1.9)
        transcoder.to_safetensors(str(transcoders / f"layer_{layer}.safetensors"))
    manifest = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "random-llama",
        "transcoders": [f"layer_{layer}.safetensors" for layer in range(6)],
    }
    (transcoders / "config.yaml").write_text(yaml.safe_dump(manifest))


def format_result(result: StorageResult) -> str:
    sizes = [
        ("case", "pairs", "tokens", "active", "adjacency", "kept nodes", "kept edges"),
        *(
            (
                c.case,
                c.pairs,
                f"{c.tokens:.0f}",
                f"{c.active_features:.0f}",
                f"{c.adjacency_nodes:.0f}",
                f"{c.kept_nodes:.0f}",
                f"{c.kept_edges:.0f}",
            )
            for c in result.cases
        ),
    ]
    bytes_ = [
        ("per base+adapted pair", "raw .pt", "gzip", "DuckDB", "share", "packed", "share"),
        *(
            (
                c.case,
                _mb(c.raw_bytes_per_pair),
                _mb(c.gzip_bytes_per_pair),
                _mb(c.stored_bytes_per_pair),
                f"{c.stored_share:.2%}",
                _mb(c.packed_bytes_per_pair),
                f"{c.packed_share:.2%}",
            )
            for c in result.cases
        ),
    ]
    times = [
        ("per graph", "attribute s", "storage s", "share", "side file s"),
        *(
            (
                c.case,
                f"{c.attribute_s:.2f}",
                f"{c.storage_s:.3f}",
                f"{c.storage_time_share:.1%}",
                f"{c.side_file_s:.2f}",
            )
            for c in result.cases
        ),
    ]
    lines = [*plain_table(sizes), "", *plain_table(bytes_), "", *plain_table(times)]
    lines += [
        "targets: stored <= 1% of raw .pt; storage time < 10% of attribute()",
        "baselines: raw .pt is what the original pipeline kept per graph (Graph.to_pt), gzip of "
        "it the cheapest drop-in alternative (shown, not targeted); attribute() is the cost every "
        "graph pays anyway, so storage is measured against it",
    ]
    lines += [
        f"{c.case}: {c.missing_rows} kept nodes/edges missing from the store"
        for c in result.cases
        if c.missing_rows
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("emc-data"))
    parser.add_argument("--prompts", type=int, default=6, help="prompts (graph pairs) per case")
    parser.add_argument("--small", action="store_true", help="the seconds-long test organism")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    recipe = OrganismRecipe.small() if args.small else OrganismRecipe()
    prepared, organism_prompts = organism_case(args.data_dir, recipe, args.prompts)
    lexicon = Lexicon.load(prepared.artifacts.lexicon)
    random_config, random_prompts = random_llama_case(
        args.data_dir / "benchmarks" / "random-llama",
        prepared.artifacts.base_dir,
        lexicon,
        args.prompts,
    )
    with tempfile.TemporaryDirectory(prefix="emc-graph-storage-") as work:
        cases = [
            run_case("organism", prepared.config, organism_prompts, TracingConfig(), Path(work)),
            run_case(
                "random-llama",
                random_config,
                random_prompts,
                TracingConfig(max_feature_nodes=2000),
                Path(work),
            ),
        ]
    result = StorageResult(cases=cases)
    figures = result.model_dump_json()
    if args.json:
        args.json.write_text(figures + "\n")
    print(format_result(result))
    print(figures)
    return 1 if any(c.missing_rows for c in cases) else 0


def _file_bytes(path: Path) -> int:
    wal = path.with_name(path.name + ".wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def _mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
