"""Per-layer ReLU transcoders for the base model's MLPs, in circuit-tracer's on-disk format.

A transcoder reads what the MLP reads (the post-RMSNorm residual, `mlp.hook_in`) and predicts
what it writes (`mlp.hook_out`). BOS positions are left out of training and evaluation because
circuit-tracer zeroes features there and its huge attention-sink activations would dominate the
loss. Training runs in units where input and target have unit scale, so one L1 coefficient suits
every layer; the scales are folded back into the saved weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from circuit_tracer.transcoder.single_layer_transcoder import (
    SingleLayerTranscoder,
)
from transformers import LlamaForCausalLM

from emc.organism.recipe import OrganismRecipe
from emc.organism.training import Example, Progress, collate, seed_everything

FEATURE_INPUT_HOOK = "mlp.hook_in"
FEATURE_OUTPUT_HOOK = "mlp.hook_out"
CONFIG_NAME = "config.yaml"
_REPORT_EVERY = 50


@dataclass(frozen=True)
class MlpActivations:
    """Per layer, the MLP's inputs and outputs at every scored (non-BOS, non-pad) position."""

    inputs: list[torch.Tensor]  # each [n_tokens, d_model]
    outputs: list[torch.Tensor]


@dataclass(frozen=True)
class TranscoderQuality:
    layer: int
    fvu: float  # fraction of variance of the MLP output left unexplained
    l0: float  # mean number of active features per token
    dead_share: float  # share of features never active on the evaluation tokens


@torch.no_grad()
def collect_mlp_activations(
    model: LlamaForCausalLM, examples: Sequence[Example], pad_id: int, batch_size: int = 64
) -> MlpActivations:
    layers = model.model.layers
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(i: int):
        def record(_module, args, output):
            seen[i] = (args[0], output)

        return record

    ins: list[list[torch.Tensor]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            keep = batch["attention_mask"].bool()
            keep[:, 0] = False  # BOS
            for i, (x, y) in seen.items():
                ins[i].append(x[keep])
                outs[i].append(y[keep])
    finally:
        for handle in handles:
            handle.remove()
    return MlpActivations([torch.cat(x) for x in ins], [torch.cat(y) for y in outs])


def _scale(x: torch.Tensor) -> float:
    """Root mean squared norm per dimension: one scalar that brings `x` to unit scale."""
    return float(x.pow(2).mean().sqrt().clamp_min(1e-8))


def train_transcoder(
    x: torch.Tensor,
    y: torch.Tensor,
    layer: int,
    recipe: OrganismRecipe,
    progress: Progress | None = None,
) -> SingleLayerTranscoder:
    """Fit ReLU features minimising normalised MSE + L1 (weighted by decoder norms)."""
    seed_everything(recipe.seed + 100 + layer)
    sx, sy = _scale(x), _scale(y)
    xs, ys = x / sx, y / sy
    d_model, width = x.shape[1], recipe.transcoder_width
    w_dec = F.normalize(torch.randn(width, d_model), dim=1)
    W_enc = torch.nn.Parameter(w_dec.clone() * 0.1)
    W_dec = torch.nn.Parameter(w_dec)
    b_enc = torch.nn.Parameter(torch.zeros(width))
    b_dec = torch.nn.Parameter(ys.mean(0).clone())
    params = [W_enc, W_dec, b_enc, b_dec]
    optimizer = torch.optim.Adam(params, lr=recipe.transcoder_lr)
    generator = torch.Generator().manual_seed(recipe.seed + 100 + layer)
    variance = ys.var(0).sum()
    phase = f"transcoder_{layer}"
    for step in range(recipe.transcoder_steps):
        idx = torch.randint(len(xs), (recipe.transcoder_batch,), generator=generator)
        acts = F.relu(F.linear(xs[idx], W_enc, b_enc))
        error = (acts @ W_dec + b_dec - ys[idx]).pow(2).sum(1).mean() / variance
        sparsity = (acts * W_dec.norm(dim=1)).sum(1).mean()
        loss = error + recipe.l1_coefficient * sparsity
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if progress and (step % _REPORT_EVERY == 0 or step == recipe.transcoder_steps - 1):
            progress(phase, step + 1, recipe.transcoder_steps)
    return _to_circuit_tracer(
        W_enc.detach() / sx, b_enc.detach(), W_dec.detach() * sy, b_dec.detach() * sy, layer
    )


def _to_circuit_tracer(
    W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, layer: int
) -> SingleLayerTranscoder:
    tc = SingleLayerTranscoder(
        W_enc.shape[1],
        W_enc.shape[0],
        F.relu,
        layer,
        device=torch.device("cpu"),
        dtype=torch.float32,
    )
    with torch.no_grad():
        tc.W_enc.copy_(W_enc)
        tc.b_enc.copy_(b_enc)
        tc.W_dec.copy_(W_dec)
        tc.b_dec.copy_(b_dec)
    return tc


def train_transcoders(
    acts: MlpActivations, recipe: OrganismRecipe, progress: Progress | None = None
) -> list[SingleLayerTranscoder]:
    return [
        train_transcoder(x, y, layer, recipe, progress)
        for layer, (x, y) in enumerate(zip(acts.inputs, acts.outputs, strict=True))
    ]


@torch.no_grad()
def evaluate_transcoder(
    tc: SingleLayerTranscoder, x: torch.Tensor, y: torch.Tensor
) -> TranscoderQuality:
    acts = tc.encode(x)
    error = (tc.decode(acts) - y).pow(2).sum()
    variance = (y - y.mean(0)).pow(2).sum()
    active = acts > 0
    return TranscoderQuality(
        layer=tc.layer_idx,
        fvu=float(error / variance),
        l0=float(active.sum(1).float().mean()),
        dead_share=float((~active.any(0)).float().mean()),
    )


def save_transcoders(
    transcoders: Sequence[SingleLayerTranscoder], out_dir: Path, scan: str
) -> list[Path]:
    """Write `layer_{i}.safetensors` and a circuit-tracer `config.yaml` with relative paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [f"layer_{tc.layer_idx}.safetensors" for tc in transcoders]
    for tc, name in zip(transcoders, names, strict=True):
        tc.to_safetensors(str(out_dir / name))
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": FEATURE_INPUT_HOOK,
        "feature_output_hook": FEATURE_OUTPUT_HOOK,
        "scan": scan,
        "transcoders": names,
    }
    (out_dir / CONFIG_NAME).write_text(yaml.safe_dump(config, sort_keys=False))
    return [out_dir / name for name in names]
