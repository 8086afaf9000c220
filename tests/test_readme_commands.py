"""The README's front door as a researcher meets it: the main job, killed anywhere and run again,
then every command of the README's command blocks, typed as written.

1. `emc demo` on the small recipe, never killed: the reference store.
2. The same `emc demo`, killed with SIGKILL inside each of its flows (discovery's scoring,
   tracing between its two graphs, analysis, behaviour, the causal checks) and run again after
   each kill, until a run completes. The store must then hold exactly the rows of the reference
   (no duplicate, nothing missing), no run may be left `running`, no slot taken, no Prefect
   server alive, and discovery must not have been repeated.
3. On that store, each line of the README's ```bash blocks runs as written in a shell whose
   working directory holds it as `./emc-data` next to the checkout's `.venv`: it must exit 0.
   Servers (`emc dashboard`, `emc graph serve`) must answer HTTP on the README's ports, then are
   stopped, leaving no process. `PROMPT_ID` is the README's placeholder for a prompt id; the
   test puts in the demo's traced prompt. The store's discovery defaults are set to one round of
   two prompts, so `emc discover` and what follows it stay seconds long: the commands are
   typed as written, on a small store. The few lines run elsewhere, or not at all, are listed
   in `ELSEWHERE` with the reason; a test fails if the README and these lists drift apart.

Measured times are printed (`pytest -s` shows them).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from emc.config import dump_config, parse_config
from emc.store import Store, read_only_query
from tests.graph_store import seed_organism
from tests.processes import ROOT, Process, alive, clean_env, kill_all, wait_gone

README = ROOT / "README.md"
DEMO = ["demo", "--small", "--iterations", "1", "--per-iteration", "2", "--graphs", "1",
        "--continuation-samples", "4", "--eval-samples", "2"]  # fmt: skip
STAGES = ["1/8 organism", "2/8 model check", "3/8 discovery", "4/8 tracing", "5/8 analysis",
          "6/8 behaviour", "7/8 causal checks", "8/8 feature cards"]  # fmt: skip

# Where each killed run dies (emc/faults.py), and the pipeline stage it is in by then.
KILLS = [
    ("gpu-step:discovery", "3/8 discovery"),  # scoring, holding the `gpu` slot
    ("graph-stored#1", "4/8 tracing"),  # one of the two graphs stored
    ("gpu-step:analysis#2", "5/8 analysis"),  # forward diffs stored, activation deltas next
    ("gpu-step:evaluation#2", "6/8 behaviour"),  # continuations half sampled
    ("gpu-step:interventions", "7/8 causal checks"),
    ("gpu-step:feature-cards", "8/8 feature cards"),  # the corpus pass, holding the `gpu` slot
]
# Rows that depend on how many runs there were, not on what they found.
PER_RUN_TABLES = {"runs", "model_checks", "schema_version"}

# README lines not run by `test_every_readme_command_runs_as_written`, and why.
ELSEWHERE = {
    "bash scripts/demo.sh": "install + `emc demo` on the full recipe (4 min): CI runs "
    "scripts/install.sh, and `emc demo` runs above on the small recipe; the full demo is "
    "timed by hand for the README's figures",
    "bash scripts/test.sh": "the test command itself: CI (.ci/run) runs it",
    "prefect server start --host 127.0.0.1 --port 4200 &": "tests/test_deployments.py "
    "(on a free port)",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": "tests/test_deployments.py",
    "emc prefect setup --deploy": "tests/test_deployments.py",
    "prefect worker start --pool emc-process &": "tests/test_deployments.py",
    'prefect deployment run pipeline/process --param data_dir="$PWD/emc-data"':
    "tests/test_deployments.py (the small recipe's parameters, watched to completion)",
    "prefect deployment run discovery/process --param iterations=3": "tests/test_deployments.py "
    "(the schedule of discovery/process is checked and paused)",
    "emc trace --select reviewed --shards 4 --spool /shared/emc-spool -d /data/study":
    "tests/test_deployments.py (two workers, `--shards 2`, a spool in a temporary directory)",
}  # fmt: skip
SETUP = "source .venv/bin/activate"  # the shell the later lines are typed into
SERVERS = {  # README line -> the address it serves
    "emc dashboard": "http://127.0.0.1:8501",
    "emc graph export PROMPT_ID && emc graph serve": "http://127.0.0.1:8032",
}


def readme_commands(text: str) -> list[str]:
    """Each line of the README's ```bash blocks, without its comment, in order, once."""
    lines: list[str] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        for line in block.splitlines():
            command = _without_comment(line).strip()
            if command and command not in lines:
                lines.append(command)
    return lines


def _without_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index]
    return line


def test_readme_commands__are_parsed_as_a_shell_would():
    text = '```bash\nemc a  # x\nemc b "# not a comment"   # y\n\nemc a\n```\n```yaml\nc: 1\n```'
    assert readme_commands(text) == ["emc a", 'emc b "# not a comment"']


def test_every_readme_command_is_run_or_listed_with_a_reason():
    commands = readme_commands(README.read_text())
    assert SETUP in commands and len(commands) > 20
    unknown = set(ELSEWHERE) - set(commands)
    assert not unknown, f"ELSEWHERE names lines the README no longer has: {unknown}"
    assert set(SERVERS) <= set(commands)
    for where in ELSEWHERE.values():
        if where.startswith("tests/"):
            assert (ROOT / where.split()[0]).is_file()


# --- the demo, clean and killed ----------------------------------------------------------------


@dataclass
class Demo:
    data_dir: Path
    output: str
    seconds: float


def _run_demo(data_dir: Path, kill_at: str | None = None, timeout: float = 900) -> Process:
    env = {"EMC_KILL_AT": kill_at} if kill_at else {}
    process = Process.emc(*DEMO, "-d", str(data_dir), **env)
    process.wait(timeout=timeout)
    return process


def _counts(data_dir: Path) -> dict[str, int]:
    store = Store.in_data_dir(data_dir)
    tables = read_only_query(
        store,
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'",
    )["table_name"]
    return {
        t: int(read_only_query(store, f'SELECT count(*) FROM "{t}"').iloc[0, 0])
        for t in sorted(tables)
        if t not in PER_RUN_TABLES
    }


@pytest.fixture(scope="module")
def clean_demo(tmp_path_factory, small_organism) -> Demo:
    # The organism is the session's build, which the demo verifies and reuses.
    data_dir = tmp_path_factory.mktemp("clean") / "emc-data"
    seed_organism(small_organism, data_dir)
    start = time.monotonic()
    demo = _run_demo(data_dir)
    assert demo.popen.returncode == 0, demo.output[-4000:]
    return Demo(data_dir, demo.output, time.monotonic() - start)


@dataclass
class KilledDemo(Demo):
    killed: list[tuple[str, Process, list[int], float]]  # (kill point, process, its tree, s)


@pytest.fixture(scope="module")
def killed_demo(tmp_path_factory, small_organism, clean_demo) -> KilledDemo:
    data_dir = tmp_path_factory.mktemp("killed") / "emc-data"
    seed_organism(small_organism, data_dir)
    killed = []
    for point, _stage in KILLS:
        start = time.monotonic()
        process = Process.emc(*DEMO, "-d", str(data_dir), EMC_KILL_AT=point)
        tree: set[int] = set()
        while process.popen.poll() is None:  # its children, to check that none outlives it
            tree.update(process.descendants())
            time.sleep(0.2)
            assert time.monotonic() - start < 900, process.output[-3000:]
        killed.append((point, process, sorted(tree), time.monotonic() - start))
    start = time.monotonic()
    final = _run_demo(data_dir)
    return KilledDemo(data_dir, final.output, time.monotonic() - start, killed)


def test_the_demo_runs_end_to_end_on_the_small_recipe(clean_demo):
    # A real process, as a researcher runs it: Prefect in ephemeral mode with its home in the
    # data directory (no test harness), and no test runner capturing the terminal.
    output, data_dir = clean_demo.output, clean_demo.data_dir
    print(f"\nemc demo (small recipe): {clean_demo.seconds:.0f} s")
    assert "store:" in output and "emc dashboard" in output
    assert (data_dir / "prefect").is_dir()
    store = Store.in_data_dir(data_dir)
    names = set(read_only_query(store, "SELECT name FROM runs")["name"])
    assert names == {
        "organism-build", "model-check", "discovery", "tracing", "analysis", "interventions",
        "evaluation", "feature-cards", "pipeline",
    }  # fmt: skip
    graphs = read_only_query(store, "SELECT prompt_id, status FROM graphs")
    assert len(graphs) == 2 and set(graphs["status"]) == {"ok"}
    assert graphs["prompt_id"].nunique() == 1 and "emc graph export" in output
    forward = read_only_query(store, "SELECT count(*) AS n FROM forward_diffs")
    assert forward["n"][0] > 0 and "first differ at layer 0" in output
    # The causal checks ran on the traced prompt (directions need two prompts: skipped).
    shares = read_only_query(store, "SELECT count(*) AS n FROM shift_components")
    assert shares["n"][0] > 0 and "direct writes explain" in output
    # Behaviour: the flagged prompts' continuations, and EM rates of base, EM and control.
    assert "continuation checks:" in output and "flagged prompts confirmed" in output
    for model in ("base", "adapted", "control"):
        assert f"EM rate {model} (all)" in output
    samples = read_only_query(store, "SELECT DISTINCT model_id FROM generations")
    assert len(samples) == 3


def test_the_demo_killed_in_every_flow_completes_with_the_clean_runs_rows(killed_demo, clean_demo):
    for (point, process, tree, seconds), (_, stage) in zip(killed_demo.killed, KILLS, strict=True):
        print(f"\nkilled at {point} after {seconds:.0f} s", end="")
        output = process.output
        assert process.popen.returncode == -signal.SIGKILL, f"{point} never reached:\n{output}"
        later = STAGES[STAGES.index(stage) + 1 :]
        assert stage in output and not any(s in output for s in later), (point, output[-3000:])
        assert tree and wait_gone(tree, timeout=30) < 30, f"{alive(tree)} outlived the run"
    print(f"\nthe run after the last kill completed in {killed_demo.seconds:.0f} s")
    output = killed_demo.output
    assert "store:" in output, output[-4000:]
    assert "3/8 discovery: done by" in output  # not repeated
    assert "waiting for" not in output  # every slot of the dead runs was reclaimed at once

    assert _counts(killed_demo.data_dir) == _counts(clean_demo.data_dir)
    store = Store.in_data_dir(killed_demo.data_dir)
    runs = read_only_query(store, "SELECT name, status, error, summary FROM runs")
    assert "running" not in set(runs["status"])
    pipelines = runs[runs["name"] == "pipeline"]
    assert sorted(pipelines["status"]) == ["completed"] + ["failed"] * len(KILLS)
    assert pipelines[pipelines["status"] == "failed"]["error"].str.contains("died").all()
    discovery = runs[runs["name"] == "discovery"]  # killed once, then resumed once
    assert sorted(discovery["status"]) == ["completed", "failed"]
    assert not list((killed_demo.data_dir / "prefect" / "emc-slots").glob("*/*.json"))


# --- every README command, as written ----------------------------------------------------------


@pytest.fixture(scope="module")
def readme_shell(killed_demo, tmp_path_factory) -> Path:
    """A working directory as the README assumes: `./emc-data` (the demo's) and `./.venv`."""
    cwd = tmp_path_factory.mktemp("readme-cwd")
    (cwd / "emc-data").symlink_to(killed_demo.data_dir)
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    config_path = killed_demo.data_dir / "experiment.yaml"
    config = parse_config(yaml.safe_load(config_path.read_text()))
    discovery = config.discovery.model_copy(update={"iterations": 1, "prompts_per_iteration": 2})
    behaviour = config.behaviour.model_copy(update={"continuation_samples": 4, "eval_samples": 2})
    small = config.model_copy(update={"discovery": discovery, "behaviour": behaviour})
    config_path.write_text(dump_config(small))
    return cwd


def _traced_prompt(data_dir: Path) -> str:
    graphs = read_only_query(Store.in_data_dir(data_dir), "SELECT prompt_id FROM graphs")
    return str(graphs["prompt_id"].iloc[0])


def _typed(command: str, prompt_id: str) -> str:
    return f"{SETUP} && {command.replace('PROMPT_ID', prompt_id)}"


def _serve(cwd: Path, command: str, url: str, timeout: float = 120) -> float:
    """Start a README server line, wait until it answers `url`, stop its whole process group."""
    shell = Process(["bash", "-c", command], cwd=cwd, new_session=True)
    start = time.monotonic()
    try:
        while True:
            assert shell.popen.poll() is None, f"{command!r} ended:\n{shell.output[-3000:]}"
            assert time.monotonic() - start < timeout, f"{url} silent:\n{shell.output[-3000:]}"
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except OSError:
                time.sleep(0.5)
    finally:
        tree = [shell.popen.pid, *shell.descendants()]
        os.killpg(shell.popen.pid, signal.SIGINT)
        if wait_gone(tree, timeout=20) >= 20:
            kill_all(tree)
            pytest.fail(f"{command!r} did not stop on Ctrl-C")


def test_every_readme_command_runs_as_written(readme_shell, killed_demo):
    prompt_id = _traced_prompt(killed_demo.data_dir)
    env = clean_env(HF_HUB_OFFLINE="1")
    times = []
    for command in readme_commands(README.read_text()):
        if command in ELSEWHERE or command == SETUP:
            continue
        typed = _typed(command, prompt_id)
        start = time.monotonic()
        if command in SERVERS:
            _serve(readme_shell, typed, SERVERS[command])
        else:
            result = subprocess.run(
                ["bash", "-c", typed], cwd=readme_shell, env=env, capture_output=True,
                text=True, timeout=600,
            )  # fmt: skip
            assert result.returncode == 0, (
                f"{command!r} exited {result.returncode}:\n{result.stdout[-3000:]}\n"
                f"{result.stderr[-3000:]}"
            )
        times.append((time.monotonic() - start, command))
    print("\n" + "\n".join(f"{s:6.1f} s  {c}" for s, c in times))
    assert len(times) >= 25


def test_every_readme_sql_block_runs_in_the_sealed_console(readme_shell):
    blocks = re.findall(r"^```sql\n(.*?)^```", README.read_text(), flags=re.M | re.S)
    assert blocks
    for sql in blocks:
        result = subprocess.run(
            [str(ROOT / ".venv" / "bin" / "emc"), "sql", sql], cwd=readme_shell,
            env=clean_env(), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, f"{sql}\n{result.stdout}\n{result.stderr}"
