"""Writes for `emc import`: insert-or-ignore everywhere.

Imported records carry ids derived from the files they came from, so importing the same files
twice adds nothing, and a row that is already stored (a label a person changed since, a queue
item someone has claimed) is never overwritten by old files. Each function returns how many
rows were new.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import pandas as pd
from pydantic import BaseModel

from emc.pivotal.judge import Judgement, Label
from emc.pivotal.logits import NextTokens, TokenScore
from emc.pivotal.review import Review
from emc.store.connection import Store
from emc.store.frames import insert_frame
from emc.store.judgements import JUDGEMENT_COLUMNS
from emc.store.queue import QueueItem
from emc.store.reviews import review_row


class LabelRow(BaseModel):
    """One token label as the `token_labels` table holds it."""

    prompt_id: str
    token_id: int
    labeller: str  # judge:<model> | human:<name>
    token: str
    label: Label
    judgement_id: str | None = None
    explanation: str | None = None
    created_at: datetime | None = None  # None: now


def import_next_tokens(store: Store, dists: Sequence[NextTokens], run_id: str) -> int:
    """Next-token rows and their logits; returns how many (prompt, model) pairs were new."""
    next_tokens = pd.DataFrame(
        [{**d.model_dump(exclude={"tokens"}), "run_id": run_id} for d in dists]
    )
    logits = pd.DataFrame(
        [
            {"prompt_id": d.prompt_id, "model_id": d.model_id, **t.model_dump(), "run_id": run_id}
            for d in dists
            for t in d.tokens
        ],
        columns=["prompt_id", "model_id", *TokenScore.model_fields, "run_id"],
    )
    with store.write() as conn:
        new = insert_frame(conn, "next_tokens", next_tokens, ["prompt_id", "model_id"], False)
        insert_frame(conn, "logits", logits, ["prompt_id", "model_id", "token_id"], False)
    return new


def import_judgements(
    store: Store, judgements: Sequence[tuple[Judgement, datetime | None]], run_id: str
) -> int:
    """Judgements with the time the original recorded (now where it recorded none)."""
    rows = pd.DataFrame(
        [
            {
                **j.model_dump(include=set(JUDGEMENT_COLUMNS)),
                "run_id": run_id,
                "created_at": _time(created),
            }
            for j, created in judgements
        ],
        columns=[*JUDGEMENT_COLUMNS, "run_id", "created_at"],
    )
    with store.write() as conn:
        return insert_frame(conn, "judgements", rows, ["judgement_id"], update=False)


def import_token_labels(store: Store, labels: Sequence[LabelRow], run_id: str) -> int:
    with store.write() as conn:
        return _insert_labels(conn, labels, run_id)


def stored_label_keys(store: Store, prompt_ids: Iterable[str]) -> set[tuple[str, int, str]]:
    """(prompt_id, token_id, labeller) of the labels stored for these prompts."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT prompt_id, token_id, labeller FROM token_labels "
            "WHERE list_contains(?, prompt_id)",
            [list(prompt_ids)],
        ).fetchall()
    return {(p, t, labeller) for p, t, labeller in rows}


def stored_review_ids(store: Store, review_ids: Iterable[str]) -> set[str]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT review_id FROM reviews WHERE list_contains(?, review_id)", [list(review_ids)]
        ).fetchall()
    return {row[0] for row in rows}


def import_reviews(
    store: Store, reviews: Sequence[tuple[Review, dict[int, str]]], run_id: str
) -> tuple[int, int]:
    """Reviews and their labels (labeller = the reviewer); returns (new reviews, new labels).

    Like a review saved in the dashboard, a rejection stores no labels.
    """
    rows = pd.DataFrame([review_row(r, run_id) for r, _ in reviews])
    labels = [
        LabelRow(
            prompt_id=r.prompt_id,
            token_id=token_id,
            labeller=r.reviewer,
            token=tokens.get(token_id, ""),
            label=label,
            judgement_id=r.judgement_id,
            explanation=r.explanation or None,
            created_at=r.created_at,
        )
        for r, tokens in reviews
        if r.action != "reject"
        for token_id, label in r.labels.items()
    ]
    with store.write() as conn:
        new_reviews = insert_frame(conn, "reviews", rows, ["review_id"], update=False)
        new_labels = _insert_labels(conn, labels, run_id)
    return new_reviews, new_labels


def import_queue_items(store: Store, items: Sequence[tuple[QueueItem, str]], run_id: str) -> int:
    """Queue items in the state the original left them (pending | done | ...)."""
    rows = pd.DataFrame(
        [{**item.model_dump(), "state": state, "run_id": run_id} for item, state in items],
        columns=[*QueueItem.model_fields, "state", "run_id"],
    )
    with store.write() as conn:
        return insert_frame(conn, "review_queue", rows, ["prompt_id"], update=False)


def _insert_labels(conn, labels: Sequence[LabelRow], run_id: str) -> int:
    frame = pd.DataFrame(
        [
            {**label.model_dump(), "run_id": run_id, "created_at": _time(label.created_at)}
            for label in labels
        ],
        columns=[*LabelRow.model_fields, "run_id"],
    )
    return insert_frame(conn, "token_labels", frame, ["prompt_id", "token_id", "labeller"], False)


def _time(value: datetime | None) -> datetime:
    # created_at is NOT NULL; an explicit NULL would not fall back to the column default.
    return value or datetime.now(UTC)
