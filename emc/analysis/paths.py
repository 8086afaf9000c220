"""Paths to a target: which chains of direct effects carry the evil token, and how the fine-tune
changed them.

A path runs from an input token (its embedding node) or an error node (what the transcoders
leave unexplained) through features to a target logit along the pruned graph's edges. Its weight
is the product of the edges' direct effects: the part of the target's logit that flows along
exactly that chain, in the graph's linear replacement. Paths are found backwards from the target,
keeping the 256 strongest partial paths per length (a beam, so no graph is enumerated whole; on
graphs with fewer partial paths it is exact, which tests check against brute force).

Base and adapted graphs are traced on the same tokens, so a node is the same node in both when
its kind, layer, position and feature (or token) agree. A path of one graph is looked up in the
other edge by edge; a missing node or edge means the other graph's pruning did not keep it, and
its weight there counts 0 (`kept_in` says so).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from emc.store.graphs import StoredGraph

NodeKey = tuple[str, int, int, int]  # kind, layer, position, feature or token id (-1: none)
BEAM = 256  # partial paths kept per length
MAX_EDGES = 4
UNCHANGED = 1e-6  # relative: a path whose |weight| moved less than this did not change


@dataclass(frozen=True)
class GraphPath:
    nodes: tuple[NodeKey, ...]  # from the input token to the target
    weight: float


def node_keys(graph: StoredGraph) -> dict[int, NodeKey]:
    """Each kept node's key, comparable across the base and adapted graphs of one prompt."""
    nodes = graph.nodes
    keys = {}
    for row in nodes.itertuples():
        index = row.feature if row.kind == "feature" else row.token_id
        ident = -1 if pd.isna(index) else int(index)
        keys[int(row.node)] = (str(row.kind), int(row.layer), int(row.position), ident)
    return keys


def target_node(graph: StoredGraph, token_id: int | None) -> int | None:
    """The logit node of `token_id` (None: the graph's custom direction target)."""
    logits = graph.nodes[graph.nodes["kind"] == "logit"]
    if token_id is None:
        rows = logits[logits["token_id"].isna()]
    else:
        rows = logits[logits["token_id"] == token_id]
    return int(rows["node"].iloc[0]) if len(rows) else None


def most_probable_evil(graph: StoredGraph) -> int | None:
    """The evil token with the highest probability among the graph's targets, if any."""
    evil = {int(t) for t in graph.record.params.get("evil_ids", [])}
    logits = graph.nodes[(graph.nodes["kind"] == "logit") & graph.nodes["token_id"].notna()]
    logits = logits[logits["token_id"].astype(int).isin(evil)]
    if logits.empty:
        return None
    return int(logits.sort_values("prob", ascending=False)["token_id"].iloc[0])


def top_paths(
    graph: StoredGraph, target: int, k: int = 10, max_edges: int = MAX_EDGES
) -> list[GraphPath]:
    """The `k` strongest token-to-target paths (by |weight|) of at most `max_edges` edges."""
    incoming: dict[int, list[tuple[int, float]]] = defaultdict(list)
    for source, dest, weight in graph.edges[["source", "target", "weight"]].itertuples(index=False):
        if weight != 0:
            incoming[int(dest)].append((int(source), float(weight)))
    keys = node_keys(graph)
    complete: list[tuple[tuple[int, ...], float]] = []
    frontier: list[tuple[tuple[int, ...], float]] = [((target,), 1.0)]
    for _ in range(max_edges):
        grown = []
        for path, weight in frontier:
            for source, edge in incoming.get(path[0], ()):
                if source in path:  # the graph is acyclic; this guards malformed input
                    continue
                step = ((source, *path), weight * edge)
                # Paths start where the graph's inputs are: embeddings and error nodes.
                (complete if keys[source][0] in _SOURCES else grown).append(step)
        frontier = sorted(grown, key=lambda p: -abs(p[1]))[:BEAM]
        if not frontier:
            break
    complete.sort(key=lambda p: -abs(p[1]))
    return [GraphPath(tuple(keys[n] for n in path), weight) for path, weight in complete[:k]]


def path_weight(graph: StoredGraph, nodes: Sequence[NodeKey]) -> float | None:
    """The weight of the same chain in `graph`; None when its pruning dropped a node or edge."""
    index = {key: node for node, key in node_keys(graph).items()}
    if any(key not in index for key in nodes):
        return None
    edges = _edge_weights(graph)
    weight = 1.0
    for source, dest in itertools.pairwise(nodes):
        edge = edges.get((index[source], index[dest]))
        if edge is None:
            return None
        weight *= edge
    return weight


def path_diff(
    base: StoredGraph,
    adapted: StoredGraph,
    token_id: int | None,
    k: int = 10,
    labels: Mapping[tuple[int, int], str] | None = None,
    max_edges: int = MAX_EDGES,
) -> pd.DataFrame:
    """The `k` strongest paths to `token_id` in each graph, each weighed in both graphs: gained
    (stronger in adapted), lost (weaker) or unchanged. A path strong in both is listed once.

    Columns: change, path (readable, features with their labels), edges, base_weight,
    adapted_weight, delta (adapted - base, a path a graph did not keep counting 0), kept_in
    (both | base | adapted). Sorted by |delta|.
    """
    rows = []
    for side, source, other in (("adapted", adapted, base), ("base", base, adapted)):
        target = target_node(source, token_id)
        if target is None:
            continue
        for path in top_paths(source, target, k, max_edges):
            there = path_weight(other, path.nodes)
            mine, theirs = path.weight, (there or 0.0)
            adapted_w, base_w = (mine, theirs) if side == "adapted" else (theirs, mine)
            rows.append(
                {
                    "change": _change(base_w, adapted_w),
                    "path": describe_path(path.nodes, source, labels or {}),
                    "edges": len(path.nodes) - 1,
                    "base_weight": base_w,
                    "adapted_weight": adapted_w,
                    "delta": adapted_w - base_w,
                    "kept_in": "both" if there is not None else side,
                }
            )
    frame = pd.DataFrame(rows, columns=_COLUMNS).drop_duplicates("path")
    if frame.empty:
        return frame.reset_index(drop=True)
    frame = frame.assign(order=frame["delta"].abs()).sort_values("order", ascending=False)
    return frame.drop(columns="order").reset_index(drop=True)


def _change(base: float, adapted: float) -> str:
    """gained: stronger (|weight|) in adapted; lost: weaker; unchanged within float noise."""
    if abs(abs(adapted) - abs(base)) <= UNCHANGED * max(abs(adapted), abs(base), 1e-12):
        return "unchanged"
    return "gained" if abs(adapted) > abs(base) else "lost"


def describe_path(
    nodes: Sequence[NodeKey], graph: StoredGraph, labels: Mapping[tuple[int, int], str]
) -> str:
    tokens = _position_tokens(graph)
    parts = []
    for kind, layer, position, ident in nodes:
        if kind == "token":
            parts.append(f"{tokens.get(position, '?')!r}@{position}")
        elif kind == "feature":
            label = labels.get((layer, ident))
            parts.append(f"L{layer}/{ident}@{position}" + (f" ({label})" if label else ""))
        elif kind == "error":
            parts.append(f"error L{layer}@{position}")
        else:
            token = logit_token(graph, ident)
            parts.append(f"logit {token!r}" if token is not None else "logit (direction)")
    return " → ".join(parts)


_SOURCES = ("token", "error")
_COLUMNS = ["change", "path", "edges", "base_weight", "adapted_weight", "delta", "kept_in"]


def _edge_weights(graph: StoredGraph) -> dict[tuple[int, int], float]:
    edges = graph.edges[["source", "target", "weight"]].itertuples(index=False)
    return {(int(s), int(t)): float(w) for s, t, w in edges}


def _position_tokens(graph: StoredGraph) -> dict[int, str]:
    tokens = graph.nodes[graph.nodes["kind"] == "token"]
    return {int(r.position): str(r.token) for r in tokens.itertuples()}


def logit_token(graph: StoredGraph, token_id: int) -> str | None:
    if token_id < 0:
        return None
    logits = graph.nodes[(graph.nodes["kind"] == "logit") & (graph.nodes["token_id"] == token_id)]
    return str(logits["token"].iloc[0]) if len(logits) else str(token_id)
