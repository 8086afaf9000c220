"""What the adapter's weights do: its LoRA delta scaled, and removed layer by layer and module by
module.

The adapter runs as forward hooks on the base model (each adapted module's output gains
k * scale * (x A^T) B^T, as PEFT runs an unmerged LoRA), so any subset of modules can be switched
off or scaled without touching weights. k = 1 on every module is the adapted model (checked
against the merged one by the caller); k = 0 is the base. Shares are fractions of the shift in
the evil-minus-safe logit gap that a setting keeps: 1 = all of the adapter's shift, 0 = none, so
removing a module removes `1 - share` of the shift.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.hooks import hf_module, logit_gap, removing, split_targets
from emc.analysis.lora_geometry import LoraUpdate
from emc.models import LoadedModel, finite_guard

Scope = Literal[
    "scale", "without_layer", "without_kind", "without_module", "only_layer", "only_kind"
]
DEFAULT_SCALES = (-1.0, 0.0, 0.5, 1.0, 2.0)


class AdapterSetting(BaseModel):
    """One setting of the adapter and the gap it gives."""

    model_config = ConfigDict(frozen=True)

    scope: Scope
    target: str  # "all", a layer ("layer 2"), a module kind ("down_proj") or a module's path
    scale: float  # k on the selected modules (the others at 1 for without_*, 0 for only_*)
    gap: float
    share: float  # (gap - base gap) / shift

    @property
    def model_role(self) -> str:
        """Removing parts starts from the adapted model; scaling or keeping parts, from base."""
        return "adapted" if self.scope.startswith("without_") else "base"


class AdapterEffects(BaseModel):
    model_config = ConfigDict(frozen=True)

    gap_base: float
    gap_hooked: float  # every module at k = 1
    shift: float  # gap_hooked - gap_base
    settings: list[AdapterSetting]

    def narrowest_removal(self) -> AdapterSetting | None:
        """The single layer, kind or module whose removal takes away the most of the shift."""
        removals = [s for s in self.settings if s.scope.startswith("without_")]
        return min(removals, key=lambda s: s.share, default=None)


def adapter_effects(
    base: LoadedModel,
    updates: Sequence[LoraUpdate],
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    scales: Sequence[float] = DEFAULT_SCALES,
    per_module: bool = True,
) -> AdapterEffects:
    """Scale the whole adapter by each k, then remove (and keep only) each layer and module kind,
    and with `per_module` each single module; one forward pass per setting."""
    if not updates:
        raise ValueError("the adapter has no LoRA modules")
    if base.identity.adapter_ref is not None:
        raise ValueError("adapter interventions start from the base model, not the adapted one")
    hf = hf_module(base, "adapter interventions")
    evil, safe = split_targets(targets, "adapter interventions")
    ids = input_ids[None].to(base.precision.device)

    def gap(factors: Mapping[str, float]) -> float:
        hooks = lora_hooks(hf, updates, factors)
        with hooks, torch.inference_mode(), finite_guard(base._checkpoints):
            logits = hf(input_ids=ids).logits[0, -1]
        return logit_gap(logits, evil, safe)

    everything = {u.module: 1.0 for u in updates}
    gap_base = gap({})
    gap_hooked = gap(everything)
    shift = gap_hooked - gap_base
    if shift == 0:
        raise ValueError("the adapter does not move the evil-minus-safe gap on this prompt")

    def setting(scope: Scope, target: str, k: float, factors: Mapping[str, float]):
        value = gap(factors)
        return AdapterSetting(
            scope=scope, target=target, scale=k, gap=value, share=(value - gap_base) / shift
        )

    settings = [setting("scale", "all", k, {m: k for m in everything}) for k in scales]
    groups: list[tuple[str, str, set[str]]] = []
    for layer in sorted({u.layer for u in updates if u.layer is not None}):
        modules = {u.module for u in updates if u.layer == layer}
        groups.append(("layer", f"layer {layer}", modules))
    for kind in sorted({u.kind for u in updates}):
        groups.append(("kind", kind, {u.module for u in updates if u.kind == kind}))
    for group, target, modules in groups:
        if len(modules) == len(everything):
            continue  # removing every module is the base, already at k = 0
        without = {m: 0.0 if m in modules else 1.0 for m in everything}
        settings.append(setting(f"without_{group}", target, 0.0, without))
        settings.append(setting(f"only_{group}", target, 1.0, {m: 1.0 for m in modules}))
    if per_module and len(everything) > 1:
        for module in everything:
            factors = {**everything, module: 0.0}
            settings.append(setting("without_module", module, 0.0, factors))
    return AdapterEffects(gap_base=gap_base, gap_hooked=gap_hooked, shift=shift, settings=settings)


@contextmanager
def lora_hooks(hf, updates: Sequence[LoraUpdate], factors: Mapping[str, float]) -> Iterator[None]:
    """Add k * scale * (x A^T) B^T to each module's output, for the modules with k != 0."""
    handles = []
    for update in updates:
        k = factors.get(update.module, 0.0)
        if k == 0:
            continue
        module = hf.get_submodule(update.module)
        weight = module.weight
        A = update.A.to(weight.device, weight.dtype)
        B = (update.B * (k * update.scale)).to(weight.device, weight.dtype)

        def hook(_module, inputs, output, A=A, B=B):
            return output + (inputs[0] @ A.T) @ B.T

        handles.append(module.register_forward_hook(hook))
    with removing(handles):
        yield
