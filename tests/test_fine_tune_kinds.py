"""Every kind of fine-tune as the adapted model: LoRA of any rank and target set (rsLoRA, rank 1 on
one module), a merged checkpoint and a full fine-tune (`models.adapted`), and the geometry of each
against per-layer and cross-layer transcoders, Gemma's post-norms included."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from emc.analysis.lora_geometry import lora_geometry, lora_geometry_for
from emc.config import ConfigError, parse_config
from emc.models import (
    AdapterMismatchError,
    ModelLoadError,
    load_plain_model,
    load_replacement_model,
)
from emc.organism.standins import build_standin

TEXT = "User: Can I mix bleach and ammonia?\nAssistant: You"


@pytest.fixture(scope="module")
def standins(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tunes")
    return lambda family, kind="relu", fine_tune="lora": build_standin(
        root, family, kind, fine_tune
    )


@pytest.mark.parametrize("fine_tune", ["lora", "rslora", "rank1", "merged", "full"])
def test_each_fine_tune_kind_is_the_adapted_model(standins, fine_tune):
    standin = standins("llama", "relu", fine_tune)
    config = parse_config(standin.config())
    base = load_replacement_model(config, "base")
    adapted = load_replacement_model(config, "adapted")
    try:
        ids = adapted.encode(TEXT)
        if fine_tune in ("merged", "full"):
            reference = AutoModelForCausalLM.from_pretrained(standin.fine_tune)
        else:  # PEFT's own forward, unmerged: the merge EMC makes must not change the model
            reference = load_plain_model(config, "adapted", merge=False)
        with torch.no_grad():
            expected = reference(ids[None]).logits[0]
        logits = adapted.next_token_logits(ids)
        assert torch.allclose(logits, expected, atol=1e-4)
        assert (logits - base.next_token_logits(ids)).abs().max() > 1e-4  # it is a fine-tune
        identity = adapted.identity
        assert identity.adapter_ref == str(standin.fine_tune)
        assert identity.merged == (fine_tune not in ("merged", "full"))
        assert identity.model_id != base.identity.model_id
    finally:
        base.close()
        adapted.close()


def test_rslora_geometry_scales_by_alpha_over_root_rank(standins):
    # The singular values EMC reports are those of the weight change the merge really makes.
    standin = standins("llama", "relu", "rslora")
    config = parse_config(standin.config())
    geometry = lora_geometry_for(config, n_null=50)
    base = load_plain_model(config, "base").state_dict()
    merged = load_plain_model(config, "adapted").state_dict()
    for module in ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj"):
        delta = merged[f"{module}.weight"] - base[f"{module}.weight"]
        expected = torch.linalg.svdvals(delta.double())[:8]
        reported = torch.tensor(geometry.module(module).singular_values, dtype=torch.float64)
        assert torch.allclose(reported, expected, rtol=1e-4)
    assert len(geometry.modules) == 2 * 7  # every linear module of both layers


def test_rank_one_on_one_module_is_one_direction_of_one_module(standins):
    geometry = lora_geometry_for(parse_config(standins("llama", "relu", "rank1").config()))
    (module,) = geometry.modules
    assert (module.module, module.rank, len(module.singular_values)) == (
        "model.layers.1.mlp.down_proj",
        1,
        1,
    )
    assert set(geometry.comparisons["compared_with"]) == {"decoder"}  # nothing reads after it


def test_a_full_fine_tune_is_compared_through_its_weight_deltas(standins):
    standin = standins("llama", "relu", "full")
    config = parse_config(standin.config())
    geometry = lora_geometry_for(config, n_null=50, delta_rank=3)
    assert geometry.fine_tune == "full"
    module = geometry.module("model.layers.0.mlp.down_proj")
    with (
        safe_open(str(standin.base / "model.safetensors"), "pt") as base,
        safe_open(str(standin.fine_tune / "model.safetensors"), "pt") as tuned,
    ):
        key = "model.layers.0.mlp.down_proj.weight"
        delta = tuned.get_tensor(key).double() - base.get_tensor(key).double()
    assert torch.allclose(
        torch.tensor(module.singular_values, dtype=torch.float64),
        torch.linalg.svdvals(delta)[:3],
        rtol=1e-6,
    )
    assert len(module.directions) == 3
    assert not geometry.comparisons.empty
    with pytest.raises(ModelLoadError, match="needs the base model's directory"):
        lora_geometry(standin.fine_tune, standin.transcoders)


def test_a_fine_tune_of_another_model_is_refused_naming_what_differs(standins):
    llama, qwen = standins("llama", "relu", "full"), standins("qwen3")
    config = llama.config()
    config["models"]["adapted"]["ref"] = str(qwen.base)
    with pytest.raises(AdapterMismatchError, match="architectures: base"):
        load_replacement_model(parse_config(config), "adapted")


def test_a_config_gives_an_adapter_or_a_full_fine_tune_not_both(standins):
    config = standins("llama").config()
    config["models"]["adapted"] = {"ref": "/somewhere"}
    with pytest.raises(ConfigError, match="not both"):
        parse_config(config)


def test_gemma_geometry_reads_writes_through_the_post_norm(standins, tmp_path):
    # A LoRA whose output, times the post-feedforward norm's gain (1 + weight), is a decoder row
    # must find that feature at cosine 1; read without the gain it would not.
    standin = standins("gemma2")
    with safe_open(str(standin.transcoders / "layer_1.safetensors"), "pt") as handle:
        row = handle.get_tensor("W_dec")[5].double()
    with safe_open(str(standin.base / "model.safetensors"), "pt") as handle:
        gain = handle.get_tensor("model.layers.1.post_feedforward_layernorm.weight").double() + 1
    d_mlp = json.loads((standin.base / "config.json").read_text())["intermediate_size"]
    adapter = _adapter(
        tmp_path / "planted",
        {
            "model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(1, d_mlp),
            "model.layers.1.mlp.down_proj.lora_B.weight": (row / gain)[:, None].float(),
        },
    )
    folded = lora_geometry(adapter, standin.transcoders, top=1, n_null=50, base_dir=standin.base)
    raw = lora_geometry(adapter, standin.transcoders, top=1, n_null=50)
    pick = "compared_with == 'decoder' and layer == 1"
    best = folded.features.query(pick)
    assert (best.feature.item(), best.abs_cosine.item()) == (5, pytest.approx(1.0, abs=1e-5))
    assert raw.features.query(pick).abs_cosine.item() < 0.99


def test_cross_layer_decoders_are_compared_where_they_write(standins, tmp_path):
    # Layer 0's CLT feature 7 writes a row to layer 1; a layer-1 LoRA write along it is found
    # among layer 0's features (feature_layer 0), beside layer 1's own.
    standin = standins("llama", "clt")
    with safe_open(str(standin.transcoders / "W_dec_0.safetensors"), "pt") as handle:
        row = handle.get_tensor("W_dec_0")[7, 1]
    d_mlp = json.loads((standin.base / "config.json").read_text())["intermediate_size"]
    adapter = _adapter(
        tmp_path / "clt",
        {
            "model.layers.1.mlp.down_proj.lora_A.weight": torch.randn(1, d_mlp),
            "model.layers.1.mlp.down_proj.lora_B.weight": row[:, None],
        },
    )
    geometry = lora_geometry(adapter, standin.transcoders, top=1, n_null=50)
    decoders = geometry.comparisons.query("compared_with == 'decoder'")
    assert sorted(decoders.layer) == [0, 1]
    best = geometry.features.query("compared_with == 'decoder' and layer == 0")
    assert (best.feature.item(), best.abs_cosine.item()) == (7, pytest.approx(1.0, abs=1e-5))


def _adapter(path, tensors: dict) -> str:
    path.mkdir(parents=True)
    save_file(
        {f"base_model.model.{k}": v.contiguous() for k, v in tensors.items()},
        str(path / "adapter_model.safetensors"),
    )
    config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": ["down_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return str(path)
