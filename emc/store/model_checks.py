"""The `model_checks` table: a probe forward pass per model, the first flow's output."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from emc.store.connection import Store


class ModelCheckRecord(BaseModel):
    run_id: str
    model_id: str
    prompt: str
    input_ids: list[int]
    top_token_ids: list[int]
    top_tokens: list[str]
    top_probs: list[float]
    dtype: str
    backend: str
    status: str  # ok | failed
    error: str | None = None


_COLUMNS = tuple(ModelCheckRecord.model_fields)


def insert_model_checks(store: Store, records: Sequence[ModelCheckRecord]) -> None:
    """Idempotent per (run, model, prompt): a retried task overwrites its own earlier row."""
    if not records:
        return
    placeholders = ", ".join("?" for _ in _COLUMNS)
    updates = ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[3:])
    with store.write() as conn:
        conn.executemany(
            f"INSERT INTO model_checks ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
            f"ON CONFLICT (run_id, model_id, prompt) DO UPDATE SET {updates}",
            [[getattr(r, c) for c in _COLUMNS] for r in _dedupe(records)],
        )


def list_model_checks(store: Store, run_id: str | None = None) -> list[ModelCheckRecord]:
    where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM model_checks {where} ORDER BY created_at, model_id",
            params,
        ).fetchall()
    return [ModelCheckRecord.model_validate(dict(zip(_COLUMNS, r, strict=True))) for r in rows]


def _dedupe(records: Sequence[ModelCheckRecord]) -> list[ModelCheckRecord]:
    # DuckDB silently collapses duplicate keys inside one statement; keep the last explicitly.
    latest = {(r.run_id, r.model_id, r.prompt): r for r in records}
    return list(latest.values())
