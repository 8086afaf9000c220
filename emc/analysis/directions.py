"""Mean-difference directions: is the shift one direction of the residual stream?

Per layer, the direction is the mean over prompts of the adapted-minus-base residual stream
after that layer's block, at the prompt's last position (where the decision is read). It is
tested on each prompt with that prompt left out of the mean, so a prompt never tests a direction
made from itself. A second source, once the adapted model's answers to the EM questions are
judged (`emc eval em`), is the *response* direction the emergent-misalignment papers ablate: the
mean residual over the tokens of misaligned answers minus that of aligned ones
(`response_directions`). Either is used in the same ways:

- **subtract** from the adapted model (x - k d at every position of that layer's output) and
  **add** to the base model (x + k d): does removing or adding the mean shift move the gap?
- **ablate** from the adapted model (x - (x . u) u, u = d / |d|): is the shift carried by the
  one dimension it points along? Besides each layer's own direction at its layer, one layer's
  direction is also projected out of *every* layer's output: a rank-1 intervention on the whole
  residual stream, as the emergent-misalignment papers ablate their single direction.
- each against a random direction of the same norm (the control).

The hooks stay on while a model generates, so the same interventions persist over generated
positions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from emc.analysis.hooks import decoder_layers, hf_module, logit_gap, removing, split_targets
from emc.models import LoadedModel, finite_guard

DirectionMode = Literal["subtract", "add", "ablate"]


class DirectionResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    mode: DirectionMode
    layer: int  # -1: every layer at once, each with its own direction
    everywhere: bool = False  # layer's one direction projected out of every layer (rank 1)
    strength: float
    norm: float  # |d| (the mean over layers for layer -1)
    gap: float
    share: float  # (gap - base gap) / shift: the shift left (subtract, ablate) or made (add)
    control_gap: float
    control_share: float


def last_position_residuals(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """(n_layers, d_model) float32: each block's output at the last position."""
    return _block_outputs(loaded, input_ids, slice(-1, None))[:, 0]


def mean_response_residuals(
    loaded: LoadedModel, input_ids: torch.Tensor, start: int
) -> torch.Tensor:
    """(n_layers, d_model) float32: each block's output averaged over the positions from `start`
    (a response's own tokens after its context)."""
    if not 0 < start < len(input_ids):
        raise ValueError(f"the response starts at {start} of {len(input_ids)} positions: none left")
    return _block_outputs(loaded, input_ids, slice(start, None)).mean(dim=1)


def _block_outputs(loaded: LoadedModel, input_ids: torch.Tensor, positions: slice) -> torch.Tensor:
    """(n_layers, n_selected, d_model) float32 on the CPU: each block's output at `positions`."""
    hf = hf_module(loaded, "mean-difference directions")
    captured: dict[int, torch.Tensor] = {}

    def keep(layer: int):
        def hook(_module, _args, output):
            value = output[0] if isinstance(output, tuple) else output
            captured[layer] = value[0, positions].detach().float().cpu()

        return hook

    handles = [block.register_forward_hook(keep(i)) for i, block in enumerate(decoder_layers(hf))]
    with removing(handles), torch.inference_mode(), finite_guard(loaded._checkpoints):
        hf(input_ids=input_ids[None].to(loaded.precision.device))
    return torch.stack([captured[i] for i in range(len(captured))])


def response_directions(misaligned: torch.Tensor, aligned: torch.Tensor) -> torch.Tensor:
    """(n_layers, d_model): mean residual of misaligned responses minus that of aligned ones.

    Each input is (n_responses, n_layers, d_model) of `mean_response_residuals`. The direction
    comes from answers to other questions than the prompts it is tested on, so no prompt is left
    out of it."""
    if len(misaligned) < 2 or len(aligned) < 2:
        raise ValueError(
            f"a response direction needs at least two misaligned and two aligned answers, got "
            f"{len(misaligned)} and {len(aligned)}"
        )
    return misaligned.mean(0) - aligned.mean(0)


def leave_one_out_means(differences: torch.Tensor) -> torch.Tensor:
    """(n_prompts, n_layers, d_model) -> the same, each prompt's entry the mean of the others."""
    n = differences.shape[0]
    if n < 2:
        raise ValueError("mean-difference directions need at least two prompts")
    total = differences.sum(0, keepdim=True)
    return (total - differences) / (n - 1)


def random_like(directions: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Random directions with the same norms as `directions` (per row): the control."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randn(directions.shape, generator=generator, dtype=torch.float32)
    return random / random.norm(dim=-1, keepdim=True) * directions.norm(dim=-1, keepdim=True)


@contextmanager
def steering(
    loaded: LoadedModel, vectors: Mapping[int, torch.Tensor], mode: DirectionMode, k: float = 1.0
) -> Iterator[None]:
    """Hooks on block outputs: add or subtract k * v, or project v's direction out."""
    hf = hf_module(loaded, "mean-difference directions")
    blocks = decoder_layers(hf)
    handles = []
    for layer, vector in vectors.items():

        def hook(_module, _args, output, vector=vector):
            value = output[0] if isinstance(output, tuple) else output
            v = vector.to(value.device, value.dtype)
            if mode == "ablate":
                norm = v.norm()
                if norm == 0:  # no direction (the layer did not move): nothing to project out
                    return output
                u = v / norm
                value = value - (value @ u)[..., None] * u
            else:
                value = value + (k if mode == "add" else -k) * v
            return (value, *output[1:]) if isinstance(output, tuple) else value

        handles.append(blocks[layer].register_forward_hook(hook))
    with removing(handles):
        yield


def direction_effects(
    base: LoadedModel,
    adapted: LoadedModel,
    input_ids: torch.Tensor,
    targets: Mapping[int, str],
    directions: torch.Tensor,
    strength: float = 1.0,
    seed: int = 0,
) -> tuple[float, float, list[DirectionResult]]:
    """Subtract, add and ablate each layer's direction (then all layers' at once) on one prompt.

    `directions` is (n_layers, d_model), e.g. this prompt's leave-one-out means. Returns
    (base gap, adapted gap, results)."""
    evil, safe = split_targets(targets, "direction interventions")
    gap_base = _gap(base, input_ids, evil, safe, {}, "add", 0.0)
    gap_adapted = _gap(adapted, input_ids, evil, safe, {}, "add", 0.0)
    shift = gap_adapted - gap_base
    if shift == 0:
        raise ValueError("the models' gaps are equal on this prompt: no shift to intervene on")
    random = random_like(directions, seed)
    n_layers = directions.shape[0]
    scopes: list[tuple[int, Sequence[int]]] = [(layer, [layer]) for layer in range(n_layers)]
    scopes.append((-1, list(range(n_layers))))
    results = []
    for label, layers in scopes:
        for mode, model in (("subtract", adapted), ("add", base), ("ablate", adapted)):
            chosen = {layer: directions[layer] for layer in layers}
            control = {layer: random[layer] for layer in layers}
            gap = _gap(model, input_ids, evil, safe, chosen, mode, strength)
            control_gap = _gap(model, input_ids, evil, safe, control, mode, strength)
            results.append(
                DirectionResult(
                    mode=mode,
                    layer=label,
                    strength=strength,
                    norm=float(directions[list(layers)].norm(dim=-1).mean()),
                    gap=gap,
                    share=(gap - gap_base) / shift,
                    control_gap=control_gap,
                    control_share=(control_gap - gap_base) / shift,
                )
            )
    for layer in range(n_layers):  # rank 1: one direction out of the whole residual stream
        chosen = {other: directions[layer] for other in range(n_layers)}
        control = {other: random[layer] for other in range(n_layers)}
        gap = _gap(adapted, input_ids, evil, safe, chosen, "ablate", strength)
        control_gap = _gap(adapted, input_ids, evil, safe, control, "ablate", strength)
        results.append(
            DirectionResult(
                mode="ablate",
                layer=layer,
                everywhere=True,
                strength=strength,
                norm=float(directions[layer].norm()),
                gap=gap,
                share=(gap - gap_base) / shift,
                control_gap=control_gap,
                control_share=(control_gap - gap_base) / shift,
            )
        )
    return gap_base, gap_adapted, results


def direction_target(result: DirectionResult) -> str:
    """How a result's scope is named in the store and the reports."""
    if result.everywhere:
        return f"layer {result.layer} direction, every layer"
    return "every layer" if result.layer < 0 else f"layer {result.layer}"


def _gap(loaded, input_ids, evil, safe, vectors, mode, k) -> float:
    hf = hf_module(loaded, "direction interventions")
    hooks = steering(loaded, vectors, mode, k)
    with hooks, torch.inference_mode(), finite_guard(loaded._checkpoints):
        logits = hf(input_ids=input_ids[None].to(loaded.precision.device)).logits[0, -1]
    return logit_gap(logits, evil, safe)
