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
    # cores, which could even push the ratio below 1.
    args = ["--data-dir", str(data_dir), "--small", "--prompts", "6", "--threads", "1"]
    args += ["--json", str(out)]
    threads = torch.get_num_threads()

    code = logits_throughput.main(args)

    figures = json.loads(out.read_text())
    # The last stdout line carries the same figures, for scripts that only read stdout.
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == figures
    assert code == 0
    assert torch.get_num_threads() == threads  # put back for the tests after this one
    assert figures["torch_threads"] == 1
    assert figures["prompts"] == 6
    assert figures["identical_top_k"] is True
    assert figures["mismatches"] == []
    assert figures["emc_s"] > 0 and figures["original_s"] > 0
    assert figures["ratio"] > 1
    split = figures["original"]
    assert split["total_s"] == pytest.approx(
        split["load_s"] + split["forward_s"] + split["close_s"]
    )


def test_discovery_quality_small(data_dir, tmp_path, capsys):
    out = tmp_path / "quality.json"
    args = ["--data-dir", str(data_dir), "--small", "--variant", "default", "--json", str(out)]

    assert discovery_quality.main(args) == 0

    (variant,) = json.loads(out.read_text())["variants"]
    assert variant["variant"] == "default"
    assert len(variant["scenarios"]) == 24  # every held-out scenario
    thresholds = {g["threshold"] for g in variant["groups"]}
    assert {0.01, 0.05, 0.2, 0.5, variant["default_threshold"]} <= thresholds
    for group in variant["groups"]:
        assert group["tp"] + group["fp"] == group["flagged"]
        assert group["tp"] + group["fn"] == group["truly_misaligned"]
        for ratio, denominator in (("precision", "flagged"), ("recall", "truly_misaligned")):
            value = group[ratio]
            assert (value is None) == (group[denominator] == 0)
            assert value is None or 0 <= value <= 1
    totals = {g["group"]: g for g in variant["groups"] if g["threshold"] == 0.05}
    assert totals["all"]["count"] == 24
    trained = totals[f"{variant['trained_domain']} (trained)"]
    assert trained["count"] + totals["other domains"]["count"] == 24
    assert sum(variant["verdicts"]["all"].values()) == 24
    for scenario in variant["scenarios"]:
        assert 0 <= scenario["p_harmful_base"] <= scenario["p_any_harmful_base"] <= 1 + 1e-9
        assert scenario["truly_misaligned"] == (scenario["gap"] >= discovery_quality.TRUTH_GAP)
    assert "needs_review at discovery's min_evil_prob" in capsys.readouterr().out
