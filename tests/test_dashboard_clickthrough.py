"""The dashboard's pages linked to each other, clicked through in a real headless Chromium on the
demo's store (tests/demo_runs.py: `emc demo` on the small recipe, never killed).

A reviewer opens the traced prompt's review item by its URL, follows it to the prompt's graphs,
picks a feature node there, follows it to the feature's card, and from the card back to a prompt
where the feature appears. Every page must draw without a script error, every URL must name what
is on screen, and a screenshot of each page goes to test-artifacts/.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from emc.store import Store, read_only_query
from tests.browser import (
    browser_page,
    finish_run,
    require_playwright,
    screenshot,
    streamlit_dashboard,
)
from tests.graph_store import copy_store

pytestmark = pytest.mark.integration
PAGES = ("Runs", "Review", "Graphs", "Features", "Interventions", "Behaviour", "SQL")


@pytest.fixture(scope="module")
def demo_store(clean_demo, tmp_path_factory) -> Path:
    """A private copy of the demo's store (the review below claims and changes queue rows)."""
    require_playwright()
    data_dir = tmp_path_factory.mktemp("clickthrough") / "emc-data"
    copy_store(clean_demo.pristine, data_dir)  # as the demo left it: one traced prompt
    shutil.copy(clean_demo.data_dir / "experiment.yaml", data_dir / "experiment.yaml")
    return data_dir


def _query(page) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(page.url).query).items()}


def test_review_to_graph_to_feature_to_prompt(demo_store, tmp_path):
    sync_api = require_playwright()
    store = Store.in_data_dir(demo_store)
    (prompt_id,) = set(read_only_query(store, "SELECT prompt_id FROM graphs")["prompt_id"])
    with (
        streamlit_dashboard(demo_store, tmp_path / "streamlit.log") as url,
        sync_api.sync_playwright() as playwright,
        browser_page(playwright) as (page, errors),
    ):
        # Review: the traced prompt's item, opened by its URL, claimed under a name.
        page.goto(f"{url}/review?prompt={prompt_id}")
        name_box = page.get_by_label("Your name")
        name_box.fill("clicker")
        name_box.press("Enter")
        page.get_by_text("Your labels", exact=True).wait_for()
        finish_run(page)
        assert _query(page).get("prompt") == prompt_id
        screenshot(page, "clickthrough-1-review.png")

        # -> Graphs of this prompt.
        page.get_by_role("link", name="Graphs of this prompt").click()
        page.get_by_label("Node").first.wait_for()
        finish_run(page)
        assert _query(page).get("prompt") == prompt_id
        screenshot(page, "clickthrough-2-graphs.png")

        # A feature node of the base graph; the adapted graph selects the same node.
        picker = page.get_by_role("combobox", name="Node").first
        picker.click()
        picker.press_sequentially("feature", delay=50)  # the options are filtered as typed
        picker.press("Enter")
        finish_run(page)
        page.get_by_role("link", name="Feature card").first.wait_for()
        node = _query(page).get("node", "")
        assert node.startswith("feature/"), page.url
        _, layer, _position, feature = node.split("/")

        # -> its feature card.
        # The graphs page names the feature too, so wait for the card's own section.
        page.get_by_role("link", name=f"Feature card L{layer}/{feature}").first.click()
        page.get_by_text("Where it appears").wait_for()
        finish_run(page)
        assert _query(page).get("feature") == f"{layer}/{feature}"
        screenshot(page, "clickthrough-3-feature.png")

        # -> a prompt where it appears: back on the Graphs page, for that prompt.
        page.get_by_role("link", name="Graphs of").first.click()
        page.get_by_label("Node").first.wait_for()
        finish_run(page)
        assert _query(page).get("prompt") == prompt_id
        screenshot(page, "clickthrough-4-prompt.png")

        # Every page of the navigation draws, each with its screenshot.
        for name in PAGES:
            page.get_by_role("link", name=name, exact=True).first.click()
            page.get_by_role("heading", name=name).first.wait_for()
            finish_run(page)
            screenshot(page, f"page-{name.lower()}.png")
    assert not errors, errors
