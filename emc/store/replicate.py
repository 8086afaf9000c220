"""Replicas of real stored graphs, for scale benchmarks (`benchmarks/store_scale.py`).

A store that holds a few real base/adapted graph pairs is copied into another store, then the
rows of each traced prompt (a prompt with at least one successful graph pair) are copied again
under new ids, as many times as asked: every table keyed by the prompt (the prompt itself, its
next tokens, logits, divergences, judgement, labels, queue item, reviews, graphs and their rows,
analysis rows, continuations and their scores) gets a copy in which each id that names a row of
that prompt (`prompt_id`, `graph_id`, `judgement_id`, `review_id`, `ablation_id`,
`generation_id`) ends in `-r<copy>`. So a replica has the same rows per graph and per prompt as
the real one, and every join the dashboard makes finds its rows. Everything not keyed by a prompt
(runs, models, LoRA geometry, feature cards and labels, the EM evaluation's answers) is copied
once.

Also here: a stored graph read back as the `TracedPrompt` that made it (to write bundles and
time the local write path with real rows), row counts, the number of graph pairs, and a
CHECKPOINT, so that file sizes count every committed row and no write-ahead log.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb

from emc.analysis.effects import EFFECT_COLUMNS
from emc.store.connection import Store
from emc.store.graph_pairs import PAIR_JOIN
from emc.store.graphs import load_graph_rows
from emc.tracing.compact import EDGE_COLUMNS, NODE_COLUMNS, CompactGraph, GraphTarget
from emc.tracing.pipeline import TracedPrompt
from emc.tracing.quality import LAYER_COLUMNS, GraphQuality, NodeCounts

# Columns whose value names one prompt's row: a replica's get `-r<copy>` appended.
ID_COLUMNS = ("prompt_id", "graph_id", "judgement_id", "review_id", "ablation_id", "generation_id")
_NOT_COPIED = ("schema_version",)  # written by the target's own migrations
_UNITS = "_replica_units"  # temp tables of the write connection: which copies to make


def copy_all(source: Store, target: Store) -> None:
    """Every row of `source` into `target` (a new store), table by table, in one transaction."""
    with target.write() as conn, _attached(conn, source) as tables:
        for table in tables:
            conn.execute(f'INSERT INTO "{table}" SELECT * FROM source."{table}"')


def traced_prompt_ids(store: Store) -> list[str]:
    """Prompts with at least one successful base/adapted graph pair, in a stable order."""
    with store.read() as conn:
        rows = conn.execute(f"SELECT DISTINCT b.prompt_id {PAIR_JOIN} ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def add_replicas(source: Store, target: Store, start: int, stop: int) -> None:
    """Copy traced prompts of `source` into `target` as replica units `start` to `stop - 1`.

    Unit u is traced prompt `u % n` (n traced prompts, `traced_prompt_ids` order), copy `u // n`:
    units below n are the originals themselves (`copy_all`), so `start` must be at least n. One
    transaction writes them all.
    """
    traced = traced_prompt_ids(source)
    n = len(traced)
    if n == 0:
        raise ValueError(f"{source.path} holds no successful base/adapted graph pair")
    if start < n:
        raise ValueError(f"units below {n} are the originals (copy_all); start is {start}")
    with target.write() as conn, _attached(conn, source) as tables:
        conn.execute(
            f"CREATE TEMP TABLE {_UNITS} AS "
            f"SELECT t.prompt_id, u // {n} AS copy FROM range(?, ?) r(u) "
            "JOIN (SELECT unnest(?::VARCHAR[]) AS prompt_id, "
            "      generate_subscripts(?::VARCHAR[], 1) - 1 AS i) t "
            f"ON t.i = u % {n}",
            [start, stop, traced, traced],
        )
        keyed = {  # how a table's rows find their prompt
            "prompt_id": "s.prompt_id = r.prompt_id",
            "graph_id": "s.graph_id IN (SELECT graph_id FROM source.graphs g "
            "WHERE g.prompt_id = r.prompt_id)",
            "generation_id": "s.generation_id IN (SELECT generation_id FROM source.generations "
            "x WHERE x.prompt_id = r.prompt_id)",
        }
        for table in tables:
            columns = _columns(conn, table)
            key = next((k for k in keyed if k in columns), None)
            if key is None:
                continue  # not a prompt's row: copied once, by copy_all
            renamed = ", ".join(
                f"s.{c} || '-r' || r.copy AS {c}" for c in ID_COLUMNS if c in columns
            )
            conn.execute(
                f'INSERT INTO "{table}" SELECT s.* REPLACE ({renamed}) '
                f'FROM source."{table}" s JOIN {_UNITS} r ON {keyed[key]}'
            )
        conn.execute(f"DROP TABLE {_UNITS}")


def stored_traced(store: Store, graph_id: str) -> TracedPrompt:
    """A stored successful graph as the `TracedPrompt` that made it: record, kept nodes and
    edges, effects, statistics and layers, the quality scores from the record. The raw graph's
    agreement with discovery and its side file are not stored, so they are None."""
    stored = load_graph_rows(store, graph_id)
    if stored is None or stored.record.status != "ok":
        raise ValueError(f"{graph_id} is not a successful graph in {store.path}")
    with store.read() as conn:
        effects, layers = (
            conn.execute(
                f"SELECT {', '.join(columns)} FROM {table} WHERE graph_id = ?", [graph_id]
            ).df()
            for table, columns in (
                ("feature_effects", EFFECT_COLUMNS),
                ("graph_layers", LAYER_COLUMNS),
            )
        )
        stats = conn.execute(
            "SELECT * EXCLUDE (graph_id) FROM feature_stats WHERE graph_id = ?", [graph_id]
        ).df()
    record = stored.record
    logits = stored.nodes[stored.nodes["kind"] == "logit"]
    targets = tuple(
        GraphTarget(
            token_id=None if _missing(row["token_id"]) else int(row["token_id"]),
            label=str(row["token"]),
            prob=float(row["prob"]),
        )
        for row in logits.to_dict("records")
    )
    quality = GraphQuality(
        replacement=record.replacement or 0.0,
        completeness=record.completeness or 0.0,
        error_score_mean=record.error_score_mean or 0.0,
        error_score_ratio=record.error_score_ratio or 0.0,
        counts=NodeCounts(
            active_features=record.n_active_features or 0,
            features=record.n_features or 0,
            errors=record.n_errors or 0,
            tokens=record.n_tokens or 0,
            logits=record.n_logits or 0,
        ),
    )
    return TracedPrompt(
        record=record,
        compact=CompactGraph(
            stored.nodes[list(NODE_COLUMNS)], stored.edges[list(EDGE_COLUMNS)], targets
        ),
        quality=quality,
        agreement=None,
        side_file=None,
        effects=effects,
        stats=stats,
        layers=layers,
    )


def row_counts(store: Store) -> dict[str, int]:
    """Rows per table (schema_version left out)."""
    with store.read() as conn:
        tables = _tables(conn, None)
        return {
            t: conn.execute(f'SELECT count(*) FROM "{t}"').fetchall()[0][0]
            for t in tables
            if t not in _NOT_COPIED
        }


def pair_count(store: Store) -> int:
    """Successful base/adapted graph pairs (as `graph_pairs` pairs them, without standing)."""
    with store.read() as conn:
        return conn.execute(f"SELECT count(*) {PAIR_JOIN}").fetchall()[0][0]


def database_size(store: Store) -> dict[str, int]:
    """DuckDB's own account of the file: blocks in use and free (bytes), and the WAL's size."""
    with store.read() as conn:
        block, used, free = conn.execute(
            "SELECT block_size, used_blocks, free_blocks FROM pragma_database_size() "
            "WHERE database_name = current_database()"
        ).fetchall()[0]
    return {"block_bytes": block, "used_bytes": used * block, "free_bytes": free * block}


def checkpoint(store: Store) -> None:
    """Write every committed row into the file itself (and empty the write-ahead log)."""
    store.ensure_schema()
    with store._connect(read_only=False) as conn:
        conn.execute("CHECKPOINT")


def _tables(conn: duckdb.DuckDBPyConnection, catalog: str | None) -> list[str]:
    """Base tables of an attached database, or of the connection's own (None)."""
    rows = conn.execute(
        "SELECT table_name FROM information_schema.tables "
        "WHERE table_catalog = coalesce(?, current_database()) AND table_type = 'BASE TABLE' "
        "ORDER BY table_name",
        [catalog],
    ).fetchall()
    return [r[0] for r in rows]


def _columns(conn: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_catalog = 'source' AND table_name = ?",
        [table],
    ).fetchall()
    return {r[0] for r in rows}


@contextmanager
def _attached(conn: duckdb.DuckDBPyConnection, source: Store) -> Iterator[list[str]]:
    """`source` attached read-only as `source` for the block; yields its tables to copy."""
    source.ensure_schema()
    quoted = str(source.path).replace("'", "''")
    conn.execute(f"ATTACH '{quoted}' AS source (READ_ONLY)")
    try:
        yield [t for t in _tables(conn, "source") if t not in _NOT_COPIED]
    finally:
        conn.execute("DETACH source")


def _missing(value: object) -> bool:
    return value is None or value != value  # NULL, or NaN from a nullable column
