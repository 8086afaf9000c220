"""Record a run (flow or CLI invocation) in the store for as long as it executes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal

import emc
from emc.processes import process_alive
from emc.provenance import code_version, host_name, package_versions
from emc.store import RunRecord, Store, finish_run, insert_run
from emc.store.runs import fail_dead_runs


def new_run_id(kind: str, name: str) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    return f"{kind}-{name}-{stamp}-{uuid.uuid4().hex[:6]}"


@contextmanager
def recorded_run(
    store: Store,
    kind: Literal["flow", "cli"],
    name: str,
    params: dict[str, Any],
    flow_run_id: str | None = None,
) -> Iterator[RunRecord]:
    """Insert a `running` row, then mark it completed or failed (with the error) on exit.

    The caller may put a JSON-able summary into `run.summary`; it is stored when the run ends.
    The row records this process's PID and host; first, rows of this host left `running` by a
    process that is gone (killed with -9, say) are marked failed: "process N died (killed?)".
    """
    fail_dead_runs(store, host_name(), process_alive)
    version = code_version()
    run = RunRecord(
        run_id=new_run_id(kind, name),
        kind=kind,
        name=name,
        status="running",
        started_at=datetime.now(UTC),
        params=params,
        code_revision=version.revision,
        code_dirty=version.dirty,
        emc_version=emc.__version__,
        package_versions=package_versions(),
        host=host_name(),
        flow_run_id=flow_run_id,
        pid=os.getpid(),
    )
    insert_run(store, run)
    try:
        yield run
    except BaseException as exc:
        finish_run(store, run.run_id, "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finish_run(store, run.run_id, "completed", summary=run.summary)
