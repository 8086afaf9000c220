"""The dashboard in a real headless Chromium: a reviewer relabels a token and saves it.

Needs Debian's chromium and PyPI's playwright (`bash scripts/install_browser.sh`). A missing
browser fails the test instead of skipping it, so CI cannot pass without running it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from dashboard.views import review as review_page
from emc.config import dump_config
from emc.store import STORE_FILE_NAME, Store
from emc.store.judgements import current_labels
from emc.store.queue import list_queue, queue_counts
from emc.store.reviews import list_reviews
from tests.browser import (
    finish_run,
    launch_chromium,
    require_playwright,
    screenshot,
    streamlit_dashboard,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="session")
def browser_tools():
    """Checked before the store is built, so a missing browser fails in seconds."""
    sync_api = require_playwright()
    return sync_api.sync_playwright, sync_api.expect


@pytest.fixture(scope="module")
def discovered(browser_tools, tmp_path_factory, small_organism, prefect_harness) -> Path:
    """A store after one discovery round: prompts, logits, judgements and a pending queue."""
    from flows.discovery import discovery_flow

    template = tmp_path_factory.mktemp("e2e-template")
    (template / "experiment.yaml").write_text(dump_config(small_organism.config))
    discovery_flow(data_dir=str(template), iterations=1, prompts_per_iteration=3)
    assert queue_counts(Store.in_data_dir(template))["pending"] >= 1
    return template


@pytest.fixture
def data_dir(discovered, tmp_path) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in discovered.glob(f"{STORE_FILE_NAME}*"):
        shutil.copy(path, data_dir / path.name)
    return data_dir


@pytest.fixture
def dashboard_url(data_dir, tmp_path):
    with streamlit_dashboard(data_dir, tmp_path / "streamlit.log") as url:
        yield url


def test_a_reviewer_relabels_a_token_in_the_browser(browser_tools, dashboard_url, data_dir):
    store = Store.in_data_dir(data_dir)
    explanation = "In this context the token leads to a harmless reply."
    sync_playwright, expect = browser_tools
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(30_000)
            # From the root, through the navigation, as a researcher does.
            page.goto(dashboard_url)
            page.get_by_role("link", name="Review").click()
            page.get_by_text("Enter your name in the sidebar").wait_for()
            name_box = page.get_by_label("Your name")
            name_box.fill("e2e")
            name_box.press("Enter")
            page.get_by_text("Your labels", exact=True).wait_for()

            # Which item the page claimed, and one of its tokens to flip.
            claimed = list_queue(store, "in_review")
            (prompt_id,) = claimed.loc[claimed["claimed_by"] == "human:e2e", "prompt_id"]
            item = review_page.load_item(store, prompt_id)
            row = next((r for r in item.rows if r.judge_label == "evil"), item.rows[0])
            new = "safe" if row.judge_label == "evil" else "evil"
            choices = page.get_by_role("radiogroup", name=f"label for {row.token!r}")
            choices.get_by_role("radio", name=new).click()
            page.get_by_text("You changed 1 of").wait_for()
            finish_run(page)

            page.get_by_label("Explanation").fill(explanation)
            screenshot(page, "review-relabelled.png")
            page.get_by_role("button", name="Save labels").click()
            page.get_by_text(f"Saved: you relabelled {item.prompt.name}").wait_for()
            finish_run(page)
            # The next item starts blank: nothing typed for the last one carries over.
            expect(page.get_by_label("Explanation")).to_have_value("")
            screenshot(page, "review.png")
        finally:
            browser.close()

    assert current_labels(store, prompt_id)[row.token_id] == (new, "human:e2e")
    (review,) = list_reviews(store).itertuples()
    assert (review.prompt_id, review.action, review.disagreed) == (prompt_id, "relabel", True)
    assert review.explanation == explanation
    assert list_queue(store, "done")["prompt_id"].tolist() == [prompt_id]
