"""Claiming queue items, saving reviews, and reading reviews back as feedback.

A claim is a lease: the reviewer who holds an unexpired lease is the only one who can submit
the item. Every write is one short transaction through the store's retrying writer, so a review
saved while a flow is writing waits for the lock instead of failing.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pandas as pd

from emc.pivotal.feedback import Feedback
from emc.pivotal.judge import JudgeExample, TokenLabel
from emc.pivotal.review import Review
from emc.store.connection import Store, StoreError
from emc.store.frames import insert_frame

DEFAULT_LEASE = timedelta(minutes=15)


class LeaseLost(StoreError):
    """The item is not (or no longer) claimed by this reviewer; nothing was saved."""


def claim_next(store: Store, reviewer: str, lease: timedelta = DEFAULT_LEASE) -> str | None:
    """Claim the highest-priority pending item (or one whose lease expired); None if empty.

    An item the reviewer already holds is returned first, so a page reload resumes it.
    """
    now = datetime.now(UTC)
    with store.write() as conn:
        # fetchall, not fetchone: an unfinished result blocks the next statement on `conn`.
        rows = conn.execute(
            "SELECT prompt_id FROM review_queue WHERE state = 'in_review' AND claimed_by = ? "
            "AND lease_expires_at > ? ORDER BY priority DESC LIMIT 1",
            [reviewer, now],
        ).fetchall()
        if not rows:
            rows = conn.execute(
                "SELECT prompt_id FROM review_queue WHERE state = 'pending' "
                "OR (state = 'in_review' AND lease_expires_at <= ?) "
                "ORDER BY priority DESC, prompt_id LIMIT 1",
                [now],
            ).fetchall()
        if not rows:
            return None
        prompt_id = rows[0][0]
        _take(conn, prompt_id, reviewer, now + lease)
    return prompt_id


def claim(store: Store, prompt_id: str, reviewer: str, lease: timedelta = DEFAULT_LEASE) -> bool:
    """Claim one item if nobody else holds an unexpired lease on it."""
    now = datetime.now(UTC)
    with store.write() as conn:
        rows = conn.execute(
            "SELECT state, claimed_by, lease_expires_at FROM review_queue WHERE prompt_id = ?",
            [prompt_id],
        ).fetchall()
        if not rows or rows[0][0] in ("done", "rejected"):
            return False
        state, holder, expires = rows[0]
        if state == "in_review" and holder != reviewer and expires > now:
            return False
        _take(conn, prompt_id, reviewer, now + lease)
    return True


def release(store: Store, prompt_id: str, reviewer: str) -> None:
    """Skip: hand the item back to the queue."""
    with store.write() as conn:
        conn.execute(
            "UPDATE review_queue SET state = 'pending', claimed_by = NULL, "
            "lease_expires_at = NULL, updated_at = now() "
            "WHERE prompt_id = ? AND state = 'in_review' AND claimed_by = ?",
            [prompt_id, reviewer],
        )


def submit_review(
    store: Store, review: Review, tokens: dict[int, str], run_id: str | None = None
) -> None:
    """Save a review, its labels (labeller human:<name>) and the queue state, atomically.

    `tokens` maps each labelled token id to its string. Raises LeaseLost, saving nothing, when
    the reviewer does not hold the item's lease any more (another person claimed it).
    """
    now = datetime.now(UTC)
    with store.write() as conn:
        rows = conn.execute(
            "SELECT state, claimed_by, lease_expires_at FROM review_queue WHERE prompt_id = ?",
            [review.prompt_id],
        ).fetchall()
        if rows:
            state, holder, expires = rows[0]
            taken_by_other = holder not in (None, review.reviewer) and expires and expires > now
            if state in ("done", "rejected") or taken_by_other:
                raise LeaseLost(
                    f"{review.prompt_id} is {state}"
                    + (f", claimed by {holder}" if holder else "")
                    + "; your review was not saved"
                )
        _write_review(conn, review, tokens, run_id)
        conn.execute(
            "UPDATE review_queue SET state = ?, claimed_by = ?, lease_expires_at = NULL, "
            "updated_at = now() WHERE prompt_id = ?",
            [
                "rejected" if review.action == "reject" else "done",
                review.reviewer,
                review.prompt_id,
            ],
        )


def write_reviews(store: Store, reviews: list[tuple[Review, dict[int, str]]], run_id) -> None:
    """Reviews from elsewhere (an import): no queue checks, idempotent on review_id."""
    with store.write() as conn:
        for review, tokens in reviews:
            _write_review(conn, review, tokens, run_id)


def generator_feedback(store: Store) -> list[Feedback]:
    """Disagreements, rejections, confirmed evil prompts and agreements, newest first."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT r.action, r.disagreed, r.explanation, r.reject_reason, r.labels, "
            "r.created_at, p.text, p.assistant_prefix FROM reviews r JOIN prompts p "
            "USING (prompt_id) ORDER BY r.created_at DESC"
        ).fetchall()
    feedback = []
    for action, disagreed, explanation, reason, labels, created, text, prefix in rows:
        if action == "reject":
            kind, note = "rejection", reason
        elif disagreed:
            kind, note = "disagreement", explanation
        elif "evil" in json.loads(labels).values():
            kind, note = "confirmed_evil", explanation or ""
        else:
            kind, note = "agreement", explanation or ""
        feedback.append(
            Feedback(
                kind=kind,
                prompt_text=text,
                assistant_prefix=prefix,
                note=note or "",
                created_at=created,
            )
        )
    return feedback


def judge_examples(store: Store, limit: int = 8) -> list[JudgeExample]:
    """Reviewed prompts as few-shot examples for the judge: disagreements first, newest first."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT r.prompt_id, r.labels, r.disagreed, r.explanation, p.text, p.format, "
            "p.assistant_prefix FROM reviews r JOIN prompts p USING (prompt_id) "
            "WHERE r.action != 'reject' ORDER BY r.disagreed DESC, r.created_at DESC LIMIT ?",
            [limit],
        ).fetchall()
        token_rows = conn.execute(
            "SELECT prompt_id, token_id, token FROM token_labels "
            "WHERE starts_with(labeller, 'human:')"
        ).fetchall()
    strings = {(p, t): s for p, t, s in token_rows}
    examples = []
    for prompt_id, labels, disagreed, explanation, text, fmt, prefix in rows:
        shown = text if fmt != "chat" else f"User: {text}\nAssistant:{prefix}"
        tokens = [
            TokenLabel(token_id=int(t), token=strings.get((prompt_id, int(t)), ""), label=label)
            for t, label in json.loads(labels).items()
        ]
        examples.append(
            JudgeExample(
                prompt_text=shown,
                tokens=tokens,
                explanation=explanation or "",
                disagreed=disagreed,
            )
        )
    return examples


def list_reviews(store: Store, prompt_id: str | None = None) -> pd.DataFrame:
    where, params = ("WHERE prompt_id = ?", [prompt_id]) if prompt_id else ("", [])
    with store.read() as conn:
        return conn.execute(f"SELECT * FROM reviews {where} ORDER BY created_at", params).df()


def _take(conn, prompt_id: str, reviewer: str, expires: datetime) -> None:
    conn.execute(
        "UPDATE review_queue SET state = 'in_review', claimed_by = ?, lease_expires_at = ?, "
        "updated_at = now() WHERE prompt_id = ?",
        [reviewer, expires, prompt_id],
    )


def review_row(review: Review, run_id: str | None) -> dict:
    """A review as one `reviews` row (shared with the importer)."""
    return {
        "review_id": review.review_id,
        "prompt_id": review.prompt_id,
        "reviewer": review.reviewer,
        "action": review.action,
        "judgement_id": review.judgement_id,
        "disagreed": review.disagreed,
        "explanation": review.explanation or None,
        "reject_reason": review.reject_reason or None,
        "labels": json.dumps({str(k): v for k, v in review.labels.items()}),
        "source": review.source,
        "run_id": run_id,
        "created_at": review.created_at,
    }


def _write_review(conn, review: Review, tokens: dict[int, str], run_id: str | None) -> None:
    row = pd.DataFrame([review_row(review, run_id)])
    insert_frame(conn, "reviews", row, ["review_id"], update=False)
    if review.action == "reject":
        return
    labels = pd.DataFrame(
        [
            {
                "prompt_id": review.prompt_id,
                "token_id": token_id,
                "labeller": review.reviewer,
                "token": tokens.get(token_id, ""),
                "label": label,
                "judgement_id": review.judgement_id,
                "explanation": review.explanation or None,
                "run_id": run_id,
                "created_at": review.created_at,
            }
            for token_id, label in review.labels.items()
        ]
    )
    insert_frame(conn, "token_labels", labels, ["prompt_id", "token_id", "labeller"], update=True)
