"""A pruned graph as rows: the nodes and edges circuit-tracer's pruning keeps, nothing else.

A raw graph is a dense float32 adjacency (hundreds of MB for a real model); the pruned part that
anyone reads is a few thousand nodes and edges. Rows keep the original node indices, so they can
be matched against a raw side file, and every node and edge that `prune_graph` keeps is kept (the
viewer's rule: an edge is kept when its mask is set and both of its ends are kept).

Node order in circuit-tracer's adjacency (rows = targets, columns = sources):
`[selected features | errors (layer-major: layer * n_pos + pos) | input tokens | logits]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from circuit_tracer.graph import Graph
from pydantic import BaseModel

from emc.tracing.pruning import Influence, node_influence, prune

NodeKind = Literal["feature", "error", "token", "logit"]
# Tokens sit below layer 0 and logits above the last layer, so ORDER BY layer draws bottom-up.
TOKEN_LAYER = -1


class GraphNode(BaseModel):
    node: int  # index in the unpruned adjacency
    kind: NodeKind
    layer: int  # tokens: -1; logits: n_layers
    position: int  # logits: the last position
    feature: int | None = None  # transcoder feature index (features only)
    activation: float | None = None  # features only
    influence: float  # total (multi-hop) influence on the probability-weighted targets
    token_id: int | None = None  # tokens, and logits of real tokens (None: custom target)
    token: str | None = None  # tokens and logits
    prob: float | None = None  # logits: the target's probability (weight)
    # Features: the last layer the feature writes to: its own layer for per-layer transcoders,
    # the model's last layer for a cross-layer transcoder (it writes to every layer from its own).
    last_layer: int | None = None


class GraphEdge(BaseModel):
    source: int
    target: int
    weight: float  # the adjacency entry: direct effect of source on target


class GraphTarget(BaseModel):
    token_id: int | None  # None for a custom target (circuit-tracer's virtual index)
    label: str
    prob: float


NODE_COLUMNS = tuple(GraphNode.model_fields)
# Nullable integer and float columns: absent values are NULL in DuckDB, never NaN or 0.
_NODE_DTYPES = {
    "node": "int32",
    "kind": "object",
    "layer": "int16",
    "position": "int32",
    "feature": "Int32",
    "activation": "Float32",
    "influence": "float32",
    "token_id": "Int32",
    "token": "object",
    "prob": "Float64",
    "last_layer": "Int16",
}
EDGE_COLUMNS = tuple(GraphEdge.model_fields)


@dataclass(frozen=True)
class GraphLayout:
    """Where each kind of node starts in the adjacency."""

    n_features: int
    n_layers: int
    n_pos: int
    n_logits: int

    @classmethod
    def of(cls, graph: Graph) -> GraphLayout:
        return cls(
            n_features=len(graph.selected_features),
            n_layers=graph.cfg.n_layers,
            n_pos=len(graph.input_tokens),
            n_logits=len(graph.logit_targets),
        )

    @property
    def error_start(self) -> int:
        return self.n_features

    @property
    def token_start(self) -> int:
        return self.n_features + self.n_layers * self.n_pos

    @property
    def logit_start(self) -> int:
        return self.token_start + self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.logit_start + self.n_logits


@dataclass(frozen=True)
class CompactGraph:
    """Kept nodes and edges as frames with NODE_COLUMNS / EDGE_COLUMNS (bulk-ready for DuckDB)."""

    nodes: pd.DataFrame
    edges: pd.DataFrame
    targets: tuple[GraphTarget, ...]

    def node_rows(self) -> list[GraphNode]:
        return [GraphNode(**_none_for_na(r)) for r in self.nodes.to_dict("records")]

    def edge_rows(self) -> list[GraphEdge]:
        return [GraphEdge(**r) for r in self.edges.to_dict("records")]


def graph_targets(graph: Graph) -> tuple[GraphTarget, ...]:
    """The graph's own targets and their probabilities (weights), in logit-node order."""
    return tuple(
        GraphTarget(
            token_id=target.vocab_idx if target.vocab_idx < graph.vocab_size else None,
            label=target.token_str,
            prob=float(prob),
        )
        for target, prob in zip(
            graph.logit_targets, graph.logit_probabilities.tolist(), strict=True
        )
    )


def compact_graph(
    graph: Graph,
    node_threshold: float,
    edge_threshold: float,
    tokenizer=None,
    influence: Influence | None = None,
    cross_layer: bool = False,
) -> CompactGraph:
    """Prune as circuit-tracer's `prune_graph` does and keep every kept node and edge as a row.

    An edge is kept when its mask is set, both its ends are kept and its weight is not zero (a
    zero entry is no edge; at the usual thresholds every masked entry is non-zero anyway).
    `tokenizer` decodes the input tokens' strings; without one they stay empty (ids are kept).
    `cross_layer`: the graph was traced with a cross-layer transcoder (features write to every
    later layer; `last_layer` says so).
    """
    if influence is None:
        influence = node_influence(graph)
    node_mask, edge_mask = prune(graph, influence, node_threshold, edge_threshold)
    adjacency = graph.adjacency_matrix
    kept = node_mask.nonzero().squeeze(1)
    # Only the kept x kept block can hold kept edges: read it instead of the whole matrix.
    block = edge_mask[kept][:, kept] & (adjacency[kept][:, kept] != 0)
    target_at, source_at = block.nonzero(as_tuple=True)
    targets, sources = kept[target_at], kept[source_at]
    edges = pd.DataFrame(
        {
            "source": sources.numpy().astype(np.int32),
            "target": targets.numpy().astype(np.int32),
            "weight": adjacency[targets, sources].numpy().astype(np.float32),
        }
    )
    nodes = _node_frame(graph, kept.numpy(), influence.node[kept].numpy(), tokenizer)
    features = nodes["kind"] == "feature"
    nodes.loc[features, "last_layer"] = (
        graph.cfg.n_layers - 1 if cross_layer else nodes.loc[features, "layer"]
    )
    return CompactGraph(nodes=nodes, edges=edges, targets=graph_targets(graph))


def _node_frame(graph: Graph, kept: np.ndarray, influence: np.ndarray, tokenizer) -> pd.DataFrame:
    layout = GraphLayout.of(graph)
    bounds = (0, layout.error_start, layout.token_start, layout.logit_start, layout.n_nodes)
    builders = (_feature_nodes, _error_nodes, _token_nodes, _logit_nodes)
    parts = [
        build(graph, layout, kept[(kept >= lo) & (kept < hi)], tokenizer)
        for build, lo, hi in zip(builders, bounds[:-1], bounds[1:], strict=True)
    ]
    # Kinds occupy consecutive index ranges, so the parts concatenate in node order.
    frame = pd.concat([p for p in parts if len(p)], ignore_index=True)
    frame["influence"] = influence
    return frame.reindex(columns=list(NODE_COLUMNS)).astype(_NODE_DTYPES)


def _feature_nodes(graph: Graph, layout: GraphLayout, nodes: np.ndarray, _) -> pd.DataFrame:
    selected = graph.selected_features[nodes]
    coords = graph.active_features[selected].numpy()
    return pd.DataFrame(
        {
            "node": nodes,
            "kind": "feature",
            "layer": coords[:, 0],
            "position": coords[:, 1],
            "feature": coords[:, 2],
            "activation": graph.activation_values[selected].float().numpy(),
        }
    )


def _error_nodes(graph: Graph, layout: GraphLayout, nodes: np.ndarray, _) -> pd.DataFrame:
    layer, position = np.divmod(nodes - layout.error_start, layout.n_pos)
    return pd.DataFrame({"node": nodes, "kind": "error", "layer": layer, "position": position})


def _token_nodes(graph: Graph, layout: GraphLayout, nodes: np.ndarray, tokenizer) -> pd.DataFrame:
    position = nodes - layout.token_start
    ids = graph.input_tokens[position].numpy()
    return pd.DataFrame(
        {
            "node": nodes,
            "kind": "token",
            "layer": TOKEN_LAYER,
            "position": position,
            "token_id": ids,
            "token": [tokenizer.decode([t]) for t in ids] if tokenizer else None,
        }
    )


def _logit_nodes(graph: Graph, layout: GraphLayout, nodes: np.ndarray, _) -> pd.DataFrame:
    targets = graph_targets(graph)
    chosen = [targets[i] for i in nodes - layout.logit_start]
    return pd.DataFrame(
        {
            "node": nodes,
            "kind": "logit",
            "layer": layout.n_layers,
            "position": layout.n_pos - 1,
            "token_id": pd.array([t.token_id for t in chosen], dtype="Int32"),
            "token": [t.label for t in chosen],
            "prob": [t.prob for t in chosen],
        }
    )


def _none_for_na(row: dict) -> dict:
    return {
        k: (None if v is pd.NA or (isinstance(v, float) and np.isnan(v)) else v)
        for k, v in row.items()
    }
