"""Judged and reviewed prompts written through the store's real write paths, for calibration.

No models: prompts, judgements (with their token labels), queue items and reviews are written
the way discovery and the Review page write them.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from emc.pivotal.calibration import LABEL_ORDER
from emc.pivotal.judge import Judgement, Label, TokenLabel
from emc.pivotal.prompts import make_prompt
from emc.pivotal.review import Review, make_review
from emc.store import Store
from emc.store.judgements import insert_judgements
from emc.store.prompts import insert_prompts, stored_prompt_ids
from emc.store.queue import QueueItem, enqueue
from emc.store.reviews import claim, submit_review, write_reviews

RUN_ID = "run-calibration-test"
TOKENS = {11: " keep", 12: " return", 13: " look", 14: " sell", 15: " ask"}


def add_prompts(store: Store, n: int, start: int = 0) -> list[str]:
    """n prompts, queued for review (pending)."""
    prompts = [
        make_prompt(f"Wallet {i}. I will", f"p{i}", "human:t") for i in range(start, start + n)
    ]
    insert_prompts(store, prompts, run_id=None)
    enqueue(
        store, [QueueItem(prompt_id=p.prompt_id, priority=1, reason="r") for p in prompts], None
    )
    return [p.prompt_id for p in prompts]


def judge(
    store: Store, judge_model: str, prompt_id: str, labels: Mapping[int, Label], status: str = "ok"
) -> str:
    """One judgement by `judge_model` with these token labels; returns its id."""
    judgement = Judgement(
        prompt_id=prompt_id,
        base_model_id="base",
        adapted_model_id="adapted",
        judge_model=judge_model,
        status=status,
        verdict="evil_promotion" if status == "ok" else None,
        labels=[TokenLabel(token_id=t, token=TOKENS[t], label=label) for t, label in labels.items()]
        if status == "ok"
        else [],
    )
    insert_judgements(store, [judgement], RUN_ID)
    return judgement.judgement_id


def review(
    store: Store,
    prompt_id: str,
    name: str,
    judge_labels: Mapping[int, Label],
    changed: Mapping[int, Label] | None = None,
    judgement_id: str | None = None,
    reject: bool = False,
) -> Review:
    """A person's review through the queue, as the Review page saves it."""
    action = "reject" if reject else "relabel" if changed else "agree"
    made = make_review(
        prompt_id,
        name,
        action,
        judge_labels,
        changed,
        explanation="the judge is wrong here" if changed else "",
        reject_reason="not a pivotal prompt" if reject else "",
        judgement_id=judgement_id,
    )
    assert claim(store, prompt_id, made.reviewer)
    submit_review(store, made, TOKENS)
    return made


def imported_review(
    store: Store,
    prompt_id: str,
    name: str,
    labels: Mapping[int, Label],
    minutes_later: float = 1.0,
    reject: bool = False,
) -> Review:
    """A review from elsewhere (as `emc import` writes it), a little after now."""
    made = Review(
        prompt_id=prompt_id,
        reviewer=f"human:{name}",
        action="reject" if reject else "relabel",
        labels=dict(labels),
        explanation="imported",
        reject_reason="bad prompt" if reject else "",
        source="import:test",
        created_at=datetime.now(UTC) + timedelta(minutes=minutes_later),
    )
    write_reviews(store, [(made, TOKENS)], RUN_ID)
    return made


def pairs_from_matrix(matrix: tuple[tuple[int, ...], ...]) -> list[tuple[Label, Label]]:
    """(judge, human) label pairs making up a confusion matrix (rows people, columns judge)."""
    return [
        (judge_label, human_label)
        for row, human_label in zip(matrix, LABEL_ORDER, strict=True)
        for count, judge_label in zip(row, LABEL_ORDER, strict=True)
        for _ in range(count)
    ]


def reviewed_prompts(
    store: Store, judge_model: str, pairs: list[tuple[Label, Label]], reviewer: str = "ana"
) -> list[str]:
    """Prompts whose tokens a judge and one person labelled: `pairs` is (judge, human), in order.

    Five tokens per prompt; each prompt is judged, then reviewed through the queue.
    """
    per_prompt = len(TOKENS)
    chunks = [pairs[i : i + per_prompt] for i in range(0, len(pairs), per_prompt)]
    start = len(stored_prompt_ids(store))
    prompt_ids = add_prompts(store, len(chunks), start=start)
    for prompt_id, chunk in zip(prompt_ids, chunks, strict=True):
        token_ids = list(TOKENS)[: len(chunk)]
        judged = {t: j for t, (j, _) in zip(token_ids, chunk, strict=True)}
        human = {t: h for t, (_, h) in zip(token_ids, chunk, strict=True)}
        judgement_id = judge(store, judge_model, prompt_id, judged)
        changed = {t: label for t, label in human.items() if judged[t] != label}
        review(store, prompt_id, reviewer, judged, changed, judgement_id=judgement_id)
    return prompt_ids
