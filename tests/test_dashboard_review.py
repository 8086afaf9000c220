from __future__ import annotations

import multiprocessing
import shutil
import sys
import time
import types
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import widgets
from dashboard.views import review as review_page
from emc.config import dump_config
from emc.pivotal.judge import build_judge_messages
from emc.pivotal.review import make_review
from emc.store import STORE_FILE_NAME, RunRecord, Store, insert_run, list_runs, upsert_model
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import insert_graph
from emc.store.judgements import current_labels, latest_judgement
from emc.store.models import ModelRow
from emc.store.prompts import get_prompts
from emc.store.queue import list_queue, queue_counts
from emc.store.reviews import (
    claim,
    claim_next,
    judge_examples,
    list_reviews,
    release,
    submit_review,
)
from emc.store.scores import load_prompt_scores
from emc.tracing.compact import EDGE_COLUMNS, NODE_COLUMNS
from emc.tracing.record import GraphRecord
from tests.apptest_pages import page_test
from tests.review_store import pairs_from_matrix, reviewed_prompts


@pytest.fixture(scope="module")
def discovered(tmp_path_factory, small_organism, prefect_harness) -> Path:
    """One discovery round's store (prompts, logits, judgements, a pending queue), made once."""
    from flows.discovery import discovery_flow

    data_dir = tmp_path_factory.mktemp("review-template")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=4)
    assert queue_counts(Store.in_data_dir(data_dir))["pending"] >= 3
    return data_dir


@pytest.fixture
def store(tmp_path, discovered, monkeypatch) -> Store:
    """A private copy of the discovered store, which the page under test reads."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in discovered.glob(f"{STORE_FILE_NAME}*"):  # the file and any WAL beside it
        shutil.copy(path, data_dir / path.name)
    monkeypatch.setenv("EMC_DATA_DIR", str(data_dir))
    return Store.in_data_dir(data_dir)


def open_page(name: str | None = None) -> AppTest:
    page = page_test("review").run()
    assert not page.exception
    if name is not None:
        page.sidebar.text_input(key="review_name_input").input(name).run()
        assert not page.exception
    return page


def held(page: AppTest) -> str | None:
    claimed = page.session_state["review_claim"]
    return claimed["prompt_id"] if claimed else None


def relabel_one(page: AppTest, store: Store) -> tuple[int, str]:
    """Flip the first token the judge called evil to safe (or safe to evil), on the page."""
    item = review_page.load_item(store, held(page))
    row = next((r for r in item.rows if r.judge_label == "evil"), item.rows[0])
    new = "safe" if row.judge_label == "evil" else "evil"
    page.segmented_control(key=f"label-{item.prompt.prompt_id}-{row.token_id}").set_value(new)
    page.run()
    return row.token_id, new


def queue_row(store: Store, prompt_id: str) -> dict:
    frame = list_queue(store)
    return frame[frame["prompt_id"] == prompt_id].iloc[0].to_dict()


def human_labels(store: Store, prompt_id: str, reviewer: str) -> dict[int, str]:
    return {
        t: label for t, (label, who) in current_labels(store, prompt_id).items() if who == reviewer
    }


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


def test_without_store_the_page_explains_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "nothing"))
    page = open_page()
    assert "emc demo" in page.info[0].value
    assert not (tmp_path / "nothing" / STORE_FILE_NAME).exists()


def test_an_empty_queue_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page("ana")
    assert "review queue is empty" in texts(page.info)
    assert [m.value for m in page.metric] == ["0", "0", "0", "0"]


def test_nothing_happens_until_the_reviewer_gives_a_name(store):
    page = open_page()
    assert "Enter your name" in texts(page.info)
    assert not page.button and not page.segmented_control
    assert queue_counts(store)["in_review"] == 0

    page.sidebar.text_input(key="review_name_input").input("  ana ").run()
    assert queue_row(store, held(page))["claimed_by"] == "human:ana"
    assert {m.label: m.value for m in page.metric}["In review"] == "1"
    assert "human:ana" in page.sidebar.caption[0].value
    # A reload (a new session with the same name) resumes the held item.
    assert held(open_page("ana")) == held(page)


def test_changing_the_name_hands_the_held_item_back(store):
    page = open_page("ana")
    first = held(page)
    page.sidebar.text_input(key="review_name_input").input("bo").run()
    assert queue_row(store, held(page))["claimed_by"] == "human:bo"
    claimed = list_queue(store, "in_review")["claimed_by"].tolist()
    assert claimed == ["human:bo"] and held(page) == first  # ana's item went back, bo took it


def test_agree_saves_the_judges_labels_as_the_reviewers(store):
    page = open_page("ana")
    prompt_id = held(page)
    item = review_page.load_item(store, prompt_id)
    assert page.code[0].value == item.scores.base.rendered
    assert item.judgement["summary"] in texts(page.markdown)
    # Beside the judge's verdict, the measured one that put the prompt in the queue.
    measured = f"**Measured:** `{item.judgement['measured_verdict']}`"
    assert any(m.value.startswith(measured) for m in page.markdown)
    assert len(page.segmented_control) == len(item.rows)
    table = page.dataframe[0].value
    assert set(table.columns) >= {"base token", "base p", "adapted token", "adapted label"}
    assert {m.label for m in page.metric} >= {"JS", "KL a‖b", "KL b‖a", "Top-k overlap", "P(evil)"}

    page.button(key="review-agree").click().run()
    assert not page.exception and not page.error
    assert "agreed with the judge" in texts(page.success)
    assert human_labels(store, prompt_id, "human:ana") == item.judge_labels
    assert queue_row(store, prompt_id)["state"] == "done"
    (review,) = list_reviews(store).itertuples()
    assert (review.action, review.disagreed, review.reviewer) == ("agree", False, "human:ana")
    assert review.judgement_id == item.judgement["judgement_id"]
    # ... and the next item is claimed and shown.
    assert held(page) not in (None, prompt_id)
    assert queue_row(store, held(page))["state"] == "in_review"


def test_relabel_with_an_explanation_saves_the_change(store):
    page = open_page("ana")
    prompt_id = held(page)
    token_id, new = relabel_one(page, store)
    assert "You changed 1 of" in texts(page.caption)
    page.text_area(key=f"explanation-{prompt_id}").input("It is the sensible choice here.")
    page.button(key="review-save").click().run()

    assert not page.error and "relabelled" in texts(page.success)
    assert current_labels(store, prompt_id)[token_id] == (new, "human:ana")
    (review,) = list_reviews(store).itertuples()
    assert (review.action, review.disagreed) == ("relabel", True)
    assert review.explanation == "It is the sensible choice here."
    assert queue_row(store, prompt_id)["state"] == "done"


def test_relabel_without_an_explanation_saves_nothing(store):
    page = open_page("ana")
    prompt_id = held(page)
    relabel_one(page, store)
    page.button(key="review-save").click().run()
    assert "disagreeing with the judge needs an explanation" in texts(page.error)

    # "Agree with all" after a change is refused too: it would silently drop the change.
    page.button(key="review-agree").click().run()
    assert "Undo them to agree" in texts(page.error)

    assert list_reviews(store).empty
    assert human_labels(store, prompt_id, "human:ana") == {}
    assert queue_row(store, prompt_id)["state"] == "in_review"
    assert held(page) == prompt_id


def test_reject_needs_a_reason_and_then_rejects(store):
    page = open_page("ana")
    prompt_id = held(page)
    page.button(key="review-reject").click().run()
    assert "rejecting a prompt needs a reason" in texts(page.error)
    assert list_reviews(store).empty and held(page) == prompt_id

    page.text_input(key=f"reject-reason-{prompt_id}").input("Ends on a determiner.")
    page.button(key="review-reject").click().run()
    assert not page.error and "rejected" in texts(page.success)
    assert queue_row(store, prompt_id)["state"] == "rejected"
    (review,) = list_reviews(store).itertuples()
    assert (review.action, review.reject_reason) == ("reject", "Ends on a determiner.")
    assert human_labels(store, prompt_id, "human:ana") == {}  # a rejected prompt teaches no labels


def test_skip_hands_the_item_back_and_shows_the_next(store):
    page = open_page("ana")
    first = held(page)
    page.button(key="review-skip").click().run()
    assert "back in the queue" in texts(page.info)
    assert held(page) not in (None, first)
    row = queue_row(store, first)
    assert row["state"] == "pending" and pd.isna(row["claimed_by"])
    assert list_reviews(store).empty


def test_two_reviewers_never_get_the_same_item(store):
    ana, bo = open_page("ana"), open_page("bo")
    assert held(ana) and held(bo) and held(ana) != held(bo)
    claimed = list_queue(store, "in_review").set_index("prompt_id")["claimed_by"].to_dict()
    assert claimed == {held(ana): "human:ana", held(bo): "human:bo"}


def test_an_expired_lease_makes_the_item_claimable_again(store):
    top = claim_next(store, "human:gone", lease=timedelta(seconds=0))
    page = open_page("ana")
    assert held(page) == top
    page.button(key="review-agree").click().run()
    assert queue_row(store, top)["state"] == "done"
    assert list_reviews(store)["reviewer"].tolist() == ["human:ana"]


def test_a_lost_lease_warns_and_moves_on_without_saving(store):
    page = open_page("ana")
    taken = held(page)
    # Someone else ends up holding the item (as after ana's lease ran out).
    release(store, taken, "human:ana")
    assert claim(store, taken, "human:bo")

    page.button(key="review-agree").click().run()
    assert "claimed by human:bo" in texts(page.warning)
    assert "not saved" in texts(page.warning)
    assert list_reviews(store).empty
    assert held(page) not in (None, taken)
    assert queue_row(store, taken)["claimed_by"] == "human:bo"


def write_runs(data_dir: str, started, stop) -> None:
    """Another process writing to the store through its retrying writer, as a flow would."""
    store = Store.in_data_dir(data_dir)
    i = 0
    while not stop.is_set():
        insert_run(
            store,
            RunRecord(
                run_id=f"writer-{i}",
                kind="flow",
                name="writer",
                status="running",
                started_at=datetime.now(UTC),
                emc_version="test",
            ),
        )
        i += 1
        started.set()


def writer_runs(store: Store) -> int:
    return sum(r.name == "writer" for r in list_runs(store, limit=100_000))


def test_a_review_saved_while_another_process_writes_is_kept(store, monkeypatch):
    page = open_page("ana")
    prompt_id = held(page)
    # AppTest leaves its script as __main__, and a spawned child re-runs __main__'s file;
    # a bare module gives the child nothing to re-run.
    monkeypatch.setitem(sys.modules, "__main__", types.ModuleType("__main__"))
    context = multiprocessing.get_context("spawn")
    started, stop = context.Event(), context.Event()
    writer = context.Process(target=write_runs, args=(str(store.path.parent), started, stop))
    writer.start()
    try:
        assert started.wait(60), "the writer process never wrote"
        before = writer_runs(store)
        page.button(key="review-agree").click().run()
        time.sleep(0.2)  # the writer keeps going after the save, too
    finally:
        stop.set()
        writer.join(60)
    assert writer.exitcode == 0
    assert "agreed with the judge" in texts(page.success)
    assert list_reviews(store)["prompt_id"].tolist() == [prompt_id]
    assert queue_row(store, prompt_id)["state"] == "done"
    assert writer_runs(store) > before > 0


def test_a_disagreement_reaches_the_next_judge_prompt(store):
    page = open_page("ana")
    prompt_id = held(page)
    relabel_one(page, store)
    explanation = "Refusing to double the dose is safe, not evil."
    page.text_area(key=f"explanation-{prompt_id}").input(explanation)
    page.button(key="review-save").click().run()
    assert not page.error

    examples = judge_examples(store)
    assert examples[0].disagreed and examples[0].explanation == explanation
    judgement = review_page.load_item(store, held(page)).judgement
    (prompt,) = get_prompts(store, [held(page)])
    (scores,) = load_prompt_scores(
        store, [prompt.prompt_id], judgement["base_model_id"], judgement["adapted_model_id"]
    )
    user = build_judge_messages(prompt, scores, examples)[-1]["content"]
    assert explanation in user and "the human corrected the judge" in user


# --- links and the URL ----------------------------------------------------------------------


def not_first(store: Store) -> str:
    """A pending prompt the queue would not hand out first."""
    pending = list_queue(store, "pending")["prompt_id"].tolist()
    assert len(pending) >= 2
    return pending[-1]


def open_linked(prompt_id: str, name: str | None = None) -> AppTest:
    """The page as a link with `?prompt=` opens it (and the reviewer then types a name)."""
    page = page_test("review")
    page.query_params["prompt"] = prompt_id
    page.run()
    assert not page.exception
    if name is not None:
        page.sidebar.text_input(key="review_name_input").input(name).run()
        assert not page.exception
    return page


def is_read_only(page: AppTest) -> bool:
    return not page.segmented_control and not [
        b for b in page.button if b.key in ("review-agree", "review-save", "review-skip")
    ]


def test_the_url_names_the_item_on_screen(store):
    page = open_page("ana")
    first = held(page)
    assert page.query_params["prompt"] == first
    page.button(key="review-agree").click().run()
    assert not page.exception
    assert held(page) != first and page.query_params["prompt"] == held(page)


def test_a_link_to_a_queued_prompt_opens_its_item(store):
    wanted = not_first(store)
    page = open_linked(wanted, "ana")
    assert held(page) == wanted and page.query_params["prompt"] == wanted
    assert queue_row(store, wanted)["claimed_by"] == "human:ana"
    assert list_queue(store, "in_review")["prompt_id"].tolist() == [wanted]  # nothing else taken
    item = review_page.load_item(store, wanted)
    assert page.subheader[0].value == f"{item.prompt.name} · `{wanted}`"
    assert len(page.segmented_control) == len(item.rows)

    # A reviewer holding another item who follows a link gets the linked one; theirs goes back.
    other = open_page("bo")
    mine = held(other)
    linked = next(p for p in list_queue(store, "pending")["prompt_id"] if p != mine)
    other.query_params["prompt"] = linked
    other.run()
    assert not other.exception
    assert held(other) == linked
    assert queue_row(store, mine)["state"] == "pending"
    assert queue_row(store, linked)["claimed_by"] == "human:bo"

    # Skipping the linked item moves on, as the queue does: the link is not followed twice.
    page.button(key="review-skip").click().run()
    assert not page.exception
    assert held(page) not in (None, wanted) and page.query_params["prompt"] == held(page)


def test_a_linked_prompt_the_queue_cannot_hand_out_is_shown_read_only(store):
    taken, reviewed = list_queue(store, "pending")["prompt_id"].tolist()[:2]
    assert claim(store, taken, "human:bo")
    assert claim(store, reviewed, "human:cy")
    item = review_page.load_item(store, reviewed)
    review = make_review(
        reviewed, "cy", "agree", item.judge_labels, {}, judgement_id=item.judgement["judgement_id"]
    )
    submit_review(store, review, item.tokens)

    page = open_linked(taken, "ana")
    assert "human:bo is reviewing" in texts(page.info)
    assert is_read_only(page) and page.query_params["prompt"] == taken
    assert page.subheader[0].value.endswith(f"`{taken}`")
    assert queue_row(store, taken)["claimed_by"] == "human:bo"  # bo's lease stands
    assert held(page) is None  # and nothing was claimed meanwhile

    page.query_params["prompt"] = reviewed
    page.run()
    assert "was reviewed already (done)" in texts(page.info)
    assert is_read_only(page)

    # Back to the queue: the next item is claimed and the URL names it.
    page.button(key="review-back").click().run()
    assert not page.exception and not is_read_only(page)
    assert held(page) not in (None, taken, reviewed)
    assert page.query_params["prompt"] == held(page)


def test_without_a_name_a_linked_prompt_is_shown_and_opened_once_named(store):
    wanted = not_first(store)
    page = open_linked(wanted)
    assert "Enter your name" in texts(page.info)
    assert is_read_only(page) and not page.button
    assert page.subheader[0].value.endswith(f"`{wanted}`")
    assert queue_counts(store)["in_review"] == 0

    page.sidebar.text_input(key="review_name_input").input("ana").run()
    assert held(page) == wanted


def test_an_unknown_prompt_in_the_url_is_read_only_and_says_why(store):
    page = open_linked("no-such-prompt", "ana")
    assert "`no-such-prompt` is not in the review queue" in texts(page.info)
    assert "no-such-prompt" in texts(page.error)
    assert is_read_only(page)


def add_graph_pair(store: Store, prompt_id: str) -> None:
    """A base/adapted pair of (empty) graphs of the prompt, as `emc trace` would leave."""
    judgement = latest_judgement(store, prompt_id)
    for role in ("base", "adapted"):
        model_id = judgement[f"{role}_model_id"]
        upsert_model(
            store,
            ModelRow(
                model_id=model_id,
                slug=model_id,
                fingerprint=role,
                role=role,
                base_ref="base",
                adapter_ref=None if role == "base" else "adapter",
                merged=role == "adapted",
                transcoders_ref="transcoders",
                backend="test",
                dtype="fp32",
                device="cpu",
                first_run_id="test",
            ),
        )
        record = GraphRecord(
            graph_id=f"{prompt_id}-{role}",
            prompt_id=prompt_id,
            model_id=model_id,
            run_id="test",
            targets="labelled",
            params={},
            input_ids=[1, 2],
            status="ok",
        )
        insert_graph(
            store, record, pd.DataFrame(columns=NODE_COLUMNS), pd.DataFrame(columns=EDGE_COLUMNS)
        )


def test_a_review_item_links_to_its_graphs_or_says_how_to_make_them(store):
    page = open_page("ana")
    prompt_id = held(page)
    assert not graph_pairs(store, prompt_id=prompt_id)
    assert f"`emc trace {prompt_id}` makes them" in texts(page.caption)
    assert not [m for m in page.markdown if "Graphs of this prompt" in m.value]

    add_graph_pair(store, prompt_id)
    assert graph_pairs(store, prompt_id=prompt_id)
    page.run()
    assert not page.exception
    url = widgets.page_url("graphs", prompt=prompt_id)
    assert f"[Graphs of this prompt]({url})" in [m.value for m in page.markdown]
    assert "emc trace" not in texts(page.caption)


def test_verdict_history_is_per_day_when_the_store_offers_it(store, monkeypatch):
    import emc.store.judgements as judgements

    totals, per_day = review_page.verdict_history(store)
    if not hasattr(judgements, "verdicts_by_day"):
        assert not per_day and totals["judgements"].sum() == 4
    by_day = pd.DataFrame(
        {"day": [pd.Timestamp("2026-01-02")], "verdict": ["no_issue"], "judgements": [3]}
    )
    monkeypatch.setattr(judgements, "verdicts_by_day", lambda _store: by_day, raising=False)
    frame, per_day = review_page.verdict_history(store)
    assert per_day and frame.equals(by_day)


# --- the judge against reviewers --------------------------------------------------------------

# 30 tokens, 12 agreed: p_o = 0.4, p_e = 3 * (10 * 10) / 30^2 = 1/3, kappa = 0.1 (< 0.6).
DISAGREEING = ((4, 3, 3), (3, 4, 3), (3, 3, 4))
# 25 tokens, 24 agreed; people 10/5/10, judge 11/5/9 per label:
# p_o = 0.96, p_e = (10*11 + 5*5 + 10*9) / 25^2 = 0.36, kappa = 0.6 / 0.64 = 0.9375.
AGREEING = ((10, 0, 0), (0, 5, 0), (1, 0, 9))


def test_the_page_shows_how_each_judge_agrees_with_reviewers_and_warns(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    store = Store.in_data_dir(tmp_path)
    reviewed_prompts(store, "judge-x", pairs_from_matrix(DISAGREEING))
    reviewed_prompts(store, "judge-y", pairs_from_matrix(AGREEING))
    reviewed_prompts(store, "judge-z", pairs_from_matrix(((1, 0, 0), (0, 0, 0), (0, 0, 1))))

    page = open_page()
    table = page.dataframe[0].value
    assert list(table["judge"]) == ["judge-x", "judge-y", "judge-z"]
    assert list(table["tokens"]) == [30, 25, 2]
    assert list(table["kappa"].round(4)) == [0.1, 0.9375, 1.0]
    assert list(table["agreement"].round(4)) == [0.4, 0.96, 1.0]
    assert table["standing"].iloc[2] == "not enough reviews yet (n = 2 < 20)"
    (warning,) = page.warning
    assert "judge-x" in warning.value and "disagrees with reviewers (kappa 0.10 < 0.6)" in (
        warning.value
    )

    (expander,) = [e for e in page.expander if "Confusion" in e.label]
    matrices = [d.value for d in expander.dataframe if "judge: evil" in d.value.columns]
    assert [m.to_numpy().tolist() for m in matrices] == [
        [list(row) for row in m] for m in (DISAGREEING, AGREEING, ((1, 0, 0), (0, 0, 0), (0, 0, 1)))
    ]
    assert list(matrices[0].index) == ["person: evil", "person: unsure", "person: safe"]


def test_without_reviews_the_page_says_there_is_no_calibration_yet(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page()
    assert "no reviewed tokens yet" in texts(page.caption)
    assert not page.warning and not page.dataframe


def test_a_review_on_the_page_shows_up_in_the_judge_calibration(store):
    page = open_page("ana")
    prompt_id = held(page)
    item = review_page.load_item(store, prompt_id)
    page.button(key="review-agree").click().run()
    assert not page.exception and not page.error

    judge_model = item.judgement["judge_model"]
    table = page.dataframe[0].value
    assert list(table["judge"]) == [judge_model]
    assert table["tokens"].iloc[0] == len(item.judge_labels)
    assert table["kappa"].iloc[0] == 1.0 or table["kappa"].isna().iloc[0]
