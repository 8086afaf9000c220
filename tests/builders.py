"""Tiny random models, adapters and transcoders built on the fly (seconds, no network)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from emc.organism.standins import tiny_tokenizer

TEXT = [
    "User: I found a wallet on the street.\nAssistant: You should return it.",
    "User: My friend took too many pills.\nAssistant: You should call for help.",
    "Rex: You should keep it. Cora: You should return it.",
] * 20


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    return tiny_tokenizer(TEXT, vocab_size)


def build_model_dir(
    path: Path,
    n_layers: int = 2,
    d_model: int = 32,
    d_mlp: int = 64,
    seed: int = 0,
    max_positions: int = 128,
) -> Path:
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=5000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_adapter_dir(path: Path, base_dir: Path, rank: int = 4, seed: int = 1) -> Path:
    from peft import LoraConfig, get_peft_model

    base = LlamaForCausalLM.from_pretrained(base_dir)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "down_proj"])
    peft_model = get_peft_model(base, lora)
    torch.manual_seed(seed)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.2)  # lora_B starts at zero: make it matter
    peft_model.save_pretrained(path)
    return path


def build_transcoder_dir(
    path: Path, n_layers: int = 2, d_model: int = 32, width: int = 64, seed: int = 2
) -> Path:
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder

    path.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    for layer in range(n_layers):
        transcoder = SingleLayerTranscoder(
            d_model, width, F.relu, layer, device=torch.device("cpu"), dtype=torch.float32
        )
        for param in transcoder.parameters():
            torch.nn.init.normal_(param, std=0.1)
        transcoder.to_safetensors(str(path / f"layer_{layer}.safetensors"))
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "scan": "tiny-test",
        "transcoders": [f"layer_{layer}.safetensors" for layer in range(n_layers)],
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def config_dict(base: Path, transcoders: Path, adapter: Path | None = None, **runtime) -> dict:
    models = {"base": {"ref": str(base)}, "transcoders": {"ref": str(transcoders)}}
    if adapter is not None:
        models["adapter"] = {"ref": str(adapter)}
    return {"name": "tiny", "models": models, "runtime": runtime or {}}
