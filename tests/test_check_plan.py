"""`emc check --plan` and emc/models/plan.py: memory from headers, before anything loads."""

from __future__ import annotations

import pytest
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from emc.cli import app
from emc.config import TracingConfig, parse_config
from emc.console import console
from emc.models.plan import (
    Architecture,
    attribution_memory,
    build_plan,
    human,
    read_safetensors_header,
    transcoder_weights,
)
from tests import builders

runner = CliRunner()


def numel(path) -> int:
    """Parameters in a safetensors file, read with the safetensors library itself."""
    total = 0
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
            size = 1
            for dim in handle.get_slice(key).get_shape():
                size *= dim
            total += size
    return total


@pytest.fixture
def config_file(tiny, tmp_path):
    path = tmp_path / "experiment.yaml"
    raw = builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"], device="cpu")
    path.write_text(yaml.safe_dump(raw))
    return path


def row(output: str, label: str) -> str:
    return next(line for line in output.splitlines() if label in line)


def test_plan_prints_per_device_totals_from_the_real_sizes(tiny, config_file, monkeypatch):
    import importlib

    cli_app = importlib.import_module("emc.cli.app")  # `emc.cli.app` the attribute is the app

    def no_flows(*args, **kwargs):
        raise AssertionError("--plan must not start Prefect")

    monkeypatch.setattr(cli_app, "prepare_flows", no_flows)
    # One table row per line whatever the temporary directory's length (CI's paths are longer).
    monkeypatch.setattr(console, "width", 400)
    result = runner.invoke(app, ["check", "--plan", "-c", str(config_file)])
    assert result.exit_code == 0, result.output
    out = result.output

    base = numel(tiny["base"] / "model.safetensors")
    line = row(out, "base weights")
    assert f"{base:,} params" in line and "safetensors headers" in line
    assert human(base * 4) in line and human(base * 2) in line  # cpu fp32, cuda bf16
    lora = numel(tiny["adapter"] / "adapter_model.safetensors")
    assert f"{lora:,} params" in row(out, "adapter (LoRA")
    transcoders = sum(numel(p) for p in tiny["transcoders"].glob("layer_*.safetensors"))
    line = row(out, "transcoders:")
    assert human(transcoders * 4) in line and human(transcoders * 2) in line
    assert "decoders loaded" in line
    one = row(out, "one model loaded")
    assert human((base + transcoders) * 4) in one and human((base + transcoders) * 2) in one
    both = row(out, "both models loaded")
    assert human(2 * (base + transcoders) * 4) in both
    for n_pos in (32, 128, 512):
        assert "GPU +" in row(out, f"attribution peak at {n_pos} tokens")
    assert "cpu · fp32 (this config)" in out and "cuda · bf16" in out
    assert "advice: cpu (fp32)" in out and "advice: cuda (bf16)" in out


def test_plan_of_unfetched_hub_refs_says_unknown_and_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(tmp_path / "ct"))
    path = tmp_path / "hub.yaml"
    path.write_text(
        yaml.safe_dump(
            {"models": {"base": {"ref": "org/not-fetched"}, "transcoders": {"ref": "org/tc"}}}
        )
    )
    result = runner.invoke(app, ["check", "--plan", "-c", str(path)])
    assert result.exit_code == 0, result.output
    assert "unknown: not on this machine" in row(result.output, "base weights")
    assert "emc models fetch CONFIG" in result.output


def test_header_reader_matches_safetensors(tiny):
    path = tiny["base"] / "model.safetensors"
    header = read_safetensors_header(path)
    with safe_open(str(path), framework="pt") as handle:
        assert set(header) == set(handle.keys())
        for key, info in header.items():
            assert info.shape == tuple(handle.get_slice(key).get_shape())
    assert sum(t.nbytes for t in header.values()) == numel(path) * 4  # saved as fp32


def test_architecture_estimate_equals_the_real_parameter_count(tiny):
    import json

    arch = Architecture.from_config(json.loads((tiny["base"] / "config.json").read_text()))
    params, offloadable = arch.estimated_params()
    assert params == numel(tiny["base"] / "model.safetensors")
    assert offloadable == 2 * arch.vocab_size * arch.d_model + arch.n_layers * 3 * 32 * 64


def test_lazy_decoders_stay_on_disk(tiny, monkeypatch):
    import emc.models.transcoders

    eager = transcoder_weights(tiny["transcoders"])
    monkeypatch.setattr(emc.models.transcoders, "LAZY_DECODER_VALUES", 10)
    lazy = transcoder_weights(tiny["transcoders"])
    assert eager.decoder_params == 2 * 64 * 32 and not eager.lazy_decoder
    assert lazy.lazy_decoder and lazy.at("fp32") == eager.at("fp32") - 2 * 64 * 32 * 4


def test_attribution_formula():
    arch = Architecture("llama", 2, 32, 64, 300, 4, 4, 8, False, True)
    tracing = TracingConfig(batch_size=8, max_feature_nodes=100, max_n_logits=5)
    memory = attribution_memory(arch, 64, tracing, 10, "fp32", active_per_token=16)
    A = 2 * 10 * 16  # layers x tokens x active per token
    assert memory.active_features == A and memory.feature_nodes == 100
    assert memory.context == A * (2 * 32 * 4 + 28) + 3 * 2 * 10 * 32 * 4
    assert memory.forward_cache == 4 * 3 * 8 * 10 * 32 * 4
    assert memory.phase1_transient == 8 * 10 * 300 * 4  # the logits dominate
    assert memory.backward_batch == (A + 3 * 10) * 8 * 4 + 3 * 8 * 10 * 32 * 4
    n = 100 + 3 * 10 + 5
    assert memory.host_adjacency == 4 * max(105 * (A + 30 + 5), 2 * 105 * n + n * n)
    no_offload = memory.device_peak(1000, 600, 200, offload=False)
    assert memory.device_peak(1000, 600, 200, offload=True) < no_offload


def test_advice_offers_offload_and_smaller_batches(tiny):
    from emc.models.plan import advise

    raw = builders.config_dict(tiny["base"], tiny["transcoders"])
    raw["tracing"] = {"batch_size": 256}
    plan = build_plan(parse_config(raw))
    cuda = plan.device("cuda")
    at_512 = cuda.lengths[-1].device_peak
    budget = (at_512 + cuda.lengths[0].device_peak) // 2  # the short prompts fit, 512 does not
    lines = advise(plan, {"cuda": (budget, "a small GPU"), "cpu": (2**40, "plenty of RAM")})
    cuda_line = next(line for line in lines if line.startswith("cuda"))
    assert "fits in a small GPU with batch_size 256 up to" in cuda_line
    assert "at 512 tokens it needs" in cuda_line
    assert "tracing.offload: cpu" in cuda_line or "tracing.batch_size:" in cuda_line
    cpu_line = next(line for line in lines if line.startswith("cpu"))
    assert "up to 512 tokens" in cpu_line
