"""How much of a graph the transcoders explain: circuit-tracer's scores and the error-node score.

Replacement and completeness are `compute_graph_scores`'s definitions, computed from the node
influence that pruning already needed (recomputing it costs as much as the rest of compaction).
The error-node score is the original pipeline's capability 8, on the unpruned adjacency: the
direct input to the logit rows that comes from error nodes (what the transcoders miss).
"""

from __future__ import annotations

from circuit_tracer.graph import Graph
from pydantic import BaseModel

from emc.tracing.compact import GraphLayout
from emc.tracing.pruning import Influence, node_influence


class NodeCounts(BaseModel):
    active_features: int  # every active transcoder feature on the prompt
    features: int  # the ones attributed (max_feature_nodes caps them)
    errors: int
    tokens: int
    logits: int


class GraphQuality(BaseModel):
    replacement: float  # share of token->logit influence through features, 0..1
    completeness: float  # influence-weighted share of non-error inputs, 0..1
    error_score_mean: float  # sum |error -> logit| per target
    error_score_ratio: float  # sum |error -> logit| / sum |anything -> logit|, 0..1
    counts: NodeCounts


def graph_quality(graph: Graph, influence: Influence | None = None) -> GraphQuality:
    layout = GraphLayout.of(graph)
    if influence is None:
        influence = node_influence(graph)
    replacement, completeness = _scores(layout, influence)
    logit_rows = graph.adjacency_matrix[layout.logit_start :].abs()
    from_errors = float(logit_rows[:, layout.error_start : layout.token_start].sum())
    total = float(logit_rows.sum())
    return GraphQuality(
        replacement=replacement,
        completeness=completeness,
        error_score_mean=from_errors / layout.n_logits,
        error_score_ratio=from_errors / total if total > 0 else 0.0,
        counts=NodeCounts(
            active_features=len(graph.active_features),
            features=layout.n_features,
            errors=layout.n_layers * layout.n_pos,
            tokens=layout.n_pos,
            logits=layout.n_logits,
        ),
    )


def _scores(layout: GraphLayout, influence: Influence) -> tuple[float, float]:
    errors = slice(layout.error_start, layout.token_start)
    from_tokens = influence.node[layout.token_start : layout.logit_start].sum()
    from_errors = influence.node[errors].sum()
    replacement = from_tokens / (from_tokens + from_errors)
    # Each node's input share that does not come from errors, weighted by its influence.
    non_error = 1 - influence.normalized[:, errors].sum(dim=-1)
    output = influence.node + influence.weights
    completeness = (non_error * output).sum() / output.sum()
    return float(replacement), float(completeness)
