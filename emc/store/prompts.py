"""The `prompts` table."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pandas as pd

from emc.pivotal.prompts import PromptRecord
from emc.store.connection import Store
from emc.store.frames import insert_frame

_COLUMNS = tuple(PromptRecord.model_fields)


def insert_prompts(store: Store, prompts: Sequence[PromptRecord], run_id: str | None) -> int:
    """Add prompts; ones already stored (same id) are kept as they were. Returns how many new."""
    frame = pd.DataFrame(
        [
            {**p.model_dump(), "meta": json.dumps(p.meta, default=str), "run_id": run_id}
            for p in prompts
        ],
        columns=[*_COLUMNS, "run_id"],
    )
    with store.write() as conn:
        return insert_frame(conn, "prompts", frame, key=["prompt_id"], update=False)


def get_prompts(store: Store, prompt_ids: Iterable[str] | None = None) -> list[PromptRecord]:
    where, params = "", []
    if prompt_ids is not None:
        params = [list(prompt_ids)]
        where = "WHERE list_contains(?, prompt_id)"
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM prompts {where} ORDER BY created_at, prompt_id",
            params,
        ).fetchall()
    records = []
    for row in rows:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["meta"] = json.loads(values["meta"]) if values["meta"] else {}
        records.append(PromptRecord.model_validate(values))
    return records


def stored_prompt_ids(store: Store) -> set[str]:
    with store.read() as conn:
        return {row[0] for row in conn.execute("SELECT prompt_id FROM prompts").fetchall()}


def require_stored_prompts(store: Store, prompt_ids: Sequence[str]) -> None:
    """Raise ValueError naming the prompt ids asked for that the store does not hold."""
    unknown = sorted(set(prompt_ids) - stored_prompt_ids(store))
    if unknown:
        raise ValueError(f"unknown prompt ids: {', '.join(unknown)}")
