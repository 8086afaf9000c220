"""Store scale: ingest throughput, DuckDB file size per 1,000 graph pairs, and the dashboard's
queries on a store of 10,000 pairs.

Run as `python benchmarks/store_scale.py [--source DIR] [--pairs 1000,5000,10000] [--smoke]`.

EMC keeps every graph of a study in one DuckDB file, written by one process at a time. This
measures how far that goes, on real rows: graphs traced on the built-in organism (a store that
`emc demo --small` filled; `--source`, built into a cache folder when absent), replicated under
new prompt and graph ids so that every copy has the rows a real graph has. A graph pair is the
base and the adapted graph of one prompt.

1. Ingest. `--ingest-pairs` pairs are written as bundles into a spool folder
   (`write_traced_bundle`, what a worker on another machine does), then loaded into an empty
   store by `ingest_bundles` (one transaction per graph, as in production): graphs/s and rows/s,
   rows being the graph's summary row, its kept nodes and edges, feature effects, feature
   statistics and layer rows. The same graphs are written through the local path
   (`insert_traced`, what a tracing run on the store's host calls) into another empty store, for
   comparison. At the end, `--ingest-at-scale` more pairs are ingested into the largest store,
   to show whether a write slows as the store grows.
2. Size. A store is built up to each size of `--pairs` by SQL (`emc.store.replicate`: one
   INSERT ... SELECT per table, every prompt-keyed table copied with new ids, so the prompt, its
   logits, judgement, labels, queue item, continuations, analysis rows and graphs all come
   along), because ingesting 10,000 pairs one graph at a time takes too long on a small CPU.
   After each size: CHECKPOINT, then the file's size (and its write-ahead log, empty then),
   per 1,000 pairs and per 1,000 pairs added since the last size. For comparison, the ingested
   store's bytes per pair (one transaction per graph) and the same graphs packed into a fresh
   store in one transaction.
3. Queries. At each size, each `emc.store` function that a dashboard page calls to draw (Runs,
   Review, Graphs with its pair picker and one pair's rows, the graph diff of one pair, Features
   with its ranking and one feature's "where it appears", Across prompts, the SQL console's
   examples), with the page's default arguments: the first call after the store file was
   dropped from the OS page cache (posix_fadvise DONTNEED; "cold"), then `--repeats` calls
   (median, min, max). Each call opens its own DuckDB connection, as the dashboard does on every
   rerun, so DuckDB's own cache never carries over between calls. Every function runs once on
   the first (smallest) store before any is timed, so imports and first-call costs of Python are
   charged to none.

Prints tables, then the same figures as one line of JSON (the last line of stdout; `--json PATH`
also writes them to a file). Exits 1 if a bundle was rejected or a count does not add up.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from emc.console import plain_table
from emc.store import (
    RunRecord,
    Store,
    get_run,
    list_models,
    list_runs,
    read_only_query,
    upsert_model,
)
from emc.store.analysis import ablation_results, analysis_failures, lora_comparisons
from emc.store.behaviour import continuation_checks
from emc.store.bundles import ingest_bundles, write_traced_bundle
from emc.store.calibration import compared_labels
from emc.store.feature_cards import feature_context, load_cards
from emc.store.feature_detail import feature_detail, feature_layers
from emc.store.feature_labels import feature_labels, shown_labels_for_model
from emc.store.feature_pages import graph_targets, ranked_prompts
from emc.store.features import feature_ranking
from emc.store.graph_diff import (
    graph_diff_summary,
    layer_diff_summary,
    pair_paths,
    prompt_graph_diff,
)
from emc.store.graph_nodes_view import node_effects
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import GRAPH_TABLES, StoredGraph, copy_graphs, insert_traced, load_graph_rows
from emc.store.judgements import current_labels, judgement_counts, latest_judgement
from emc.store.prompts import get_prompts
from emc.store.queue import list_queue, queue_counts
from emc.store.replicate import (
    add_replicas,
    checkpoint,
    copy_all,
    database_size,
    pair_count,
    row_counts,
    stored_traced,
    traced_prompt_ids,
)
from emc.store.runs import child_runs, run_parents
from emc.store.scores import load_prompt_scores
from emc.store.validity import graph_standing, left_out_of_rankings
from emc.tracing.pipeline import TracedPrompt

GRAPH_ROW_TABLES = GRAPH_TABLES
SMOKE = {"pairs": "10,20", "ingest_pairs": 5, "ingest_at_scale": 2, "repeats": 1}
DEFAULT_SOURCE = (
    Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "emc" / "store-scale-source"
)
BUILD_SOURCE = ["demo", "--small"]  # `emc demo --small -d SOURCE`: the whole pipeline, on CPU


# The source: real graphs


def ensure_source(source: Path) -> float | None:
    """A store with at least one graph pair in `source`, made with `emc demo --small` if not;
    returns the seconds that took (None: it was there)."""
    store = Store.in_data_dir(source)
    if store.exists() and pair_count(store) > 0:
        return None
    started = time.perf_counter()
    command = [sys.executable, "-m", "emc", *BUILD_SOURCE, "-d", str(source)]
    log(
        f"no graph pairs in {source}: building them with `emc {' '.join(BUILD_SOURCE)} -d "
        f"{source}` (a few minutes on CPU)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # Its output goes to stderr, as progress: stdout keeps the report (and JSON last).
    done = subprocess.run(command, env=env, stdout=sys.stderr, stderr=sys.stderr)
    if done.returncode != 0 or pair_count(store) == 0:
        sys.exit(f"building the source store failed (exit {done.returncode})")
    return time.perf_counter() - started


def source_graphs(source: Store) -> list[TracedPrompt]:
    """Every graph of the source's pairs, as the traced prompts that made them."""
    ids = [g for p in graph_pairs(source) for g in (p.base_graph_id, p.adapted_graph_id)]
    return [stored_traced(source, g) for g in dict.fromkeys(ids)]


def graph_rows(traced: TracedPrompt) -> int:
    """The rows one graph writes: its summary, kept nodes and edges, effects, stats, layers."""
    frames = (
        traced.compact.nodes,
        traced.compact.edges,
        traced.effects,
        traced.stats,
        traced.layers,
    )
    return 1 + sum(len(f) for f in frames)


def renamed(graphs: Sequence[TracedPrompt], pairs: int, tag: str) -> Iterator[TracedPrompt]:
    """`pairs` pairs' graphs, cycling through the source's, copy c's ids ending in `-<tag><c>`."""
    by_prompt: dict[str, list[TracedPrompt]] = {}
    for traced in graphs:
        by_prompt.setdefault(traced.record.prompt_id, []).append(traced)
    units = list(by_prompt.values())
    per_unit = len(graphs) / len(units) / 2  # pairs per prompt
    for u in range(math.ceil(pairs / per_unit)):
        suffix = f"-{tag}{u // len(units) + 1}"
        for traced in units[u % len(units)]:
            record = traced.record.model_copy(
                update={
                    "graph_id": traced.record.graph_id + suffix,
                    "prompt_id": traced.record.prompt_id + suffix,
                }
            )
            yield dataclasses.replace(traced, record=record)


# 1. Ingest


def write_bundles(
    graphs: Sequence[TracedPrompt], models: dict, pairs: int, spool: Path, tag: str
) -> dict[str, float]:
    started = time.perf_counter()
    n_graphs = rows = 0
    for traced in renamed(graphs, pairs, tag):
        write_traced_bundle(spool, traced, models[traced.record.model_id])
        n_graphs += 1
        rows += graph_rows(traced)
    seconds = time.perf_counter() - started
    return {"graphs": n_graphs, "rows": rows, "seconds": seconds}


def ingest(store: Store, spool: Path, written: dict[str, float]) -> dict[str, Any]:
    store.ensure_schema()
    started = time.perf_counter()
    report = ingest_bundles(store, spool)
    seconds = time.perf_counter() - started
    return {
        "graphs": len(report.ingested),
        "rejected": [f"{name}: {reason}" for name, reason in report.rejected],
        "rows": written["rows"],
        "seconds": seconds,
        "graphs_per_s": len(report.ingested) / seconds,
        "rows_per_s": written["rows"] / seconds,
    }


def insert_directly(
    store: Store, graphs: Sequence[TracedPrompt], models: dict, pairs: int
) -> dict[str, float]:
    """The local path: `insert_traced` per graph, as a tracing run on the store's host does."""
    for model in models.values():
        upsert_model(store, model)
    todo = list(renamed(graphs, pairs, "d"))
    started = time.perf_counter()
    for traced in todo:
        insert_traced(store, traced)
    seconds = time.perf_counter() - started
    rows = sum(graph_rows(t) for t in todo)
    return {
        "graphs": len(todo),
        "rows": rows,
        "seconds": seconds,
        "graphs_per_s": len(todo) / seconds,
        "rows_per_s": rows / seconds,
    }


# 2. Size


def grow(source: Store, store: Store, sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Build `store` up to each size (in pairs) by SQL, from wherever it is (an empty store gets
    the source's rows first); measure it after a CHECKPOINT each time."""
    traced = len(traced_prompt_ids(source))
    per_unit = pair_count(source) / traced  # graph pairs per traced prompt
    steps = []
    for size in sizes:
        rows_before = sum(row_counts(store).values()) if store.exists() else 0
        started = time.perf_counter()
        if rows_before == 0:
            copy_all(source, store)
        have = round(pair_count(store) / per_unit)
        units = max(traced, round(size / per_unit))
        if units > have:
            add_replicas(source, store, have, units)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        checkpoint(store)
        checkpoint_seconds = time.perf_counter() - started
        counts = row_counts(store)
        step = {
            "asked": size,
            "pairs": pair_count(store),
            "rows": sum(counts.values()),
            "graph_rows": sum(counts[t] for t in GRAPH_ROW_TABLES),
            "rows_added": sum(counts.values()) - rows_before,
            "build_s": build_seconds,
            "checkpoint_s": checkpoint_seconds,
            "file_bytes": file_bytes(store.path),
            **database_size(store),
            "counts": counts,
        }
        step["mb_per_1000_pairs"] = step["file_bytes"] / step["pairs"] / 1e3
        steps.append(step)
        log(
            f"size: {step['pairs']:,} pairs, {step['rows']:,} rows, "
            f"{step['file_bytes'] / 1e6:,.1f} MB ({build_seconds:.1f} s)"
        )
    return steps


def file_bytes(path: Path) -> int:
    wal = path.with_name(path.name + ".wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def packed_bytes(store: Store, work: Path) -> int:
    """The graphs of `store` copied into a fresh store in one transaction: the file's growth."""
    packed = Store.in_data_dir(work)
    packed.ensure_schema()
    checkpoint(packed)
    empty = file_bytes(packed.path)
    copy_graphs(store, packed)
    checkpoint(packed)
    return file_bytes(packed.path) - empty


# 3. Queries


@dataclasses.dataclass(frozen=True)
class Query:
    page: str
    name: str  # the store function and its arguments, as a person reads them
    call: Callable[[], Any]


def dashboard_queries(store: Store) -> list[Query]:
    """What each page calls to draw, with the page's defaults (its first pair, prompt, feature)."""
    # `python benchmarks/store_scale.py` puts only benchmarks/ on sys.path; the project root
    # holds the dashboard, whose defaults (and the SQL console's examples) are used as they are.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from dashboard.views.features import PATHS_K, SIGNS, card_model_ids, main_pair
    from dashboard.views.sql import EXAMPLES

    metric, sign = "total_diff", SIGNS[0]  # the Features page's first metric and sign
    runs = list_runs(store, limit=500)
    run_id = runs[0].run_id
    pairs = graph_pairs(store)
    pair = pairs[0]  # the Graphs page's first prompt and its first pair
    queue = list_queue(store)
    prompt_id = str(queue["prompt_id"].iloc[0])  # the Review page's first item
    judgement = latest_judgement(store, prompt_id) or {}
    models = list_models(store)
    adapted = load_graph_rows(store, pair.adapted_graph_id)
    features = adapted.nodes[adapted.nodes["kind"] == "feature"]
    node = int(features.sort_values("influence", ascending=False)["node"].iloc[0])
    ranking = feature_ranking(store, metric, role="adapted", sign=sign, top=30)
    layer, feature = (int(ranking["layer"].iloc[0]), int(ranking["feature"].iloc[0]))
    model_pair = main_pair(pairs)
    ref = next((m.transcoders_ref for m in models if m.model_id == model_pair[1]), None)
    ids = list(dict.fromkeys(p.prompt_id for p in pairs))
    graph_ids = [pair.base_graph_id, pair.adapted_graph_id]
    base_model, adapted_model = judgement.get("base_model_id"), judgement.get("adapted_model_id")

    queries = [
        Query(
            "(every page)", "Store.read(): open a connection, no query", lambda: open_only(store)
        ),
        Query("Runs", "list_runs(limit=500)", lambda: list_runs(store, limit=500)),
        Query("Runs", "run_parents()", lambda: run_parents(store)),
        Query("Runs", "get_run(run)", lambda: get_run(store, run_id)),
        Query("Runs", "child_runs(run)", lambda: child_runs(store, run_id)),
        Query("Review", "queue_counts()", lambda: queue_counts(store)),
        Query("Review", "list_queue()", lambda: list_queue(store)),
        Query("Review", "judgement_counts()", lambda: judgement_counts(store)),
        Query("Review", "compared_labels() (calibration)", lambda: compared_labels(store)),
        Query("Review", "latest_judgement(prompt)", lambda: latest_judgement(store, prompt_id)),
        Query("Review", "get_prompts([prompt])", lambda: get_prompts(store, [prompt_id])),
        Query(
            "Review",
            "load_prompt_scores([prompt])",
            lambda: load_prompt_scores(store, [prompt_id], base_model, adapted_model),
        ),
        Query("Review", "current_labels(prompt)", lambda: current_labels(store, prompt_id)),
        Query(
            "Review",
            "graph_pairs(prompt) (graphs link)",
            lambda: graph_pairs(store, prompt_id=prompt_id),
        ),
        Query(
            "Review",
            "continuation_checks([prompt])",
            lambda: continuation_checks(store, [prompt_id]),
        ),
        Query("Graphs", "graph_pairs() (picker)", lambda: graph_pairs(store)),
        Query(
            "Graphs", "get_prompts(every pair's prompt) (picker)", lambda: get_prompts(store, ids)
        ),
        Query(
            "Graphs", "load_graph_rows(base)", lambda: load_graph_rows(store, pair.base_graph_id)
        ),
        Query(
            "Graphs",
            "load_graph_rows(adapted)",
            lambda: load_graph_rows(store, pair.adapted_graph_id),
        ),
        Query("Graphs", "graph_standing(pair)", lambda: graph_standing(store, graph_ids)),
        Query(
            "Graphs",
            "shown_labels_for_model(adapted)",
            lambda: shown_labels_for_model(store, pair.adapted_model_id),
        ),
        Query(
            "Graphs",
            "node_effects(adapted, top node)",
            lambda: node_effects(store, pair.adapted_graph_id, node),
        ),
        Query(
            "Graph diff", "prompt_graph_diff(pair)", lambda: prompt_graph_diff(store, pair, metric)
        ),
        Query(
            "Graph diff",
            "graph_targets(adapted)",
            lambda: graph_targets(store, pair.adapted_graph_id),
        ),
        Query("Graph diff", "pair_paths(pair)", lambda: pair_paths(store, pair, k=PATHS_K)),
        Query(
            "Features",
            "feature_ranking(top=1) (any graphs?)",
            lambda: feature_ranking(store, top=1),
        ),
        Query("Features", "lora_comparisons()", lambda: lora_comparisons(store)),
        Query("Features", "ablation_results()", lambda: ablation_results(store)),
        Query("Features", "analysis_failures()", lambda: analysis_failures(store)),
        Query("Features", "feature_layers()", lambda: feature_layers(store)),
        Query(
            "Features",
            "feature_ranking(adapted, evil, top=30)",
            lambda: feature_ranking(store, metric, role="adapted", sign=sign, top=30),
        ),
        Query("Features", "ranked_prompts()", lambda: ranked_prompts(store, metric)),
        Query("Features", "left_out_of_rankings()", lambda: left_out_of_rankings(store)),
        Query(
            "Features",
            "feature_detail(top feature) (where it appears)",
            lambda: feature_detail(store, layer, feature, metric, sign=sign),
        ),
        Query("Features", "list_models()", lambda: list_models(store)),
        Query(
            "Features",
            "load_cards(top feature)",
            lambda: load_cards(store, [(layer, feature)], card_model_ids(models, "adapted")),
        ),
        Query(
            "Features",
            "feature_context(top feature)",
            lambda: feature_context(store, layer, feature, *model_pair, metric, sign),
        ),
        Query(
            "Features",
            "feature_labels(top feature)",
            lambda: feature_labels(store, ref, [(layer, feature)]) if ref else [],
        ),
        Query("Across prompts", "layer_diff_summary()", lambda: layer_diff_summary(store)),
        Query(
            "Across prompts",
            "graph_diff_summary(top=50)",
            lambda: graph_diff_summary(store, metric, top=50),
        ),
    ]
    queries += [
        Query("SQL", f"example {e.name}", lambda sql=e.sql: read_only_query(store, sql))
        for e in EXAMPLES
    ]
    return queries


def open_only(store: Store) -> None:
    """What every store function pays before its query: a connection opened and closed."""
    with store.read():
        pass


def size_of(result: Any) -> int | None:
    """Rows or items in a query's result, where it has a length (to show it did the work)."""
    if isinstance(result, pd.DataFrame | list | dict | set):
        return len(result)
    if isinstance(result, StoredGraph):
        return len(result.nodes) + len(result.edges)  # load_graph_rows: nodes and edges
    if isinstance(result, RunRecord):
        return 1
    if hasattr(result, "prompts") and isinstance(result.prompts, pd.DataFrame):
        return len(result.prompts)  # feature_detail: where the feature appears
    if hasattr(result, "features") and isinstance(result.features, pd.DataFrame):
        return len(result.features)  # prompt_graph_diff
    if hasattr(result, "paths") and isinstance(result.paths, pd.DataFrame):
        return len(result.paths)
    return None


def drop_from_page_cache(path: Path) -> None:
    """Ask the kernel to forget the file's cached pages (clean ones go; a no-op elsewhere)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for name in (path, path.with_name(path.name + ".wal")):
        if name.exists():
            fd = os.open(name, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def time_queries(store: Store, queries: Sequence[Query], repeats: int) -> list[dict[str, Any]]:
    timed = []
    for query in queries:
        drop_from_page_cache(store.path)
        started = time.perf_counter()
        result = query.call()
        cold = time.perf_counter() - started
        warm = []
        for _ in range(repeats):
            started = time.perf_counter()
            query.call()
            warm.append(time.perf_counter() - started)
        timed.append(
            {
                "page": query.page,
                "query": query.name,
                "result_size": size_of(result),
                "cold_s": cold,
                "median_s": statistics.median(warm),
                "min_s": min(warm),
                "max_s": max(warm),
            }
        )
        log(f"{query.page}: {query.name}: cold {cold:.3f} s, median {timed[-1]['median_s']:.3f} s")
    return timed


# Report


def machine() -> dict[str, Any]:
    import pyarrow

    memory = None
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with duckdb.connect() as conn:
        threads = conn.execute("SELECT current_setting('threads')").fetchall()[0][0]
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "processor": platform.processor() or platform.machine(),
        "memory_bytes": memory,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "duckdb": duckdb.__version__,
        "duckdb_threads": threads,
        "pandas": pd.__version__,
        "pyarrow": pyarrow.__version__,
        "timer": "time.perf_counter (wall clock)",
    }


def format_report(figures: dict[str, Any]) -> str:
    m, src = figures["machine"], figures["source"]
    lines = [
        f"machine: {m['cpu_count']} CPUs ({m['cpus_usable']} usable), "
        f"{(m['memory_bytes'] or 0) / 2**30:.0f} GiB, {m['platform']}; Python {m['python']}, "
        f"DuckDB {m['duckdb']} ({m['duckdb_threads']} threads), pandas {m['pandas']}, "
        f"pyarrow {m['pyarrow']}; load average {figures['load_average_start']} at the start, "
        f"{figures['load_average_end']} at the end",
        f"source: {src['path']}: {src['pairs']} real graph pairs of {src['traced_prompts']} "
        f"prompts, {src['graph_rows_per_pair']:,.0f} graph rows per pair (mean)",
        "",
        "-- 1. ingest (one transaction per graph)",
    ]
    ing = figures["ingest"]
    rows = [("path", "pairs", "graphs", "rows", "seconds", "graphs/s", "rows/s")]
    for label, key in (
        ("write_traced_bundle (worker side)", "bundles_written"),
        ("ingest_bundles into an empty store", "bundles"),
        ("insert_traced into an empty store", "direct"),
        (f"ingest_bundles into the {ing['at_scale_store_pairs']:,}-pair store", "at_scale"),
    ):
        r = ing[key]
        rows.append(
            (
                label,
                f"{r['graphs'] // 2:,}",
                f"{r['graphs']:,}",
                f"{r['rows']:,}",
                f"{r['seconds']:.2f}",
                f"{r['graphs'] / r['seconds']:,.1f}",
                f"{r['rows'] / r['seconds']:,.0f}",
            )
        )
    lines += plain_table(rows)
    lines += ["", "-- 2. size (after CHECKPOINT; built by SQL replication)"]
    rows = [
        (
            "pairs",
            "rows",
            "graph rows",
            "file MB",
            "MB / 1,000 pairs",
            "MB / 1,000 added",
            "used MB",
            "free MB",
            "build s",
            "rows/s",
        )
    ]
    previous = None
    for s in figures["sizes"]:
        added = "—"
        if previous is not None and s["pairs"] > previous["pairs"]:
            growth = (s["file_bytes"] - previous["file_bytes"]) / (s["pairs"] - previous["pairs"])
            added = f"{growth * 1000 / 1e6:,.1f}"
        rows.append(
            (
                f"{s['pairs']:,}",
                f"{s['rows']:,}",
                f"{s['graph_rows']:,}",
                f"{s['file_bytes'] / 1e6:,.1f}",
                f"{s['mb_per_1000_pairs']:,.1f}",
                added,
                f"{s['used_bytes'] / 1e6:,.1f}",
                f"{s['free_bytes'] / 1e6:,.1f}",
                f"{s['build_s']:.1f}",
                f"{s['rows_added'] / s['build_s']:,.0f}",
            )
        )
        previous = s
    lines += plain_table(rows)
    last = figures["sizes"][-1]
    lines.append(
        f"per pair at {last['pairs']:,} pairs: {last['rows'] / last['pairs']:,.0f} rows, "
        f"{last['graph_rows'] / last['pairs']:,.0f} of them in the graph tables"
    )
    p = figures["packing"]
    lines.append(
        f"graph rows only, {p['pairs']:,} pairs: ingested one graph per transaction "
        f"{p['ingested_mb_per_1000_pairs']:,.1f} MB / 1,000 pairs, the same graphs copied in one "
        f"transaction {p['packed_mb_per_1000_pairs']:,.1f} MB / 1,000 pairs"
    )
    sizes = list(figures["queries"][0]["median_s_by_pairs"])
    at = [f"{int(n):,}" for n in sizes]
    lines += [
        "",
        f"-- 3. dashboard queries: median of {figures['repeats']} calls at each size; at "
        f"{figures['query_store_pairs']:,} pairs also the cold call (the first, after dropping "
        "the file from the page cache) and the min and max",
    ]
    rows = [
        (
            "page",
            "store function",
            "result",
            *(f"median s @{n}" for n in at),
            "cold s",
            "min s",
            "max s",
        )
    ]
    for q in figures["queries"]:
        size = "—" if q["result_size"] is None else f"{q['result_size']:,}"
        medians = [f"{q['median_s_by_pairs'][n]:.3f}" for n in sizes]
        rows.append(
            (
                q["page"],
                q["query"],
                size,
                *medians,
                f"{q['cold_s']:.3f}",
                f"{q['min_s']:.3f}",
                f"{q['max_s']:.3f}",
            )
        )
    lines += plain_table(rows)
    rows = [("page (its calls added up)", *(f"median s @{n}" for n in at), "cold s")]
    for page, total in figures["pages"].items():
        medians = [f"{total['median_s_by_pairs'][n]:.2f}" for n in sizes]
        rows.append((page, *medians, f"{total['cold_s']:.2f}"))
    lines += ["", *plain_table(rows)]
    built = figures["source_build_s"]
    lines.append(
        f"total time {figures['total_s']:.0f} s"
        + (f", of which {built:.0f} s building the source store" if built else "")
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Figures from a full run, and how to read them: benchmarks/README.md.",
    )
    parser.add_argument(
        "--source",
        type=Path,
        default=DEFAULT_SOURCE,
        help="data directory whose store holds real base/adapted graph pairs (e.g. after "
        "`emc demo --small -d DIR`); built that way when it has none "
        f"(default: {DEFAULT_SOURCE})",
    )
    parser.add_argument(
        "--pairs",
        default="1000,5000,10000",
        help="store sizes, in graph pairs, to build and measure; queries are timed at the "
        "largest (default: 1000,5000,10000)",
    )
    parser.add_argument(
        "--ingest-pairs",
        type=int,
        default=200,
        help="pairs written as bundles and ingested into an empty store (default: 200)",
    )
    parser.add_argument(
        "--ingest-at-scale",
        type=int,
        default=25,
        help="pairs ingested into the largest store at the end (default: 25)",
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="warm calls per query after the cold one"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="a new or empty folder for the stores and spools, kept after the run (default: a "
        "temporary folder, deleted after)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a seconds-long preset for tests: --pairs 10,20 --ingest-pairs 5 "
        "--ingest-at-scale 2 --repeats 1",
    )
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    sizes = sorted({int(p) for p in str(args.pairs).split(",") if p.strip()})
    if not sizes or sizes[0] < 1:
        parser.error("--pairs needs at least one size of 1 or more")

    if args.work_dir is not None and args.work_dir.exists() and any(args.work_dir.iterdir()):
        parser.error(f"--work-dir {args.work_dir} is not empty; give a new or empty folder")

    started = time.perf_counter()
    load_start = tuple(round(x, 2) for x in os.getloadavg())
    source_build_s = ensure_source(args.source)
    source = Store.open_existing(args.source)
    if args.work_dir is None:
        with tempfile.TemporaryDirectory(prefix="emc-store-scale-") as work:
            figures = run(args, source, sizes, Path(work))
    else:
        figures = run(args, source, sizes, args.work_dir)
    figures["load_average_start"] = load_start
    figures["load_average_end"] = tuple(round(x, 2) for x in os.getloadavg())
    figures["source_build_s"] = source_build_s
    figures["total_s"] = time.perf_counter() - started
    problems = check(figures)
    figures["problems"] = problems
    text = json.dumps(figures)
    if args.json:
        args.json.write_text(text + "\n")
    print(format_report(figures))
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(text)
    return 1 if problems else 0


def run(args: argparse.Namespace, source: Store, sizes: list[int], work: Path) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    graphs = source_graphs(source)
    models = {m.model_id: m for m in list_models(source)}
    source_pairs = pair_count(source)
    figures: dict[str, Any] = {
        "machine": machine(),
        "source": {
            "path": str(source.path.parent),
            "pairs": source_pairs,
            "traced_prompts": len(traced_prompt_ids(source)),
            "graphs": len(graphs),
            "graph_rows_per_pair": sum(graph_rows(g) for g in graphs) / source_pairs,
        },
        "repeats": args.repeats,
    }

    log(f"1. ingest: writing {args.ingest_pairs} pairs as bundles")
    written = write_bundles(graphs, models, args.ingest_pairs, work / "spool", "b")
    ingest_store = Store.in_data_dir(work / "ingested")
    log("1. ingest: ingest_bundles")
    bundles = ingest(ingest_store, work / "spool", written)
    log("1. ingest: insert_traced")
    direct = insert_directly(Store.in_data_dir(work / "direct"), graphs, models, args.ingest_pairs)
    checkpoint(ingest_store)
    ingested_pairs = pair_count(ingest_store)
    ingested_bytes = file_bytes(ingest_store.path)
    empty = Store.in_data_dir(work / "empty")
    empty.ensure_schema()
    checkpoint(empty)
    schema_bytes = file_bytes(empty.path)
    packed = packed_bytes(ingest_store, work / "packed")
    figures["packing"] = {
        "pairs": ingested_pairs,
        "ingested_mb_per_1000_pairs": (ingested_bytes - schema_bytes) / ingested_pairs / 1e3,
        "packed_mb_per_1000_pairs": packed / ingested_pairs / 1e3,
    }

    # 2 and 3: the store grows size by size; the queries are timed at each size.
    store = Store.in_data_dir(work / "scaled")
    steps: list[dict[str, Any]] = []
    timed: dict[int, list[dict[str, Any]]] = {}
    for size in sizes:
        log(f"2. size: building {size:,} pairs")
        steps += grow(source, store, [size])
        if len(steps) == 1:
            # Every query once first, untimed: imports and first calls are paid here.
            for query in dashboard_queries(store):
                query.call()
        log(f"3. queries at {steps[-1]['pairs']:,} pairs")
        timed[steps[-1]["pairs"]] = time_queries(store, dashboard_queries(store), args.repeats)
    figures["sizes"] = steps
    largest = steps[-1]["pairs"]
    figures["query_store_pairs"] = largest
    figures["queries"] = timed[largest]
    for i, query in enumerate(figures["queries"]):
        for key in ("median_s", "cold_s"):
            query[f"{key}_by_pairs"] = {str(n): runs[i][key] for n, runs in timed.items()}
    pages: dict[str, dict[str, Any]] = {}
    for q in figures["queries"]:
        page = pages.setdefault(
            q["page"],
            {
                "cold_s": 0.0,
                "median_s": 0.0,
                "median_s_by_pairs": dict.fromkeys(q["median_s_by_pairs"], 0.0),
            },
        )
        page["cold_s"] += q["cold_s"]
        page["median_s"] += q["median_s"]
        for n, median in q["median_s_by_pairs"].items():
            page["median_s_by_pairs"][n] += median
    figures["pages"] = pages

    log(f"1. ingest: {args.ingest_at_scale} pairs into the {steps[-1]['pairs']:,}-pair store")
    written_at_scale = write_bundles(graphs, models, args.ingest_at_scale, work / "spool2", "s")
    at_scale = ingest(store, work / "spool2", written_at_scale)
    figures["ingest"] = {
        "bundles_written": written,
        "bundles": bundles,
        "at_scale_written": written_at_scale,
        "direct": direct,
        "at_scale": at_scale,
        "at_scale_store_pairs": steps[-1]["pairs"],
        "expected_graph_rows": written["rows"],
        "ingested_graph_rows": sum(row_counts(ingest_store)[t] for t in GRAPH_ROW_TABLES),
    }
    return figures


def check(figures: dict[str, Any]) -> list[str]:
    """What must hold for the figures to mean anything."""
    problems = []
    ing = figures["ingest"]
    for key in ("bundles", "at_scale"):
        problems += [f"bundle rejected: {r}" for r in ing[key]["rejected"]]
        if ing[key]["graphs"] != ing[f"{key}_written"]["graphs"]:
            problems.append(f"{key}: {ing[key]['graphs']} graphs ingested, not all written")
    if ing["ingested_graph_rows"] != ing["expected_graph_rows"]:
        problems.append(
            f"the ingested store holds {ing['ingested_graph_rows']} graph rows, the bundles "
            f"{ing['expected_graph_rows']}"
        )
    per_prompt = figures["source"]["pairs"] / figures["source"]["traced_prompts"]
    for step in figures["sizes"]:
        if abs(step["pairs"] - step["asked"]) > per_prompt:
            problems.append(f"asked for {step['asked']} pairs, the store holds {step['pairs']}")
    return problems


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
