"""The `organism_builds` table: each built model organism with its recipe and report."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from emc.store.connection import Store


class OrganismBuildRow(BaseModel):
    recipe_hash: str
    variant: str
    path: str
    run_id: str
    build_seconds: float | None
    recipe: dict[str, Any]
    report: dict[str, Any]
    built_at: datetime | None = None


def upsert_organism_build(store: Store, row: OrganismBuildRow) -> None:
    """A rebuild of the same recipe (after corruption) replaces the earlier row."""
    with store.write() as conn:
        conn.execute(
            "INSERT INTO organism_builds "
            "(recipe_hash, variant, path, run_id, build_seconds, recipe, report) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (recipe_hash) DO UPDATE SET "
            "variant = excluded.variant, path = excluded.path, run_id = excluded.run_id, "
            "built_at = now(), build_seconds = excluded.build_seconds, "
            "recipe = excluded.recipe, report = excluded.report",
            [
                row.recipe_hash,
                row.variant,
                row.path,
                row.run_id,
                row.build_seconds,
                json.dumps(row.recipe),
                json.dumps(row.report),
            ],
        )


def list_organism_builds(store: Store) -> list[OrganismBuildRow]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT recipe_hash, variant, path, run_id, build_seconds, recipe, report, built_at "
            "FROM organism_builds ORDER BY built_at DESC"
        ).fetchall()
    return [
        OrganismBuildRow(
            recipe_hash=r[0],
            variant=r[1],
            path=r[2],
            run_id=r[3],
            build_seconds=r[4],
            recipe=json.loads(r[5]),
            report=json.loads(r[6]),
            built_at=r[7],
        )
        for r in rows
    ]
