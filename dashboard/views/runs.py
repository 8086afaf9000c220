"""Runs: every flow and CLI run, its status, code version, parameters and summary."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard.data import current_store
from emc.store import list_runs

st.title("Runs")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. Run `emc demo` to create one.")
    st.stop()

records = list_runs(store, limit=500)
frame = pd.DataFrame(
    [
        {
            "run": r.run_id,
            "kind": r.kind,
            "name": r.name,
            "status": r.status,
            "started": r.started_at,
            "seconds": (r.finished_at - r.started_at).total_seconds() if r.finished_at else None,
            "code": (r.code_revision or "?")[:8] + ("+dirty" if r.code_dirty else ""),
            "error": r.error or "",
        }
        for r in records
    ],
    columns=["run", "kind", "name", "status", "started", "seconds", "code", "error"],
)

counts = frame["status"].value_counts()
left, middle, right = st.columns(3)
left.metric("Completed", int(counts.get("completed", 0)))
middle.metric("Failed", int(counts.get("failed", 0)))
right.metric("Running", int(counts.get("running", 0)))

status_filter = st.multiselect(
    "Status", ["completed", "failed", "running"], default=["completed", "failed", "running"]
)
shown = frame[frame["status"].isin(status_filter)]
st.dataframe(shown, width="stretch", hide_index=True)

if not shown.empty:
    chosen = st.selectbox("Run details", shown["run"].tolist())
    record = next(r for r in records if r.run_id == chosen)
    st.subheader(chosen)
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
