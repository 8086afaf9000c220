"""Feature aggregation at scale: rank features over 1,000 graphs' effects (target: under 5 s).

Real organism graphs (from a data directory that `emc demo` or `emc trace` filled) are replicated
under new graph and prompt ids until the store holds `--graphs` graphs, then `emc analyze`'s
ranking, a per-(layer, feature) aggregation of the raw `feature_effects` rows, and `emc diff`'s
base-vs-adapted aggregation (features and layers over every pair) are timed.

    python benchmarks/feature_aggregation.py --data-dir emc-data [--graphs 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

from emc.store import Store, read_only_query
from emc.store.features import feature_ranking
from emc.store.graph_diff import graph_diff_summary, layer_diff_summary
from emc.store.graphs import replicate_graphs


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("emc-data"))
    parser.add_argument("--graphs", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)

    source = Store.in_data_dir(args.data_dir)
    ok = read_only_query(source, "SELECT count(*) FROM graphs WHERE status = 'ok'")
    have = int(ok.iloc[0, 0])
    if have == 0:
        sys.exit(f"no traced graphs in {args.data_dir}: run `emc demo -d {args.data_dir}` first")
    copies = math.ceil(args.graphs / have)
    with tempfile.TemporaryDirectory(prefix="emc-aggregation-") as work:
        store = Store.in_data_dir(work)
        started = time.perf_counter()
        graphs = replicate_graphs(source, store, copies)
        build_s = time.perf_counter() - started
        counts = read_only_query(
            store,
            "SELECT (SELECT count(*) FROM feature_effects) AS effects, "
            "(SELECT count(*) FROM feature_stats) AS stats",
        )
        started = time.perf_counter()
        ranking = feature_ranking(store, role="adapted", sign="any", top=None)
        ranking_s = time.perf_counter() - started
        started = time.perf_counter()
        raw = read_only_query(
            store,
            "SELECT layer, feature, count(DISTINCT graph_id) AS graphs, avg(total) AS mean_total, "
            "avg(direct) AS mean_direct FROM feature_effects GROUP BY ALL",
        )
        raw_s = time.perf_counter() - started
        started = time.perf_counter()
        diff = graph_diff_summary(store, top=None)
        layers = layer_diff_summary(store)
        diff_s = time.perf_counter() - started
        pairs = int(layers["pairs"].max()) if len(layers) else 0
    figures = {
        "graphs": graphs,
        "source_graphs": have,
        "feature_effects_rows": int(counts["effects"][0]),
        "feature_stats_rows": int(counts["stats"][0]),
        "ranked_features": len(ranking),
        "ranking_s": ranking_s,
        "effects_aggregation_s": raw_s,
        "effects_groups": len(raw),
        "graph_diff_s": diff_s,
        "graph_diff_pairs": pairs,
        "graph_diff_features": len(diff),
        "replicate_s": build_s,
    }
    print(
        f"{graphs} graphs ({have} real, replicated {copies}x): "
        f"{figures['feature_effects_rows']:,} feature_effects rows, "
        f"{figures['feature_stats_rows']:,} feature_stats rows\n"
        f"ranking (emc analyze, every adapted feature): {ranking_s:.2f} s, "
        f"{len(ranking)} features\n"
        f"aggregation of raw effects by (layer, feature): {raw_s:.2f} s, {len(raw)} groups\n"
        f"base-vs-adapted diff over {pairs} pairs (emc diff): {diff_s:.2f} s, "
        f"{len(diff)} features\n"
        "target: under 5 s per query (an absolute budget, not a ratio: there is no baseline to "
        "beat, as the original pipeline had no store and aggregated per-prompt vectors in memory)"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return figures


if __name__ == "__main__":
    main()
