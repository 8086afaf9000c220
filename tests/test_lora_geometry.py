from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from emc.analysis.lora_geometry import (
    alignment_histogram,
    chance_cosine_probabilities,
    compared_layers,
    lora_geometry,
)
from emc.models.errors import AdapterMismatchError
from tests import builders

D_MODEL, WIDTH, N_LAYERS = 32, 64, 3


@pytest.fixture(scope="module")
def transcoders(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("geometry-tc")
    return builders.build_transcoder_dir(
        root / "tc", n_layers=N_LAYERS, d_model=D_MODEL, width=WIDTH
    )


def transcoder_rows(directory: Path, layer: int, name: str) -> torch.Tensor:
    with safe_open(str(directory / f"layer_{layer}.safetensors"), framework="pt") as handle:
        return handle.get_tensor(name)  # [d_transcoder, d_model] in circuit-tracer's format


def write_adapter(path: Path, tensors: dict[str, torch.Tensor], r: int, alpha: float, **config):
    path.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, **config}
    (path / "adapter_config.json").write_text(json.dumps(settings))
    weights = {f"base_model.model.{k}": v.contiguous().float() for k, v in tensors.items()}
    save_file(weights, str(path / "adapter_model.safetensors"))
    return path


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def test_lora_geometry__down_proj_along_next_encoder_ranks_that_feature_first(
    tmp_path, transcoders
):
    feature = unit(transcoder_rows(transcoders, 1, "W_enc")[7])
    A = torch.randn(1, 48)
    adapter = write_adapter(
        tmp_path / "a",
        {
            "model.layers.0.mlp.down_proj.lora_A.weight": A,
            "model.layers.0.mlp.down_proj.lora_B.weight": 3.0 * feature[:, None],
        },
        r=1,
        alpha=4,
    )

    geometry = lora_geometry(adapter, transcoders, top=5, n_null=200)

    (record,) = geometry.modules
    assert (record.layer, record.kind, record.site, record.rank) == (0, "down_proj", "mlp_out", 1)
    assert record.encoder_layers == (1, 2) and record.decoder_layers == (0,)
    assert record.singular_values[0] == pytest.approx(4.0 * 3.0 * float(A.norm()), rel=1e-5)
    best = geometry.features.query("compared_with == 'encoder' and layer == 1 and abs_rank == 1")
    assert best.feature.item() == 7
    assert best.cosine.item() == pytest.approx(1.0, abs=1e-5)  # rank 1: u = +B/|B|
    assert best.null_percentile.item() == 100.0
    row = geometry.comparisons.query("compared_with == 'encoder' and layer == 1")
    assert row.best_feature.item() == 7 and row.null_q99.item() < 0.99
    assert set(geometry.comparisons.layer) == {0, 1, 2}
    assert len(geometry.features) == 3 * 5


def test_lora_geometry__rank_two_reports_alpha_over_r_singular_values(tmp_path, transcoders):
    feature = unit(transcoder_rows(transcoders, 2, "W_enc")[3])
    noise = torch.randn(D_MODEL)
    other = unit(noise - (noise @ feature) * feature)
    q, _ = torch.linalg.qr(torch.randn(48, 2))
    B = torch.stack([5.0 * feature, 1.0 * other], dim=1)
    tensors = {
        "model.layers.1.mlp.down_proj.lora_A.weight": q.T,
        "model.layers.1.mlp.down_proj.lora_B.weight": B,
    }
    plain = lora_geometry(write_adapter(tmp_path / "p", tensors, r=2, alpha=16), transcoders)
    rs = lora_geometry(
        write_adapter(tmp_path / "rs", tensors, r=2, alpha=16, use_rslora=True), transcoders
    )

    assert plain.modules[0].scale == 8.0
    assert plain.modules[0].singular_values == pytest.approx((40.0, 8.0), rel=1e-5)
    assert rs.modules[0].singular_values == pytest.approx(
        (5 * 16 / math.sqrt(2), 16 / math.sqrt(2))
    )
    top = plain.features.query("direction == 0 and compared_with == 'encoder' and abs_rank == 1")
    assert (top.layer.item(), top.feature.item()) == (2, 3)
    assert top.cosine.item() == pytest.approx(1.0, abs=1e-5)
    assert top.singular_value.item() == pytest.approx(40.0, rel=1e-5)


def test_lora_geometry__o_proj_along_own_decoder_is_found_with_its_sign(tmp_path, transcoders):
    decoder = unit(transcoder_rows(transcoders, 1, "W_dec")[11])
    adapter = write_adapter(
        tmp_path / "o",
        {
            "model.layers.1.self_attn.o_proj.lora_A.weight": torch.randn(1, D_MODEL),
            "model.layers.1.self_attn.o_proj.lora_B.weight": -2.0 * decoder[:, None],
            "model.layers.1.self_attn.q_proj.lora_A.weight": torch.randn(1, D_MODEL),
            "model.layers.1.self_attn.q_proj.lora_B.weight": torch.randn(D_MODEL, 1),
        },
        r=1,
        alpha=1,
    )

    geometry = lora_geometry(adapter, transcoders, top=3, n_null=100)

    o_proj = geometry.module("model.layers.1.self_attn.o_proj")
    assert o_proj.site == "attn_out"
    assert o_proj.encoder_layers == (1, 2) and o_proj.decoder_layers == (1,)
    q_proj = geometry.module("model.layers.1.self_attn.q_proj")
    assert not q_proj.writes_residual and q_proj.encoder_layers == ()
    assert set(geometry.features.module) == {"model.layers.1.self_attn.o_proj"}
    best = geometry.features.query("compared_with == 'decoder' and abs_rank == 1")
    assert best.feature.item() == 11
    assert best.cosine.item() == pytest.approx(-1.0, abs=1e-5)


def test_lora_geometry__folds_mlp_input_norm_into_encoders(tmp_path, transcoders):
    gamma = {layer: 0.2 + 2 * torch.rand(D_MODEL) for layer in range(N_LAYERS)}
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    norms = {f"model.layers.{i}.post_attention_layernorm.weight": g for i, g in gamma.items()}
    save_file(norms, str(base / "model.safetensors"))
    read_direction = transcoder_rows(transcoders, 1, "W_enc")[5] * gamma[1]  # what it reads
    adapter = write_adapter(
        tmp_path / "n",
        {
            "model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(1, 48),
            "model.layers.0.mlp.down_proj.lora_B.weight": read_direction[:, None],
        },
        r=1,
        alpha=1,
    )

    folded = lora_geometry(adapter, transcoders, top=1, base_dir=base)
    raw = lora_geometry(adapter, transcoders, top=1)

    def cosine_with_5(geometry):
        rows = geometry.features.query("compared_with == 'encoder' and layer == 1")
        return rows.feature.item(), rows.cosine.item()

    assert folded.norms_folded and not raw.norms_folded
    assert cosine_with_5(folded) == (5, pytest.approx(1.0, abs=1e-5))
    assert cosine_with_5(raw)[1] < 0.99


def test_lora_geometry__adapter_of_another_width_is_a_clear_error(tmp_path, transcoders):
    adapter = write_adapter(
        tmp_path / "w",
        {
            "model.layers.0.mlp.down_proj.lora_A.weight": torch.randn(2, 96),
            "model.layers.0.mlp.down_proj.lora_B.weight": torch.randn(48, 2),
        },
        r=2,
        alpha=4,
    )
    with pytest.raises(AdapterMismatchError, match=r"d_model 32.*width 48"):
        lora_geometry(adapter, transcoders)


def test_lora_geometry__real_peft_adapter_on_tiny_model(tiny):
    geometry = lora_geometry(tiny["adapter"], tiny["transcoders"], top=4, n_null=50)

    kinds = {(m.layer, m.kind) for m in geometry.modules}
    assert kinds == {(layer, k) for layer in (0, 1) for k in ("q_proj", "down_proj")}
    last = geometry.module("model.layers.1.mlp.down_proj")
    assert last.encoder_layers == () and last.decoder_layers == (1,)  # nothing reads after it
    assert geometry.modules[0].alpha == 8 and geometry.modules[0].rank == 4


def test_small_organism__every_adapted_module_gets_a_sane_record(small_organism):
    artifacts = small_organism.artifacts
    recipe = small_organism_recipe(artifacts.root)
    n_layers, width = recipe["n_layers"], recipe["transcoder_width"]

    geometry = lora_geometry(artifacts.em_adapter, artifacts.transcoders_dir, top=10, n_null=100)

    assert len(geometry.modules) == n_layers * len(recipe["lora_targets"])
    writers = [m for m in geometry.modules if m.writes_residual]
    assert {m.kind for m in writers} == {"o_proj", "down_proj"}
    for m in geometry.modules:
        assert m.rank == recipe["lora_rank"] and m.scale == recipe["lora_alpha"] / m.rank
        assert list(m.singular_values) == sorted(m.singular_values, reverse=True)
    for m in writers:
        assert m.directions.shape == (m.rank, recipe["d_model"])
        assert np.allclose(np.linalg.norm(m.directions, axis=1), 1.0, atol=1e-5)
        expected = compared_layers(m.site, m.layer, n_layers)
        assert (list(m.encoder_layers), list(m.decoder_layers)) == expected
    n_rows = sum(m.rank * (len(m.encoder_layers) + len(m.decoder_layers)) for m in writers)
    assert len(geometry.comparisons) == n_rows
    assert len(geometry.features) == n_rows * 10
    assert geometry.comparisons.n_features.eq(width).all()
    assert geometry.comparisons.null_percentile.between(0, 100).all()
    assert geometry.features.abs_cosine.between(0, 1 + 1e-6).all()
    null_medians = geometry.comparisons.null_median
    assert null_medians.between(2 * geometry.chance_cosine_std, 1).all()  # best of many features

    histograms = alignment_histogram(geometry, bins=20)
    assert len(histograms) == n_rows
    for h in histograms:
        assert len(h.edges) == len(h.counts) + 1 and h.counts.sum() == width
        assert h.chance_counts.sum() == pytest.approx(width * _mass(h.edges, recipe["d_model"]))
    one = alignment_histogram(
        geometry, module=writers[0].module, direction=0, compared_with="decoder"
    )
    assert len(one) == 1 and one[0].layer == writers[0].layer


def small_organism_recipe(root: Path) -> dict:
    return json.loads((root / "recipe.json").read_text())


def _mass(edges: np.ndarray, d_model: int) -> float:
    return float(chance_cosine_probabilities(np.array([edges[0], edges[-1]]), d_model)[0])


def test_chance_cosine_probabilities__uniform_in_three_dimensions():
    edges = np.linspace(-1, 1, 5)
    assert chance_cosine_probabilities(edges, 3) == pytest.approx([0.25] * 4, abs=1e-6)
    spread = chance_cosine_probabilities(np.array([-1, -1 / 8, 1 / 8, 1]), 64)
    assert spread[1] == pytest.approx(0.68, abs=0.02)  # about ±1 std of 1/sqrt(64)
