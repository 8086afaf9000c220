"""Each feature's effect on each target of an attribution graph: direct, total, and weighted.

circuit-tracer's adjacency `A` (N x N, rows = targets, columns = sources) holds direct effects
only: `A[t, j]` is what source node `j` writes, along no other node, into target node `t`. The
original pipeline read the features' rows instead of the logits' rows (all zeros), then reported
a probability-weighted *one-hop* effect as "multi-hop". Here the direct effect is the logit row
of `A`, and the total effect sums every path, per target, from that target alone.

Definitions (graph with N nodes, target logit nodes `t`, target probabilities `p_t`):

- `Â`: `A` with each row divided by the sum of the absolute values of that row,
  `Â[i, j] = A[i, j] / Σ_k |A[i, k]|` (a row of zeros stays zeros). Signs are kept, unlike
  circuit-tracer's `normalize_matrix`, which takes |A|: an inhibitory edge stays negative, and a
  path's sign is the product of its edges' signs.
- `direct[j, t] = A[t, j]`, in the target's logit units (what circuit-tracer's edges are).
- `total[j, t] = Σ_{k>=1} (e_t Â^k)[j] = ((I - Â)^-1 - I)[t, j]`, with `e_t` the one-hot row
  vector of target `t` (not the probability vector). Signed, in units of *normalised
  attribution*: the sum over every path `j -> ... -> t` of the product of the normalised edge
  weights along it. One hop contributes `A[t, j] / abs_input[t]` with
  `abs_input[t] = Σ_k |A[t, k]|`, so for a feature with no path to `t` through other nodes
  `total * abs_input == direct`. The graph is a DAG (edges go from earlier layers or positions
  to later ones), so the series has at most N non-zero terms.
- `*_weighted`: the same times `p_t`. Summed over targets, `total_weighted` is the signed
  version of circuit-tracer's node influence (which uses |A| and the probability vector).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from circuit_tracer.graph import Graph

from emc.tracing.compact import GraphLayout, graph_targets

EFFECT_COLUMNS = (
    "node",  # index of the feature node in the graph's adjacency
    "layer",
    "position",
    "feature",  # transcoder feature index
    "target",  # 0 .. n_logits - 1, in the graph's logit order
    "token_id",  # None (NA) for a custom target such as the evil-minus-safe direction
    "label",  # the target's token string or custom label
    "prob",  # the target's probability (its weight in the graph)
    "abs_input",  # Σ_k |A[t, k]|: total * abs_input is in the units of direct
    "direct",
    "total",
    "direct_weighted",
    "total_weighted",
)
EFFECT_METRICS = ("direct", "total", "direct_weighted", "total_weighted")
_DTYPES = {
    "node": "int32",
    "layer": "int32",
    "position": "int32",
    "feature": "int32",
    "target": "int32",
    "token_id": "Int32",
    "label": "object",
} | {name: "float32" for name in ("prob", "abs_input", *EFFECT_METRICS)}


class NotADagError(ValueError):
    """The adjacency has a cycle, so the total-effect power series does not terminate."""


def feature_effects(graph: Graph, feature_nodes: Iterable[int] | None = None) -> pd.DataFrame:
    """One row per (feature node, target) with EFFECT_COLUMNS; see the module for definitions.

    `feature_nodes` restricts the rows to these node indices (e.g. every kept node of a pruned
    graph); indices of error, token and logit nodes among them are skipped, indices outside the
    graph are an error. Rows are ordered by node, then target.
    """
    layout = GraphLayout.of(graph)
    nodes = _feature_nodes(feature_nodes, layout)
    adjacency = graph.adjacency_matrix
    logit_rows = adjacency[layout.logit_start : layout.n_nodes]
    abs_input = torch.linalg.vector_norm(logit_rows, ord=1, dim=1)
    index = torch.as_tensor(nodes, dtype=torch.long, device=adjacency.device)
    direct = logit_rows[:, index].T.float().cpu().numpy()
    total = total_effects(adjacency, layout.logit_start)[:, index].T.float().cpu().numpy()

    n_targets = layout.n_logits
    coords = graph.active_features[graph.selected_features[torch.as_tensor(nodes)]]
    coords = coords.reshape(-1, 3).numpy()
    targets = graph_targets(graph)
    prob = np.array([t.prob for t in targets], dtype=np.float32)
    frame = pd.DataFrame(
        {
            "node": np.repeat(nodes, n_targets),
            "layer": np.repeat(coords[:, 0], n_targets),
            "position": np.repeat(coords[:, 1], n_targets),
            "feature": np.repeat(coords[:, 2], n_targets),
            "target": np.tile(np.arange(n_targets), len(nodes)),
            "token_id": pd.array([t.token_id for t in targets] * len(nodes), dtype="Int32"),
            "label": [t.label for t in targets] * len(nodes),
            "prob": np.tile(prob, len(nodes)),
            "abs_input": np.tile(abs_input.float().cpu().numpy(), len(nodes)),
            "direct": direct.reshape(-1),
            "total": total.reshape(-1),
        }
    )
    frame["direct_weighted"] = frame["direct"] * frame["prob"]
    frame["total_weighted"] = frame["total"] * frame["prob"]
    return frame.reindex(columns=list(EFFECT_COLUMNS)).astype(_DTYPES)


def total_effects(adjacency: torch.Tensor, start: int) -> torch.Tensor:
    """`((I - Â)^-1 - I)[start:]`: every node's total effect on each row from `start` on.

    Â (signed rows over their absolute sums, see the module) is never built: a row vector `v`
    times Â is `(v / s) @ A` with `s` the rows' absolute sums. All target rows run at once as an
    (n_targets x N) power series, which stops when its term is zero (at most N steps in a DAG).
    """
    n = adjacency.shape[0]
    scale = torch.linalg.vector_norm(adjacency, ord=1, dim=1)
    inverse = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    term = torch.zeros(n - start, n, dtype=adjacency.dtype, device=adjacency.device)
    term[:, start:] = torch.eye(n - start, dtype=adjacency.dtype, device=adjacency.device)
    total = torch.zeros_like(term)
    for _ in range(n):
        term = (term * inverse) @ adjacency
        if not term.any():
            return total
        total += term
    raise NotADagError(f"the total-effect series is non-zero after {n} steps: a cycle")


def _feature_nodes(feature_nodes: Iterable[int] | None, layout: GraphLayout) -> np.ndarray:
    if feature_nodes is None:
        return np.arange(layout.n_features, dtype=np.int32)
    if isinstance(feature_nodes, torch.Tensor):
        feature_nodes = feature_nodes.cpu().numpy()
    nodes = np.unique(np.asarray(list(feature_nodes), dtype=np.int64))
    outside = nodes[(nodes < 0) | (nodes >= layout.n_nodes)]
    if len(outside):
        raise ValueError(
            f"node indices {outside[:5].tolist()} are outside the graph (0..{layout.n_nodes - 1})"
        )
    return nodes[nodes < layout.n_features].astype(np.int32)
