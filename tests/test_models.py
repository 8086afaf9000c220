from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from emc.config import parse_config
from emc.models import (
    AdapterMismatchError,
    ModelLoadError,
    NonFiniteActivationError,
    TranscoderMismatchError,
    finite_guard,
    hf_checkpoints,
    load_plain_model,
    load_replacement_model,
)
from emc.models.factory import TRANSFORMERLENS_MAX_CONTEXT
from tests import builders


def _config(tiny, **overrides):
    raw = builders.config_dict(tiny["base"], tiny["transcoders"], tiny["adapter"])
    raw["runtime"].update(overrides)
    return parse_config(raw)


@pytest.fixture(scope="module")
def prompt_ids(tiny):
    tokenizer = builders.build_tokenizer()
    text = "User: I found a wallet on the street.\nAssistant: You should"
    return torch.tensor([tokenizer.bos_token_id, *tokenizer(text)["input_ids"]])


def test_plain_base_loads_in_fp32_on_cpu(tiny):
    model = load_plain_model(_config(tiny), "base")
    assert next(model.parameters()).dtype == torch.float32
    assert next(model.parameters()).device.type == "cpu"


def test_adapter_changes_logits_and_merged_matches_unmerged(tiny, prompt_ids):
    config = _config(tiny)
    base = load_plain_model(config, "base")
    peft_model = load_plain_model(config, "adapted", merge=False)
    merged = load_plain_model(config, "adapted", merge=True)
    with torch.no_grad():
        base_logits = base(prompt_ids[None]).logits
        peft_logits = peft_model(prompt_ids[None]).logits
        merged_logits = merged(prompt_ids[None]).logits
    assert (peft_logits - base_logits).abs().max() > 1e-3
    assert torch.allclose(peft_logits, merged_logits, atol=1e-4)


def test_adapter_for_another_base_fails_with_clear_error(tiny, tmp_path):
    wide_base = builders.build_model_dir(tmp_path / "wide", d_model=48, d_mlp=96)
    foreign_adapter = builders.build_adapter_dir(tmp_path / "foreign", wide_base)
    raw = builders.config_dict(tiny["base"], tiny["transcoders"], foreign_adapter)
    with pytest.raises(AdapterMismatchError, match=r"does not fit base model.*takes 32 inputs"):
        load_plain_model(parse_config(raw), "adapted")


def test_directory_without_adapter_config_is_refused(tiny):
    raw = builders.config_dict(tiny["base"], tiny["transcoders"], tiny["transcoders"])
    with pytest.raises(ModelLoadError, match=r"adapter_config\.json"):
        load_plain_model(parse_config(raw), "adapted")


@pytest.mark.parametrize("role", ["base", "adapted"])
def test_both_backends_give_the_same_logits_as_hugging_face(tiny, prompt_ids, role):
    reference = load_plain_model(_config(tiny), role)
    with torch.no_grad():
        expected = reference(prompt_ids[None]).logits[0]
    for backend in ("nnsight", "transformerlens"):
        loaded = load_replacement_model(_config(tiny, backend=backend), role)
        try:
            logits = loaded.next_token_logits(prompt_ids)
            assert loaded.identity.backend == backend
            assert loaded.identity.dtype == "fp32"
            assert torch.allclose(logits, expected, atol=1e-4), (backend, role)
        finally:
            loaded.close()


def test_transformerlens_caps_a_long_context_instead_of_allocating_its_mask(tiny, tmp_path):
    # Llama 3 directories say 131072 positions: a full mask would take 17 GB per layer.
    long = builders.build_model_dir(tmp_path / "long", max_positions=131072)
    raw = builders.config_dict(long, tiny["transcoders"], backend="transformerlens")
    loaded = load_replacement_model(parse_config(raw), "base")
    try:
        assert loaded.model.cfg.n_ctx == TRANSFORMERLENS_MAX_CONTEXT
        ids = torch.tensor([1, 5, 9, 13])
        with torch.no_grad():
            expected = load_plain_model(parse_config(raw), "base")(ids[None]).logits[0]
        assert torch.allclose(loaded.next_token_logits(ids), expected, atol=1e-4)
    finally:
        loaded.close()


def test_identity_names_role_adapter_and_fingerprint(tiny):
    base = load_replacement_model(_config(tiny), "base")
    adapted = load_replacement_model(_config(tiny), "adapted")
    try:
        assert base.identity.adapter_ref is None and not base.identity.merged
        assert adapted.identity.merged and adapted.identity.adapter_ref == str(tiny["adapter"])
        assert base.identity.model_id != adapted.identity.model_id
        assert "+adapter" in adapted.identity.slug
    finally:
        base.close()
        adapted.close()


def test_transcoders_with_wrong_layer_count_fail_clearly(tiny, tmp_path):
    three = builders.build_transcoder_dir(tmp_path / "tc3", n_layers=3)
    raw = builders.config_dict(tiny["base"], three)
    with pytest.raises(TranscoderMismatchError, match="3 transcoder layers but the model has 2"):
        load_replacement_model(parse_config(raw), "base")


def test_transcoders_with_wrong_width_fail_clearly(tiny, tmp_path):
    wide = builders.build_transcoder_dir(tmp_path / "tcwide", d_model=48)
    raw = builders.config_dict(tiny["base"], wide)
    with pytest.raises(TranscoderMismatchError, match="d_model 48 but the model's d_model is 32"):
        load_replacement_model(parse_config(raw), "base")


def test_missing_transcoder_file_is_reported(tiny, tmp_path):
    broken = shutil.copytree(tiny["transcoders"], tmp_path / "broken")
    (broken / "layer_1.safetensors").unlink()
    raw = builders.config_dict(tiny["base"], broken)
    with pytest.raises(ModelLoadError, match="missing transcoder files"):
        load_replacement_model(parse_config(raw), "base")


def test_unknown_hub_model_fails_offline_without_network(tiny):
    raw = builders.config_dict(tiny["base"], tiny["transcoders"])
    raw["models"]["base"]["ref"] = "no-such-org/no-such-model"
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE=1"):
        load_replacement_model(parse_config(raw), "base")


def test_unknown_hub_transcoders_fail_offline(tiny):
    raw = builders.config_dict(tiny["base"], tiny["transcoders"])
    raw["models"]["transcoders"]["ref"] = "no-such-org/no-such-transcoders"
    with pytest.raises(ModelLoadError, match="not in circuit-tracer's cache"):
        load_replacement_model(parse_config(raw), "base")


def test_missing_local_directory_is_reported(tiny, tmp_path):
    raw = builders.config_dict(tmp_path / "nothing-here", tiny["transcoders"])
    with pytest.raises(ModelLoadError, match="model directory not found"):
        load_replacement_model(parse_config(raw), "base")


def test_nan_guard_names_the_first_bad_layer(tiny, prompt_ids):
    model = load_plain_model(_config(tiny), "base")
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        with (
            pytest.raises(NonFiniteActivationError, match="layer 1") as info,
            finite_guard(hf_checkpoints(model)),
        ):
            model(prompt_ids[None])
    assert info.value.location == "layer 1"


@pytest.mark.parametrize("backend", ["nnsight", "transformerlens"])
def test_nan_guard_works_on_replacement_models(tiny, prompt_ids, backend):
    loaded = load_replacement_model(_config(tiny, backend=backend), "base")
    try:
        blocks = loaded.model.blocks if backend == "transformerlens" else None
        with torch.no_grad():
            if blocks is not None:
                blocks[0].attn.W_O.data[0, 0, 0] = float("inf")
            else:
                loaded.model._model.model.layers[0].self_attn.o_proj.weight[0, 0] = float("inf")
        with pytest.raises(NonFiniteActivationError, match="layer 0"):
            loaded.next_token_logits(prompt_ids)
    finally:
        loaded.close()


def _plant_in_hub_cache(model_dir, repo_id: str) -> None:
    """Lay a local model out the way huggingface_hub caches a downloaded snapshot."""
    cache = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    (cache / "refs").mkdir(parents=True, exist_ok=True)
    (cache / "refs" / "main").write_text("0" * 40)
    shutil.copytree(model_dir, cache / "snapshots" / ("0" * 40), dirs_exist_ok=True)


def test_hub_references_resolve_from_local_caches_offline(tiny, tmp_path, monkeypatch):
    _plant_in_hub_cache(tiny["base"], "tiny-org/tiny-base")
    monkeypatch.setenv("CIRCUIT_TRACER_CACHE_DIR", str(tmp_path / "ct-cache"))
    cached = shutil.copytree(tiny["transcoders"], tmp_path / "ct-cache" / "tiny-org" / "tiny-tc")
    (cached / "config.yaml").write_text(
        "model_kind: transcoder_set\nfeature_input_hook: mlp.hook_in\n"
        "feature_output_hook: mlp.hook_out\nscan: tiny-org/tiny-tc\n"
    )  # circuit-tracer's cache format: no file list, layer_{i}.safetensors beside it
    raw = builders.config_dict("tiny-org/tiny-base", "tiny-org/tiny-tc")
    loaded = load_replacement_model(parse_config(raw), "base")
    try:
        expected = load_replacement_model(_config(tiny), "base")
        ids = loaded.encode("User: hello")
        assert torch.equal(loaded.next_token_logits(ids), expected.next_token_logits(ids))
        assert loaded.identity.base_ref == "tiny-org/tiny-base"
        expected.close()
    finally:
        loaded.close()


@pytest.mark.parametrize("backend", ["nnsight", "transformerlens"])
def test_batched_last_token_logits_match_one_at_a_time(tiny, backend):
    loaded = load_replacement_model(_config(tiny, backend=backend), "adapted")
    try:
        texts = ["User: hi", "User: I found a wallet on the street.", "Rex: You should keep it"]
        sequences = [loaded.encode(t) for t in texts]
        batched = loaded.last_token_logits(sequences, batch_size=2)
        for sequence, logits in zip(sequences, batched, strict=True):
            alone = loaded.next_token_logits(sequence)[-1]
            assert torch.allclose(logits, alone, atol=1e-5)
    finally:
        loaded.close()


def test_a_nan_item_in_a_batch_fails_alone(tiny):
    loaded = load_replacement_model(_config(tiny), "base")
    try:
        poisoned = loaded.encode("wallet")[-1].item()
        with torch.no_grad():
            loaded.model._model.model.embed_tokens.weight[poisoned] = float("nan")
        sequences = [loaded.encode("User: hi"), loaded.encode("wallet"), loaded.encode("Rex")]
        results = loaded.last_token_logits(sequences)
        assert isinstance(results[1], NonFiniteActivationError)
        assert results[1].location == "embedding"
        assert all(isinstance(r, torch.Tensor) for r in (results[0], results[2]))
    finally:
        loaded.close()
