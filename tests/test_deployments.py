"""The deployment path for real: a Prefect server, `emc prefect setup --deploy`, a process worker,
the `pipeline/process` deployment run on the small organism, rows checked in DuckDB.

Run alone with `pytest -m integration tests/test_deployments.py`. Every service is a real
subprocess on localhost; nothing is mocked. The worker is stopped before the server, with two
SIGTERMs (the first only forwards SIGINT to a running flow).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest

from emc.store import Store, read_only_query
from tests.browser import ROOT, free_port
from tests.graph_store import seed_organism

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
def _prefect_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A `prefect server` on a free local port, healthy; yields the environment that uses it."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
               str(port)]  # fmt: skip
    log = tmp_path / "server.log"
    with _process(command, _env(home), log) as server:
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
# due during the test never starts a discovery run on the worker (in the default data dir).
_PAUSE_SCHEDULED = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    deployment = client.read_deployment_by_name("discovery/process")
    crons = [s.schedule.cron for s in client.read_deployment_schedules(deployment.id)]
    client.pause_deployment(deployment.id)
print(json.dumps({"crons": crons}))
"""

_LIST_RUNS = """
import json
from prefect.client.orchestration import get_client
with get_client(sync_client=True) as client:
    runs = client.read_flow_runs()
    artifacts = client.read_artifacts()
print(json.dumps({"flow_runs": [r.name for r in runs], "artifacts": [a.key for a in artifacts]}))
"""


def test_the_pipeline_deployment_runs_on_a_process_worker(tmp_path, small_organism):
    data_dir, worker_log = tmp_path / "data", tmp_path / "worker.log"
    seed_organism(small_organism, data_dir)  # the worker's organism stage verifies and reuses it
    with _prefect_server(tmp_path) as env:
        setup = _run([str(BIN / "emc"), "prefect", "setup", "--deploy"], env, timeout=300)
        assert "emc-process" in setup.stdout and "store-writer" in setup.stdout
        again = _run([str(BIN / "emc"), "prefect", "setup"], env, timeout=120)
        assert "True" not in again.stdout, "a second setup created something again"
        listed = _run([str(BIN / "prefect"), "deployment", "ls"], env, timeout=120).stdout
        for name in ("pipeline", "discovery", "tracing", "analysis"):
            assert f"{name}/process" in listed and f"{name}/docker" in listed
        paused = json.loads(_run([sys.executable, "-c", _PAUSE_SCHEDULED], env, 120).stdout)
        assert paused["crons"] == ["0 */6 * * *"]

        worker_cmd = [str(BIN / "prefect"), "worker", "start", "--pool", "emc-process"]
        with _process(worker_cmd, env, worker_log, stop_signals=2) as worker:
            params = {
                "data_dir": str(data_dir),
                "small_organism": True,
                "iterations": 1,
                "prompts_per_iteration": 2,
                "graphs": 1,
                "ablate_top": 3,
                "continuation_samples": 3,
                "eval_samples": 2,
            }
            run = subprocess.run(
                [str(BIN / "prefect"), "deployment", "run", "pipeline/process",
                 "--params", json.dumps(params), "--watch", "--watch-timeout", "900"],
                cwd=ROOT, env=env, capture_output=True, text=True, timeout=960,
            )  # fmt: skip
            assert worker.poll() is None, worker_log.read_text()[-3000:]
            assert run.returncode == 0 and "COMPLETED" in run.stdout.upper(), (
                f"{run.stdout[-3000:]}\n{run.stderr[-2000:]}\nworker:\n"
                f"{worker_log.read_text()[-5000:]}"
            )
        assert worker.returncode is not None  # stopped before the server
        published = json.loads(_run([sys.executable, "-c", _LIST_RUNS], env, timeout=120).stdout)

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
        "tracing-graphs",
        "analysis-summary",
        "analysis-ranking",
        "analysis-forward",
        "interventions-summary",
        "behaviour",
        "em-rates",
    }
    missing = expected_artifacts - set(published["artifacts"])
    assert not missing, (sorted(missing), sorted(published["artifacts"]))

    store = Store.in_data_dir(data_dir)
    runs = read_only_query(store, "SELECT name, kind, status, flow_run_id FROM runs")
    assert set(runs["name"]) == {"organism-build", "model-check", "discovery", "tracing",
                                 "analysis", "interventions", "evaluation", "feature-cards",
                                 "pipeline"}  # fmt: skip
    assert set(runs["status"]) == {"completed"} and set(runs["kind"]) == {"flow"}
    assert runs["flow_run_id"].notna().all()
    graphs = read_only_query(store, "SELECT status FROM graphs")
    assert len(graphs) == 2 and set(graphs["status"]) == {"ok"}
    counts = read_only_query(
        store,
        "SELECT (SELECT count(*) FROM forward_diffs) AS forward, "
        "(SELECT count(*) FROM ablations) AS ablations, "
        "(SELECT count(*) FROM lora_comparisons) AS lora",
    )
    assert (counts.iloc[0] > 0).all(), counts


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
        _run([sys.executable, "-c", _PAUSE_SCHEDULED], env, 120)
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

    # Each worker ran shards: every graph came through the spool, and once only.
    for name, log in logs.items():
        assert "trace-shard-" in log.read_text(), f"worker {name} ran no shard"
    graphs = read_only_query(store, "SELECT graph_id, status FROM graphs")
    assert len(graphs) == 2 * queued and set(graphs["status"]) == {"ok"}
    assert graphs["graph_id"].is_unique
    ingested = list((data_dir / "spool" / "ingested").iterdir())
    assert len(ingested) == len(graphs) and not list((data_dir / "spool").glob("*.bundle"))
    assert f"made {len(graphs)}, failed 0" in first.stdout
    assert "made 0, failed 0" in again.stdout  # nothing left to do: no shard, no duplicate
