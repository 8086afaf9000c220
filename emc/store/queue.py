"""The `review_queue` table: flagged prompts waiting for a person.

States: pending -> in_review -> done | rejected. A claim takes a lease so two reviewers never
work on one item; an expired lease makes the item claimable again.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
from pydantic import BaseModel

from emc.store.connection import Store
from emc.store.validity import REJECTED_PROMPTS


class QueueItem(BaseModel):
    prompt_id: str
    priority: float
    reason: str
    judgement_id: str | None = None


def enqueue(store: Store, items: Sequence[QueueItem], run_id: str | None) -> int:
    """Add flagged prompts as pending; a pending item gets the newer priority and judgement.

    Items already reviewed (done, rejected) or being reviewed are left alone. Returns how many
    items are new in the queue.
    """
    if not items:
        return 0
    latest = {item.prompt_id: item for item in items}
    frame = pd.DataFrame([{**i.model_dump(), "run_id": run_id} for i in latest.values()])
    with store.write() as conn:
        conn.register("_incoming", frame)
        new = conn.execute(
            "SELECT count(*) FROM _incoming i "
            "WHERE NOT EXISTS (SELECT 1 FROM review_queue q WHERE q.prompt_id = i.prompt_id)"
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO review_queue (prompt_id, state, priority, reason, judgement_id, run_id) "
            "SELECT prompt_id, 'pending', priority, reason, judgement_id, run_id FROM _incoming "
            "ON CONFLICT (prompt_id) DO UPDATE SET "
            "priority = CASE WHEN review_queue.state = 'pending' "
            "  THEN excluded.priority ELSE review_queue.priority END, "
            "reason = CASE WHEN review_queue.state = 'pending' "
            "  THEN excluded.reason ELSE review_queue.reason END, "
            "judgement_id = CASE WHEN review_queue.state = 'pending' "
            "  THEN excluded.judgement_id ELSE review_queue.judgement_id END, "
            "updated_at = now()"
        )
        conn.unregister("_incoming")
    return new


def queue_counts(store: Store) -> dict[str, int]:
    with store.read() as conn:
        rows = conn.execute("SELECT state, count(*) FROM review_queue GROUP BY state").fetchall()
    counts = {"pending": 0, "in_review": 0, "done": 0, "rejected": 0}
    counts.update({state: n for state, n in rows})
    return counts


def list_queue(store: Store, state: str | None = None) -> pd.DataFrame:
    where, params = ("WHERE state = ?", [state]) if state else ("", [])
    with store.read() as conn:
        return conn.execute(
            f"SELECT prompt_id, state, priority, reason, judgement_id, claimed_by, "
            f"lease_expires_at, updated_at FROM review_queue {where} "
            f"ORDER BY priority DESC, prompt_id",
            params,
        ).df()


def queued_prompt_ids(store: Store, reviewed_only: bool) -> list[str]:
    """Prompts worth tracing, highest priority first: reviewed (done), or all but rejected.

    A prompt whose newest review is a rejection is left out whatever its queue state (an
    imported rejection leaves the queue alone).
    """
    states = ["done"] if reviewed_only else ["pending", "in_review", "done"]
    with store.read() as conn:
        rows = conn.execute(
            "SELECT prompt_id FROM review_queue WHERE list_contains(?, state) "
            f"AND prompt_id NOT IN (SELECT prompt_id FROM ({REJECTED_PROMPTS})) "
            "ORDER BY priority DESC, prompt_id",
            [states],
        ).fetchall()
    return [r[0] for r in rows]
