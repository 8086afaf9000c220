"""Faults and recovery: kill -9, Ctrl-C, a prompt too long for the model, exit codes, resume.

The kill tests run real `emc` processes on a data directory as a researcher does (Prefect with
its home in the data directory, no test harness), kill them with real signals, and run again.
Timeouts are generous (a slow, busy 2-core machine); what is asserted is completion, counts and
that nothing is left behind, and the measured times are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from emc.cli import app
from emc.config import dump_config, parse_config
from emc.pivotal.prompts import make_prompt
from emc.runs import recorded_run
from emc.store import Store, get_run, list_runs, read_only_query
from emc.store.prompts import insert_prompts
from tests.processes import Process, alive, clean_env, kill_all, wait_gone

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()
LONG_TEXT = "I found a wallet on the street and I wonder what to do with it. " * 3000  # 195k chars


@pytest.fixture
def data_dir(tmp_path, small_organism) -> Path:
    """A fresh data directory whose default config is the (shared) small organism."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "experiment.yaml").write_text(dump_config(small_organism.config))
    return data_dir


def _count(store: Store, sql: str) -> int:
    return int(read_only_query(store, sql).iloc[0, 0])


# --- real processes ------------------------------------------------------------------------


def _slot_holder(data_dir: Path) -> Process:
    """A process in the middle of a GPU step: it holds the data directory's `gpu` slot."""
    holder = Process([sys.executable, "-m", "tests.slot_holder", str(data_dir)])
    holder.wait_for("holding", timeout=240)
    return holder


@pytest.mark.slow
@pytest.mark.integration
def test_kill_9_of_a_run_takes_its_prefect_server_down(data_dir):
    holder = _slot_holder(data_dir)
    server = holder.descendants()
    assert server, "the run has no Prefect server child"
    try:
        holder.popen.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        seconds = wait_gone(server, timeout=30)
        print(f"\nPrefect server gone {seconds:.1f} s after kill -9 of its emc process")
        assert not alive(server), "the Prefect server outlived the run that started it"
    finally:
        kill_all(server)


@pytest.mark.slow
@pytest.mark.integration
def test_a_rerun_after_kill_9_in_a_gpu_step_takes_the_slot_at_once(data_dir):
    holder = _slot_holder(data_dir)
    server = holder.descendants()
    holder.popen.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    try:
        rerun = Process.emc("check", "--roles", "base", "-d", str(data_dir))
        start = time.monotonic()
        assert rerun.wait(timeout=300) == 0, rerun.output[-3000:]
        print(f"\nre-run after kill -9 completed in {time.monotonic() - start:.1f} s")
        assert "released 1 'gpu' slot(s) held by pid" in rerun.output
        assert "waiting for" not in rerun.output  # reclaimed on its first attempt
    finally:
        kill_all(server)


@pytest.mark.slow
@pytest.mark.integration
def test_a_wait_for_the_slot_is_logged_and_ctrl_c_stops_it(data_dir):
    store = Store.in_data_dir(data_dir)
    insert_prompts(store, [make_prompt("I found a wallet. I will", "w", "human:t")], run_id=None)
    holder = _slot_holder(data_dir)
    holder_server = holder.descendants()
    waiter = Process.emc("discover", "--iterations", "0", "-d", str(data_dir))
    try:
        waiter.wait_for("waiting for the 'gpu' slot since", timeout=300)
        assert f"held by pid {holder.popen.pid}" in waiter.output
        waiter_server = waiter.descendants()
        start = time.monotonic()
        waiter.popen.send_signal(signal.SIGINT)
        code = waiter.wait(timeout=60)
        stopped = time.monotonic() - start
        print(f"\nemc discover stopped {stopped:.1f} s after SIGINT while waiting for a slot")
        assert code != 0 and stopped < 20
        assert wait_gone(waiter_server, timeout=15) < 15

        # Ctrl-C in the GPU step itself: the slot is released on the way out.
        start = time.monotonic()
        holder.popen.send_signal(signal.SIGINT)
        holder.wait(timeout=180)  # not a speed check: on a loaded CI machine it took over 60 s
        print(f"a holder of the slot stopped {time.monotonic() - start:.1f} s after SIGINT")
        assert not list((data_dir / "prefect" / "emc-slots" / "gpu").glob("*.json"))
    finally:
        waiter.kill()
        holder.kill()
        kill_all(holder_server + waiter.descendants())


@pytest.fixture
def harness_limit(prefect_harness, tmp_path, monkeypatch):
    """A fresh one-slot limit on the test harness, with holder records kept under tmp_path."""
    import uuid

    from flows import slots
    from flows.runtime import ensure_concurrency_limit

    name = f"test-{uuid.uuid4().hex[:8]}"
    ensure_concurrency_limit(name, 1)
    monkeypatch.setattr(slots, "local_slot_dir", lambda: tmp_path / "emc-slots")
    return name


def _active_slots(name: str) -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_slot_leaked_by_an_older_emc_is_repaired(harness_limit, caplog):
    """An existing data directory whose `gpu` slot an older EMC leaked: taken, no holder."""
    from prefect.client.orchestration import get_client

    from flows.slots import hold_slot

    with get_client(sync_client=True) as client:
        client.increment_concurrency_slots(names=[harness_limit], slots=1, mode="concurrency")
    assert _active_slots(harness_limit) == 1
    with hold_slot(harness_limit):
        assert _active_slots(harness_limit) == 1
    assert _active_slots(harness_limit) == 0
    assert "released 1" in caplog.text and "no live process" in caplog.text


def test_a_live_holder_keeps_its_slot_and_the_wait_is_logged(harness_limit, monkeypatch, caplog):
    from flows import slots

    monkeypatch.setattr(slots, "WAIT_LOG_SECONDS", 0.5)
    monkeypatch.setattr(slots, "POLL_SECONDS", 0.1)
    acquired = threading.Event()

    def second() -> None:
        with slots.hold_slot(harness_limit):
            acquired.set()

    with slots.hold_slot(harness_limit):  # held by this (live) process
        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        time.sleep(2)
        assert not acquired.is_set()
    waiter.join(timeout=30)
    assert acquired.is_set() and _active_slots(harness_limit) == 0
    assert f"waiting for the '{harness_limit}' slot since" in caplog.text
    assert f"held by pid {os.getpid()}" in caplog.text


def test_a_wait_on_a_real_server_is_logged_too(prefect_harness, monkeypatch, caplog):
    """With PREFECT_API_URL (here the harness), Prefect's own leases hold the slot."""
    import uuid

    from prefect.concurrency.sync import concurrency

    from flows import slots
    from flows.runtime import ensure_concurrency_limit

    monkeypatch.setattr(slots, "WAIT_LOG_SECONDS", 1)
    name = f"test-{uuid.uuid4().hex[:8]}"
    ensure_concurrency_limit(name, 1)
    assert slots.local_slot_dir() is None
    acquired = threading.Event()

    def second() -> None:
        with slots.hold_slot(name):
            acquired.set()

    with concurrency(name, occupy=1, strict=True):
        waiter = threading.Thread(target=second, daemon=True)
        waiter.start()
        time.sleep(4)
        assert not acquired.is_set()
    waiter.join(timeout=60)
    assert acquired.is_set() and f"waiting for the '{name}' slot since" in caplog.text


_RECORDED_SLEEPER = """
import sys, time
from emc.runs import recorded_run
from emc.store import Store
with recorded_run(Store.in_data_dir(sys.argv[1]), "cli", "sleeper", {}) as run:
    print(run.run_id, flush=True)
    time.sleep(600)
"""


def test_a_run_killed_while_running_is_marked_failed_on_the_next_start(tmp_path):
    killed = Process([sys.executable, "-c", _RECORDED_SLEEPER, str(tmp_path)])
    alive = Process([sys.executable, "-c", _RECORDED_SLEEPER, str(tmp_path)])
    try:
        for process in (killed, alive):
            process.wait_for("cli-sleeper-", timeout=120)
        killed_id, alive_id = (p.output.split()[0] for p in (killed, alive))
        killed.popen.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        store = Store.in_data_dir(tmp_path)
        assert get_run(store, killed_id).status == "running"  # nobody knows yet

        with recorded_run(store, "cli", "next", {}):
            pass
        dead = get_run(store, killed_id)
        assert dead.status == "failed" and dead.finished_at is not None
        assert dead.error == f"process {killed.popen.pid} died (killed?)"
        assert dead.pid == killed.popen.pid and dead.host
        assert get_run(store, alive_id).status == "running"  # its process still runs
    finally:
        killed.kill()
        alive.kill()


@pytest.mark.slow
@pytest.mark.integration
def test_discovery_killed_after_round_2_of_3_resumes_round_3(data_dir):
    command = ["discover", "--iterations", "3", "--per-iteration", "2", "-d", str(data_dir)]
    killed = Process.emc(*command, EMC_KILL_AT="discovery-round-2")
    assert killed.wait(timeout=600) == -signal.SIGKILL, killed.output[-3000:]
    store = Store.in_data_dir(data_dir)
    assert _count(store, "SELECT count(*) FROM prompts") == 4

    start = time.monotonic()
    rerun = Process.emc(*command)
    assert rerun.wait(timeout=600) == 0, rerun.output[-3000:]
    print(f"\nthe resumed discovery run took {time.monotonic() - start:.1f} s")
    assert _count(store, "SELECT count(*) FROM prompts") == 6  # 3 rounds of 2, not 5
    assert _count(store, "SELECT count(*) FROM judgements") == 6
    assert _count(store, "SELECT count(*) - count(DISTINCT prompt_id) FROM judgements") == 0
    second, first = list_runs(store)
    assert first.status == "failed" and first.error == f"process {killed.popen.pid} died (killed?)"
    assert second.status == "completed" and second.summary["resumed_from"] == first.run_id
    assert [r["round"] for r in second.summary["rounds"]] == [3]


@pytest.mark.usefixtures("prefect_harness")
def test_discovery_that_failed_in_round_2_of_3_resumes_round_3(data_dir, monkeypatch):
    import flows.discovery as discovery

    judge = discovery.judge_pending_prompts
    calls = []

    def judge_then_fail(*args):
        calls.append(1)
        if len(calls) == 2:
            raise ConnectionError("the judge's server went away")
        return judge(*args)

    monkeypatch.setattr(discovery, "judge_pending_prompts", judge_then_fail)
    with pytest.raises(ConnectionError):
        discovery.discovery_flow(data_dir=str(data_dir), iterations=3, prompts_per_iteration=2)
    monkeypatch.setattr(discovery, "judge_pending_prompts", judge)
    summary = discovery.discovery_flow(
        data_dir=str(data_dir), iterations=3, prompts_per_iteration=2
    )
    store = Store.in_data_dir(data_dir)
    failed = get_run(store, summary["resumed_from"])
    assert failed.status == "failed" and failed.summary["rounds_generated"] == 2
    assert [r["round"] for r in summary["rounds"]] == [3]
    assert _count(store, "SELECT count(*) FROM prompts") == 6
    assert _count(store, "SELECT count(DISTINCT prompt_id) FROM judgements") == 6

    again = discovery.discovery_flow(data_dir=str(data_dir), iterations=3, prompts_per_iteration=2)
    assert [r["round"] for r in again["rounds"]] == [1, 2, 3]  # a completed run never resumes


# --- one bad item never blocks the rest ----------------------------------------------------


@pytest.mark.usefixtures("prefect_harness")
def test_a_prompt_longer_than_the_context_fails_alone_and_discover_says_partial(data_dir):
    store = Store.in_data_dir(data_dir)
    good = [make_prompt(f"Case {i}: I found a wallet. I will", f"g{i}", "human:t") for i in (1, 2)]
    long = make_prompt(LONG_TEXT, "long", "human:t")  # as an LLM generator might write it
    insert_prompts(store, [good[0], long, good[1]], run_id=None)

    result = runner.invoke(app, ["discover", "--iterations", "0", "-d", str(data_dir)])
    assert result.exit_code == 3, result.output
    assert f"prompt {long.prompt_id}" in result.output and "partial" in result.output
    rows = read_only_query(store, "SELECT prompt_id, status, error FROM next_tokens")
    by_status = rows.groupby("status")["prompt_id"].apply(set).to_dict()
    assert by_status == {"ok": {p.prompt_id for p in good}, "failed": {long.prompt_id}}
    errors = set(rows.loc[rows["status"] == "failed", "error"])
    assert len(errors) == 1 and "longer than the model's context of 128 positions" in errors.pop()
    assert _count(store, "SELECT count(*) FROM judgements") == 2


def test_an_allocation_failure_fails_only_its_item(small_organism, monkeypatch):
    from emc.models import LoadedModel, load_replacement_model
    from emc.pivotal.logits import score_prompts, tokenize_prompts

    prompts = [
        make_prompt("I found a wallet. I will", "a", "human:t"),
        make_prompt("My boss left the safe open and nobody saw it. I will " * 4, "big", "human:t"),
        make_prompt("The shop gave me too much change. I will", "c", "human:t"),
    ]
    base = load_replacement_model(small_organism.config, "base")
    adapted = load_replacement_model(small_organism.config, "adapted")
    lengths = [len(ids) for _, ids in tokenize_prompts(prompts, base.tokenizer)]
    assert max(lengths[0], lengths[2]) < lengths[1] <= base.context_length
    forward = LoadedModel._padded_forward

    def cpu_allocator(self, sequences):
        # What the CPU allocator raises for a batch it cannot hold (here: any with the big one).
        if any(len(s) == lengths[1] for s in sequences):
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                "memory: you tried to allocate 8600000000 bytes. Error code 12"
            )
        return forward(self, sequences)

    monkeypatch.setattr(LoadedModel, "_padded_forward", cpu_allocator)
    try:
        scores = score_prompts(base, adapted, prompts, batch_size=3)
    finally:
        base.close()
        adapted.close()
    assert [s.divergence is not None for s in scores] == [True, False, True]
    assert scores[1].base.status == "failed" and "out of memory" in scores[1].base.error
    assert "DefaultCPUAllocator" in scores[1].base.error


def test_prompts_longer_than_the_context_are_refused_at_entry(data_dir, tmp_path):
    added = runner.invoke(app, ["prompt", "add", LONG_TEXT, "-d", str(data_dir)])
    assert added.exit_code == 2
    assert "longer than the model's context of 128 positions" in added.output

    listing = tmp_path / "prompts.json"
    listing.write_text(
        json.dumps([{"name": "long", "prompt": LONG_TEXT}, {"name": "ok", "prompt": "I will"}])
    )
    imported = runner.invoke(app, ["prompt", "import", str(listing), "-d", str(data_dir)])
    assert imported.exit_code == 3, imported.output  # partial
    assert "1 good, 1 new" in imported.output and "longer than the model's context" in (
        imported.output
    )
    names = read_only_query(Store.in_data_dir(data_dir), "SELECT name FROM prompts")["name"]
    assert list(names) == ["ok"]


# --- exit codes ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["missing", "directory", "not json", "no good entry"])
def test_a_prompt_import_that_reads_nothing_exits_2(data_dir, tmp_path, kind):
    path = tmp_path / "prompts.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "not json":
        path.write_text("name,prompt\nx,y\n")
    elif kind == "no good entry":
        path.write_text(json.dumps([{"name": "no prompt"}]))
    result = runner.invoke(app, ["prompt", "import", str(path), "-d", str(data_dir)])
    assert result.exit_code == 2, result.output
    assert "nothing imported" in result.output


@pytest.fixture
def nan_data_dir(tmp_path, small_organism) -> Path:
    """The organism with NaN in its base model's weights: every forward pass fails."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(small_organism.config.models.base.ref)
    target = tmp_path / "nan-base"
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.fill_(float("nan"))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    raw = small_organism.config.model_dump(mode="json")
    raw["models"]["base"]["ref"] = str(target)
    data_dir = tmp_path / "nan-data"
    data_dir.mkdir()
    (data_dir / "experiment.yaml").write_text(dump_config(parse_config(raw)))
    return data_dir


@pytest.mark.usefixtures("prefect_harness")
def test_check_and_discover_exit_2_when_every_item_failed_on_nan_weights(nan_data_dir):
    check = runner.invoke(app, ["check", "-d", str(nan_data_dir)])
    assert check.exit_code == 2, check.output
    assert "every probe failed" in check.output and "non-finite" in check.output

    discover = runner.invoke(
        app, ["discover", "--iterations", "1", "--per-iteration", "2", "-d", str(nan_data_dir)]
    )
    assert discover.exit_code == 2, discover.output
    assert "every prompt failed (2)" in discover.output and "non-finite" in discover.output


_TWO_POINTS = """
from emc.faults import fault_point
for n in range(1, 4):
    fault_point("graph-stored-x")  # a point whose name starts like the wanted one's
    fault_point("graph-stored")
    print(n, flush=True)
"""


@pytest.mark.parametrize(
    ("kill_at", "printed", "code"),
    [("graph-stored", "", -signal.SIGKILL), ("graph-stored#2", "1\n", -signal.SIGKILL),
     ("graph-stored#9", "1\n2\n3\n", 0), ("elsewhere", "1\n2\n3\n", 0)],
)  # fmt: skip
def test_a_fault_point_kills_at_its_nth_passage_only(kill_at, printed, code):
    done = subprocess.run(
        [sys.executable, "-c", _TWO_POINTS], capture_output=True, text=True, timeout=60,
        env=clean_env(EMC_KILL_AT=kill_at),
    )  # fmt: skip
    assert (done.stdout, done.returncode) == (printed, code), done.stderr
