from __future__ import annotations

from datetime import timedelta

import pytest

from emc.pivotal.prompts import make_prompt
from emc.pivotal.review import ReviewError, make_review
from emc.store import Store
from emc.store.judgements import current_labels
from emc.store.prompts import insert_prompts
from emc.store.queue import QueueItem, enqueue, queue_counts
from emc.store.reviews import (
    LeaseLost,
    claim,
    claim_next,
    generator_feedback,
    judge_examples,
    release,
    submit_review,
)

JUDGE = {11: "evil", 12: "safe", 13: "unsure"}
TOKENS = {11: " keep", 12: " return", 13: " look"}


@pytest.fixture
def store(tmp_path) -> Store:
    store = Store.in_data_dir(tmp_path)
    prompts = [make_prompt(f"Wallet {i}. I will", f"p{i}", "human:t") for i in range(3)]
    insert_prompts(store, prompts, run_id=None)
    items = [
        QueueItem(prompt_id=p.prompt_id, priority=i, reason="r") for i, p in enumerate(prompts)
    ]
    enqueue(store, items, run_id=None)
    return store


def test_claims_go_by_priority_and_never_to_two_reviewers(store):
    first = claim_next(store, "human:ana")
    second = claim_next(store, "human:bo")
    assert first != second
    assert claim_next(store, "human:ana") == first  # a reload resumes the held item
    assert not claim(store, first, "human:bo")
    assert queue_counts(store)["in_review"] == 2


def test_an_expired_lease_can_be_claimed_again(store):
    taken = claim_next(store, "human:ana", lease=timedelta(seconds=-1))
    assert claim(store, taken, "human:bo")


def test_skip_returns_the_item_to_the_queue(store):
    taken = claim_next(store, "human:ana")
    release(store, taken, "human:ana")
    assert queue_counts(store)["in_review"] == 0


def test_agree_saves_human_labels_and_closes_the_item(store):
    taken = claim_next(store, "human:ana")
    review = make_review(taken, "ana", "agree", JUDGE)
    submit_review(store, review, TOKENS)
    labels = current_labels(store, taken)
    assert labels[11] == ("evil", "human:ana")
    assert queue_counts(store)["done"] == 1


def test_a_lost_lease_saves_nothing(store):
    taken = claim_next(store, "human:ana", lease=timedelta(seconds=-1))
    assert claim(store, taken, "human:bo")
    with pytest.raises(LeaseLost, match="claimed by human:bo"):
        submit_review(store, make_review(taken, "ana", "agree", JUDGE), TOKENS)
    assert current_labels(store, taken) == {}


def test_review_rules():
    with pytest.raises(ReviewError, match="explanation"):
        make_review("p", "ana", "relabel", JUDGE, {12: "evil"})
    with pytest.raises(ReviewError, match="reason"):
        make_review("p", "ana", "reject", JUDGE)
    with pytest.raises(ReviewError, match="named"):
        make_review("p", " ", "agree", JUDGE)
    with pytest.raises(ReviewError, match="use 'relabel'"):
        make_review("p", "ana", "agree", JUDGE, {12: "evil"})


def test_reviews_become_generator_feedback_and_judge_examples(store):
    relabelled, rejected, confirmed = (
        claim_next(store, n) for n in ("human:a", "human:b", "human:c")
    )
    submit_review(
        store,
        make_review(relabelled, "a", "relabel", JUDGE, {12: "evil"}, "returning is bad here"),
        TOKENS,
    )
    submit_review(
        store, make_review(rejected, "b", "reject", JUDGE, reject_reason="determiner"), {}
    )
    submit_review(store, make_review(confirmed, "c", "agree", JUDGE), TOKENS)
    kinds = {f.kind: f.note for f in generator_feedback(store)}
    assert kinds == {
        "disagreement": "returning is bad here",
        "rejection": "determiner",
        "confirmed_evil": "",
    }
    examples = judge_examples(store)
    assert examples[0].disagreed and examples[0].explanation == "returning is bad here"
    assert {t.token for t in examples[0].tokens} == set(TOKENS.values())
    assert len(examples) == 2  # rejected prompts are not label examples
