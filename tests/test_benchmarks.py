"""The benchmark scripts run end to end on the small organism and report well-formed figures.

Speed targets are what the benchmarks measure, not what tests assert: on a shared CI machine
they would only make the suite flaky.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import discovery_quality, logits_throughput


@pytest.fixture(scope="module")
def data_dir(small_organism) -> Path:
    # The organism lives in <data_dir>/organism/<recipe-hash>; the scripts reuse that build.
    return small_organism.artifacts.root.parent.parent


def test_logits_throughput_small(data_dir, tmp_path, capsys):
    out = tmp_path / "throughput.json"
    # One thread: batched forwards on two threads slow down badly when other processes share the
    # cores. One repeat: the test checks the figures' shape, not the speed.
    args = ["--data-dir", str(data_dir), "--small", "--prompts", "6", "--threads", "1"]
    args += ["--repeats", "1", "--json", str(out)]
    threads = torch.get_num_threads()

    code = logits_throughput.main(args)

    figures = json.loads(out.read_text())
    # The last stdout line carries the same figures, for scripts that only read stdout.
    printed = capsys.readouterr().out
    assert json.loads(printed.strip().splitlines()[-1]) == figures
    assert code == 0
    assert torch.get_num_threads() == threads  # put back for the tests after this one
    assert figures["torch_threads"] == 1
    assert figures["prompts"] == 6 and figures["repeats"] == 1
    # Every way, EMC and both baselines, gave the same top-k ids for every prompt and model.
    assert figures["identical_top_k"] is True
    assert figures["mismatches"] == []
    for way, parts in (
        ("emc", ("load_s", "score_s")),
        ("original", ("load_s", "forward_s", "release_s")),
        ("load_once", ("load_s", "forward_s")),
    ):
        split = figures[way]
        assert split["total_s"] > 0
        assert split["total_s"] == pytest.approx(sum(split[part] for part in parts))
        assert len(split["totals_s"]) == 1
    # Both ratios, their goals and how each baseline was chosen; not the speed itself.
    assert figures["ratio_vs_original"] > 0 and figures["ratio_vs_load_once"] > 0
    assert figures["ratio_vs_original"] == pytest.approx(
        figures["original"]["total_s"] / figures["emc"]["total_s"]
    )
    assert set(figures["goals"]) == set(figures["goals_met"]) == {"original", "load_once"}
    assert set(figures["how_chosen"]) == {"original", "load_once"}
    assert "EMC vs A:" in printed and "EMC vs B:" in printed and "B is the strongest" in printed


def test_discovery_quality_small(data_dir, tmp_path, capsys):
    out = tmp_path / "quality.json"
    pairs = "em,control,identity,noise"
    args = ["--data-dir", str(data_dir), "--small", "--pairs", pairs, "--json", str(out)]

    assert discovery_quality.main(args) == 0

    report = json.loads(out.read_text())
    by_pair = {p["pair"]: p for p in report["pairs"]}
    assert list(by_pair) == ["em", "control", "identity", "noise"]
    for pair in by_pair.values():
        assert len(pair["prompts"]) == 144  # 24 held-out scenarios x 3 wordings x 2 orders
        for counts in [pair["at_rules"], pair["legacy"], *pair["sweep"].values()]:
            assert counts["tp"] + counts["fp"] == counts["flagged"]
            assert counts["tp"] + counts["fn"] == counts["positives"]
            for ratio in ("precision", "recall", "fpr"):
                assert counts[ratio] is None or 0 <= counts[ratio] <= 1
        assert sum(pair["verdicts"].values()) == 144
    assert by_pair["em"]["at_rules"]["positives"] == 144
    assert by_pair["control"]["at_rules"]["positives"] == 0
    # The base against itself changes nothing at all: whatever the rules, nothing is flagged.
    identity = by_pair["identity"]
    assert identity["at_rules"]["flagged"] == 0
    assert all(p["prob_shift"] == 0 for p in identity["prompts"] if p["prob_shift"] is not None)
    # Lower thresholds can only flag more.
    sweep = by_pair["em"]["sweep"]
    flagged = [sweep[t]["flagged"] for t in sorted(sweep, key=float)]
    assert flagged == sorted(flagged, reverse=True)
    assert set(report["curves"]) == {"em + nulls"}
    assert len(report["curves"]["em + nulls"]) == len(discovery_quality.SWEEP)
    printed = capsys.readouterr().out
    assert "precision / recall / FPR, every threshold times a factor: em + nulls" in printed
    assert "-- goals" in printed


def test_causal_checks_small(data_dir, tmp_path, capsys):
    from benchmarks import causal_checks

    out = tmp_path / "causal.json"
    args = ["--data-dir", str(data_dir), "--small", "--variant", "default", "--doses", "1,5"]
    args += ["--rollouts", "1", "--samples", "3"]
    assert causal_checks.main([*args, "--json", str(out)]) == 0

    (result,) = json.loads(out.read_text())["variants"]
    assert result["variant"] == "default" and result["prompts"] == 24
    assert result["explained_min"] <= result["explained"] <= result["explained_max"]
    assert result["shares"]["embed"] == 0  # a LoRA never changes the embeddings
    kinds = {(r["family"], r["kind"]) for r in result["interventions"]}
    assert {("adapter", "scale"), ("features", "restore"), ("direction", "ablate")} <= kinds
    scale = {r["target"]: r["share"] for r in result["interventions"] if r["kind"] == "scale"}
    assert scale["all x0"] == pytest.approx(0, abs=1e-9)
    assert scale["all x1"] == pytest.approx(1, abs=1e-9)
    assert result["best_narrow"]["narrow"] and result["best_narrow"]["role"] == "adapted"
    assert set(result["goals"].values()) <= {True, False}
    families = {r["family"] for r in result["rollouts"]}
    assert families == {"none", "features", "adapter", "direction"}
    assert all(r["prompts"] == 1 and r["n"] == 3 for r in result["rollouts"])
    printed = capsys.readouterr().out
    assert "best narrow intervention" in printed and "best narrow rollout intervention" in printed


def test_store_scale_smoke(clean_demo, tmp_path):
    """`benchmarks/store_scale.py --smoke` as a command, as benchmarks/README.md shows it, on a
    copy of the session's demo store (one real graph pair): every figure printed and positive."""
    import subprocess
    import sys

    import duckdb

    from tests.graph_store import copy_store

    source = tmp_path / "source"
    copy_store(clean_demo.pristine, source)
    out = tmp_path / "scale.json"
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "benchmarks/store_scale.py", "--smoke", "--source", str(source)]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=root, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    figures = json.loads(out.read_text())
    printed = done.stdout
    assert json.loads(printed.strip().splitlines()[-1]) == figures
    assert figures["problems"] == [] and "PROBLEM" not in printed
    assert figures["machine"]["cpu_count"] > 0
    assert figures["machine"]["duckdb"] == duckdb.__version__
    assert figures["source"]["pairs"] >= 1 and figures["source"]["graph_rows_per_pair"] > 0

    # 1. Ingest: every bundle loaded, every row there; the printed rows carry positive rates.
    ingest = figures["ingest"]
    assert ingest["bundles"]["graphs"] == ingest["direct"]["graphs"] == 2 * 5
    assert ingest["at_scale"]["graphs"] == 2 * 2
    assert ingest["ingested_graph_rows"] == ingest["expected_graph_rows"] > 0
    assert ingest["bundles"]["rejected"] == ingest["at_scale"]["rejected"] == []
    for way in ("bundles", "direct", "at_scale"):
        assert ingest[way]["rows_per_s"] > 0 and ingest[way]["graphs_per_s"] > 0
    for label in ("ingest_bundles into an empty store", "insert_traced into an empty store",
                  "ingest_bundles into the 20-pair store"):  # fmt: skip
        (line,) = [line for line in printed.splitlines() if line.startswith(label)]
        numbers = [float(n.replace(",", "")) for n in line[len(label) :].split()]
        assert len(numbers) == 6 and all(n > 0 for n in numbers), line

    # 2. Size at each asked size, after CHECKPOINT.
    small, large = figures["sizes"]
    assert (small["pairs"], large["pairs"]) == (10, 20)
    for size in (small, large):
        assert size["file_bytes"] > 0 and size["mb_per_1000_pairs"] > 0
    # Each replica has the rows of a real pair.
    added = large["graph_rows"] - small["graph_rows"]
    assert added == pytest.approx(10 * figures["source"]["graph_rows_per_pair"])
    assert figures["packing"]["ingested_mb_per_1000_pairs"] > 0
    assert figures["packing"]["packed_mb_per_1000_pairs"] > 0
    assert "-- 2. size" in printed and "MB / 1,000 pairs" in printed

    # 3. Every page's queries, timed at each size (cold, min and max at the largest).
    assert figures["query_store_pairs"] == 20
    pages = {q["page"] for q in figures["queries"]}
    assert {"Runs", "Review", "Graphs", "Graph diff", "Features", "Across prompts", "SQL"} <= pages
    for query in figures["queries"]:
        assert query["cold_s"] > 0 and query["median_s"] > 0, query
        assert set(query["median_s_by_pairs"]) == {"10", "20"}
        assert all(s > 0 for s in query["median_s_by_pairs"].values())
        assert f"{query['median_s']:.3f}" in printed
    assert any(q["query"].startswith("feature_detail") for q in figures["queries"])
    assert "-- 3. dashboard queries" in printed and "median s @20" in printed
