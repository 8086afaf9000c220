"""The Features page in a real headless Chromium, over graphs traced and analysed for real.

The AppTest suite (test_dashboard_features.py) checks the numbers; this checks that a browser
draws every tab's charts from them, and a feature's card opened from its URL, without a script
error.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest

from emc.config import dump_config
from emc.store import Store
from emc.store.feature_cards import card_summaries
from tests.browser import (
    browser_page,
    finish_run,
    require_playwright,
    screenshot,
    streamlit_dashboard,
)
from tests.graph_store import build_traced_store

pytestmark = pytest.mark.integration
TABS = ("Ranking", "Base vs adapted", "Across prompts", "LoRA geometry", "Ablations")


@pytest.fixture(scope="module")
def analysed(tmp_path_factory, small_organism, prefect_harness) -> Path:
    require_playwright()
    from flows.analysis import analysis_flow

    data_dir = tmp_path_factory.mktemp("features-browser")
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    build_traced_store(small_organism, data_dir, n_prompts=2)
    from flows.feature_cards import feature_cards_flow

    summary = analysis_flow(data_dir=str(data_dir), ablate_top=3, lora_null=50)
    assert summary["measured"] == 2 and summary["ablated_prompts"] == 2
    cards = feature_cards_flow(data_dir=str(data_dir), top=5, limit_texts=200)
    assert cards["carded"] >= 5
    return data_dir


def a_carded_feature(data_dir: Path) -> str:
    """The last carded feature with examples, as the URL names it."""
    cards = card_summaries(Store.in_data_dir(data_dir))
    row = cards[cards["examples"] > 0].iloc[-1]
    return f"{int(row.layer)}/{int(row.feature)}"


def test_every_tab_of_the_features_page_draws_its_charts(analysed, tmp_path):
    sync_api = require_playwright()
    with (
        streamlit_dashboard(analysed, tmp_path / "streamlit.log") as url,
        sync_api.sync_playwright() as playwright,
        browser_page(playwright) as (page, errors),
    ):
        page.goto(url)
        page.get_by_role("link", name="Features").click()
        page.get_by_text("Rank in adapted").wait_for()
        finish_run(page)
        charts = {}
        for tab in TABS:
            page.get_by_role("tab", name=tab).click()
            panel = page.get_by_role("tabpanel", name=tab)
            panel.locator(".vega-embed").first.wait_for()
            finish_run(page)
            charts[tab] = panel.locator(".vega-embed").count()
            if tab in ("Ranking", "Base vs adapted"):
                screenshot(page, f"features-{tab.split()[0].lower()}.png")
        panel = page.get_by_role("tabpanel", name="Base vs adapted")
        page.get_by_role("tab", name="Base vs adapted").click()
        assert panel.get_by_text("First divergent layer").is_visible()
        assert panel.get_by_text("L0", exact=True).is_visible()
        assert panel.get_by_text("Strongest paths to a target").is_visible()
        assert page.locator("[data-testid=stException]").count() == 0
        assert not errors, errors

        # A feature's card, opened from its URL as another page's link opens it.
        feature = a_carded_feature(analysed)
        page.goto(f"{url}/features?feature={feature}")
        page.get_by_text(f"Feature L{feature}").wait_for()
        page.get_by_text("What it fires on").wait_for()
        finish_run(page)
        panel = page.get_by_role("tabpanel", name="Ranking")
        examples = panel.locator(".emc-example")
        assert examples.count() > 0 and examples.first.is_visible()
        assert panel.locator('.emc-token[data-max="true"]').count() == examples.count()
        card_charts = panel.locator(".vega-embed").count()
        assert panel.get_by_role("button", name="Save label").is_visible()
        screenshot(page, "features-card.png")
        assert f"feature={feature}" in unquote(page.url)
        assert page.locator("[data-testid=stException]").count() == 0
        assert not errors, errors
    # Ranking: the feature's per-prompt bars; diff: effect and error share by layer, and the
    # forward pass; LoRA: the cosine histogram; ablations: top vs control.
    assert charts["Ranking"] >= 1 and charts["Base vs adapted"] >= 4
    assert all(charts[tab] >= 1 for tab in TABS), charts
    # The card: the activation histogram, the logit effects, the per-prompt bars.
    assert card_charts >= 3
