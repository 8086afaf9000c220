"""The GPU tracing benchmark's `--smoke` preset runs as a real process on the CPU.

It builds its tiny random model and transcoders, traces through EMC's path and writes figures
that are well formed. Speed is what the benchmark measures, not what the test asserts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "tracing_gpu.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def test_smoke__traces_graphs_on_cpu_with_the_requested_l0(tmp_path):
    out = tmp_path / "figures.json"

    result = _run("--smoke", "--work-dir", str(tmp_path / "work"), "--json", str(out))

    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    # The last stdout line carries the same figures, for callers that only read stdout.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == figures
    assert (figures["device"], figures["dtype"], figures["backend"]) == ("cpu", "fp32", "nnsight")
    shape = figures["shape"]
    assert len(figures["graphs"]) == figures["summary"]["graphs"] == figures["prompts"] > 0
    low, high = figures["summary"]["l0_range"]
    assert (low, high) == (shape["l0"] / 2, shape["l0"] * 2)
    assert len(figures["calibration_l0"]) == shape["layers"]
    assert all(low <= l0 <= high for l0 in figures["calibration_l0"])
    for graph in figures["graphs"]:
        assert graph["tokens"] == figures["tokens"]
        assert graph["attribute_s"] > 0 and graph["storage_s"] > 0
        assert graph["total_s"] >= graph["attribute_s"]
        assert low <= graph["l0"] <= high
        assert graph["active_features"] > graph["feature_nodes"] == figures["max_feature_nodes"]
        assert graph["kept_nodes"] > 0 and graph["kept_edges"] > 0
        assert graph["peak_gpu_bytes"] is None and graph["peak_rss_bytes"] > 0
    summary = figures["summary"]
    assert summary["l0_in_range"] and low <= summary["l0"] <= high
    assert summary["mean_s_per_graph"] > 0
    assert "building a random model" in result.stderr  # progress while the weights are built


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu__fails_clearly_before_building(tmp_path):
    result = _run("--smoke", "--device", "cuda", "--work-dir", str(tmp_path / "work"))

    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "work").exists()
