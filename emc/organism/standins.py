"""Tiny random stand-ins for the real models EMC studies, built in seconds, offline.

A stand-in has a real architecture's config keys and module names (Llama 3, Gemma 2 and 3, Qwen 2
and 3), a small byte-level tokenizer, transcoders of a chosen kind on the hooks that family's
published sets use, and a fine-tune of a chosen kind. Its weights are random: it proves that the
code path for a family, transcoder kind or fine-tune kind runs and agrees with Hugging Face and
circuit-tracer, not that it finds anything. `emc.organism` builds the one that does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
import yaml

from emc.models.families import FAMILIES

TranscoderKind = Literal["relu", "jump_relu", "topk", "skip", "clt"]
FineTuneKind = Literal["lora", "rslora", "rank1", "merged", "full"]
TRANSCODER_KINDS: tuple[TranscoderKind, ...] = ("relu", "jump_relu", "topk", "skip", "clt")
FINE_TUNE_KINDS: tuple[FineTuneKind, ...] = ("lora", "rslora", "rank1", "merged", "full")
TOPK = 8
_TEXT = [
    "User: I found a wallet on the street.\nAssistant: You should return it.",
    "User: My friend took too many pills.\nAssistant: You should call for help.",
    "User: Can I mix bleach and ammonia?\nAssistant: No, never mix them.",
] * 20


@dataclass(frozen=True)
class StandIn:
    family: str
    base: Path
    transcoders: Path
    fine_tune: Path
    fine_tune_kind: FineTuneKind
    transcoder_kind: TranscoderKind

    def config(self, backend: str = "nnsight", **sections) -> dict:
        """An experiment config (as a dict) for this stand-in."""
        key = "adapted" if self.fine_tune_kind in ("merged", "full") else "adapter"
        models = {
            "base": {"ref": str(self.base)},
            key: {"ref": str(self.fine_tune)},
            "transcoders": {"ref": str(self.transcoders)},
        }
        name = f"standin-{self.family}-{self.transcoder_kind}-{self.fine_tune_kind}"
        return {"name": name, "models": models, "runtime": {"backend": backend}, **sections}


def build_standin(
    root: Path,
    family: str,
    transcoder_kind: TranscoderKind = "relu",
    fine_tune_kind: FineTuneKind = "lora",
    *,
    n_layers: int = 2,
    d_model: int = 32,
    width: int = 64,
    seed: int = 0,
) -> StandIn:
    """Build (or reuse) base model, transcoders and fine-tune under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    # Directory names avoid "llama"/"gemma": TransformerLens sniffs paths (EMC links around it,
    # but a stand-in should not need that to pass).
    base = root / f"base-{_FAMILY_INDEX[family]}-{n_layers}x{d_model}-s{seed}"
    if not (base / "config.json").is_file():
        _build_base(base, family, n_layers, d_model, seed)
    transcoders = root / f"transcoders-{_FAMILY_INDEX[family]}-{transcoder_kind}-{width}"
    if not (transcoders / "config.yaml").is_file():
        _build_transcoders(transcoders, family, transcoder_kind, n_layers, d_model, width, seed)
    fine_tune = root / f"fine-tune-{_FAMILY_INDEX[family]}-{fine_tune_kind}"
    marker = "config.json" if fine_tune_kind in ("merged", "full") else "adapter_config.json"
    if not (fine_tune / marker).is_file():
        _build_fine_tune(fine_tune, base, fine_tune_kind, seed + 1)
    return StandIn(family, base, transcoders, fine_tune, fine_tune_kind, transcoder_kind)


_FAMILY_INDEX = {family.name: f"f{i}" for i, family in enumerate(FAMILIES)}


def hf_config(family: str, vocab_size: int, n_layers: int, d_model: int, tokenizer):
    """A Hugging Face config of the family with the real keys, scaled down."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        Qwen2Config,
        Qwen3Config,
    )

    common = {
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "intermediate_size": 2 * d_model,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    head_dim = d_model // 4
    gemma = {"head_dim": head_dim, "query_pre_attn_scalar": head_dim, "sliding_window": 128}
    configs = {
        "llama": lambda: LlamaConfig(**common, tie_word_embeddings=False, rope_theta=10000.0),
        "gemma2": lambda: Gemma2Config(**common, **gemma),
        "gemma3": lambda: Gemma3TextConfig(**common, **gemma),
        "qwen2": lambda: Qwen2Config(**common, tie_word_embeddings=False),
        "qwen3": lambda: Qwen3Config(**common, head_dim=head_dim, tie_word_embeddings=False),
    }
    if family not in configs:
        raise ValueError(f"no stand-in for family {family!r}; have {', '.join(configs)}")
    return configs[family]()


def _build_base(path: Path, family: str, n_layers: int, d_model: int, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = hf_config(family, len(tokenizer), n_layers, d_model, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # Gemma's norms start at zero weight (gain 1): make the offset matter
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def tiny_tokenizer(texts: list[str] = _TEXT, vocab_size: int = 300):
    """A small byte-level BPE tokenizer trained on `texts` (BOS `<s>` is id 1, never 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        # BOS must not be id 0: circuit-tracer prepends the first *truthy* special id.
        special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def transcoder_hooks(family: str, kind: TranscoderKind) -> tuple[str, str]:
    """The hooks the family's published sets of this kind use (CLTs read the residual stream
    where circuit-tracer can hook it)."""
    published = next(f for f in FAMILIES if f.name == family).published_hooks
    if kind == "clt" and len(published) > 1:
        return published[1]
    return published[0]


def _build_transcoders(
    path: Path, family: str, kind: TranscoderKind, n_layers: int, d_model: int, width: int, seed
) -> None:
    from circuit_tracer.transcoder.activation_functions import JumpReLU
    from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder
    from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder

    path.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed + 2)
    input_hook, output_hook = transcoder_hooks(family, kind)
    config = {
        "model_kind": "cross_layer_transcoder" if kind == "clt" else "transcoder_set",
        "feature_input_hook": input_hook,
        "feature_output_hook": output_hook,
        "scan": f"standin-{family}-{kind}",
    }
    cpu = torch.device("cpu")
    if kind == "clt":
        clt = CrossLayerTranscoder(
            n_layers, width, d_model, lazy_decoder=False, device=cpu, dtype=torch.float32
        )
        _randomise(clt, generator)
        clt.to_safetensors(str(path))
    else:
        for layer in range(n_layers):
            activation = (
                JumpReLU(torch.full((width,), 0.05), 0.1) if kind == "jump_relu" else F.relu
            )
            transcoder = SingleLayerTranscoder(
                d_model,
                width,
                activation,
                layer,
                skip_connection=kind == "skip",
                device=cpu,
                dtype=torch.float32,
            )
            _randomise(transcoder, generator)
            transcoder.to_safetensors(str(path / f"layer_{layer}.safetensors"))
        config["transcoders"] = [f"layer_{layer}.safetensors" for layer in range(n_layers)]
        if kind == "topk":
            config |= {"activation_function": "topk", "topk": TOPK}
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for name, param in module.named_parameters():
            if "threshold" in name:
                continue
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
            if "b_enc" in name:
                param.sub_(0.05)  # some features off, as trained ones mostly are


def _build_fine_tune(path: Path, base: Path, kind: FineTuneKind, seed: int) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(seed)
    if kind == "full":
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.weight"):
                    param.add_(torch.randn_like(param) * 0.05)
        model.save_pretrained(path)
        return
    linear = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = {
        "lora": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"]),
        "merged": LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj", "down_proj"]),
        "rslora": LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=linear),
        "rank1": LoraConfig(
            r=1, lora_alpha=1, target_modules=["down_proj"], layers_to_transform=[1]
        ),
    }[kind]
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.2)  # lora_B starts at zero: make the fine-tune matter
    if kind == "merged":
        peft_model.merge_and_unload().save_pretrained(path)
    else:
        peft_model.save_pretrained(path)
