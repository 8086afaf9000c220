"""The GPU tracing benchmark's `--smoke` preset runs as a real process on the CPU.

For Llama, Gemma 2 and Qwen 3 with per-layer transcoders and for Llama with a cross-layer
transcoder, it builds a tiny random model and transcoders, traces each prompt through EMC's path
and through bare `attribute()`, and writes figures that are well formed: graphs traced both ways
at every token length, an overhead ratio per length, L0 in range, the family and kind echoed.
Speed is what the benchmark measures, not what the test asserts.
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
TOKENS = [8, 16]
# family, kind -> the hooks the family's published sets of that kind use, and the activation.
RUNS = {
    ("llama", "per_layer"): (["mlp.hook_in", "mlp.hook_out"], "relu"),
    ("gemma2", "per_layer"): (["ln2.hook_normalized", "hook_mlp_out"], "jump_relu"),
    ("qwen3", "per_layer"): (["mlp.hook_in", "mlp.hook_out"], "relu"),
    ("llama", "clt"): (["hook_resid_mid", "hook_mlp_out"], "relu"),
}


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120
    )


def _smoke(tmp_path: Path, family: str, kind: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "figures.json"
    result = _run(
        "--smoke", "--family", family, "--kind", kind, "--tokens", ",".join(map(str, TOKENS)),
        "--work-dir", str(tmp_path / "work"), "--json", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(out.read_text())
    # The last stdout line carries the same figures, for callers that only read stdout.
    assert json.loads(result.stdout.strip().splitlines()[-1]) == figures
    return result, figures


@pytest.mark.parametrize(("family", "kind"), list(RUNS), ids=[f"{f}-{k}" for f, k in RUNS])
def test_smoke__traces_both_ways_at_every_length(tmp_path, family, kind):
    result, figures = _smoke(tmp_path, family, kind)

    hooks, activation = RUNS[family, kind]
    assert (figures["family"], figures["kind"]) == (family, kind)
    assert (figures["shape"]["family"], figures["shape"]["kind"]) == (family, kind)
    assert (figures["hooks"], figures["activation"]) == (hooks, activation)
    assert (figures["device"], figures["dtype"], figures["backend"]) == ("cpu", "fp32", "nnsight")
    assert "attribute()" in figures["baseline"]
    assert figures["tokens"] == [length["tokens"] for length in figures["lengths"]] == TOKENS
    assert figures["complete"] and figures["skipped"] == []
    shape, prompts = figures["shape"], figures["prompts"]
    low, high = figures["summary"]["l0_range"]
    assert (low, high) == (shape["l0"] / 2, shape["l0"] * 2)
    assert len(figures["calibration_l0"]) == shape["layers"]
    assert all(low <= l0 <= high for l0 in figures["calibration_l0"])
    for length in figures["lengths"]:
        n, summary = length["tokens"], length["summary"]
        assert len(length["graphs"]) == len(length["bare"]) == summary["graphs"] == prompts > 0
        for graph, bare in zip(length["graphs"], length["bare"], strict=True):
            assert graph["prompt_id"] == bare["prompt_id"]
            assert graph["tokens"] == bare["tokens"] == n
            assert graph["attribute_s"] > 0 and graph["storage_s"] > 0 and bare["attribute_s"] > 0
            assert graph["total_s"] >= graph["attribute_s"]
            # Same model object, ids and settings: the same active features and attributed nodes.
            assert graph["active_features"] == bare["active_features"]
            assert graph["feature_nodes"] == bare["feature_nodes"] == figures["max_feature_nodes"]
            assert graph["active_features"] > graph["feature_nodes"]  # max_feature_nodes binds
            assert graph["kept_nodes"] > 0 and graph["kept_edges"] > 0 and graph["l0"] > 0
            if kind == "per_layer":  # normalised inputs: every graph's L0 is in range (a CLT's
                assert low <= graph["l0"] <= high  # raw residual runs high on short prompts)
            assert graph["peak_gpu_bytes"] is None and bare["peak_gpu_bytes"] is None
            assert graph["peak_rss_bytes"] > 0 and bare["peak_rss_bytes"] > 0
        assert summary["tokens"] == n
        assert summary["overhead"] > 0
        assert summary["overhead"] == pytest.approx(
            summary["emc_s_per_graph"] / summary["bare_s_per_graph"]
        )
        assert summary["within_goal"] == (
            summary["overhead"] <= figures["summary"]["overhead_goal"]
        )
        assert summary["bare_peak_rss_bytes"] > 0 and summary["emc_peak_rss_bytes"] > 0
    summary = figures["summary"]
    assert summary["graphs"] == prompts * len(TOKENS)
    assert summary["l0_in_range"] and low <= summary["l0"] <= high
    assert summary["max_overhead"] == max(x["summary"]["overhead"] for x in figures["lengths"])
    assert "building a random model" in result.stderr  # progress while the weights are built
    assert "overhead" in result.stdout and f"{family} {kind}" in result.stdout  # the table


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_cuda_without_a_gpu__fails_clearly_before_building(tmp_path):
    result = _run("--smoke", "--device", "cuda", "--work-dir", str(tmp_path / "work"))

    assert result.returncode == 2
    assert "no CUDA device" in result.stderr
    assert not (tmp_path / "work").exists()
