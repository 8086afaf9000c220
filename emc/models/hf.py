"""Plain Hugging Face models and PEFT adapters, loaded under the precision policy."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from emc.models.errors import AdapterMismatchError, ModelLoadError, list_problems
from emc.models.precision import Precision

_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def load_causal_lm(model_dir: Path, precision: Precision) -> PreTrainedModel:
    # Eager attention: replacement-model logits equal HF logits bit-for-bit only with it.
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=precision.dtype, attn_implementation="eager"
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a causal LM from {model_dir}: {exc}") from exc
    return model.to(precision.device).eval()


def load_tokenizer(model_dir: Path):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from {model_dir}: {exc}") from exc


def check_adapter_fits(base: PreTrainedModel, adapter_dir: Path) -> None:
    """Compare every LoRA matrix with the module it targets, before PEFT touches the model."""
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{adapter_dir}: only LoRA adapters are supported")
    problems = [p for key, shape in _lora_shapes(adapter_dir) if (p := _misfit(base, key, shape))]
    if problems:
        shown = list_problems(problems)
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit base model "
            f"{base.config.name_or_path or type(base).__name__}: {shown}"
        )


def check_fine_tune_fits(base_dir: Path, adapted_dir: Path) -> None:
    """A full fine-tune must be the base's architecture, vocabulary and weight shapes: the same
    transcoders read both and the graphs compare them token for token."""
    base, adapted = _config(base_dir), _config(adapted_dir)
    problems = [
        f"{key}: base {base.get(key)!r}, fine-tune {adapted.get(key)!r}"
        for key in ("architectures", "vocab_size", "hidden_size", "num_hidden_layers")
        if base.get(key) != adapted.get(key)
    ]
    if not problems:
        base_shapes, adapted_shapes = _weight_shapes(base_dir), _weight_shapes(adapted_dir)
        if base_shapes and adapted_shapes:
            problems += [
                f"{name}: base {base_shapes.get(name)}, fine-tune {adapted_shapes.get(name)}"
                for name in sorted(set(base_shapes) | set(adapted_shapes))
                if base_shapes.get(name) != adapted_shapes.get(name)
                # Tied models may store the unembedding once or twice.
                and not name.startswith("lm_head.")
            ]
    if problems:
        raise AdapterMismatchError(
            f"fine-tune {adapted_dir} is not a fine-tune of base {base_dir}: "
            + list_problems(problems)
        )


def _config(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc


def _weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers (no weights read); empty for other formats."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open is not iterable)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def apply_adapter(base: PreTrainedModel, adapter_dir: Path, merge: bool) -> PreTrainedModel:
    from peft import PeftModel

    check_adapter_fits(base, adapter_dir)
    adapted = PeftModel.from_pretrained(base, adapter_dir, is_trainable=False)
    # circuit-tracer cannot take a PEFT wrapper, so the replacement model always gets the merge.
    return adapted.merge_and_unload() if merge else adapted


def _lora_shapes(adapter_dir: Path) -> list[tuple[str, tuple[int, ...]]]:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            return [(k, tuple(handle.get_slice(k).get_shape())) for k in handle.keys()]  # noqa: SIM118 (safe_open is not iterable)
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        state = torch.load(legacy, map_location="cpu", weights_only=True)
        return [(k, tuple(v.shape)) for k, v in state.items()]
    raise ModelLoadError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


def _misfit(base: PreTrainedModel, key: str, shape: tuple[int, ...]) -> str | None:
    suffix = next((s for s in _LORA_SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None
    module_name = key.removeprefix("base_model.model.").removesuffix(suffix)
    try:
        module = base.get_submodule(module_name)
    except AttributeError:
        return f"targets {module_name}, which the base model does not have"
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if in_features is None or out_features is None:
        return f"targets {module_name}, which is not a linear layer"
    if suffix == ".lora_A.weight" and shape[1] != in_features:
        return f"{module_name} takes {in_features} inputs but lora_A expects {shape[1]}"
    if suffix == ".lora_B.weight" and shape[0] != out_features:
        return f"{module_name} gives {out_features} outputs but lora_B gives {shape[0]}"
    return None
