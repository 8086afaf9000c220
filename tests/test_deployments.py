"""The deployment path for real: a Prefect server, `emc prefect setup --deploy`, a process worker;
the trigger chain (reviews saved in the dashboard -> tracing -> analysis -> causal checks and
behaviour), the switches of schedules and triggers, the `pipeline/full-pipeline` deployment on
the pool's data directory, and sharded tracing over two workers; rows checked in DuckDB.

Run alone with `pytest -m integration tests/test_deployments.py`. Every service is a real
subprocess on localhost; nothing is mocked. The worker is stopped before the server, with two
SIGTERMs (the first only forwards SIGINT to a running flow).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest

from emc.store import Store, read_only_query
from tests.browser import (
    ARTIFACTS,
    ROOT,
    browser_page,
    finish_run,
    free_port,
    require_playwright,
    streamlit_dashboard,
)
from tests.graph_store import copy_store, seed_organism
from tests.tcp_proxy import forwarded_port

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent


def _env(home: Path, api_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


@contextmanager
def _process(command: list[str], env: dict, log: Path, stop_signals: int = 1) -> Iterator:
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        for _ in range(stop_signals):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                with suppress(subprocess.TimeoutExpired):
                    process.wait(15)
        if process.poll() is None:
            process.kill()
            process.wait()


def _wait_healthy(url: str, server, log: Path, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with {server.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if json.load(reply) is True:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy after {seconds} s:\n{log.read_text()[-3000:]}")


@contextmanager
def _prefect_server(
    tmp_path: Path, port: int | None = None, ui_api_url: str | None = None
) -> Iterator[dict[str, str]]:
    """A `prefect server` on a local port (default: a free one), healthy; yields the environment
    that uses it. `ui_api_url`: the API address the UI calls (PREFECT_UI_API_URL)."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = port or free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
               str(port)]  # fmt: skip
    log = tmp_path / "server.log"
    server_env = _env(home) | ({"PREFECT_UI_API_URL": ui_api_url} if ui_api_url else {})
    with _process(command, server_env, log) as server:
        api = f"http://127.0.0.1:{port}/api"
        _wait_healthy(api, server, log)
        yield _env(home, api)


def _run(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result


# The cron deployment must show its schedule; then it is paused, so that a schedule that comes
# due during the test never starts a discovery run on the worker.
_PAUSE_SCHEDULED = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("discovery/discover-every-6h")
    schedules = client.read_deployment_schedules(deployment.id)
    for schedule in schedules:
        client.update_deployment_schedule(deployment.id, schedule.id, active=False)
print(json.dumps({"crons": [s.schedule.cron for s in schedules]}))
"""

_LIST_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployments = {d.id: d.name for d in client.read_deployments()}
    runs = client.read_flow_runs()
    artifacts = client.read_artifacts()
print(json.dumps({
    "flow_runs": [r.name for r in runs],
    "artifacts": [a.key for a in artifacts],
    "deployment_runs": [
        {"deployment": deployments.get(r.deployment_id), "state": r.state_name,
         "parameters": r.parameters, "id": str(r.id)}
        for r in runs if r.deployment_id
    ],
}))
"""

_CANCEL = """
import sys
from prefect.client.orchestration import get_client
from prefect.states import Cancelling
with get_client(sync_client=True) as client:
    for run_id in sys.argv[1:]:
        client.set_flow_run_state(run_id, Cancelling(), force=True)
"""

_RUN_LOGS = """
import json, sys
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
with get_client(sync_client=True) as client:
    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[sys.argv[1]])))
print(json.dumps([log.message for log in logs]))
"""


def _published(env: dict) -> dict:
    return json.loads(_run([sys.executable, "-c", _LIST_RUNS], env, timeout=120).stdout)


@dataclass
class Deployed:
    env: dict[str, str]
    pool_data_dir: Path  # the emc-process pool's EMC_DATA_DIR (`emc prefect setup --data-dir`)
    worker_log: Path
    setup_output: str
    ui_url: str  # the UI through another port than the server's, as PREFECT_UI_API_URL says


@pytest.fixture(scope="module")
def deployed(tmp_path_factory, clean_demo, small_organism) -> Iterator[Deployed]:
    """A Prefect server with EMC set up and deployed (tracing after 2 reviews) and one process
    worker. The pool's data directory holds the small organism and a copy of the demo's store."""
    root = tmp_path_factory.mktemp("deployed")
    pool_data = root / "pool-data"
    seed_organism(small_organism, pool_data)
    # No experiment.yaml: the pipeline's organism stage writes the pool's own.
    copy_store(clean_demo.pristine, pool_data)
    port = free_port()
    with (
        forwarded_port(port) as ui_port,
        _prefect_server(root, port, f"http://127.0.0.1:{ui_port}/api") as env,
    ):
        setup = _run([str(BIN / "emc"), "prefect", "setup", "--deploy", "--data-dir",
                      str(pool_data), "--trace-after", "2", "--within", "30m"], env,
                     timeout=300)  # fmt: skip
        paused = json.loads(_run([sys.executable, "-c", _PAUSE_SCHEDULED], env, 120).stdout)
        assert paused["crons"] == ["0 */6 * * *"]
        worker_log = root / "worker.log"
        worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "emc-process"]
        with _process(worker_cmd, env, worker_log, stop_signals=2) as worker:
            yield Deployed(env, pool_data, worker_log, setup.stdout, f"http://127.0.0.1:{ui_port}")
            assert worker.poll() is None, worker_log.read_text()[-3000:]


def test_setup_creates_pools_variables_and_readable_deployments(deployed):
    env = deployed.env
    assert "emc-process" in deployed.setup_output and "store-writer" in deployed.setup_output
    assert f"EMC_DATA_DIR={deployed.pool_data_dir}" in deployed.setup_output
    again = _run([str(BIN / "emc"), "prefect", "setup"], env, timeout=120)
    assert "True" not in again.stdout, "a second setup created something again"
    listed = _run([str(BIN / "prefect"), "deployment", "ls"], env, timeout=120).stdout
    for name in ("pipeline/full-pipeline", "discovery/discover-every-6h",
                 "tracing/trace-after-reviews", "analysis/analyse-after-tracing",
                 "interventions/causal-checks-after-analysis",
                 "evaluation/behaviour-after-analysis", "trace-shard/graphs-to-spool"):  # fmt: skip
        assert name in listed and f"{name}-docker" in listed, name


_DEPLOYMENT_ID = """
import sys
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    print(client.read_deployment_by_name(sys.argv[1]).id)
"""


def test_the_ui_shows_readable_deployments_and_parameter_forms(deployed):
    """The Prefect UI, reached through another port (PREFECT_UI_API_URL names it), in a real
    browser: the deployments page lists EMC's descriptive names, and a deployment's run form
    describes each parameter and offers its choices. Screenshots go to test-artifacts/."""
    sync_api = require_playwright()
    tracing_id = _run([sys.executable, "-c", _DEPLOYMENT_ID, "tracing/trace-after-reviews"],
                      deployed.env, 120).stdout.strip()  # fmt: skip
    ARTIFACTS.mkdir(exist_ok=True)
    with (
        sync_api.sync_playwright() as playwright,
        browser_page(playwright) as (page, errors),
    ):
        page.goto(f"{deployed.ui_url}/deployments")
        # The first page of ten, A to Z.
        for name in ("analyse-after-tracing", "check-models", "discover-every-6h"):
            page.get_by_text(name, exact=True).first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "prefect-deployments.png"), full_page=True)

        page.goto(f"{deployed.ui_url}/deployments/deployment/{tracing_id}/run")
        page.get_by_text("Which review-queue prompts are traced").first.wait_for()
        page.get_by_text("The EMC data directory").first.wait_for()
        page.screenshot(path=str(ARTIFACTS / "prefect-tracing-run-form.png"), full_page=True)
    assert not errors, errors


def test_pause_and_resume_switch_the_triggers_of_one_pool(deployed):
    env = {**deployed.env, "COLUMNS": "200"}
    status = _run([str(BIN / "emc"), "prefect", "status"], env, timeout=120).stdout
    rows = {line.split()[1]: line for line in status.splitlines() if line.count("│") > 3}
    assert "emc.review.saved x2 within 1800 s (active)" in rows["tracing/trace-after-reviews"]
    assert "(paused)" in rows["tracing/trace-after-reviews-docker"]
    assert "(paused)" in rows["discovery/discover-every-6h"]  # paused by the fixture

    paused = _run([str(BIN / "emc"), "prefect", "pause"], env, 120).stdout  # as the README types it
    assert "tracing/trace-after-reviews: trigger paused" in paused
    assert "(active)" not in paused
    resumed = _run([str(BIN / "emc"), "prefect", "resume"], env, 120).stdout
    assert "analysis/analyse-after-tracing: trigger resumed" in resumed
    assert "discovery/discover-every-6h: schedule resumed" in resumed
    _run([sys.executable, "-c", _PAUSE_SCHEDULED], env, 120)  # as the other tests expect
    docker = [line for line in resumed.splitlines() if "-docker" in line and "(active)" in line]
    assert not docker, docker


def _wait_for_run(env: dict, deployment: str, seconds: float, worker_log: Path) -> dict:
    """The first run of `deployment` once it is final; fails if it did not complete."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        runs = [r for r in _published(env)["deployment_runs"] if r["deployment"] == deployment]
        if runs and runs[-1]["state"] in ("Completed", "Failed", "Crashed", "Cancelled"):
            assert runs[-1]["state"] == "Completed", (runs, worker_log.read_text()[-4000:])
            return runs[-1]
        time.sleep(2)
    pytest.fail(f"no completed run of {deployment} after {seconds} s:\n"
                f"{worker_log.read_text()[-4000:]}")  # fmt: skip


def _reviews(store: Store) -> int:
    return int(read_only_query(store, "SELECT count(*) AS n FROM reviews")["n"][0])


def test_reviews_saved_in_the_dashboard_start_tracing_then_analysis(deployed, clean_demo, tmp_path):
    """The trigger chain for real: two reviews saved in the dashboard (a real browser) make the
    server start tracing on that store; tracing's graphs start analysis; analysis starts the
    causal checks and the behaviour stage."""
    sync_api = require_playwright()
    env, data_dir = deployed.env, tmp_path / "reviewed-store"
    copy_store(deployed.pool_data_dir, data_dir)  # another store than the pool's
    shutil.copy(clean_demo.data_dir / "experiment.yaml", data_dir / "experiment.yaml")
    store = Store.in_data_dir(data_dir)
    queued = list(read_only_query(store, "SELECT prompt_id FROM review_queue")["prompt_id"])
    assert len(queued) == 2
    api = {"PREFECT_API_URL": env["PREFECT_API_URL"]}
    with (
        streamlit_dashboard(data_dir, tmp_path / "streamlit.log", env=api) as url,
        sync_api.sync_playwright() as playwright,
        browser_page(playwright) as (page, errors),
    ):
        page.goto(f"{url}/review")
        name_box = page.get_by_label("Your name")
        name_box.fill("trigger-tester")
        name_box.press("Enter")
        for saved in (1, 2):
            page.get_by_text("Your labels", exact=True).wait_for()
            finish_run(page)
            page.get_by_role("button", name="Agree with all").click()
            # The first save's message stays on screen: wait for the store instead.
            deadline = time.monotonic() + 60
            while _reviews(store) < saved and time.monotonic() < deadline:
                time.sleep(0.5)
            assert _reviews(store) == saved
            finish_run(page)
    assert not errors, errors

    tracing = _wait_for_run(env, "trace-after-reviews", 300, deployed.worker_log)
    assert tracing["parameters"]["data_dir"] == str(data_dir.resolve())
    analysis = _wait_for_run(env, "analyse-after-tracing", 300, deployed.worker_log)
    assert analysis["parameters"]["data_dir"] == str(data_dir.resolve())
    graphs = read_only_query(store, "SELECT prompt_id, status FROM graphs")
    assert set(graphs["prompt_id"]) == set(queued) and set(graphs["status"]) == {"ok"}
    analysed = read_only_query(store, "SELECT DISTINCT prompt_id FROM forward_diffs")
    assert set(analysed["prompt_id"]) == set(queued)
    # Analysis announced itself: both later stages were started on the same store.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        started = {r["deployment"]: r for r in _published(env)["deployment_runs"]}
        if {"causal-checks-after-analysis", "behaviour-after-analysis"} <= set(started):
            break
        time.sleep(2)
    else:
        pytest.fail(f"analysis started no later stage: {sorted(started)}")
    for name in ("causal-checks-after-analysis", "behaviour-after-analysis"):
        assert started[name]["parameters"]["data_dir"] == str(data_dir.resolve())
    # Their work is the other tests' business: stop them, so the worker is free.
    _run([sys.executable, "-c", _CANCEL, *(r["id"] for r in started.values()
          if r["state"] not in ("Completed", "Failed", "Crashed"))], env, 120)  # fmt: skip
    # The pool's own store saw none of it.
    pool = Store.in_data_dir(deployed.pool_data_dir)
    assert read_only_query(pool, "SELECT count(*) AS n FROM reviews")["n"][0] == 0
    logs = json.loads(_run([sys.executable, "-c", _RUN_LOGS, tracing["id"]], env, 120).stdout)
    assert any("graph" in line for line in logs), logs


def test_the_pipeline_deployment_runs_on_the_pools_data_dir(deployed):
    """`pipeline/full-pipeline` with no data_dir: it works on the pool's EMC_DATA_DIR (set by
    `emc prefect setup --data-dir`); every stage skips what the demo's store already holds."""
    env, data_dir = deployed.env, deployed.pool_data_dir
    params = {
        "small_organism": True,
        "iterations": 1,
        "prompts_per_iteration": 2,
        "graphs": 1,
        "ablate_top": 3,
        "continuation_samples": 3,
        "eval_samples": 2,
    }
    run = subprocess.run(
        [str(BIN / "prefect"), "deployment", "run", "pipeline/full-pipeline",
         "--params", json.dumps(params), "--watch", "--watch-timeout", "900"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=960,
    )  # fmt: skip
    assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), (
        f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\nworker:\n"
        f"{deployed.worker_log.read_text()[-5000:]}"
    )
    published = _published(env)

    # Every stage ran as a readably named subflow and published its artifacts.
    expected_runs = {
        "pipeline-organism-default-1x-trace1",
        "organism-default",
        "model-check-base,adapted",
        "discovery-1x2",
        "tracing-flagged-config",
        "analysis-all-pairs-top3",
        "interventions-all-pairs",
        "evaluation-continuations",
        "evaluation-em+features",
        "evaluation-em",  # the control adapter, the negative control
    }
    missing = expected_runs - set(published["flow_runs"])
    assert not missing, (sorted(missing), sorted(published["flow_runs"]))
    expected_artifacts = {
        "organism",
        "pipeline-summary",
        "pipeline-store",
        "discovery-summary",
        "discovery-verdicts",
        "discovery-rounds",
        "tracing-summary",
        "analysis-summary",
        "analysis-ranking",
        "interventions-summary",
        "behaviour",
        "em-rates",
    }
    missing = expected_artifacts - set(published["artifacts"])
    assert not missing, (sorted(missing), sorted(published["artifacts"]))

    store = Store.in_data_dir(data_dir)
    runs = read_only_query(store, "SELECT name, kind, status, flow_run_id FROM runs "
                                  "WHERE flow_run_id IS NOT NULL")  # fmt: skip
    assert set(runs["name"]) == {"organism-build", "model-check", "discovery", "tracing",
                                 "analysis", "interventions", "evaluation", "feature-cards",
                                 "pipeline"}  # fmt: skip
    assert set(runs["status"]) == {"completed"} and set(runs["kind"]) == {"flow"}
    graphs = read_only_query(store, "SELECT status FROM graphs")
    assert len(graphs) >= 2 and set(graphs["status"]) == {"ok"}
    # The pipeline's own stages start nothing: their events say so (emc.chain off).
    pipeline_names = {"trace-after-reviews", "analyse-after-tracing"}
    triggered = [r for r in published["deployment_runs"] if r["deployment"] in pipeline_names
                 and r["parameters"].get("data_dir") == str(data_dir)]  # fmt: skip
    assert not triggered, triggered


def _flagged_data_dir(data_dir: Path, home: Path, small_organism) -> None:
    """The small organism and one discovery round, without a server (ephemeral Prefect)."""
    env = _env(home)
    seed_organism(small_organism, data_dir)  # `emc organism build` verifies and reuses it
    _run([str(BIN / "emc"), "organism", "build", "--small", "-d", str(data_dir)], env, 600)
    _run([str(BIN / "emc"), "discover", "--iterations", "1", "--per-iteration", "4",
          "-d", str(data_dir)], env, 600)  # fmt: skip


def test_two_workers_trace_shards_into_the_spool_and_one_ingest_loads_them(
    tmp_path, small_organism
):
    data_dir = tmp_path / "data"
    _flagged_data_dir(data_dir, tmp_path / "ephemeral-home", small_organism)
    store = Store.in_data_dir(data_dir)
    queued = read_only_query(store, "SELECT count(*) AS n FROM review_queue")["n"][0]
    assert queued >= 2
    logs = {name: tmp_path / f"worker-{name}.log" for name in ("a", "b")}
    with _prefect_server(tmp_path) as env:
        _run([str(BIN / "emc"), "prefect", "setup", "--deploy"], env, timeout=300)
        # Two GPUs' worth of slots, one flow run per worker: the shards spread over both.
        _run([str(BIN / "prefect"), "gcl", "update", "gpu", "--limit", "2"], env, timeout=60)
        # Nothing but the shards: `emc trace` announces its graphs, and analysis would follow.
        _run([str(BIN / "emc"), "prefect", "pause"], env, 120)
        workers = [[str(BIN / "prefect"), "worker", "start", "--pool", "emc-process", "--limit",
                    "1", "--name", f"worker-{name}"] for name in logs]  # fmt: skip
        with (
            _process(workers[0], env, logs["a"], stop_signals=2),
            _process(workers[1], env, logs["b"], stop_signals=2),
        ):
            trace = [str(BIN / "emc"), "trace", "--select", "flagged", "--shards", "2",
                     "-d", str(data_dir)]  # fmt: skip
            first = subprocess.run(trace, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=900)  # fmt: skip
            worker_output = "\n".join(log.read_text()[-3000:] for log in logs.values())
            assert first.returncode == 0, (
                f"{first.stdout[-3000:]}{first.stderr[-3000:]}\n{worker_output}"
            )
            again = _run(trace, env, timeout=600)
            # The behaviour stage the same way: samples drawn and judged by shards.
            check = [str(BIN / "emc"), "continuations", "--limit", "1", "--samples", "2",
                     "--shards", "2", "-d", str(data_dir)]  # fmt: skip
            sampled = subprocess.run(check, cwd=ROOT, env=env, capture_output=True, text=True,
                                     timeout=900)  # fmt: skip
            worker_output = "\n".join(log.read_text()[-3000:] for log in logs.values())
            assert sampled.returncode == 0, (
                f"{sampled.stdout[-3000:]}{sampled.stderr[-3000:]}\n{worker_output}"
            )
            samples = read_only_query(store, "SELECT generation_id FROM generations")
            resampled = _run(check, env, timeout=600)
            started = {r["deployment"] for r in _published(env)["deployment_runs"]}

    # Each worker ran shards: every graph came through the spool, and once only.
    for name, log in logs.items():
        assert "trace-shard-" in log.read_text(), f"worker {name} ran no shard"
    graphs = read_only_query(store, "SELECT graph_id, status FROM graphs")
    assert len(graphs) == 2 * queued and set(graphs["status"]) == {"ok"}
    assert graphs["graph_id"].is_unique
    ingested = list((data_dir / "spool" / "ingested").glob("*.bundle*"))
    assert len(ingested) == len(graphs) and not list((data_dir / "spool").glob("*.bundle"))
    # Every sample came through the spool once; the second check drew nothing.
    worker_logs = "\n".join(log.read_text() for log in logs.values())
    assert "behaviour-shard-base-" in worker_logs and "behaviour-shard-adapted-" in worker_logs
    assert len(samples) > 0 and samples["generation_id"].is_unique
    assert list((data_dir / "spool" / "ingested").glob("*.samples*"))
    assert not list((data_dir / "spool").glob("*.samples"))
    assert started == {"graphs-to-spool", "samples-to-spool"}, started  # triggers paused
    after = read_only_query(store, "SELECT generation_id FROM generations")
    assert len(after) == len(samples), resampled.stdout[-2000:]
    assert f"made {len(graphs)}, failed 0" in first.stdout
    assert "made 0, failed 0" in again.stdout  # nothing left to do: no shard, no duplicate
