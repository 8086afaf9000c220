"""Attribution graphs: `graphs` (one summary row each), `graph_nodes` and `graph_edges`.

Only pruned nodes and edges are stored, as plain rows, so cross-prompt questions ("which features
feed the evil token in more than 10 prompts") are ordinary SQL joins with `token_labels`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import duckdb
import pandas as pd

from emc.analysis.effects import EFFECT_COLUMNS
from emc.store.connection import Store
from emc.store.frames import append_frame, insert_frame
from emc.store.validity import GRAPH_STANDING
from emc.tracing.compact import EDGE_COLUMNS, NODE_COLUMNS
from emc.tracing.pipeline import TracedPrompt
from emc.tracing.quality import LAYER_COLUMNS
from emc.tracing.record import GraphKey, GraphRecord

_COLUMNS = tuple(GraphRecord.model_fields)
# Every table keyed by graph_id, the summary first: a graph is copied or deleted as a whole.
GRAPH_TABLES = (
    "graphs",
    "graph_nodes",
    "graph_edges",
    "feature_effects",
    "feature_stats",
    "graph_layers",
)
_WRITTEN = tuple(c for c in _COLUMNS if c != "created_at")


@dataclass(frozen=True)
class StoredGraph:
    record: GraphRecord
    nodes: pd.DataFrame  # NODE_COLUMNS, by node
    edges: pd.DataFrame  # EDGE_COLUMNS, by target then source


def insert_graph(
    store: Store,
    record: GraphRecord,
    nodes: pd.DataFrame,
    edges: pd.DataFrame,
    effects: pd.DataFrame | None = None,
    stats: pd.DataFrame | None = None,
    layers: pd.DataFrame | None = None,
) -> float:
    """Write a graph and its rows in one transaction, replacing an earlier graph with its id.

    `effects` (EFFECT_COLUMNS), `stats` (per layer and feature) and `layers` (LAYER_COLUMNS) are
    the graph's analysis rows, written with it so that a graph never exists without them.

    The time spent here is added to `storage_seconds`, so it covers the write too; returns the
    stored value.
    """
    started = time.perf_counter()
    _check_columns("nodes", nodes, NODE_COLUMNS)
    _check_columns("edges", edges, EDGE_COLUMNS)
    graph_id = record.graph_id
    with store.write() as conn:
        _delete_graph(conn, graph_id)
        insert_frame(
            conn, "graph_nodes", _with_id(nodes, graph_id), ["graph_id", "node"], update=False
        )
        append_frame(conn, "graph_edges", _with_id(edges, graph_id))
        if effects is not None:
            _check_columns("effects", effects, EFFECT_COLUMNS)
            append_frame(conn, "feature_effects", _with_id(effects, graph_id))
        if stats is not None:
            append_frame(conn, "feature_stats", _with_id(stats, graph_id))
        if layers is not None:
            _check_columns("layers", layers, LAYER_COLUMNS)
            append_frame(conn, "graph_layers", _with_id(layers, graph_id))
        spent = time.perf_counter() - started
        storage_seconds = (record.storage_seconds or 0.0) + spent
        _write_record(conn, record.model_copy(update={"storage_seconds": storage_seconds}))
    return storage_seconds


def insert_traced(store: Store, traced: TracedPrompt) -> float:
    """`insert_graph` with everything `trace_prompt` made: record, rows, effects and stats."""
    compact = traced.compact
    return insert_graph(
        store,
        traced.record,
        compact.nodes,
        compact.edges,
        traced.effects,
        traced.stats,
        traced.layers,
    )


def record_failed_graph(
    store: Store, key: GraphKey, input_ids: Sequence[int], run_id: str, error: str
) -> None:
    """Store an item's failure; an earlier graph with the same id (and its rows) is replaced."""
    with store.write() as conn:
        _delete_graph(conn, key.graph_id)
        _write_record(conn, GraphRecord.failed(key, list(input_ids), run_id, error))


def graph_ids_done(store: Store, model_id: str, include_failed: bool = False) -> set[str]:
    """Graphs of this model a re-run can skip: the successful ones (and failed, if asked)."""
    statuses = ["ok", "failed"] if include_failed else ["ok"]
    with store.read() as conn:
        rows = conn.execute(
            "SELECT graph_id FROM graphs WHERE model_id = ? AND list_contains(?, status)",
            [model_id, statuses],
        ).fetchall()
    return {r[0] for r in rows}


def load_graph_rows(store: Store, graph_id: str) -> StoredGraph | None:
    with store.read() as conn:
        row = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM graphs WHERE graph_id = ?", [graph_id]
        ).fetchone()
        if row is None:
            return None
        nodes = conn.execute(
            f"SELECT {', '.join(NODE_COLUMNS)} FROM graph_nodes WHERE graph_id = ? ORDER BY node",
            [graph_id],
        ).df()
        edges = conn.execute(
            f"SELECT {', '.join(EDGE_COLUMNS)} FROM graph_edges WHERE graph_id = ? "
            "ORDER BY target, source",
            [graph_id],
        ).df()
    return StoredGraph(_to_record(row), nodes, edges)


def list_graphs(
    store: Store, model_id: str | None = None, prompt_id: str | None = None
) -> list[GraphRecord]:
    """Graph summaries, newest first, optionally of one model and/or one prompt."""
    where, params = [], []
    for column, value in (("model_id", model_id), ("prompt_id", prompt_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM graphs {clause} ORDER BY created_at DESC, graph_id",
            params,
        ).fetchall()
    return [_to_record(row) for row in rows]


def graphs_overview(store: Store, prompt_ids: Sequence[str] | None = None) -> pd.DataFrame:
    """One line per graph for people: prompt, model role, status, scores, sizes, flags (stale:
    traced for labels that are no longer the prompt's; rejected: a person rejected the prompt)."""
    where = "WHERE list_contains(?, g.prompt_id)" if prompt_ids is not None else ""
    params = [list(prompt_ids)] if prompt_ids is not None else []
    with store.read() as conn:
        return conn.execute(
            "SELECT g.prompt_id, coalesce(m.role, '?') AS model, g.targets, g.status, "
            "round(g.replacement, 3) AS replacement, round(g.completeness, 3) AS completeness, "
            "round(g.error_score_ratio, 3) AS error_share, g.kept_features AS features, "
            "g.kept_edges AS edges, g.logit_mismatch_exceeds AS logit_mismatch, "
            "s.stale AND g.status = 'ok' AS stale, s.rejected, "
            "round(g.seconds, 2) AS seconds, g.error "
            f"FROM graphs g LEFT JOIN models m USING (model_id) "
            f"JOIN ({GRAPH_STANDING}) s USING (graph_id) {where} "
            "ORDER BY g.prompt_id, m.role DESC, g.targets, s.stale, g.created_at DESC",
            params,
        ).df()


def copy_graphs(store: Store, target: Store, graph_ids: Sequence[str] | None = None) -> int:
    """Copy graphs (summary, nodes, edges) into another store, e.g. to share them.

    One transaction writes them all, so the copy is packed as tightly as DuckDB compresses;
    returns how many graphs were copied.
    """
    ids = list(graph_ids) if graph_ids is not None else None
    where = "WHERE list_contains(?, graph_id)" if ids is not None else ""
    params = [ids] if ids is not None else []
    with target.write() as conn, _attached(conn, store, "source"):
        for table in GRAPH_TABLES:
            conn.execute(f"INSERT INTO {table} SELECT * FROM source.{table} {where}", params)
        copied = conn.execute(f"SELECT count(*) FROM source.graphs {where}", params)
        return copied.fetchall()[0][0]


def _delete_graph(conn: duckdb.DuckDBPyConnection, graph_id: str) -> None:
    # Node and edge tables have no index but their primary keys; look at the small summary
    # table first so a new graph (the usual case) costs no scan of the large ones.
    # fetchall, not fetchone: an unfinished result blocks registering the frames that follow.
    exists = conn.execute("SELECT 1 FROM graphs WHERE graph_id = ?", [graph_id]).fetchall()
    if not exists:
        return
    for table in GRAPH_TABLES[::-1]:
        conn.execute(f"DELETE FROM {table} WHERE graph_id = ?", [graph_id])


def _write_record(conn: duckdb.DuckDBPyConnection, record: GraphRecord) -> None:
    values = record.model_dump(include=set(_WRITTEN))
    values["params"] = json.dumps(values["params"], sort_keys=True)
    frame = pd.DataFrame([values], columns=list(_WRITTEN))
    insert_frame(conn, "graphs", frame, ["graph_id"], update=True)


def _with_id(frame: pd.DataFrame, graph_id: str) -> pd.DataFrame:
    return frame.assign(graph_id=graph_id)[["graph_id", *frame.columns]]


def _check_columns(name: str, frame: pd.DataFrame, expected: Sequence[str]) -> None:
    if tuple(frame.columns) != tuple(expected):
        raise ValueError(f"{name} columns {list(frame.columns)} != {list(expected)}")


def _to_record(row: tuple[Any, ...]) -> GraphRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["params"] = json.loads(values["params"]) if values["params"] else {}
    return GraphRecord.model_validate(values)


def replicate_graphs(store: Store, target: Store, copies: int) -> int:
    """Copy every ok graph `copies` times into `target`, each copy under new graph and prompt ids.

    For scale tests and benchmarks: real rows at a size no CPU run could trace. Returns how many
    graphs the target holds afterwards.
    """
    ok = "graph_id IN (SELECT graph_id FROM source.graphs WHERE status = 'ok')"
    with target.write() as conn, _attached(conn, store, "source"):
        conn.execute("INSERT INTO models SELECT * FROM source.models ON CONFLICT DO NOTHING")
        for table in GRAPH_TABLES:
            renamed = ["graph_id || '-' || c AS graph_id"]
            if table == "graphs":
                renamed.append("prompt_id || '-' || c AS prompt_id")
            conn.execute(
                f"INSERT INTO {table} SELECT t.* REPLACE ({', '.join(renamed)}) "
                f"FROM source.{table} t, range({copies}) AS r(c) WHERE t.{ok}"
            )
        return conn.execute("SELECT count(*) FROM graphs").fetchall()[0][0]


@contextmanager
def _attached(conn: duckdb.DuckDBPyConnection, store: Store, alias: str) -> Iterator[None]:
    """Another store attached read-only under `alias` for the length of the block."""
    store.ensure_schema()
    quoted = str(store.path).replace("'", "''")
    conn.execute(f"ATTACH '{quoted}' AS {alias} (READ_ONLY)")
    try:
        yield
    finally:
        conn.execute(f"DETACH {alias}")
