"""Runs: every flow and CLI run, its status, code version, parameters and summary."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store
from emc.store import RunRecord, list_runs

STATUSES = ["completed", "failed", "running"]


def run_frame(records: Sequence[RunRecord]) -> pd.DataFrame:
    """One row per run: id, kind, name, status, start, seconds taken, code version, error."""
    return pd.DataFrame(
        [
            {
                "run": r.run_id,
                "kind": r.kind,
                "name": r.name,
                "status": r.status,
                "started": r.started_at,
                "seconds": (
                    (r.finished_at - r.started_at).total_seconds() if r.finished_at else None
                ),
                "code": (r.code_revision or "?")[:8] + ("+dirty" if r.code_dirty else ""),
                "error": r.error or "",
            }
            for r in records
        ],
        columns=["run", "kind", "name", "status", "started", "seconds", "code", "error"],
    )


def render() -> None:
    st.title("Runs")
    store = existing_store("Run `emc demo` to create one.")

    records = list_runs(store, limit=500)
    frame = run_frame(records)
    counts = frame["status"].value_counts()
    left, middle, right = st.columns(3)
    left.metric("Completed", int(counts.get("completed", 0)))
    middle.metric("Failed", int(counts.get("failed", 0)))
    right.metric("Running", int(counts.get("running", 0)))

    status_filter = st.multiselect("Status", STATUSES, default=STATUSES)
    shown = frame[frame["status"].isin(status_filter)]
    st.dataframe(shown, width="stretch", hide_index=True)
    if not shown.empty:
        chosen = st.selectbox("Run details", shown["run"].tolist())
        show_run(next(r for r in records if r.run_id == chosen))


def show_run(record: RunRecord) -> None:
    st.subheader(record.run_id)
    if record.error:
        st.error(record.error)
    details, parameters = st.columns(2)
    details.json(
        {
            "summary": record.summary,
            "code_revision": record.code_revision,
            "code_dirty": record.code_dirty,
            "flow_run_id": record.flow_run_id,
            "host": record.host,
            "packages": record.package_versions,
        }
    )
    parameters.json(record.params)
