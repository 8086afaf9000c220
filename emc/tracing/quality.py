"""How much of a graph the transcoders explain: circuit-tracer's scores and the error-node score.

Replacement and completeness are `compute_graph_scores`'s definitions, computed from the node
influence that pruning already needed (recomputing it costs as much as the rest of compaction).
The error-node score is the original pipeline's capability 8, on the unpruned adjacency: the
direct input to the logit rows that comes from error nodes (what the transcoders miss).
Per layer, the error share of influence says where the transcoders stop explaining a model:
comparing it between base and adapted graphs locates what a fine-tune added that they miss.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
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


LAYER_COLUMNS = (
    "layer",
    "active_features",
    "features",
    "feature_influence",
    "error_influence",
    "error_share",
)


def layer_quality(graph: Graph, influence: Influence | None = None) -> pd.DataFrame:
    """Per layer: active and attributed features, their influence and the error nodes'.

    Influence is the multi-hop influence on the probability-weighted targets (as pruning uses),
    on the unpruned graph, so the shares do not depend on pruning thresholds.
    """
    layout = GraphLayout.of(graph)
    if influence is None:
        influence = node_influence(graph)
    node = influence.node.double().cpu().numpy()
    n_layers = layout.n_layers
    active_layers = graph.active_features[:, 0].cpu().numpy()
    selected = graph.selected_features.cpu()
    selected_layers = graph.active_features.cpu()[selected, 0].numpy()
    feature_influence = np.bincount(
        selected_layers, weights=node[: layout.n_features], minlength=n_layers
    )
    # Error nodes are layer-major: layer * n_pos + position.
    errors = node[layout.error_start : layout.token_start].reshape(n_layers, layout.n_pos)
    error_influence = errors.sum(axis=1)
    explained = feature_influence + error_influence
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(explained > 0, error_influence / explained, np.nan)
    return pd.DataFrame(
        {
            "layer": np.arange(n_layers, dtype=np.int16),
            "active_features": np.bincount(active_layers, minlength=n_layers).astype(np.int32),
            "features": np.bincount(selected_layers, minlength=n_layers).astype(np.int32),
            "feature_influence": feature_influence,
            "error_influence": error_influence,
            "error_share": share,
        },
        columns=list(LAYER_COLUMNS),
    )
