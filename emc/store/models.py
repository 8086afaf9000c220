"""The `models` table: every loaded model, named by a readable slug plus a fingerprint."""

from __future__ import annotations

from pydantic import BaseModel

from emc.store.connection import Store


class ModelRow(BaseModel):
    model_id: str
    slug: str
    fingerprint: str
    role: str
    base_ref: str
    adapter_ref: str | None
    merged: bool
    transcoders_ref: str
    backend: str
    dtype: str
    device: str
    first_run_id: str


_COLUMNS = tuple(ModelRow.model_fields)


def upsert_model(store: Store, row: ModelRow) -> None:
    """Insert once; a model seen again keeps the run that first loaded it."""
    placeholders = ", ".join("?" for _ in _COLUMNS)
    with store.write() as conn:
        conn.execute(
            f"INSERT INTO models ({', '.join(_COLUMNS)}) VALUES ({placeholders}) "
            "ON CONFLICT (model_id) DO NOTHING",
            [getattr(row, column) for column in _COLUMNS],
        )


def list_models(store: Store) -> list[ModelRow]:
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM models ORDER BY created_at"
        ).fetchall()
    return [ModelRow.model_validate(dict(zip(_COLUMNS, row, strict=True))) for row in rows]
