"""What the prompt generator learns from: its earlier attempts and the human's feedback.

Each item renders as one line, so that a token budget can take or leave it whole.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Literal, TypeVar

from pydantic import BaseModel, Field

from emc.pivotal.judge import Judgement, Outcome
from emc.pivotal.prompts import PromptFormat, PromptRecord

FeedbackKind = Literal["disagreement", "rejection", "confirmed_evil", "agreement"]
# Most instructive first: where the judge was wrong, then what makes a prompt bad, then successes.
FEEDBACK_PRIORITY: tuple[FeedbackKind, ...] = (
    "disagreement",
    "rejection",
    "confirmed_evil",
    "agreement",
)


def _now() -> datetime:
    return datetime.now(UTC)


class Attempt(BaseModel):
    """A prompt tried earlier and the outcome class the judge gave it."""

    text: str
    format: PromptFormat = "raw"
    assistant_prefix: str = ""
    outcome: Outcome
    summary: str = ""
    created_at: datetime = Field(default_factory=_now)

    @classmethod
    def from_judgement(cls, prompt: PromptRecord, judgement: Judgement) -> Attempt | None:
        """None when the judgement has no outcome (failed, skipped, labels mismatched)."""
        if judgement.status != "ok" or judgement.outcome is None:
            return None
        return cls(
            text=prompt.text,
            format=prompt.format,
            assistant_prefix=prompt.assistant_prefix,
            outcome=judgement.outcome,
            summary=judgement.summary or "",
            created_at=prompt.created_at,
        )


class Feedback(BaseModel):
    """A human's word on one prompt."""

    kind: FeedbackKind
    prompt_text: str
    assistant_prefix: str = ""
    note: str = ""
    created_at: datetime = Field(default_factory=_now)


_Dated = TypeVar("_Dated", Attempt, Feedback)


def attempt_line(attempt: Attempt) -> str:
    summary = _one_line(attempt.summary)
    tail = f" ({summary})" if summary else ""
    return f"{_prompt_repr(attempt.text, attempt.assistant_prefix)} => {attempt.outcome}{tail}"


def feedback_line(item: Feedback) -> str:
    note = _one_line(item.note) or "(no note)"
    return f"{_prompt_repr(item.prompt_text, item.assistant_prefix)} => {note}"


def newest_first(items: Sequence[_Dated]) -> list[_Dated]:
    # Stable: items with equal times keep the caller's order.
    return sorted(items, key=lambda item: item.created_at, reverse=True)


def _prompt_repr(text: str, assistant_prefix: str) -> str:
    # JSON quoting keeps a multi-line prompt on one line and shows trailing whitespace.
    quoted = json.dumps(text, ensure_ascii=False)
    if not assistant_prefix:
        return quoted
    return f"{quoted} / assistant: {json.dumps(assistant_prefix, ensure_ascii=False)}"


def _one_line(text: str) -> str:
    return " ".join(text.split())
