"""An unforeseen failure is one message naming its cause, the traceback in a log file; `--debug`
shows the traceback (the real `python -m emc` entry point, in a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from emc.cli.errors import describe
from emc.config import dump_config
from tests.processes import clean_env


def run_emc(*args: str, log_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "EMC_LOG_DIR": str(log_dir), "COLUMNS": "200"}
    env.pop("EMC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "emc", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_a_failure_is_one_message_and_the_traceback_goes_to_a_log(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("a file where the data directory should be")
    done = run_emc("organism", "build", "-d", str(not_a_dir), log_dir=tmp_path / "logs")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "│" not in done.stderr
    assert f"error: FileExistsError: [Errno 17] File exists: '{not_a_dir}'" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 4
    (log,) = (tmp_path / "logs").glob("emc-*.log")
    assert str(log) in done.stderr.replace("\n", "")
    assert "Traceback" in log.read_text() and "organism build" in log.read_text()


def test_debug_shows_the_traceback_instead(tmp_path):
    not_a_dir = tmp_path / "data"
    not_a_dir.write_text("x")
    done = run_emc("organism", "build", "-d", str(not_a_dir), "--debug", log_dir=tmp_path / "l")
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "FileExistsError" in done.stderr
    assert not (tmp_path / "l").exists()


def test_causes_are_listed_outermost_first():
    try:
        try:
            raise OSError("disk\nfull")
        except OSError as inner:
            raise RuntimeError("could not save the graph") from inner
    except RuntimeError as outer:
        lines = describe(outer)
    assert lines[0].endswith("RuntimeError: could not save the graph")
    assert lines[1] == "  caused by: OSError: disk full"


def _missing_transcoders(tmp_path: Path, small_organism) -> Path:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config = small_organism.config
    missing = config.models.model_copy(
        update={"transcoders": config.models.transcoders.model_copy(update={"ref": "/nowhere/tc"})}
    )
    broken = config.model_copy(update={"models": missing})
    (data_dir / "experiment.yaml").write_text(dump_config(broken))
    return data_dir


def _run_flow_command(data_dir: Path, *extra: str, log_dir: Path) -> subprocess.CompletedProcess:
    env = clean_env(EMC_LOG_DIR=str(log_dir), COLUMNS="200")
    env.pop("EMC_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "emc", "trace", "--select", "flagged", "-d", str(data_dir), *extra],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip


def test_a_failing_flow_prints_prefects_lines_without_their_tracebacks(tmp_path, small_organism):
    data_dir = _missing_transcoders(tmp_path, small_organism)
    done = _run_flow_command(data_dir, log_dir=tmp_path / "logs")
    output = done.stdout + done.stderr
    assert done.returncode == 1
    assert "Traceback" not in output and 'File "' not in output, output
    assert "error: ModelLoadError: transcoder directory not found: /nowhere/tc" in output
    assert len(output.strip().splitlines()) <= 10, output
    (log,) = (tmp_path / "logs").glob("emc-*.log")
    assert "Traceback" in log.read_text()

    debug = _run_flow_command(data_dir, "--debug", log_dir=tmp_path / "logs")
    assert debug.returncode != 0
    assert (debug.stdout + debug.stderr).count("Traceback") >= 2  # Prefect's, then the raise
