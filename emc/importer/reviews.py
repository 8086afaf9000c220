"""Labelled files, rejections, notes and the manual queue -> labels, reviews and queue items.

Who labelled what, in the original's labeled_logits files:
- `judge_original_label` is the judge's label; `evil_label` is the label after review.
- `evil_label` is taken as a person's label when the file says a person looked (a
  `human_verdict`, `manually_labeled`), or when it differs from the judge's label. Some of the
  original's labelling tools never set `human_verdict`, and the labels were lost downstream;
  here they are kept. A file with neither, whose labels equal the judge's, gives judge labels only.
- `interrupted` reviews gave no decision: only the judge's labels are imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

from emc.importer.judgements import ImportedJudgement, stable_id
from emc.importer.readers import (
    LegacyBadPrompt,
    LegacyFormatError,
    LegacyLabeled,
    LegacyNote,
    LegacyQueueEntry,
    LegacyRead,
    details_text,
    legacy_time,
)
from emc.importer.tokens import TokenIds
from emc.pivotal.judge import Label
from emc.pivotal.review import Review, ReviewAction
from emc.store.imports import LabelRow
from emc.store.queue import QueueItem

# Review rules demand a reason and, for a disagreement, an explanation; the original did not
# always record one. These say so in the record instead of inventing one.
NO_EXPLANATION = "(imported: the original files give no explanation)"
NO_REJECT_REASON = "(imported: the original files give no reason)"
QUEUE_STATES = {"pending": "pending", "processed": "done"}


@dataclass
class LabeledImport:
    judge_labels: list[LabelRow]
    review: Review | None
    tokens: dict[int, str]  # token id -> string, for the review's labels
    warnings: list[str] = field(default_factory=list)


def from_labeled(
    read: LegacyRead[LegacyLabeled],
    prompt_id: str,
    token_ids: TokenIds,
    judgement: ImportedJudgement | None,
    notes: list[LegacyRead[LegacyNote]],
) -> LabeledImport:
    data = read.data
    ids = [token_ids.resolve(data.prompt_id, token) for token in data.top_k]
    if len(set(ids)) != len(ids):
        raise LegacyFormatError("two entries of top_k have the same token (id)")
    tokens = {tid: token.token for tid, token in zip(ids, data.top_k, strict=True)}
    after, judge, reviewed, warnings = _whose_labels(data, ids)
    judge_model = data.judge_model or (judgement.judgement.judge_model if judgement else "unknown")
    judgement_id = judgement.judgement.judgement_id if judgement else None
    judge_rows = [
        LabelRow(
            prompt_id=prompt_id,
            token_id=token_id,
            labeller=f"judge:{judge_model}",
            token=tokens[token_id],
            label=label,
            judgement_id=judgement_id,
            created_at=legacy_time(data.timestamp),
        )
        for token_id, label in judge.items()
    ]
    review = None
    if data.prompt_rejected or reviewed:
        review = _labeled_review(read, prompt_id, after, judge, judgement_id, notes, warnings)
    return LabeledImport(judge_rows, review, tokens, warnings)


def _whose_labels(
    data: LegacyLabeled, ids: list[int]
) -> tuple[dict[int, Label], dict[int, Label], bool, list[str]]:
    """(labels after review, the judge's labels, whether a person reviewed, warnings)."""
    pairs = list(zip(ids, data.top_k, strict=True))
    after = {t: tok.evil_label for t, tok in pairs if tok.evil_label}
    judge = {t: tok.judge_original_label for t, tok in pairs if tok.judge_original_label}
    if data.human_verdict in ("agreed", "agreed_with_comment"):
        # Older files lack judge_original_label; a person who agreed kept the judge's labels.
        judge = {**after, **judge}
    reviewed = bool(data.human_verdict or data.manually_labeled) or after != judge
    warnings = []
    if data.human_verdict == "interrupted":
        reviewed = False
        warnings.append("review was interrupted in the original: judge labels only")
    elif not reviewed and not data.prompt_rejected:
        warnings.append(
            "no human_verdict, not manually_labeled, labels equal the judge's: judge labels only"
            if judge
            else "no labels in this file"
        )
    return after, judge, reviewed, warnings


def _labeled_review(
    read: LegacyRead[LegacyLabeled],
    prompt_id: str,
    labels: dict[int, Label],
    judge: dict[int, Label],
    judgement_id: str | None,
    notes: list[LegacyRead[LegacyNote]],
    warnings: list[str],
) -> Review:
    data = read.data
    disagreed = any(judge.get(t) != label for t, label in labels.items())
    action: ReviewAction = "relabel" if disagreed or data.human_verdict == "disagreed" else "agree"
    if data.prompt_rejected:
        action = "reject"
    elif data.human_verdict in ("agreed", "agreed_with_comment") and disagreed:
        warnings.append(f"human_verdict is {data.human_verdict} but labels differ: relabel")
    texts = [data.human_explanation, details_text(data.disagreement_details)]
    explanation = _join([*texts, *(text for note in notes for text in note.data.texts())])
    if disagreed and not explanation:
        explanation = NO_EXPLANATION
    try:
        return Review(
            review_id=stable_id(
                "labeled", read.file.rel, read.digest, *(n.file.rel + n.digest for n in notes)
            ),
            prompt_id=prompt_id,
            reviewer=f"human:{data.person or 'unknown'}",
            action=action,
            judgement_id=judgement_id,
            labels=labels,
            judge_labels=judge,
            explanation=explanation,
            reject_reason=(data.bad_reason or NO_REJECT_REASON) if data.prompt_rejected else "",
            source=f"import:{read.file.rel}",
            created_at=legacy_time(data.timestamp) or datetime.now(UTC),
        )
    except ValueError as exc:
        raise LegacyFormatError(f"not a valid review: {exc}") from None


def from_bad_prompt(read: LegacyRead[LegacyBadPrompt], prompt_id: str) -> Review:
    data = read.data
    return Review(
        review_id=stable_id("bad_prompt", read.file.rel, read.digest),
        prompt_id=prompt_id,
        reviewer=f"human:{data.person or 'unknown'}",
        action="reject",
        labels={},
        reject_reason=data.bad_reason or NO_REJECT_REASON,
        source=f"import:{read.file.rel}",
        created_at=legacy_time(data.timestamp) or datetime.now(UTC),
    )


def from_queue_entry(
    read: LegacyRead[LegacyQueueEntry], prompt_id: str, judgement: ImportedJudgement | None
) -> tuple[QueueItem, str]:
    data = read.data
    reason = _join(["from the original's manual labelling queue", data.reason])
    item = QueueItem(
        prompt_id=prompt_id,
        priority=0.0,  # the original queue had no priorities
        reason=reason,
        judgement_id=judgement.judgement.judgement_id if judgement else None,
    )
    return item, QUEUE_STATES[data.status]


def _join(texts: list[str | None]) -> str:
    """Distinct non-empty texts in order: a note often repeats the labelled file's explanation."""
    unique: list[str] = []
    for text in texts:
        if text and text.strip() and text.strip() not in unique:
            unique.append(text.strip())
    return "\n\n".join(unique)
