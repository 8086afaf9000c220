"""Where transcoders read and write, as Hugging Face modules EMC can hook.

circuit-tracer names a transcoder's input and output by TransformerLens hook (`mlp.hook_in`,
`ln2.hook_normalized`, `hook_resid_mid`, `mlp.hook_out`, `hook_mlp_out`). EMC's own interventions,
activation scans and attribution-patching rankings hook the Hugging Face modules the nnsight
backend wraps, so each hook maps to a module and a side:

| hook                | Llama, Qwen (pre-norm)              | Gemma 2/3 (sandwich norms)         |
|---------------------|-------------------------------------|------------------------------------|
| hook_resid_mid      | post_attention_layernorm, input     | pre_feedforward_layernorm, input   |
| ln2.hook_normalized | post_attention_layernorm, input/rms | pre_feedforward_layernorm, in/rms  |
| mlp.hook_in         | post_attention_layernorm, output    | pre_feedforward_layernorm, output  |
| mlp.hook_out        | mlp, output                         | mlp, output                        |
| hook_mlp_out        | mlp, output                         | post_feedforward_layernorm, output |

`ln2.hook_normalized` is the norm's input divided by its RMS, before the norm's weight: what
Gemma Scope's transcoders read. A write site's output is what the residual stream gains, so a
feature edit adds its decoder change there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from emc.models.errors import ModelLoadError
from emc.models.families import Family

READ_HOOKS = ("hook_resid_mid", "ln2.hook_normalized", "mlp.hook_in")
WRITE_HOOKS = ("mlp.hook_out", "hook_mlp_out")


@dataclass(frozen=True)
class Site:
    module: str  # dotted path inside the causal LM, `{layer}` for the block index
    side: Literal["input", "output"]
    unit_rms: bool = False  # the value is the module's input divided by its RMS

    def at(self, hf_model: torch.nn.Module, layer: int) -> torch.nn.Module:
        return hf_model.get_submodule(self.module.format(layer=layer))


def site_for(family: Family, hook: str) -> Site:
    block = "model.layers.{layer}"
    mlp_norm = (
        f"{block}.pre_feedforward_layernorm"
        if family.sandwich_norms
        else (f"{block}.post_attention_layernorm")
    )
    sites = {
        "hook_resid_mid": Site(mlp_norm, "input"),
        "ln2.hook_normalized": Site(mlp_norm, "input", unit_rms=True),
        "mlp.hook_in": Site(mlp_norm, "output"),
        "mlp.hook_out": Site(f"{block}.mlp", "output"),
        "hook_mlp_out": Site(
            f"{block}.post_feedforward_layernorm" if family.sandwich_norms else f"{block}.mlp",
            "output",
        ),
    }
    if hook not in sites:
        raise ModelLoadError(
            f"transcoder hook {hook!r} is not one EMC knows; reads: {', '.join(READ_HOOKS)}; "
            f"writes: {', '.join(WRITE_HOOKS)}"
        )
    return sites[hook]


def check_hooks(family: Family, backend: str, input_hook: str, output_hook: str) -> None:
    """Refuse a hook pair EMC cannot hook or circuit-tracer cannot trace for this family."""
    if input_hook not in READ_HOOKS or output_hook not in WRITE_HOOKS:
        raise ModelLoadError(
            f"transcoders read {input_hook!r} and write {output_hook!r}; EMC reads one of "
            f"{', '.join(READ_HOOKS)} and writes one of {', '.join(WRITE_HOOKS)}"
        )
    if backend != "nnsight":
        return
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping

    architecture = family.architectures[0]
    try:
        known = get_mapping(architecture).feature_hook_mapping
    except ValueError:
        return  # registered by EMC at load time (families.prepare_for_nnsight)
    missing = [hook for hook in (input_hook, output_hook) if hook not in known]
    if missing:
        raise ModelLoadError(
            f"circuit-tracer's nnsight backend has no location for {', '.join(missing)} in "
            f"{architecture} (it knows {', '.join(sorted(known))}); these transcoders need "
            "runtime.backend: transformerlens, or transcoders trained on those hooks"
        )


def read_value(site: Site, module: torch.nn.Module, args: tuple, output) -> torch.Tensor:
    """The value a transcoder reads, from a hook's arguments (input) or result (output)."""
    if site.side == "output":
        return output[0] if isinstance(output, tuple) else output
    x = args[0]
    if not site.unit_rms:
        return x
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", 1e-6))
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def norm_gain(family: Family, norm: torch.nn.Module | None) -> torch.Tensor | None:
    """What an RMSNorm multiplies the normalised stream by: its weight, plus one for Gemma."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        return None
    return weight.detach() + family.norm_offset
