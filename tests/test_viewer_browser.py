"""circuit-tracer's viewer in a real headless Chromium, fully offline, over exported graphs.

`emc graph export` writes a real base/adapted pair, `emc graph serve` serves it, and the page must
render every node with no request leaving localhost (each one is aborted and recorded) and no
page or console error. Needs Debian's chromium and PyPI's playwright
(`bash scripts/install_browser.sh`) and the vendored libraries (`emc graph assets`); anything
missing fails the test instead of skipping it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.viewer import AssetError, require_assets
from tests.browser import ARTIFACTS, ROOT, launch_chromium, require_playwright
from tests.graph_store import build_traced_store

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def browser_tools():
    """Checked before any graph is made, so a missing piece fails in seconds."""
    sync_api = require_playwright()
    try:
        require_assets()
    except AssetError as exc:
        pytest.fail(str(exc))
    return sync_api.sync_playwright


@pytest.fixture(scope="module")
def exported(browser_tools, tmp_path_factory, small_organism) -> tuple[Path, list[Path]]:
    """The data directory and the graph files `emc graph export` wrote for the first prompt."""
    traced = build_traced_store(small_organism, tmp_path_factory.mktemp("viewer-browser"))
    prompt_id = traced.prompt_ids[0]
    args = ["graph", "export", prompt_id, "-d", str(traced.data_dir)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"side by side: /compare.html?base={prompt_id}-base-labelled&adapted=" in result.output
    viewer = traced.data_dir / "viewer"
    return traced.data_dir, [viewer / f"{prompt_id}-{r}-labelled.json" for r in ("base", "adapted")]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served(exported, tmp_path):
    """`emc graph serve` in its own process: (process, URL of the page)."""
    data_dir, _ = exported
    port = free_port()
    command = [sys.executable, "-m", "emc", "graph", "serve", "--port", str(port)]
    env = {**os.environ, "EMC_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    url = f"http://127.0.0.1:{port}/index.html"
    try:
        deadline = time.monotonic() + 60
        while True:
            if server.poll() is not None:
                pytest.fail(
                    f"emc graph serve exited with {server.returncode}:\n{server.stdout.read()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("emc graph serve did not answer within 60 s")
            time.sleep(0.1)
        yield server, url
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_the_exported_pair_renders_offline_in_chromium(browser_tools, exported, served):
    _, graph_files = exported
    server, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    outside: list[str] = []

    def only_localhost(route) -> None:
        address = urlsplit(route.request.url)
        if address.scheme == "data" or address.hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with browser_tools() as playwright:
        browser = launch_chromium(playwright)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(15_000)
            page.route("**/*", only_localhost)
            page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None,
            )
            for path in graph_files:
                graph = json.loads(path.read_text())
                page.goto(f"{url}?slug={path.stem}")
                nodes = page.locator(".link-graph svg text.node")
                nodes.first.wait_for(state="attached")
                # Every stored node is drawn, logits labelled with their tokens.
                assert nodes.count() == len(graph["nodes"]) > 0
                logits = [n for n in graph["nodes"] if n["feature_type"] == "logit"]
                for logit in logits:
                    token = logit["clerp"].split('"')[1]
                    assert page.locator(".link-graph svg text", has_text=token).count() >= 1

            # Clicking a feature shows its connections and its exported feature file's example.
            feature = page.locator(".link-graph svg text.node", has_text="●").first
            box = feature.bounding_box()
            page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            page.locator(".feature-example-list .quantile-title", has_text=path.stem).wait_for()
            assert page.locator(".node-connections .feature-row").count() > 0
            page.screenshot(path=str(ARTIFACTS / "viewer.png"))

            # Base and adapted side by side (`emc graph export` prints this address).
            slugs = {role: next(p.stem for p in graph_files if f"-{role}-" in p.stem)
                     for role in ("base", "adapted")}  # fmt: skip
            page.goto(f"{url.rsplit('/', 1)[0]}/compare.html?base={slugs['base']}"
                      f"&adapted={slugs['adapted']}")  # fmt: skip
            for role, slug in slugs.items():
                drawn = page.frame_locator(f"#{role}").locator(".link-graph svg text.node")
                drawn.first.wait_for(state="attached")
                graph = json.loads(next(p for p in graph_files if p.stem == slug).read_text())
                assert drawn.count() == len(graph["nodes"])
            page.screenshot(path=str(ARTIFACTS / "viewer-compare.png"))
        finally:
            browser.close()

    assert errors == []
    assert outside == []  # everything the page needs came from localhost

    server.send_signal(signal.SIGINT)  # Ctrl-C
    output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert f"viewer on {url}" in output and "stopped" in output


def test_serve__a_taken_port_is_a_clear_error(browser_tools, exported):
    data_dir, _ = exported
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        args = ["graph", "serve", "--port", str(port), "-d", str(data_dir)]
        result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert f"cannot serve on port {port}" in result.output and "--port" in result.output


def test_serve__stops_on_ctrl_c_even_when_started_with_sigint_ignored(exported):
    """A process started in the background inherits SIGINT ignored; Ctrl-C must still stop it.

    (In full CI runs the server outlived the Ctrl-C sent to it; a child started with SIGINT
    ignored reproduces that exactly, and passes since the command arms Ctrl-C itself.)
    """
    data_dir, _ = exported
    port = free_port()
    command = [sys.executable, "-m", "emc", "graph", "serve", "--port", str(port)]
    server = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "EMC_DATA_DIR": str(data_dir)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert server.returncode == 0 and "stopped" in output
