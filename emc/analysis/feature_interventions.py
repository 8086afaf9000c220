"""Do the features EMC names carry the shift? Restore, zero or scale them and measure the gap.

An edit sets chosen transcoder features at every position of a layer's MLP output: the MLP's
output gains (new - current) activations times the decoder, with full propagation (attention and
later layers recomputed from the edited stream; later transcoders re-encode their own inputs).
The same hooks stay on while a model generates, so an edit persists at every generated position.

- **restore**: in the adapted model, set the features to the base model's activations on the
  same tokens: the causal test that they carry the fine-tune's shift.
- **inject**: in the base model, set them to the adapted model's activations: do they reproduce
  it?
- **zero** and **scale** (x k, negative included): plain ablation and steering.

Features are ranked per prompt by attribution patching: the first-order estimate of how much
restoring a feature (at every position) would change the evil-minus-safe gap, the gradient of
the gap with respect to the adapted model's feature activations times (base - adapted)
activations. The anchors rank persona latents the same way (attribution to the contrast, not
activation change). The matched control draws as many features from the same layers among those
active on the prompt in either model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.hooks import feature_hooks, hf_module, logit_gap, removing, split_targets
from emc.models import LoadedModel, finite_guard

Mode = Literal["restore", "inject", "zero", "scale"]
Feature = tuple[int, int]  # (layer, feature)
DOSES = (1, 5, 20, 100)


@dataclass(frozen=True)
class FeatureEdit:
    """Which features to set, how, and (restore/inject) the activations to set them to."""

    mode: Mode
    features: tuple[Feature, ...]
    strength: float = 0.0  # the factor for scale
    source: Mapping[int, torch.Tensor] | None = None  # layer -> (n_pos, d_transcoder)

    def by_layer(self) -> dict[int, torch.Tensor]:
        layers: dict[int, list[int]] = {}
        for layer, feature in self.features:
            layers.setdefault(layer, []).append(feature)
        return {layer: torch.tensor(sorted(set(fs))) for layer, fs in layers.items()}


class DoseResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    mode: Mode
    k: int | None  # None: every active feature
    features: list[Feature]
    gap: float
    share: float  # (gap - base gap) / shift: the shift left (restore) or reproduced (inject)
    control_gap: float | None
    control_share: float | None


@contextmanager
def editing(
    loaded: LoadedModel,
    edit: FeatureEdit | None,
    record: dict | None = None,
    keep_batch: bool = False,
):
    """Hooks that apply `edit` at the transcoders' write sites (and optionally record each
    layer's feature activations into `record`: (n_pos, d_transcoder) of the first sequence on the
    CPU, or with `keep_batch` the whole (batch, n_pos, d_transcoder) where the model runs) until
    the block ends.

    A feature's change in activation reaches every layer it writes to: its own layer for
    per-layer transcoders, its layer and all later ones for a cross-layer transcoder."""
    hooks = feature_hooks(loaded, "feature interventions")
    dictionary = hooks.dictionary
    selected = edit.by_layer() if edit else {}
    device = loaded.precision.device
    # Decoder rows read once per edit, not per forward pass (a lazy decoder reads from disk).
    rows = {
        (source, out): dictionary.decoder(source, idx)[:, out - source].to(device)
        for source, idx in selected.items()
        for out in dictionary.output_layers(source)
    }
    changes: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(dictionary.n_layers):
        if layer not in selected and record is None:
            continue

        def on_read(x, layer=layer):
            acts = dictionary.encode(layer, x)
            if record is not None:
                record[layer] = acts.detach() if keep_batch else acts[0].detach().float().cpu()
            if layer in selected:
                idx = selected[layer].to(acts.device)
                changes[layer] = (_edited(acts, selected[layer], edit, layer) - acts)[..., idx]

        handles.append(hooks.on_read(layer, on_read))
    for out in sorted({out for source, out in rows}):

        def on_write(output, out=out):
            added = sum(
                changes[source] @ rows[source, out].to(changes[source].dtype)
                for source in dictionary.writers(out)
                if (source, out) in rows
            )
            return output + added.to(output.dtype)

        handles.append(hooks.on_write(out, on_write))
    with removing(handles):
        yield


def _edited(acts: torch.Tensor, idx: torch.Tensor, edit: FeatureEdit, layer: int) -> torch.Tensor:
    new = acts.clone()
    idx = idx.to(acts.device)
    if edit.mode == "zero":
        new[..., idx] = 0
    elif edit.mode == "scale":
        new[..., idx] = acts[..., idx] * edit.strength
    else:
        source = edit.source[layer].to(acts.device, acts.dtype)  # type: ignore[index]
        if source.dim() == 3:  # a live source: the other model on these very sequences
            new[..., idx] = source[..., idx]
            return new
        n_pos = acts.shape[-2]
        if source.shape[0] < n_pos:
            # Generated positions have no source activation: keep the model's own there.
            pad = acts[0, source.shape[0] :]
            source = torch.cat([source, pad], 0)
        new[..., idx] = source[:n_pos][None][..., idx]
    return new


@contextmanager
def live_source(source_model: LoadedModel, target: LoadedModel, into: dict) -> Iterator[None]:
    """Before every forward pass of `target`, run `source_model` on the same token ids and put
    its feature activations, (batch, n_pos, d_transcoder) per layer, into `into`.

    A restore or inject edit whose source is `into` then sets its features at every position,
    generated ones included: while sampling, each step's sequence is read by the other model
    first, so a restored feature takes the value the base model would give it on the text so far.
    The target must run full passes (no key-value cache), so every position is edited each step.
    """
    source_hf = hf_module(source_model, "live feature sources")

    if source_model is target:
        raise ValueError("a live source must be another model than the one it edits")

    def read_source(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        into.clear()
        with editing(source_model, None, record=into, keep_batch=True), torch.inference_mode():
            source_hf(input_ids=ids.to(source_model.precision.device))

    handle = hf_module(target, "live feature sources").register_forward_pre_hook(
        read_source, with_kwargs=True
    )
    with removing([handle]):
        yield


def gap_with(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    evil: list[int],
    safe: list[int],
    edit: FeatureEdit | None = None,
    record: dict | None = None,
) -> float:
    return logit_gap(logits_with(loaded, input_ids, edit, record), evil, safe)


def logits_with(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    edit: FeatureEdit | None = None,
    record: dict | None = None,
) -> torch.Tensor:
    """The last position's logits with `edit` applied (and activations recorded)."""
    hf = hf_module(loaded, "feature interventions")
    with editing(loaded, edit, record), torch.inference_mode(), finite_guard(loaded._checkpoints):
        return hf(input_ids=input_ids[None].to(loaded.precision.device)).logits[0, -1]


def attribution_ranking(
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    base_acts: Mapping[int, torch.Tensor],
) -> list[tuple[Feature, float]]:
    """Every feature active in either model, with its estimated effect of restoring it on the
    gap (negative: restoring it lowers the gap, i.e. it carries the shift), most negative first."""
    evil, safe = split_targets(targets, "feature attribution")
    hooks = feature_hooks(adapted, "feature attribution")
    dictionary = hooks.dictionary
    acts: dict[int, torch.Tensor] = {}
    probes: dict[int, torch.Tensor] = {}
    handles = []
    for layer in range(dictionary.n_layers):

        def on_read(x, layer=layer):
            with torch.no_grad():
                acts[layer] = dictionary.encode(layer, x)[0].float().cpu()

        def on_write(output, layer=layer):
            # Adds zero; its gradient is the gap's gradient at this write site.
            probes[layer] = torch.zeros_like(output, requires_grad=True)
            return output + probes[layer]

        handles += [hooks.on_read(layer, on_read), hooks.on_write(layer, on_write)]
    with removing(handles), torch.enable_grad():
        logits = hooks.hf(input_ids=input_ids[None].to(adapted.precision.device)).logits[0, -1]
        gap = logits.double()[evil].mean() - logits.double()[safe].mean()
        layers = sorted(probes)
        grads = torch.autograd.grad(gap, [probes[layer] for layer in layers])
    write_grads = {layer: g[0].float().cpu() for layer, g in zip(layers, grads, strict=True)}
    scored: list[tuple[Feature, float]] = []
    for layer in sorted(acts):
        adapted_acts, base = acts[layer], base_acts[layer].float()
        active = torch.nonzero(((adapted_acts > 0) | (base > 0)).any(0)).flatten()
        if not len(active):
            continue
        # d gap / d activation: the write sites' gradients through the feature's decoder rows
        # (read for the active features only: a big or lazy decoder is never read whole).
        decoder = dictionary.decoder(layer, active).float().cpu()  # (n, n_out, d_model)
        grad = sum(
            write_grads[out] @ decoder[:, out - layer].T for out in dictionary.output_layers(layer)
        )
        estimate = ((base[:, active] - adapted_acts[:, active]) * grad).sum(0)
        scored += [
            ((layer, int(f)), float(e)) for f, e in zip(active.tolist(), estimate, strict=True)
        ]
    return sorted(scored, key=lambda item: (item[1], item[0]))


def matched_control(
    chosen: Sequence[Feature],
    active: Mapping[int, Sequence[int]],
    seed: int = 0,
) -> list[Feature]:
    """As many features per layer as `chosen`, drawn from the layer's other active features."""
    rng = np.random.default_rng(seed)
    taken = set(chosen)
    per_layer: dict[int, int] = {}
    for layer, _ in chosen:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    control: list[Feature] = []
    for layer, n in sorted(per_layer.items()):
        pool = [f for f in active.get(layer, ()) if (layer, f) not in taken]
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False) if pool else []
        control += [(layer, pool[int(i)]) for i in sorted(picks)]
    return control


@dataclass(frozen=True)
class RankedFeatures:
    """Both models' gaps and feature activations on a prompt, the features ranked by their
    attribution to the shift, and each layer's features active in either model."""

    gap_base: float
    gap_adapted: float
    base_acts: dict[int, torch.Tensor]  # layer -> (n_pos, d_transcoder)
    adapted_acts: dict[int, torch.Tensor]
    ranking: list[tuple[Feature, float]]
    active: dict[int, list[int]]


def rank_features(
    base: LoadedModel, adapted: LoadedModel, input_ids: torch.Tensor, targets: Mapping[int, str]
) -> RankedFeatures:
    """What every feature intervention starts from (dose-response, rollouts)."""
    evil, safe = split_targets(targets, "feature interventions")
    base_acts: dict[int, torch.Tensor] = {}
    adapted_acts: dict[int, torch.Tensor] = {}
    gap_base = gap_with(base, input_ids, evil, safe, record=base_acts)
    gap_adapted = gap_with(adapted, input_ids, evil, safe, record=adapted_acts)
    active = {
        layer: torch.nonzero(((base_acts[layer] > 0) | (adapted_acts[layer] > 0)).any(0))
        .flatten()
        .tolist()
        for layer in base_acts
    }
    ranking = attribution_ranking(adapted, input_ids, targets, base_acts)
    return RankedFeatures(gap_base, gap_adapted, base_acts, adapted_acts, ranking, active)


def dose_response(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    doses: Sequence[int] = DOSES,
    seed: int = 0,
) -> tuple[float, float, list[DoseResult]]:
    """Restore the top-k attributed features in the adapted model and inject them into the base
    model, for each k and for every active feature, each against a matched random control.

    Returns (base gap, adapted gap, results)."""
    evil, safe = split_targets(targets, "feature interventions")
    ranked = rank_features(base, adapted, input_ids, targets)
    gap_base, gap_adapted = ranked.gap_base, ranked.gap_adapted
    base_acts, adapted_acts = ranked.base_acts, ranked.adapted_acts
    ranking, active = ranked.ranking, ranked.active
    shift = gap_adapted - gap_base
    if shift == 0:
        raise ValueError("the models' gaps are equal on this prompt: no shift to intervene on")
    results = []
    for k in [*[d for d in doses if d < len(ranking)], None]:
        chosen = [feature for feature, _ in (ranking if k is None else ranking[:k])]
        control = matched_control(chosen, active, seed) if k is not None else None
        for mode, model, source in (
            ("restore", adapted, base_acts),
            ("inject", base, adapted_acts),
        ):
            edit = FeatureEdit(mode, tuple(chosen), 0, source)
            gap = gap_with(model, input_ids, evil, safe, edit)
            control_gap = None
            if control:
                control_edit = FeatureEdit(mode, tuple(control), 0, source)
                control_gap = gap_with(model, input_ids, evil, safe, control_edit)
            results.append(
                DoseResult(
                    mode=mode,
                    k=k,
                    features=chosen,
                    gap=gap,
                    share=(gap - gap_base) / shift,
                    control_gap=control_gap,
                    control_share=None if control_gap is None else (control_gap - gap_base) / shift,
                )
            )
    return gap_base, gap_adapted, results
