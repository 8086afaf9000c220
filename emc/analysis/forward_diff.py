"""Where the base and adapted forward passes first differ, and whether that is a loading error.

A LoRA changes only the layers it adapts. On the same token ids, every residual state upstream of
the adapter's first layer (the embeddings included) must therefore be the same in the base and the
adapted model. A difference there is not misalignment but a loading error: an adapted model built
on another copy of the base, at another precision, or with other weights. The original research
once read such spurious early-layer differences as findings; `compare_forward` flags them.

Residual states are indexed like circuit-tracer's layers, shifted by one: index 0 is the
embedding output (reported as layer -1), index l + 1 is the output of decoder block l (layer l),
before any final norm.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, computed_field
from safetensors import safe_open

from emc.models import LoadedModel, finite_guard

EMBEDDINGS = -1  # the layer number of the embedding output
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
DELTA_COLUMNS = (
    "layer",
    "feature",
    "base_activation",  # summed over positions
    "adapted_activation",
    "delta",  # adapted - base
    "base_positions",  # positions where the feature is active (activation > 0)
    "adapted_positions",
)
_DELTA_DTYPES = {
    "layer": "int32",  # int32 like feature_effects' columns, so the two frames join directly
    "feature": "int32",
    "base_activation": "float64",
    "adapted_activation": "float64",
    "delta": "float64",
    "base_positions": "int32",
    "adapted_positions": "int32",
}
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def residual_states(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(n_layers + 1, n_pos, d_model) float32 on the CPU: embeddings, then each block's output.

    Read with hooks rather than HF's `output_hidden_states`, whose last entry has the final norm
    applied and so would not be comparable with the other layers.
    """
    ids = _checked_ids(input_ids).to(loaded.precision.device)
    with torch.inference_mode(), finite_guard(loaded._checkpoints):
        if loaded.identity.backend == "nnsight":
            states = _hf_residual_states(loaded.model._model, ids)
        else:
            states = _transformerlens_residual_states(loaded.model, ids)
    return torch.stack([s.reshape(len(ids), -1) for s in states]).float().cpu()


def feature_activations(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(n_layers, n_pos, d_transcoder) float32 on the CPU: every transcoder feature's activation."""
    return activations_and_last_logits(loaded, input_ids)[0]


def activations_and_last_logits(
    loaded: LoadedModel, input_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`feature_activations` and the last position's logits, from the one forward pass that
    gives both (the same `get_activations` call `LoadedModel.next_token_logits` makes)."""
    ids = _checked_ids(input_ids).to(loaded.precision.device)
    with finite_guard(loaded._checkpoints):
        logits, activations = loaded.model.get_activations(ids)
    if activations.is_sparse:
        activations = activations.to_dense()
    last = logits.reshape(-1, logits.shape[-1])[-1].float().cpu()
    return activations.float().cpu(), last


def adapter_layers(adapter_dir: Path) -> tuple[int, ...]:
    """Sorted decoder-layer indices that a PEFT adapter has weights for.

    The weights' key names (`...layers.<i>....`) are the truth: they are what gets merged.
    `layers_to_transform` in the adapter's config is the fallback for architectures whose keys
    do not name layers that way.
    """
    adapter_dir = Path(adapter_dir)
    weights = adapter_dir / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ValueError(f"{weights} not found: {adapter_dir} holds no PEFT adapter weights")
    with safe_open(str(weights), framework="pt") as handle:
        keys = list(handle.keys())
    found = {int(m.group(1)) for key in keys if (m := _LAYER_KEY.search(key))}
    if found:
        return tuple(sorted(found))
    configured = _configured_layers(adapter_dir / ADAPTER_CONFIG)
    if configured:
        return configured
    raise ValueError(
        f"{weights}: no weight key names a decoder layer ('layers.<i>.') and "
        f"{ADAPTER_CONFIG} sets no layers_to_transform, so the adapted layers are unknown"
    )


def default_tolerance(dtype_name: str) -> float:
    """The relative difference above which a layer counts as changed, for a model precision.

    Identical weights on identical ids give identical results, so upstream of the adapter the
    true difference is zero: the tolerance only absorbs kernel nondeterminism (reduction order
    on GPUs), which is rounding-sized, about 1e-7 relative in float32 and 1e-3 in bfloat16
    (8 mantissa bits). A real adapter moves the residual stream by far more than either.
    """
    name = dtype_name.lower()
    if name in ("fp32", "float32"):
        return 1e-6
    if name in ("bf16", "bfloat16", "fp16", "float16"):
        return 1e-2
    raise ValueError(f"no default tolerance for dtype {dtype_name!r} (fp32, bf16 or fp16)")


class LayerDiff(BaseModel):
    """How far one residual state moved between the base and the adapted forward pass."""

    model_config = ConfigDict(frozen=True)

    layer: int  # -1: embeddings; l: output of decoder block l
    rel_diff: float  # ||adapted - base||_F / ||base||_F over every position
    max_abs_diff: float
    upstream_of_adapter: bool  # layer < the adapter's first layer
    diverged: bool  # rel_diff > tolerance


class ForwardDiff(BaseModel):
    """Per-layer differences between base and adapted, and whether they betray a loading error."""

    model_config = ConfigDict(frozen=True)

    layers: list[LayerDiff]
    first_divergent_layer: int | None
    first_adapter_layer: int | None  # None: the adapter changes no layer
    loading_error: bool  # a divergence upstream of the adapter's first layer, embeddings included
    tolerance: float

    @computed_field  # type: ignore[prop-decorator]
    @property
    def message(self) -> str:
        """One sentence a researcher can act on."""
        first = self.first_divergent_layer
        if first is None:
            return f"base and adapted agree at every layer (relative tolerance {self.tolerance:g})"
        where = _layer_name(first)
        if self.loading_error and self.first_adapter_layer is None:
            return (
                f"base and adapted differ at {where} but the adapter changes no layer: the "
                "adapted model was not built on this base"
            )
        if self.loading_error:
            return (
                f"base and adapted differ at {where}, upstream of the adapter's first layer "
                f"{self.first_adapter_layer}: the adapted model was not built on this base "
                "(check the base model, its revision and the precision both were loaded with)"
            )
        return (
            f"base and adapted first differ at {where}, where the adapter starts acting "
            f"(its first layer is {self.first_adapter_layer}): no sign of a loading error"
        )


def compare_forward(
    base: torch.Tensor, adapted: torch.Tensor, adapter_layers: Sequence[int], tolerance: float
) -> ForwardDiff:
    """Compare two `residual_states` stacks of the same ids; see the module for the indexing."""
    if base.shape != adapted.shape:
        raise ValueError(f"base states {tuple(base.shape)} != adapted {tuple(adapted.shape)}")
    if base.dim() != 3 or base.shape[0] < 1:
        raise ValueError(f"expected (n_layers + 1, n_pos, d_model) states, got {tuple(base.shape)}")
    n_layers = base.shape[0] - 1
    outside = sorted(layer for layer in adapter_layers if not 0 <= layer < n_layers)
    if outside:
        raise ValueError(f"adapter layers {outside} are outside the model's 0..{n_layers - 1}")
    first_adapter = min(adapter_layers, default=None)
    base64, adapted64 = base.double(), adapted.double()
    rows = []
    for index in range(base.shape[0]):
        layer = index - 1
        diff = adapted64[index] - base64[index]
        rel = _relative(float(torch.linalg.norm(diff)), float(torch.linalg.norm(base64[index])))
        rows.append(
            LayerDiff(
                layer=layer,
                rel_diff=rel,
                max_abs_diff=float(diff.abs().max()) if diff.numel() else 0.0,
                upstream_of_adapter=first_adapter is None or layer < first_adapter,
                diverged=rel > tolerance,
            )
        )
    divergent = [row.layer for row in rows if row.diverged]
    return ForwardDiff(
        layers=rows,
        first_divergent_layer=divergent[0] if divergent else None,
        first_adapter_layer=first_adapter,
        loading_error=any(row.diverged and row.upstream_of_adapter for row in rows),
        tolerance=tolerance,
    )


def activation_deltas(
    base_acts: torch.Tensor, adapted_acts: torch.Tensor, top_per_layer: int = 50
) -> pd.DataFrame:
    """Per (layer, feature), position-summed activations in both models and their difference.

    Rows with DELTA_COLUMNS: a feature is listed when its delta is non-zero or it is active in
    either model; per layer only the `top_per_layer` largest |delta| are kept (ties: lower
    feature index first). Sorted by layer, then |delta| descending.
    """
    if base_acts.shape != adapted_acts.shape:
        raise ValueError(
            f"base activations {tuple(base_acts.shape)} != adapted {tuple(adapted_acts.shape)}"
        )
    if base_acts.dim() != 3:
        raise ValueError(f"expected (n_layers, n_pos, d_transcoder), got {tuple(base_acts.shape)}")
    if top_per_layer < 1:
        raise ValueError(f"top_per_layer must be at least 1, got {top_per_layer}")
    base = base_acts.double().cpu().numpy()
    adapted = adapted_acts.double().cpu().numpy()
    base_sum, adapted_sum = base.sum(axis=1), adapted.sum(axis=1)
    delta = adapted_sum - base_sum
    base_pos, adapted_pos = (base > 0).sum(axis=1), (adapted > 0).sum(axis=1)
    keep = (delta != 0) | (base_pos > 0) | (adapted_pos > 0)
    layer, feature = np.nonzero(keep)  # row-major: by layer, then feature
    frame = pd.DataFrame(
        {
            "layer": layer,
            "feature": feature,
            "base_activation": base_sum[layer, feature],
            "adapted_activation": adapted_sum[layer, feature],
            "delta": delta[layer, feature],
            "base_positions": base_pos[layer, feature],
            "adapted_positions": adapted_pos[layer, feature],
        }
    )
    order = np.lexsort((frame["feature"], -frame["delta"].abs(), frame["layer"]))
    frame = frame.iloc[order].groupby("layer", sort=False).head(top_per_layer)
    return frame.reset_index(drop=True).reindex(columns=list(DELTA_COLUMNS)).astype(_DELTA_DTYPES)


def _relative(diff_norm: float, base_norm: float) -> float:
    if base_norm > 0:
        return diff_norm / base_norm
    return 0.0 if diff_norm == 0 else float("inf")


def _layer_name(layer: int) -> str:
    return "the embeddings" if layer == EMBEDDINGS else f"layer {layer}"


def _configured_layers(config_path: Path) -> tuple[int, ...]:
    if not config_path.is_file():
        return ()
    layers = json.loads(config_path.read_text()).get("layers_to_transform")
    if layers is None:
        return ()
    return tuple(sorted({int(layers)} if isinstance(layers, int) else {int(i) for i in layers}))


def _checked_ids(input_ids: torch.Tensor) -> torch.Tensor:
    if input_ids.dim() != 1 or len(input_ids) == 0:
        raise ValueError("pass one non-empty sequence of token ids (1-D tensor, starting with BOS)")
    return input_ids


def _hf_residual_states(hf_model: torch.nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    core = hf_model.get_base_model() if hasattr(hf_model, "get_base_model") else hf_model
    body = getattr(core, "model", core)
    modules = [core.get_input_embeddings(), *body.layers]
    captured: list[torch.Tensor | None] = [None] * len(modules)

    def capture(index: int):
        def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            captured[index] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [m.register_forward_hook(capture(i)) for i, m in enumerate(modules)]
    try:
        hf_model(input_ids=ids[None])
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, state in enumerate(captured) if state is None]
    if missing:
        raise RuntimeError(f"residual states {missing} were not produced by the forward pass")
    return captured  # type: ignore[return-value]


def _transformerlens_residual_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    # blocks.0.hook_resid_pre is the embedding output: Llama has no positional embedding to add.
    names = ["blocks.0.hook_resid_pre"]
    names += [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    _, cache = model.run_with_cache(ids[None], names_filter=names)
    return [cache[name] for name in names]
