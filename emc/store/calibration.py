"""The tokens a judge and a person both labelled, for calibrating the judge against people.

Both kinds of label live in `token_labels`: the judge's under `judge:<model>` (one per model,
prompt and token: its latest judgement's), a person's under `human:<name>`. Which labels count:

- every label a person gave on an `agree` or `relabel` review, whichever judge they saw;
- not a rejection: rejecting a prompt writes no labels (the review's `labels` column is the
  judge's labels as shown, not the person's), so a rejected prompt adds nothing unless someone
  labelled its tokens. Labels a person gave are dropped when that same person's newest review
  of the prompt is a rejection (they withdrew them); other people's labels on it still count;
- only tokens the judge labelled too (a judge whose reply failed left none).

`shown` says whether the person's label was given on a judgement of this judge model (the
`judgement_id` of their label), i.e. whether they saw this judge's labels while labelling.
"""

from __future__ import annotations

from emc.pivotal.calibration import ComparedLabel
from emc.store.connection import Store

_COMPARED_SQL = """
WITH
judge AS (
    SELECT substr(labeller, length('judge:') + 1) AS judge_model, prompt_id, token_id,
           label AS judge_label
    FROM token_labels WHERE starts_with(labeller, 'judge:')
),
last_review AS (
    SELECT prompt_id, reviewer, action FROM reviews
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id, reviewer ORDER BY created_at DESC, review_id) = 1
),
human AS (
    SELECT t.prompt_id, t.token_id, t.labeller AS reviewer, t.label AS human_label,
           t.created_at AS labelled_at, seen.judge_model AS seen_judge
    FROM token_labels t
    LEFT JOIN last_review r ON r.prompt_id = t.prompt_id AND r.reviewer = t.labeller
    LEFT JOIN judgements seen ON seen.judgement_id = t.judgement_id
    WHERE starts_with(t.labeller, 'human:') AND r.action IS DISTINCT FROM 'reject'
)
SELECT j.judge_model, h.prompt_id, h.token_id, h.reviewer, j.judge_label, h.human_label,
       h.labelled_at, coalesce(h.seen_judge = j.judge_model, false) AS shown
FROM human h
JOIN judge j ON j.prompt_id = h.prompt_id AND j.token_id = h.token_id
ORDER BY j.judge_model, h.prompt_id, h.token_id, h.reviewer
"""
_FIELDS = (
    "judge_model",
    "prompt_id",
    "token_id",
    "reviewer",
    "judge_label",
    "human_label",
    "labelled_at",
    "shown",
)


def compared_labels(store: Store) -> list[ComparedLabel]:
    """Every (judge model, prompt, token, reviewer) where both gave a label that counts."""
    with store.read() as conn:
        rows = conn.execute(_COMPARED_SQL).fetchall()
    return [ComparedLabel(**dict(zip(_FIELDS, row, strict=True))) for row in rows]
