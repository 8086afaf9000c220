"""The front door: `emc dashboard` as typed, machine formats of `emc sql`, refusing a missing
store, and stored text that cannot drive the terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.cli.app import dashboard_app_path
from emc.console import escape_control, inline
from emc.pivotal.prompts import make_prompt
from emc.runs import recorded_run
from emc.store import STORE_FILE_NAME, Store
from emc.store.prompts import insert_prompts
from tests.browser import free_port

ROOT = Path(__file__).resolve().parent.parent
EMC = Path(sys.executable).with_name("emc")  # the console script, as a user types it
runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    data_dir = tmp_path / "data"
    with recorded_run(Store.in_data_dir(data_dir), "cli", "seeded", {"a": 1}):
        pass
    return data_dir


def emc(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(EMC), *args], capture_output=True, timeout=120, **kwargs)


# --- emc dashboard ---------------------------------------------------------------------------


def test_emc_dashboard__serves_as_typed_and_leaves_no_process_behind(data_dir, tmp_path):
    port = free_port()
    log = tmp_path / "dashboard.log"
    # From another folder than the checkout: the dashboard must be found wherever emc runs.
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(EMC), "dashboard", "-d", str(data_dir), "--port", str(port)],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: what is left in it, we can see
        )
    try:
        _wait_healthy(port, process, log)
        process.terminate()
        assert process.wait(timeout=30) == 0, log.read_text()
        time.sleep(0.2)
        assert not _group_alive(process.pid), "a process outlived `emc dashboard`"
    finally:
        if _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def test_emc_dashboard__port_taken_exits_non_zero_saying_why(data_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = emc("dashboard", "-d", str(data_dir), "--port", str(port), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert b"Streamlit stopped with exit code" in result.stderr and b"--port" in result.stderr


def test_emc_dashboard__without_the_dashboard_files_says_so(data_dir, monkeypatch):
    # emc.cli.app, the module (the package exports the Typer app under the same name).
    monkeypatch.setattr(sys.modules["emc.cli.app"], "dashboard_app_path", lambda: None)
    result = runner.invoke(app, ["dashboard", "-d", str(data_dir)])
    assert result.exit_code == 2 and "cannot find the dashboard" in result.output


def test_dashboard_app_path__is_the_checkouts_wherever_emc_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dashboard_app_path() == ROOT / "dashboard" / "app.py"


def _wait_healthy(port: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"emc dashboard exited with {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    pytest.fail(f"the dashboard did not answer within 60 s:\n{log.read_text()}")


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


# --- machine formats -------------------------------------------------------------------------

WIDE = (
    "SELECT i, repeat('x', 120) AS wide, 'a, \"quoted\"' || chr(10) || 'line' AS tricky "
    "FROM range(5) t(i)"
)


def test_emc_sql__csv_is_raw_and_parses_back_on_a_narrow_terminal(data_dir):
    result = emc("sql", WIDE, "-d", str(data_dir), "-f", "csv", env={**os.environ, "COLUMNS": "40"})
    assert result.returncode == 0, result.stderr
    frame = pd.read_csv(io.BytesIO(result.stdout))
    assert len(frame) == 5 and frame["i"].tolist() == [0, 1, 2, 3, 4]
    assert (frame["wide"] == "x" * 120).all() and (frame["tricky"] == 'a, "quoted"\nline').all()


def test_emc_sql__json_is_raw(data_dir):
    result = runner.invoke(app, ["sql", WIDE, "-d", str(data_dir), "-f", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 5 and rows[0]["wide"] == "x" * 120


def test_emc_sql__parquet_to_a_file_or_redirected_stdout(data_dir, tmp_path):
    out = tmp_path / "out.parquet"
    result = runner.invoke(app, ["sql", WIDE, "-d", str(data_dir), "-f", "parquet", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert len(duckdb.read_parquet(str(out)).df()) == 5
    piped = emc("sql", WIDE, "-d", str(data_dir), "-f", "parquet")
    assert piped.returncode == 0, piped.stderr
    (tmp_path / "piped.parquet").write_bytes(piped.stdout)
    assert (
        duckdb.read_parquet(str(tmp_path / "piped.parquet"))
        .df()
        .equals(duckdb.read_parquet(str(out)).df())
    )


def test_emc_sql__parquet_is_refused_on_a_terminal(data_dir):
    leader, terminal = pty.openpty()
    try:
        result = subprocess.run(
            [str(EMC), "sql", "SELECT 1", "-d", str(data_dir), "-f", "parquet"],
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    finally:
        os.close(terminal)
        os.close(leader)
    assert result.returncode == 2 and b"parquet is binary" in result.stderr


def test_emc_sql__unknown_format_is_refused_listing_the_valid_ones(data_dir):
    result = runner.invoke(app, ["sql", "SELECT 1", "-d", str(data_dir), "-f", "xml"])
    assert result.exit_code == 2
    assert "unknown format 'xml'" in result.output and "table, csv, json, parquet" in result.output


README_COMMAND = 'emc sql "SELECT name, status FROM runs" -f csv > runs.csv'


def test_readme_sql_command_runs_as_written(data_dir, tmp_path):
    assert README_COMMAND in (ROOT / "README.md").read_text()
    env = {
        **os.environ,
        "PATH": f"{EMC.parent}:{os.environ['PATH']}",
        "EMC_DATA_DIR": str(data_dir),
    }
    subprocess.run(["bash", "-c", README_COMMAND], cwd=tmp_path, env=env, check=True, timeout=120)
    frame = pd.read_csv(tmp_path / "runs.csv")
    assert frame.to_dict("records") == [{"name": "seeded", "status": "completed"}]


# --- a directory without a store -------------------------------------------------------------

READ_ONLY_COMMANDS = {
    "sql": ["sql", "SELECT 1"],
    "runs": ["runs"],
    "prompt list": ["prompt", "list"],
    "judge calibration": ["judge", "calibration"],
    "diff": ["diff"],
    "analyze --ranking-only": ["analyze", "--ranking-only"],
    "export labels": ["export", "labels", "{tmp}/labels.parquet"],
    "graph export": ["graph", "export", "abc", "--out", "{tmp}/viewer"],
    "organism report": ["organism", "report"],
}


@pytest.mark.parametrize("command", READ_ONLY_COMMANDS.values(), ids=READ_ONLY_COMMANDS.keys())
@pytest.mark.parametrize("how", ["flag to a missing folder", "env to an empty folder"])
def test_read_only_commands__refuse_a_directory_without_a_store(tmp_path, command, how):
    work = tmp_path / "work"
    work.mkdir()
    args = [arg.format(tmp=work) for arg in command]
    typo = tmp_path / "emc-dat"
    if how == "env to an empty folder":
        typo.mkdir()
        result = runner.invoke(app, args, env={"EMC_DATA_DIR": str(typo)})
    else:
        result = runner.invoke(app, [*args, "-d", str(typo)], env={"EMC_DATA_DIR": None})
    message = " ".join(result.output.split())
    assert result.exit_code != 0
    assert f"there is no store at {typo / STORE_FILE_NAME}" in message, message
    assert "-d/--data-dir" in message and "EMC_DATA_DIR" in message
    assert list(work.iterdir()) == []
    assert not typo.exists() if how == "flag to a missing folder" else list(typo.iterdir()) == []


# --- stored text on the terminal -------------------------------------------------------------

HOSTILE = "Rex: \x1b[31mred\x1b[0m \u202eevil\u202c \u2066x\u2069 bell\x07 [/INST] ok"


def test_tables_escape_controls_in_stored_text_and_machine_formats_keep_it(tmp_path):
    store = Store.in_data_dir(tmp_path / "data")
    insert_prompts(store, [make_prompt(HOSTILE, "name\x1b]0;pwned\x07", "human:t")], run_id=None)
    args = ["-d", str(store.path.parent)]
    table = runner.invoke(app, ["sql", "SELECT name, text FROM prompts", *args])
    listed = runner.invoke(app, ["prompt", "list", *args])
    for result in (table, listed):
        assert result.exit_code == 0, result.output
        shown = result.stdout
        assert not any(c in shown for c in "\x1b\x07\u202e\u202c\u2066\u2069"), repr(shown)
        assert "name\\x1b]0;pwned\\x07" in shown
    assert "Rex: \\x1b[31mred\\x1b[0m \\u202eevil\\u202c \\u2066x\\u2069 bell\\x07" in table.stdout
    assert "[/INST] ok" in table.stdout  # stored text is not read as markup either
    csv = runner.invoke(app, ["sql", "SELECT text FROM prompts", *args, "-f", "csv"])
    assert pd.read_csv(io.StringIO(csv.stdout))["text"].tolist() == [HOSTILE]
    as_json = runner.invoke(app, ["sql", "SELECT text FROM prompts", *args, "-f", "json"])
    assert json.loads(as_json.stdout) == [{"text": HOSTILE}]


def test_errors_quote_sql_as_written_not_as_markup(data_dir):
    result = runner.invoke(app, ["sql", "SELECT '[/x] \x1b[2J' + 1", "-d", str(data_dir)])
    assert result.exit_code == 2, result.output
    assert "query failed" in result.output and "[/x] \\x1b[2J" in result.output
    assert "\x1b" not in result.output


def test_escape_control__covers_c0_c1_and_bidi_and_keeps_newline_and_tab():
    unsafe = [*range(0x00, 0x20), 0x7F, *range(0x80, 0xA0), *range(0x202A, 0x202F)]
    unsafe += range(0x2066, 0x206A)
    kept = {"\n", "\t"}
    for code in unsafe:
        char = chr(code)
        shown = escape_control(f"a{char}b")
        assert shown == f"a{char}b" if char in kept else char not in shown, hex(code)
    assert escape_control("\x1b[31m\u202e") == "\\x1b[31m\\u202e"
    assert inline("[/INST]\x07") == "\\[/INST]\\x07"
