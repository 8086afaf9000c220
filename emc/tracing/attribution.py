"""One attribution graph: circuit-tracer's `attribute` on a loaded replacement model, timed.

Token ids are passed, never text: circuit-tracer tokenises strings its own way, and the graph must
see exactly the ids the discovery logits were read from.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from typing import NamedTuple, NoReturn, TypeVar

import torch
from circuit_tracer import attribute
from circuit_tracer.attribution.targets import CustomTarget
from circuit_tracer.graph import Graph

from emc.config import TracingConfig
from emc.models import LoadedModel
from emc.tracing.targets import TargetPlan, build_targets


class NonFiniteGraphError(FloatingPointError):
    """Attribution met NaN/inf (circuit-tracer reports it as a failure to converge)."""


class Traced(NamedTuple):
    graph: Graph  # on the CPU
    seconds: float  # wall time of `attribute` alone


def targets_for(
    loaded: LoadedModel, input_ids: torch.Tensor, plan: TargetPlan
) -> torch.Tensor | list[CustomTarget] | None:
    """The plan's attribution targets for this model; raises TargetError for missing labels."""
    plan.check()
    # Only the contrastive weight needs the model's next-token distribution: skip the forward
    # pass otherwise.
    if plan.mode == "contrastive":
        last_logits = loaded.next_token_logits(_checked_ids(loaded, input_ids))[-1]
    else:
        last_logits = torch.empty(0, device=loaded.precision.device)
    return build_targets(plan, loaded.model.unembed_proj, last_logits)


def trace(
    loaded: LoadedModel,
    input_ids: torch.Tensor,
    targets: torch.Tensor | list[CustomTarget] | None,
    config: TracingConfig,
) -> Traced:
    """Attribute the next token after `input_ids` (1-D, starting with BOS) to `targets`."""
    ids = _checked_ids(loaded, input_ids)
    started = time.perf_counter()
    try:
        graph = attribute(
            ids,
            loaded.model,
            attribution_targets=targets,
            max_n_logits=config.max_n_logits,
            desired_logit_prob=config.desired_logit_prob,
            batch_size=config.batch_size,
            max_feature_nodes=config.max_feature_nodes,
            offload=config.offload,
            verbose=False,
        )
    except RuntimeError as exc:
        if "converge" not in str(exc):
            raise
        _raise_non_finite(loaded, ids, exc)
    seconds = time.perf_counter() - started
    graph = _to_cpu(graph)
    if not (
        torch.isfinite(graph.adjacency_matrix).all()
        and torch.isfinite(graph.logit_probabilities).all()
    ):
        _raise_non_finite(loaded, ids, None)
    return Traced(graph, seconds)


def release_memory() -> None:
    """Free what a finished or failed graph left behind (dense matrices of up to gigabytes)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA and host allocation failures, which a smaller graph may avoid."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def memory_fallback(config: TracingConfig) -> TracingConfig | None:
    """A config that needs less memory for the same graph, or None when none is left.

    Halves the batch size down to 16, then offloads finished model parts to the CPU. Neither
    changes the graph (nor its id); a smaller `max_feature_nodes` would, so it is the flow's call.
    """
    if config.batch_size > 16:
        return config.model_copy(update={"batch_size": max(16, config.batch_size // 2)})
    if config.offload is None:
        return config.model_copy(update={"offload": "cpu"})
    return None


T = TypeVar("T")


def with_memory_fallback(
    attempt: Callable[[TracingConfig], T], config: TracingConfig
) -> tuple[T, TracingConfig]:
    """Run `attempt(config)`; on out-of-memory free memory and retry with `memory_fallback`.

    Returns the result and the config that fitted; re-raises the last out-of-memory error when no
    smaller setting is left.
    """
    while True:
        try:
            return attempt(config), config
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            smaller = memory_fallback(config)
            if smaller is None:
                raise
        # Outside the handler: the traceback, and the tensors its frames hold, are gone by now.
        release_memory()
        config = smaller


def _checked_ids(loaded: LoadedModel, input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids, dtype=torch.long).squeeze()
    if ids.dim() != 1 or len(ids) < 2:
        raise ValueError("pass one sequence of at least two token ids (BOS and a token)")
    bos = loaded.tokenizer.bos_token_id
    if bos is not None and int(ids[0]) != bos:
        # circuit-tracer would silently prepend its own special token and shift every position.
        raise ValueError(f"token ids must start with BOS ({bos}), got {int(ids[0])}")
    return ids.to(loaded.precision.device)


def _raise_non_finite(loaded: LoadedModel, ids: torch.Tensor, cause: Exception | None) -> NoReturn:
    # The guarded forward pass names the first layer that produced NaN/inf, if the forward pass
    # is where it started.
    loaded.next_token_logits(ids)
    raise NonFiniteGraphError(
        "attribution produced NaN/inf although the forward pass is finite"
        + (f": {cause}" if cause else "")
    ) from cause


def _to_cpu(graph: Graph) -> Graph:
    graph.to("cpu")  # adjacency, active features, logit probabilities
    graph.input_tokens = graph.input_tokens.cpu()
    graph.selected_features = graph.selected_features.cpu()
    graph.activation_values = graph.activation_values.cpu()
    return graph
