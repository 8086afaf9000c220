"""Check a graph's edges by intervention: does scaling a feature move its targets as the edge says?

An adjacency entry `A[t, s]` of circuit-tracer is a direct effect: source `s`'s activation `a_s`
times the gradient of target `t` along the frozen local replacement model (attention patterns,
norm denominators and every MLP output held at their clean values, so only the residual stream's
linear paths remain). circuit-tracer's own `feature_intervention` with `freeze_attention=True`
and `constrained_layers` covering every layer runs exactly that model forward. Scaling `a_s` by
`(1 + epsilon)` there changes `t`'s value by `epsilon * A[t, s]`, so `measured = Δ / epsilon`
must equal the edge. The frozen model is linear, so this holds for any `epsilon`, not only a
small one: `epsilon` only sets how far above rounding noise the change is.

What a target's value is, as circuit-tracer attributes it:

- A logit node of a token `v` is the *demeaned* logit `logit_v - mean_u logit_u` (its attribution
  vector is the unembedding column minus the mean column), at the last position, before any
  final softcap (circuit-tracer attributes the uncapped logits; `zero_softcap` is applied here).
  A custom target (a direction, not a token) has no logit to read and is not checked.
- A feature node's value is its transcoder *pre-activation* (the encoder row is what attribution
  injects), read from `feature_intervention(apply_activation_function=False)`. Only targets that
  an edge can reach are checked: a later layer, at the same or a later position.

With full propagation (nothing constrained), the real MLPs and norm denominators respond to the
change, not the transcoder's linearised features, so no sum of the graph's paths predicts the
result exactly; that is not checked here.

Tolerance: `|measured - predicted| <= rtol * |predicted| + ulps * eps(dtype) * scale / |epsilon|`.
The second term is float rounding: the change is a difference of two forward passes whose values
are of size `scale` (the largest clean |logit| for logit targets, the largest clean
|pre-activation| for feature targets), each rounded to about `eps(dtype) * scale`, and dividing
by `epsilon` magnifies that. `rtol` covers the edge's own rounding (backward and forward sum in
different orders).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from circuit_tracer.graph import Graph
from pydantic import BaseModel, ConfigDict

from emc.tracing.compact import GraphLayout

TargetKind = Literal["logit", "feature"]


class EdgeCheck(BaseModel):
    """One edge `source -> target`: the graph's weight against the intervention's effect."""

    model_config = ConfigDict(frozen=True)

    source_node: int  # column of the adjacency (a selected feature)
    source_layer: int
    source_position: int
    source_feature: int
    source_activation: float
    target_node: int  # row of the adjacency
    target_kind: TargetKind
    target_layer: int  # logits: n_layers
    target_position: int  # logits: the last position
    target_feature: int | None  # features only
    target_token_id: int | None  # logits only
    epsilon: float
    predicted: float  # A[target, source]
    measured: float  # Δ target value / epsilon
    abs_error: float
    rel_error: float  # abs_error / |predicted|; inf when predicted is 0 and measured is not
    tolerance: float
    agrees: bool


class EdgeSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    n_edges: int
    n_sources: int
    n_agree: int
    max_abs_error: float
    # Over edges whose |predicted| exceeds their tolerance: below it the ratio is rounding noise
    # over a near-zero edge. NaN when there is none.
    max_rel_error: float
    n_resolved: int  # edges that max_rel_error is taken over
    worst_error_ratio: float  # max abs_error / tolerance: how near any edge came to failing


def edge_agreement(
    model: Any,
    graph: Graph,
    epsilon: float = 1e-2,
    n_top: int = 8,
    n_random: int = 4,
    seed: int = 0,
    sources: Sequence[int] | None = None,
    rtol: float = 1e-4,
    ulps: float = 64.0,
) -> list[EdgeCheck]:
    """Intervene on each source feature and compare every reachable target with its edge.

    `model` is the circuit-tracer ReplacementModel the graph was traced with (either backend);
    it runs on `graph.input_tokens`. Sources are adjacency columns of selected features: by
    default the `n_top` with the largest |edge| into the most probable logit, then `n_random`
    others drawn uniformly (deterministic for `seed`), which mostly have small or zero edges and
    so test that no effect is measured where the graph has none. `sources` replaces that choice.
    Rows are ordered by source (in that order), then its logit targets, then its feature targets
    by node.
    """
    if epsilon == 0 or not math.isfinite(epsilon):
        raise ValueError(f"epsilon must be finite and non-zero, got {epsilon}")
    layout = GraphLayout.of(graph)
    chosen = _sources(graph, layout, n_top, n_random, seed) if sources is None else sources
    chosen = _checked_sources(chosen, layout)
    tokens = graph.input_tokens.to(model.unembed_proj.device)
    constrained = range(layout.n_layers)
    eps = torch.finfo(model.unembed_proj.dtype).eps

    with model.zero_softcap():
        clean_logits, clean_pre = model.get_activations(tokens, apply_activation_function=False)
        clean_logits = _last(clean_logits)
        clean_pre = clean_pre.float().cpu()
        logit_rows = _logit_rows(graph, layout, clean_logits.shape[-1])
        feature_coords = graph.active_features[graph.selected_features]
        logit_atol = ulps * eps * float(clean_logits.abs().max())
        feature_atol = ulps * eps * float(clean_pre.abs().max())

        checks: list[EdgeCheck] = []
        for node in chosen:
            layer, pos, feature = (int(v) for v in feature_coords[node])
            activation = float(graph.activation_values[graph.selected_features[node]])
            logits, pre = model.feature_intervention(
                tokens,
                [(layer, pos, feature, (1 + epsilon) * activation)],
                constrained_layers=constrained,
                freeze_attention=True,
                apply_activation_function=False,
            )
            logit_change = _demeaned(_last(logits)) - _demeaned(clean_logits)
            pre_change = pre.float().cpu() - clean_pre
            source = {
                "source_node": node,
                "source_layer": layer,
                "source_position": pos,
                "source_feature": feature,
                "source_activation": activation,
                "epsilon": epsilon,
            }
            for row, token_id in logit_rows:
                checks.append(
                    _check(
                        source,
                        graph,
                        row,
                        float(logit_change[token_id]) / epsilon,
                        rtol,
                        logit_atol / abs(epsilon),
                        target_kind="logit",
                        target_layer=layout.n_layers,
                        target_position=layout.n_pos - 1,
                        target_feature=None,
                        target_token_id=token_id,
                    )
                )
            reachable = (feature_coords[:, 0] > layer) & (feature_coords[:, 1] >= pos)
            for row in reachable.nonzero().flatten().tolist():
                t_layer, t_pos, t_feature = (int(v) for v in feature_coords[row])
                checks.append(
                    _check(
                        source,
                        graph,
                        row,
                        float(pre_change[t_layer, t_pos, t_feature]) / epsilon,
                        rtol,
                        feature_atol / abs(epsilon),
                        target_kind="feature",
                        target_layer=t_layer,
                        target_position=t_pos,
                        target_feature=t_feature,
                        target_token_id=None,
                    )
                )
    return checks


def summarise_edges(checks: Sequence[EdgeCheck]) -> EdgeSummary:
    resolved = [c.rel_error for c in checks if abs(c.predicted) > c.tolerance]
    return EdgeSummary(
        n_edges=len(checks),
        n_sources=len({c.source_node for c in checks}),
        n_agree=sum(c.agrees for c in checks),
        max_abs_error=max((c.abs_error for c in checks), default=math.nan),
        max_rel_error=max(resolved, default=math.nan),
        n_resolved=len(resolved),
        worst_error_ratio=max((_ratio(c.abs_error, c.tolerance) for c in checks), default=math.nan),
    )


def _check(
    source: dict, graph: Graph, row: int, measured: float, rtol: float, atol: float, **target
) -> EdgeCheck:
    predicted = float(graph.adjacency_matrix[row, source["source_node"]])
    abs_error = abs(measured - predicted)
    tolerance = rtol * abs(predicted) + atol
    return EdgeCheck(
        **source,
        target_node=row,
        **target,
        predicted=predicted,
        measured=measured,
        abs_error=abs_error,
        rel_error=_ratio(abs_error, abs(predicted)),
        tolerance=tolerance,
        agrees=abs_error <= tolerance,
    )


def _sources(graph: Graph, layout: GraphLayout, n_top: int, n_random: int, seed: int) -> list[int]:
    top_logit = layout.logit_start + int(graph.logit_probabilities.argmax())
    edges = graph.adjacency_matrix[top_logit, : layout.n_features].abs()
    ranked = edges.argsort(descending=True, stable=True).tolist()
    top, rest = ranked[:n_top], ranked[n_top:]
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)
    return top + [rest[i] for i in sorted(drawn.tolist())]


def _checked_sources(sources: Sequence[int], layout: GraphLayout) -> list[int]:
    nodes = [int(node) for node in sources]
    outside = [node for node in nodes if not 0 <= node < layout.n_features]
    if outside:
        raise ValueError(
            f"sources {outside[:5]} are not feature nodes (0..{layout.n_features - 1})"
        )
    return list(dict.fromkeys(nodes))


def _logit_rows(graph: Graph, layout: GraphLayout, vocab_size: int) -> list[tuple[int, int]]:
    """(adjacency row, token id) of each token target; custom targets have no logit to read."""
    return [
        (layout.logit_start + i, target.vocab_idx)
        for i, target in enumerate(graph.logit_targets)
        if target.vocab_idx < vocab_size
    ]


def _ratio(error: float, scale: float) -> float:
    if scale > 0:
        return error / scale
    return 0.0 if error == 0 else math.inf


def _last(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])[-1].float().cpu()


def _demeaned(logits: torch.Tensor) -> torch.Tensor:
    return logits - logits.mean()
