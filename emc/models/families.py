"""The model families EMC runs, and what each needs from circuit-tracer and from EMC's hooks.

A family is recognised by its Hugging Face architecture (`config.json`'s `architectures`). Each
says which circuit-tracer backends load it from a local directory (measured on tiny random models
of the architecture: logits equal to Hugging Face's, a graph built, an intervention applied), the
transcoder hooks its published sets use, and how its RMSNorm applies its weight: Gemma multiplies
by `1 + weight`, Llama and Qwen by `weight`.

Qwen 2 has Llama's module layout but no circuit-tracer nnsight mapping; EMC registers Llama's
mapping under Qwen 2's architecture name (the locations are the same modules and source lines),
and writes `head_dim`, which circuit-tracer reads and Qwen 2's config leaves implicit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from emc.models.errors import ModelLoadError


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    backends: tuple[str, ...]  # circuit-tracer backends that load it from a directory
    # The hooks its published transcoders read and write (circuit-tracer's TransformerLens names).
    published_hooks: tuple[tuple[str, str], ...]
    norm_offset: float = 0.0  # RMSNorm output = x / rms(x) * (offset + weight)
    sandwich_norms: bool = False  # pre- and post-feedforward norms around the MLP (Gemma 2/3)


FAMILIES = (
    Family(
        "llama",
        ("LlamaForCausalLM",),
        ("nnsight", "transformerlens"),
        (("mlp.hook_in", "mlp.hook_out"), ("hook_resid_mid", "hook_mlp_out")),
    ),
    Family(
        "gemma2",
        ("Gemma2ForCausalLM",),
        ("nnsight",),
        (("ln2.hook_normalized", "hook_mlp_out"), ("hook_resid_mid", "hook_mlp_out")),
        norm_offset=1.0,
        sandwich_norms=True,
    ),
    Family(
        "gemma3",
        ("Gemma3ForCausalLM",),
        ("nnsight",),
        (("ln2.hook_normalized", "hook_mlp_out"), ("hook_resid_mid", "hook_mlp_out")),
        norm_offset=1.0,
        sandwich_norms=True,
    ),
    Family(
        "qwen2",
        ("Qwen2ForCausalLM",),
        ("nnsight", "transformerlens"),
        (("mlp.hook_in", "mlp.hook_out"),),
    ),
    Family(
        "qwen3",
        ("Qwen3ForCausalLM",),
        ("nnsight", "transformerlens"),
        (("mlp.hook_in", "mlp.hook_out"),),
    ),
)

# Why a backend cannot take a family, for the error message.
_BACKEND_GAPS = {
    ("gemma2", "transformerlens"): "TransformerLens does not build Gemma 2 from a local directory",
    ("gemma3", "transformerlens"): "TransformerLens does not build Gemma 3 from a local directory",
}


def family_of(hf_config) -> Family:
    """The family of a Hugging Face config; an unknown architecture is a clear error."""
    architectures = tuple(getattr(hf_config, "architectures", None) or ())
    for family in FAMILIES:
        if set(architectures) & set(family.architectures):
            return family
    known = ", ".join(a for f in FAMILIES for a in f.architectures)
    raise ModelLoadError(
        f"architecture {', '.join(architectures) or '(none in config.json)'} is not one EMC "
        f"runs; supported: {known}"
    )


def check_backend(family: Family, backend: str) -> None:
    if backend not in family.backends:
        why = _BACKEND_GAPS.get((family.name, backend), "circuit-tracer does not support it")
        raise ModelLoadError(
            f"{family.name} models cannot run on the {backend} backend ({why}); set "
            f"runtime.backend: {family.backends[0]}"
        )


def prepare_for_nnsight(hf_model) -> None:
    """Make circuit-tracer's nnsight backend accept the model (see the module docstring)."""
    family = family_of(hf_model.config)
    if family.name != "qwen2":
        return
    from circuit_tracer.utils import tl_nnsight_mapping as mapping

    if "Qwen2ForCausalLM" not in mapping.get_supported_architectures():
        llama = mapping.get_mapping("LlamaForCausalLM")
        mapping._register(dataclasses.replace(llama, model_architecture="Qwen2ForCausalLM"))
    config = hf_model.config
    if "head_dim" not in config.to_dict():
        config.head_dim = config.hidden_size // config.num_attention_heads
