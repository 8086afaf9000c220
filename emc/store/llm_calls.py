"""The `llm_calls` table: every call to a generator or judge LLM, with its raw response."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import duckdb
import pandas as pd
from pydantic import BaseModel

from emc.store.connection import Store
from emc.store.frames import insert_frame


class LLMCallRow(BaseModel):
    call_id: str
    run_id: str | None
    purpose: str
    model: str
    base_url: str | None
    request: dict[str, Any]
    response_raw: str | None
    status: str
    error: str | None
    latency_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    attempts: int
    created_at: datetime | None = None


_COLUMNS = tuple(c for c in LLMCallRow.model_fields if c != "created_at")


def insert_llm_calls(store: Store, rows: Sequence[LLMCallRow]) -> None:
    """Idempotent on call_id, so a retried task does not record a call twice."""
    if not rows:
        return
    with store.write() as conn:
        write_llm_calls(conn, rows)


def write_llm_calls(conn: duckdb.DuckDBPyConnection, rows: Sequence[LLMCallRow]) -> None:
    """Inside a caller's transaction (judgements are stored together with their calls)."""
    frame = pd.DataFrame(
        [
            {**row.model_dump(include=set(_COLUMNS)), "request": json.dumps(row.request)}
            for row in rows
        ],
        columns=list(_COLUMNS),
    )
    insert_frame(conn, "llm_calls", frame, ["call_id"], update=False)


def list_llm_calls(store: Store, run_id: str | None = None) -> list[LLMCallRow]:
    where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
    columns = (*_COLUMNS, "created_at")
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(columns)} FROM llm_calls {where} ORDER BY created_at", params
        ).fetchall()
    records = []
    for row in rows:
        values = dict(zip(columns, row, strict=True))
        values["request"] = json.loads(values["request"])
        records.append(LLMCallRow.model_validate(values))
    return records
