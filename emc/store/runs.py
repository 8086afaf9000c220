"""The `runs` table: one row for every flow or CLI run, with code version and parameters."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from emc.store.connection import Store

RunStatus = Literal["running", "completed", "failed"]


class RunRecord(BaseModel):
    run_id: str
    kind: Literal["flow", "cli"]
    name: str
    status: RunStatus
    started_at: datetime
    finished_at: datetime | None = None
    params: dict[str, Any] = {}
    code_revision: str | None = None
    code_dirty: bool | None = None
    emc_version: str
    package_versions: dict[str, str] = {}
    host: str | None = None
    flow_run_id: str | None = None
    error: str | None = None
    summary: dict[str, Any] | None = None
    pid: int | None = None  # the process running it, on `host`


_COLUMNS = tuple(RunRecord.model_fields)
_JSON_COLUMNS = {"params", "package_versions", "summary"}


def insert_run(store: Store, run: RunRecord) -> None:
    row = run.model_dump()
    values = [json.dumps(row[c], default=str) if c in _JSON_COLUMNS else row[c] for c in _COLUMNS]
    placeholders = ", ".join("?" for _ in _COLUMNS)
    with store.write() as conn:
        conn.execute(f"INSERT INTO runs ({', '.join(_COLUMNS)}) VALUES ({placeholders})", values)


def finish_run(
    store: Store,
    run_id: str,
    status: RunStatus,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
) -> None:
    with store.write() as conn:
        updated = conn.execute(
            # No summary given: keep the progress the run stored as it went (update_run_summary).
            "UPDATE runs SET status = ?, finished_at = now(), error = ?, "
            "summary = coalesce(?, summary) WHERE run_id = ? RETURNING run_id",
            [status, error, json.dumps(summary, default=str) if summary else None, run_id],
        ).fetchall()
    if not updated:
        raise KeyError(f"no run with id {run_id!r}")


def update_run_summary(store: Store, run_id: str, summary: dict[str, Any]) -> None:
    """Store a running run's progress so far (its summary), e.g. after each round."""
    with store.write() as conn:
        conn.execute(
            "UPDATE runs SET summary = ? WHERE run_id = ?",
            [json.dumps(summary, default=str), run_id],
        )


def fail_dead_runs(store: Store, host: str, alive: Callable[[int], bool]) -> list[str]:
    """Mark failed the `running` rows of `host` whose process is gone; returns their run ids.

    A run killed with -9 never gets to write its end: this is how its row learns it.
    """
    with store.read() as conn:
        rows = conn.execute(
            "SELECT run_id, pid FROM runs WHERE status = 'running' AND host = ? "
            "AND pid IS NOT NULL",
            [host],
        ).fetchall()
    dead = [(run_id, pid) for run_id, pid in rows if not alive(pid)]
    if not dead:
        return []
    with store.write() as conn:
        for run_id, pid in dead:
            conn.execute(
                "UPDATE runs SET status = 'failed', finished_at = now(), error = ? "
                "WHERE run_id = ? AND status = 'running'",
                [f"process {pid} died (killed?)", run_id],
            )
    return [run_id for run_id, _ in dead]


def list_runs(store: Store, limit: int = 100) -> list[RunRecord]:
    with store.read() as conn:
        cursor = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs ORDER BY started_at DESC LIMIT ?", [limit]
        )
        rows = cursor.fetchall()
    return [_to_record(row) for row in rows]


def latest_runs(
    store: Store, name: str, exclude: str | None = None, limit: int = 50
) -> list[RunRecord]:
    """The most recent runs called `name`, newest first (`exclude`: a run id to leave out)."""
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE name = ? AND run_id <> ? "
            "ORDER BY started_at DESC LIMIT ?",
            [name, exclude or "", limit],
        ).fetchall()
    return [_to_record(row) for row in rows]


def latest_run_with_params(
    store: Store, name: str, params: dict[str, Any], exclude: str | None = None
) -> RunRecord | None:
    """The most recent run called `name` whose parameters equal `params` (as stored: JSON)."""
    stored = json.loads(json.dumps(params, default=str))
    return next((r for r in latest_runs(store, name, exclude) if r.params == stored), None)


def get_run(store: Store, run_id: str) -> RunRecord | None:
    with store.read() as conn:
        row = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE run_id = ?", [run_id]
        ).fetchone()
    return _to_record(row) if row else None


def _to_record(row: tuple[Any, ...]) -> RunRecord:
    values = dict(zip(_COLUMNS, row, strict=True))
    for column in _JSON_COLUMNS:
        if values[column] is not None:
            values[column] = json.loads(values[column])
    values["params"] = values["params"] or {}
    values["package_versions"] = values["package_versions"] or {}
    return RunRecord.model_validate(values)


# Parent runs: a flow that runs other flows as subflows (the pipeline) is their parent. Each
# subflow records its own row; `parent_run_id` (migration 18) ties it to the parent's.


def set_parent_run(store: Store, parent_run_id: str, run_ids: Sequence[str]) -> None:
    """Record `parent_run_id` as the parent of the runs `run_ids`."""
    if not run_ids:
        return
    with store.write() as conn:
        conn.execute(
            "UPDATE runs SET parent_run_id = ? WHERE list_contains(?, run_id) AND run_id <> ?",
            [parent_run_id, list(run_ids), parent_run_id],
        )


def adopt_process_runs(
    store: Store, parent_run_id: str, since: datetime | None = None
) -> list[str]:
    """Make `parent_run_id` the parent of every run its own process started since `since`
    (default: the parent's start) and that has no parent yet; returns their ids.

    Subflows run in their parent flow's process, so they share its host and pid: this finds
    them from the store alone, with no Prefect API.
    """
    with store.write() as conn:
        rows = conn.execute(
            "UPDATE runs SET parent_run_id = p.run_id FROM runs p "
            "WHERE p.run_id = ? AND runs.host = p.host AND runs.pid = p.pid "
            "AND runs.run_id <> p.run_id AND runs.parent_run_id IS NULL "
            "AND runs.started_at >= coalesce(?::TIMESTAMPTZ, p.started_at) "
            "RETURNING runs.run_id",
            [parent_run_id, since],
        ).fetchall()
    return sorted(row[0] for row in rows)


@contextmanager
def adopting_runs(
    store: Store, parent_run_id: str, since: datetime | None = None
) -> Iterator[None]:
    """`adopt_process_runs` when the block ends, however it ends: a flow wraps the part that
    runs its subflows (after its own row exists), so a failed run still lists the stages it ran.
    """
    try:
        yield
    finally:
        adopt_process_runs(store, parent_run_id, since)


def run_parents(store: Store) -> dict[str, str]:
    """Run id -> its parent's run id, for every run that has a parent."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT run_id, parent_run_id FROM runs WHERE parent_run_id IS NOT NULL"
        ).fetchall()
    return dict(rows)


def child_runs(store: Store, parent_run_id: str) -> list[RunRecord]:
    """The runs `parent_run_id` ran, in the order they started."""
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM runs WHERE parent_run_id = ? "
            "ORDER BY started_at, run_id",
            [parent_run_id],
        ).fetchall()
    return [_to_record(row) for row in rows]
