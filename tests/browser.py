"""Headless Chromium for end-to-end tests: Debian's chromium driven by PyPI's playwright.

A missing browser fails the test instead of skipping it, so CI cannot pass without running it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def streamlit_dashboard(
    data_dir: Path, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`streamlit run dashboard/app.py` on the store in `data_dir` (with `env` added to this
    process's environment); yields its URL once healthy."""
    port = free_port()
    command = [
        sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
        "--server.fileWatcherType", "none",
    ]  # fmt: skip
    env = {**os.environ, **(env or {}), "EMC_DATA_DIR": str(data_dir)}
    with log_path.open("w") as log:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(f"streamlit exited with {server.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit was not healthy after 60 s:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def finish_run(page) -> None:
    """Wait for the script run to end; until then the page mixes old and new elements.

    Call it once something the run writes is visible: before a run starts there is nothing to
    wait for. Old elements are marked stale, and the running indicator shows only after a delay.
    """
    page.wait_for_function(
        "() => !document.querySelector('[data-stale=\"true\"], [data-testid=stStatusWidget]')"
    )


def screenshot(page, name: str) -> None:
    # Streamlit scrolls inside its main element, so a full-page shot would show one screen:
    # grow the window to the content first.
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": max(height, 1000)})
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1000})


@contextmanager
def browser_page(playwright, timeout_ms: int = 60_000) -> Iterator[tuple[Any, list[str]]]:
    """A 1400x1000 page of a fresh headless Chromium (closed afterwards), and the list the
    page's script errors are collected in."""
    browser = launch_chromium(playwright)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(timeout_ms)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        yield page, errors
    finally:
        browser.close()
