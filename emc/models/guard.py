"""NaN/inf guard: forward hooks that name the first module whose output is not finite."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from emc.models.errors import NonFiniteActivationError

NamedModules = Sequence[tuple[str, nn.Module]]


def hf_checkpoints(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Embedding, every decoder layer, final norm and unembedding of a HF decoder-only model."""
    core = model.get_base_model() if hasattr(model, "get_base_model") else model
    body = getattr(core, "model", core)
    checkpoints = [("embedding", core.get_input_embeddings())]
    checkpoints += [(f"layer {i}", layer) for i, layer in enumerate(body.layers)]
    if getattr(body, "norm", None) is not None:
        checkpoints.append(("final norm", body.norm))
    checkpoints.append(("unembedding", core.get_output_embeddings()))
    return checkpoints


def transformerlens_checkpoints(model: nn.Module) -> list[tuple[str, nn.Module]]:
    checkpoints = [("embedding", model.embed)]
    checkpoints += [(f"layer {i}", block) for i, block in enumerate(model.blocks)]
    checkpoints += [("final norm", model.ln_final), ("unembedding", model.unembed)]
    return checkpoints


@contextmanager
def finite_guard(checkpoints: NamedModules) -> Iterator[None]:
    """Raise NonFiniteActivationError after a forward pass that produced NaN or inf.

    Hooks fire in forward order, so the first recorded module is where the problem started. The
    error is raised after the pass, not inside the hook, so that backends wrapping the forward
    (nnsight) do not swallow or rewrap it.
    """
    first_bad: list[tuple[str, str]] = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            if first_bad:
                return
            tensor = output[0] if isinstance(output, tuple) else output
            if isinstance(tensor, torch.Tensor) and not torch.isfinite(tensor).all():
                n_nan = int(torch.isnan(tensor).sum())
                n_inf = int(torch.isinf(tensor).sum())
                first_bad.append((name, f"{n_nan} NaN and {n_inf} inf of {tensor.numel()} values"))

        return hook

    handles = [module.register_forward_hook(make_hook(name)) for name, module in checkpoints]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if first_bad:
        raise NonFiniteActivationError(*first_bad[0])
