"""circuit-tracer's pruning, with the same masks, minus its one expensive step.

`circuit_tracer.graph.prune_graph` finds its edge threshold by sorting every entry of the dense
N x N score matrix (0.45 s for an organism graph of 2,830 nodes, ~4x the rest of pruning, and
12 bytes per entry of peak memory). Scores are zero outside the kept nodes' rows and columns, and
zeros change neither a descending cumulative sum's prefix nor the total, so sorting the positive
scores and summing them padded to full length gives the identical threshold. Every other step calls
circuit-tracer's own functions, so the arithmetic (and each float) is theirs; tests compare the
masks with `prune_graph` itself.

Node influence is computed once here and shared with the rows and the quality scores.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from circuit_tracer.graph import (
    Graph,
    compute_edge_influence,
    compute_influence,
    find_threshold,
    normalize_matrix,
)


class Influence(NamedTuple):
    normalized: torch.Tensor  # |adjacency|, rows normalised to sum 1
    weights: torch.Tensor  # target probabilities at the logit rows, zero elsewhere
    node: torch.Tensor  # each node's total (multi-hop) influence on the weighted targets


class PruneMasks(NamedTuple):
    node_mask: torch.Tensor  # (N,) bool
    edge_mask: torch.Tensor  # (N, N) bool, rows = targets


def node_influence(graph: Graph) -> Influence:
    """What `compute_node_influence` computes, keeping the normalised matrix for reuse."""
    n_logits = len(graph.logit_targets)
    weights = torch.zeros(graph.adjacency_matrix.shape[0])
    weights[-n_logits:] = graph.logit_probabilities.float().cpu()
    normalized = normalize_matrix(graph.adjacency_matrix)
    return Influence(normalized, weights, compute_influence(normalized, weights))


def prune(
    graph: Graph, influence: Influence, node_threshold: float, edge_threshold: float
) -> PruneMasks:
    """The node and edge masks of `prune_graph(graph, node_threshold, edge_threshold)`."""
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be between 0.0 and 1.0")
    n_fixed = len(graph.logit_targets) + len(graph.input_tokens)
    n_features = len(graph.selected_features)

    node_mask = influence.node >= find_threshold(influence.node, node_threshold)
    node_mask[-n_fixed:] = True  # tokens and logits are always kept
    pruned = graph.adjacency_matrix.clone()
    pruned[~node_mask] = 0
    pruned[:, ~node_mask] = 0
    scores = compute_edge_influence(pruned, influence.weights)
    del pruned
    # Scores are zero outside the kept rows and columns, so the positive ones are all in there.
    kept = node_mask.nonzero().squeeze(1)
    positive = scores[kept][:, kept].flatten()
    positive = positive[positive > 0]
    edge_mask = scores >= _cumulative_threshold(positive, scores.numel(), edge_threshold)
    del scores

    # Features and errors need a kept outgoing edge, features a kept incoming one; dropping a
    # node drops its edges, which may strand others, so repeat until nothing changes.
    before = node_mask.clone()
    _require_edges(node_mask, edge_mask, n_features, n_fixed)
    while not torch.equal(node_mask, before):
        before.copy_(node_mask)
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        _require_edges(node_mask, edge_mask, n_features, n_fixed)
    return PruneMasks(node_mask, edge_mask)


def _require_edges(
    node_mask: torch.Tensor, edge_mask: torch.Tensor, n_features: int, n_fixed: int
) -> None:
    node_mask[:-n_fixed] &= edge_mask[:, :-n_fixed].any(0)
    node_mask[:n_features] &= edge_mask[:n_features].any(1)


def _cumulative_threshold(positive: torch.Tensor, n_scores: int, threshold: float) -> torch.Tensor:
    """`find_threshold(scores, threshold)` from the positive scores and the count of all scores.

    The total is summed over a full-length copy (positives first, then zeros: the sorted vector
    `find_threshold` sums), because a float sum's rounding depends on the length it runs over.
    """
    ordered = torch.sort(positive, descending=True).values
    padded = ordered.new_zeros(n_scores)
    padded[: len(ordered)] = ordered
    cumulative = torch.cumsum(ordered, dim=0) / torch.sum(padded)
    index = int(torch.searchsorted(cumulative, threshold).item())
    if index < len(ordered):
        return ordered[index]
    # Past the positives find_threshold lands on the zeros (or, with none, on the last score).
    return ordered.new_zeros(()) if len(ordered) < n_scores else ordered[-1]
