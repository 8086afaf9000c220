"""Headless Chromium for end-to-end tests: Debian's chromium driven by PyPI's playwright.

A missing browser fails the test instead of skipping it, so CI cannot pass without running it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts"
INSTALL_HINT = "run `bash scripts/install_browser.sh` (Debian chromium + PyPI playwright)"


def require_playwright():
    """playwright's sync API module, or a failed test naming how to install what is missing."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: {INSTALL_HINT}")
    try:
        from playwright import sync_api
    except ImportError:
        pytest.fail(f"the playwright package is missing: {INSTALL_HINT}")
    return sync_api


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
