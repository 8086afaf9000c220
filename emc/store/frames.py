"""Bulk writes through DataFrames: DuckDB ingests a registered frame ~100x faster than
executemany, which matters for logits and graph rows."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress

import duckdb
import pandas as pd


def insert_frame(
    conn: duckdb.DuckDBPyConnection,
    table: str,
    frame: pd.DataFrame,
    key: Sequence[str],
    update: bool,
) -> int:
    """Insert rows, de-duplicated on `key` (last wins); on conflict update or keep the old row.

    Returns how many rows were new. DuckDB silently collapses duplicate keys inside one
    statement, so the frame is de-duplicated here explicitly.
    """
    if frame.empty:
        return 0
    frame = frame.drop_duplicates(subset=list(key), keep="last")
    columns = list(frame.columns)
    key_match = " AND ".join(f"t.{k} = f.{k}" for k in key)
    name = f"_frame_{table}"
    with _registered(conn, name, frame):
        existing = conn.execute(
            f"SELECT count(*) FROM {name} f "
            f"WHERE EXISTS (SELECT 1 FROM {table} t WHERE {key_match})"
        ).fetchone()[0]
        if update:
            assignments = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
            conflict = f"DO UPDATE SET {assignments}" if assignments else "DO NOTHING"
        else:
            conflict = "DO NOTHING"
        conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {name} "
            f"ON CONFLICT ({', '.join(key)}) {conflict}"
        )
    return len(frame) - existing


def append_frame(conn: duckdb.DuckDBPyConnection, table: str, frame: pd.DataFrame) -> None:
    """Insert every row of `frame` (its columns named as the table's), with no key check.

    For tables without a key (graph rows, per-prompt measurements): the caller has deleted
    whatever the rows replace, in the same transaction.
    """
    name = f"_append_{table}"
    with _registered(conn, name, frame):
        columns = ", ".join(frame.columns)
        conn.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {name}")


@contextmanager
def _registered(conn: duckdb.DuckDBPyConnection, name: str, frame: pd.DataFrame) -> Iterator[None]:
    """`frame` visible to SQL as `name` for the block.

    After a failed statement DuckDB refuses every further call in the transaction, unregister
    included ("Current transaction is aborted"); that refusal must not replace the statement's
    own error (a NOT NULL or conversion failure naming the column), so it is dropped.
    """
    conn.register(name, frame)
    try:
        yield
    except BaseException:
        with suppress(duckdb.Error):
            conn.unregister(name)
        raise
    conn.unregister(name)
