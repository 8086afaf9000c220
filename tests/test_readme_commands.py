"""The README's front door as a researcher meets it: the main job, then every command of the
README's command blocks, typed as written.

1. `emc demo` on the small recipe, never killed (the session's run, tests/demo_runs.py; killed
   and run again in tests/test_demo_killed.py).
2. On that store, each line of the README's ```bash blocks runs as written in a shell whose
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
from pathlib import Path

import pytest
import yaml

from emc.config import dump_config, load_experiment, parse_config
from emc.store import Store, read_only_query
from emc.store.features import feature_ranking
from tests.processes import ROOT, Process, clean_env, kill_all, wait_gone
from tests.test_real_model_walk import walk_commands
from tests.test_study import readme_study_command

README = ROOT / "README.md"
# README lines not run by `test_every_readme_command_runs_as_written`, and why.
ELSEWHERE = {
    "bash scripts/demo.sh": "install + `emc demo` on the full recipe (4 min): CI runs "
    "scripts/install.sh, and `emc demo` runs above on the small recipe; the full demo is "
    "timed by hand for the README's figures",
    "bash scripts/test.sh": "the test command itself: CI (.ci/run) runs it",
    "prefect server start --host 127.0.0.1 --port 4200 &": "tests/test_deployments.py "
    "(on a free port)",
    "export PREFECT_API_URL=http://127.0.0.1:4200/api": "tests/test_deployments.py",
    'emc prefect setup --deploy --data-dir "$PWD/emc-data"': "tests/test_deployments.py "
    "(a temporary data directory, with --trace-after 2 --within 30m)",
    "prefect worker start --pool emc-process &": "tests/test_deployments.py",
    "emc prefect status": "tests/test_deployments.py (the triggers' states read from its table)",
    "prefect deployment run pipeline/full-pipeline": "tests/test_deployments.py (the small "
    "recipe's parameters, no data_dir: the pool's, watched to completion)",
    "prefect deployment run discovery/discover-every-6h --param iterations=3":
    "tests/test_deployments.py (the schedule of discovery/discover-every-6h is checked and "
    "paused)",
    "emc prefect pause": "tests/test_deployments.py",
    "emc prefect resume": "tests/test_deployments.py",
    "emc trace --select reviewed --shards 4 --spool /shared/emc-spool -d /data/study":
    "tests/test_deployments.py (two workers, `--shards 2`, a spool in a temporary directory)",
}  # fmt: skip
# The real-model walk: a local hub of stand-ins under the configs' names, and a local judge.
ELSEWHERE |= dict.fromkeys(walk_commands(), "tests/test_real_model_walk.py")
# Three pairs on a fresh copy of the small organism (the demo store already holds the em pair).
ELSEWHERE[readme_study_command()] = "tests/test_study.py"
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


# --- the demo ------------------------------------------------------------------------------------


def _judge_model(data_dir) -> str:
    config, _ = load_experiment(None, data_dir)
    return config.judge.model


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
    # Each stage's run names the pipeline's as its parent (the Runs page nests them).
    parents = read_only_query(
        store,
        "SELECT r.name, p.name AS parent FROM runs r "
        "LEFT JOIN runs p ON r.parent_run_id = p.run_id",
    )
    stages = parents[parents["name"] != "pipeline"]
    assert set(stages["parent"]) == {"pipeline"} and len(set(stages["name"])) == 8
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
    # Every feature of the top-30 ranking has a card and a label (the organism's offline
    # labeller, credited by its name), and the output says so.
    ranking = feature_ranking(store, role="adapted", sign="evil", top=30)
    top = {(int(r.layer), int(r.feature)) for r in ranking.itertuples()}
    carded = read_only_query(store, "SELECT DISTINCT layer, feature FROM feature_cards")
    labelled = read_only_query(store, "SELECT layer, feature, labeller, label FROM feature_labels")
    assert top and top <= set(zip(carded["layer"], carded["feature"], strict=True))
    assert top <= set(zip(labelled["layer"], labelled["feature"], strict=True))
    assert set(labelled["labeller"]) == {"llm:" + _judge_model(data_dir)}
    assert ranking["label"].notna().all() and "labels by llm:organism-lexicon" in output


# --- every README command, as written ----------------------------------------------------------


@pytest.fixture(scope="module")
def readme_shell(clean_demo, tmp_path_factory) -> Path:
    """A working directory as the README assumes: `./emc-data` (the demo's) and `./.venv`."""
    cwd = tmp_path_factory.mktemp("readme-cwd")
    (cwd / "emc-data").symlink_to(clean_demo.data_dir)
    (cwd / ".venv").symlink_to(ROOT / ".venv")
    config_path = clean_demo.data_dir / "experiment.yaml"
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


def test_every_readme_command_runs_as_written(readme_shell, clean_demo):
    prompt_id = _traced_prompt(clean_demo.data_dir)
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
