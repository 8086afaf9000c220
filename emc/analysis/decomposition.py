"""Where the harmful shift lives: activation patching between base and adapted, per component.

The shift is the change of the evil-minus-safe logit gap (mean logit of the evil-labelled tokens
minus mean of the safe ones, at the prompt's last position) from the base to the adapted model,
on the same token ids. Every component of the residual stream (the embeddings, each layer's
attention output, each layer's MLP output, the MLP split into what the layer's transcoder
reconstructs and its error) is patched both ways and its share of the shift reported:

- **direct**: only the component's own write to the final residual stream at the last position
  is swapped (adapted's into the base run, or base's into the adapted run), nothing downstream
  recomputed. The residual stream is a sum of component writes, so the direct shares of
  embeddings, attention and MLPs add up to the whole shift except for what the final norm's
  nonlinearity moves: that remainder is reported as unexplained.
- **total**: the component's output is swapped at every position and everything downstream is
  recomputed (classic activation patching). These shares overlap (a patched layer-0 output
  carries the change into every later layer), so they do not add up; they say how much of the
  shift a component is sufficient (into base) or necessary (out of adapted) for.

Transcoder features against error nodes is a direct split of the MLP's write: the MLP output is
the transcoder's reconstruction (features, skip connection and bias) plus the error node.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.hooks import (
    decoder_layers,
    feature_hooks,
    hf_module,
    logit_gap,
    removing,
    split_targets,
)
from emc.models import LoadedModel, finite_guard
from emc.models.dictionary import dictionary_of
from emc.models.families import family_of

Component = Literal["embed", "attn", "mlp", "mlp_features", "mlp_error"]
EMBEDDINGS_LAYER = -1
# The shift must be at least this many logits to be decomposed into shares.
MIN_SHIFT = 1e-6


class ComponentShare(BaseModel):
    """One component's share of the shift; each value is a fraction of `shift`."""

    model_config = ConfigDict(frozen=True)

    component: Component
    layer: int  # -1 for the embeddings
    direct_into_base: float  # gap(base + the adapted write) - gap(base)
    direct_from_adapted: float  # gap(adapted) - gap(adapted with the base write)
    total_into_base: float | None  # None for the MLP split (direct only)
    total_from_adapted: float | None

    @property
    def direct(self) -> float:
        """Both directions averaged: the share used for accounting."""
        return (self.direct_into_base + self.direct_from_adapted) / 2


class ShiftDecomposition(BaseModel):
    model_config = ConfigDict(frozen=True)

    gap_base: float
    gap_adapted: float
    shift: float  # gap_adapted - gap_base, in logits
    components: list[ComponentShare]

    def _parts(self) -> list[ComponentShare]:
        # Embeddings, attention and whole MLPs partition the residual stream; the split does not.
        return [c for c in self.components if c.component in ("embed", "attn", "mlp")]

    @property
    def explained_into_base(self) -> float:
        return sum(c.direct_into_base for c in self._parts())

    @property
    def explained_from_adapted(self) -> float:
        return sum(c.direct_from_adapted for c in self._parts())

    @property
    def explained(self) -> float:
        return (self.explained_into_base + self.explained_from_adapted) / 2

    @property
    def unexplained(self) -> float:
        """What the direct shares leave out: the final norm's share of the shift."""
        return 1.0 - self.explained


@dataclass
class _Run:
    """One forward pass's component writes (batch dim dropped) and its final residual."""

    writes: dict[tuple[str, int], torch.Tensor]  # (component, layer) -> (n_pos, d_model)
    mlp_inputs: dict[int, torch.Tensor]
    final_residual: torch.Tensor  # (d_model,) at the last position, before the final norm
    gap: float


def decompose_shift(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    total: bool = True,
) -> ShiftDecomposition:
    """Decompose the adapted-minus-base change of the evil-minus-safe gap on `input_ids`.

    `targets` maps token ids to "evil" or "safe" (both kinds needed). `total=False` skips the
    full-propagation patches (2 forward passes per component) and keeps the direct shares.
    """
    evil, safe = split_targets(targets, "the shift decomposition")
    ids = _checked(input_ids)
    hf_base = hf_module(base, "the shift decomposition")
    hf_adapted = hf_module(adapted, "the shift decomposition")
    base_run = _run(base, hf_base, ids, evil, safe)
    adapted_run = _run(adapted, hf_adapted, ids, evil, safe)
    shift = adapted_run.gap - base_run.gap
    if abs(shift) < MIN_SHIFT:
        raise ValueError(
            f"the models' evil-minus-safe gaps differ by {shift:.2e} logits: there is no shift "
            "to decompose on this prompt"
        )

    def gap_of(hf, residual: torch.Tensor) -> float:
        return logit_gap(_final_logits(hf, residual), evil, safe)

    # References through the same norm-and-unembedding path, so a zero write gives exactly 0.
    reference_base = gap_of(hf_base, base_run.final_residual)
    reference_adapted = gap_of(hf_adapted, adapted_run.final_residual)

    def direct(delta: torch.Tensor) -> tuple[float, float]:
        """(adapted write into the base run, base write into the adapted run) gap changes."""
        into = gap_of(hf_base, base_run.final_residual + delta) - reference_base
        out = reference_adapted - gap_of(hf_adapted, adapted_run.final_residual - delta)
        return into, out

    components: list[ComponentShare] = []
    for key in base_run.writes:
        name, layer = key
        into, out = direct(adapted_run.writes[key][-1] - base_run.writes[key][-1])
        total_into = total_out = None
        if total:
            total_into = _patched_gap(base, hf_base, ids, key, adapted_run, evil, safe)
            total_into -= base_run.gap
            total_out = adapted_run.gap - _patched_gap(
                adapted, hf_adapted, ids, key, base_run, evil, safe
            )
        components.append(_share(name, layer, into, out, total_into, total_out, shift))
        if name == "mlp":
            components += _mlp_split(base, layer, base_run, adapted_run, direct, shift)
    return ShiftDecomposition(
        gap_base=base_run.gap, gap_adapted=adapted_run.gap, shift=shift, components=components
    )


def _mlp_split(base, layer, base_run, adapted_run, direct, shift) -> list[ComponentShare]:
    """The MLP's direct write split into the transcoder's reconstruction and the error node.

    Both runs are read through the *same* transcoder (the base model's set, which the graphs
    use), so a change the transcoder cannot express lands in the error node. Only per-layer
    transcoders that write exactly the MLP's residual write split it this way: a cross-layer
    transcoder's reconstruction of one layer needs every earlier layer's features.
    """
    if not _splits_mlp_write(base):
        return []
    dictionary = dictionary_of(base)
    transcoder = dictionary.module[layer]
    parts = {}
    for side, run in (("base", base_run), ("adapted", adapted_run)):
        x = run.mlp_inputs[layer][-1:]
        with torch.inference_mode():
            recon = transcoder(x.to(dictionary.dtype))[0].to(run.writes["mlp", layer].dtype)
        parts[side] = (recon, run.writes["mlp", layer][-1] - recon)
    shares = []
    for index, component in enumerate(("mlp_features", "mlp_error")):
        into, out = direct(parts["adapted"][index] - parts["base"][index])
        shares.append(_share(component, layer, into, out, None, None, shift))
    return shares


def _splits_mlp_write(loaded: LoadedModel) -> bool:
    dictionary = dictionary_of(loaded)
    sandwich = family_of(loaded.model._model.config).sandwich_norms
    writes_residual = dictionary.output_hook == "hook_mlp_out" or not sandwich
    return dictionary.kind == "per_layer" and writes_residual


def _share(component, layer, into, out, total_into, total_out, shift) -> ComponentShare:
    def frac(value: float | None) -> float | None:
        return None if value is None else value / shift

    return ComponentShare(
        component=component,
        layer=layer,
        direct_into_base=into / shift,
        direct_from_adapted=out / shift,
        total_into_base=frac(total_into),
        total_from_adapted=frac(total_out),
    )


# -- forward passes with hooks --------------------------------------------------------------------


def _modules(hf) -> Iterator[tuple[tuple[str, int], torch.nn.Module]]:
    """Each component and the module whose output is its write to the residual stream: with
    Gemma's sandwich norms, attention and MLP write through their post-norms."""
    sandwich = family_of(hf.config).sandwich_norms
    yield ("embed", EMBEDDINGS_LAYER), hf.get_input_embeddings()
    for layer, block in enumerate(decoder_layers(hf)):
        yield ("attn", layer), block.post_attention_layernorm if sandwich else block.self_attn
        yield ("mlp", layer), block.post_feedforward_layernorm if sandwich else block.mlp


def _embedding_scale(hf) -> float:
    """Gemma 2 multiplies the embeddings by sqrt(d_model) outside the embedding module."""
    if family_of(hf.config).name == "gemma2":
        return float(hf.config.hidden_size) ** 0.5
    return 1.0


def _final_norm(hf) -> torch.nn.Module:
    return getattr(hf, "model", hf).norm


def _run(loaded: LoadedModel, hf, ids: torch.Tensor, evil, safe) -> _Run:
    writes: dict[tuple[str, int], torch.Tensor] = {}
    mlp_inputs: dict[int, torch.Tensor] = {}
    final: list[torch.Tensor] = []
    hooks = []
    feature_sites = feature_hooks(loaded, "the shift decomposition")
    for key, module in _modules(hf):
        scale = _embedding_scale(hf) if key[0] == "embed" else 1.0
        hooks.append(module.register_forward_hook(_capture(writes, key, scale)))
        if key[0] == "mlp":

            def keep(x, layer=key[1]):
                mlp_inputs[layer] = x[0].detach().clone()

            hooks.append(feature_sites.on_read(key[1], keep))
    hooks.append(_final_norm(hf).register_forward_pre_hook(_capture_input(final, None)))
    with removing(hooks), torch.inference_mode(), finite_guard(loaded._checkpoints):
        logits = hf(input_ids=ids[None].to(loaded.precision.device)).logits[0, -1]
    return _Run(writes, mlp_inputs, final[0][-1], logit_gap(logits, evil, safe))


def _patched_gap(
    loaded: LoadedModel, hf, ids, key: tuple[str, int], source: _Run, evil, safe
) -> float:
    """The gap with one component's output replaced, at every position, by `source`'s."""
    module = dict(_modules(hf))[key]
    scale = _embedding_scale(hf) if key[0] == "embed" else 1.0
    replacement = source.writes[key][None] / scale

    def swap(_module, _inputs, output):
        if isinstance(output, tuple):
            return (replacement, *output[1:])
        return replacement

    with removing([module.register_forward_hook(swap)]), torch.inference_mode():
        logits = hf(input_ids=ids[None].to(loaded.precision.device)).logits[0, -1]
    return logit_gap(logits, evil, safe)


def _capture(store: dict, key, scale: float = 1.0):
    def hook(_module, _inputs, output):
        value = output[0] if isinstance(output, tuple) else output
        store[key] = value[0].detach().clone() * scale

    return hook


def _capture_input(store, key):
    def hook(_module, inputs):
        value = inputs[0][0].detach().clone()
        if isinstance(store, list):
            store.append(value)
        else:
            store[key] = value

    return hook


def _final_logits(hf, residual: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        normed = _final_norm(hf)(residual[None, None])
        return hf.get_output_embeddings()(normed)[0, 0]


def _checked(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() != 1 or len(input_ids) == 0:
        raise ValueError("pass one non-empty sequence of token ids (1-D tensor, starting with BOS)")
    return input_ids
