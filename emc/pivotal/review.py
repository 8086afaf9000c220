"""A person's review of a flagged prompt: the decision, its rules, and what it teaches.

Human labels are ground truth. Disagreements, rejections and confirmed evil prompts flow back
into the generator's history and the judge's few-shot examples.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from emc.pivotal.judge import Label

ReviewAction = Literal["agree", "relabel", "reject"]


class ReviewError(ValueError):
    """A review that cannot be saved as given; the message says what is missing."""


class Review(BaseModel):
    review_id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    prompt_id: str
    reviewer: str  # human:<name>
    action: ReviewAction
    judgement_id: str | None = None
    labels: dict[int, Label]  # every shown token's label as the person left it
    judge_labels: dict[int, Label] = Field(default_factory=dict, exclude=True)
    explanation: str = ""
    reject_reason: str = ""
    source: str = "dashboard"
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))

    @property
    def disagreed(self) -> bool:
        return any(self.judge_labels.get(t) != label for t, label in self.labels.items())

    @model_validator(mode="after")
    def _rules(self) -> Review:
        if not self.reviewer.startswith("human:") or not self.reviewer.removeprefix("human:"):
            raise ReviewError("the reviewer must be named (human:<name>)")
        if self.action == "reject" and not self.reject_reason.strip():
            raise ReviewError("rejecting a prompt needs a reason")
        if self.action == "agree" and self.disagreed:
            raise ReviewError("'agree' keeps the judge's labels; use 'relabel' to change them")
        if self.action != "reject" and self.disagreed and not self.explanation.strip():
            raise ReviewError("disagreeing with the judge needs an explanation")
        return self


def make_review(
    prompt_id: str,
    reviewer_name: str,
    action: ReviewAction,
    judge_labels: Mapping[int, Label],
    changed: Mapping[int, Label] | None = None,
    explanation: str = "",
    reject_reason: str = "",
    judgement_id: str | None = None,
    source: str = "dashboard",
) -> Review:
    """The judge's labels with the person's changes applied; raises ReviewError if invalid."""
    labels = {**judge_labels, **(changed or {})}
    try:
        return Review(
            prompt_id=prompt_id,
            reviewer=f"human:{reviewer_name.strip()}",
            action=action,
            judgement_id=judgement_id,
            labels=labels,
            judge_labels=dict(judge_labels),
            explanation=explanation,
            reject_reason=reject_reason,
            source=source,
        )
    except ReviewError:
        raise
    except ValueError as exc:  # pydantic wraps validator errors
        cause = exc.errors()[0].get("ctx", {}).get("error") if hasattr(exc, "errors") else None
        raise ReviewError(str(cause or exc)) from None
