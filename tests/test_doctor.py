"""`emc doctor`: the command on real data directories, and its checks as plain functions."""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from emc import doctor as checks
from emc.cli import app
from emc.doctor import Status
from emc.processes import process_start
from emc.provenance import host_name
from emc.store import STORE_FILE_NAME, Store
from emc.store.migrations import latest_version, stored_version

runner = CliRunner()


@pytest.fixture(autouse=True)
def _local_prefect(monkeypatch):
    # A developer's own Prefect server or home must not decide what these tests see.
    for name in ("PREFECT_API_URL", "PREFECT_HOME", "EMC_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def run_doctor(data_dir: Path):
    return runner.invoke(app, ["doctor", "-d", str(data_dir)])


def status_of(output: str, check: str) -> str:
    """The status column of one check's row in the printed table."""
    match = re.search(rf"│ {re.escape(check)}\s+│ (\w+)\s+│", output)
    assert match, f"no row for {check!r} in:\n{output}"
    return match.group(1)


def store_with_version(data_dir: Path, version: int) -> Path:
    """A real store, its schema_version table then set to claim `version`."""
    store = Store.in_data_dir(data_dir)
    store.ensure_schema()
    with duckdb.connect(str(store.path)) as conn:
        conn.execute("DELETE FROM schema_version WHERE version > ?", [version])
        if version > latest_version():
            conn.execute(
                "INSERT INTO schema_version (version, name) VALUES (?, 'future')", [version]
            )
    return store.path


def read_version(path: Path) -> int:
    with duckdb.connect(str(path), read_only=True) as conn:
        return stored_version(conn)


# --- the command ---------------------------------------------------------------------------


def test_fresh_directory_passes_with_the_store_missing_and_creates_nothing(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    result = run_doctor(data_dir)
    assert result.exit_code == 0, result.output
    assert status_of(result.output, "store") == "warn"
    assert "no store yet" in result.output and "emc demo" in result.output
    assert status_of(result.output, "data directory") == "ok"
    assert re.search(r"\d+ ok, \d+ warn, 0 fail", result.output)
    # Read-only: no store, and the write test's file is gone.
    assert not (data_dir / STORE_FILE_NAME).exists()
    assert list(data_dir.iterdir()) == []


def test_a_store_newer_than_the_code_fails_and_says_upgrade(tmp_path):
    path = store_with_version(tmp_path / "data", latest_version() + 1)
    result = run_doctor(tmp_path / "data")
    assert result.exit_code == 1, result.output
    assert status_of(result.output, "store") == "fail"
    assert "upgrade EMC" in result.output
    assert f"schema version {latest_version() + 1} is newer" in result.output
    assert re.search(r"\d+ ok, \d+ warn, [1-9]\d* fail", result.output)
    assert read_version(path) == latest_version() + 1


def test_an_older_store_warns_and_is_not_migrated(tmp_path):
    path = store_with_version(tmp_path / "data", latest_version() - 1)
    result = run_doctor(tmp_path / "data")
    assert result.exit_code == 0, result.output
    assert status_of(result.output, "store") == "warn"
    assert "migrates it" in result.output
    assert read_version(path) == latest_version() - 1


def test_a_current_store_is_ok(tmp_path):
    store_with_version(tmp_path / "data", latest_version())
    result = run_doctor(tmp_path / "data")
    assert status_of(result.output, "store") == "ok", result.output
    assert f"schema version {latest_version()} (current)" in result.output


def test_a_damaged_store_fails_naming_the_file(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    path = data_dir / STORE_FILE_NAME
    path.write_bytes(b"not a database " * 1000)
    result = run_doctor(data_dir)
    assert result.exit_code == 1, result.output
    assert status_of(result.output, "store") == "fail"
    assert f"cannot read {path}" in result.output
    assert path.read_bytes() == b"not a database " * 1000


def test_a_data_directory_that_is_a_file_fails_naming_it(tmp_path):
    path = tmp_path / "data"
    path.write_text("a file\n")
    result = run_doctor(path)
    assert result.exit_code == 1, result.output
    assert status_of(result.output, "data directory") == "fail"
    assert f"{path} is a file, not a directory" in result.output
    assert path.read_text() == "a file\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_crashing_check_is_a_failed_row_and_the_rest_still_run(tmp_path, monkeypatch):
    def broken():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(checks, "check_gpu", broken)
    result = run_doctor(tmp_path)
    assert result.exit_code == 1, result.output
    assert status_of(result.output, "gpu") == "fail"
    assert "RuntimeError: driver exploded" in result.output
    assert status_of(result.output, "data directory") == "ok"


def test_help_says_what_is_checked_and_the_exit_codes():
    result = runner.invoke(app, ["doctor", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Exit codes: 0 when no check failed" in text
    assert "1 when at least one failed" in text
    assert "Opened read-only" in text and "PREFECT_API_URL" in text


# --- the checks ----------------------------------------------------------------------------


def test_disk_space_warns_under_the_minimum():
    where = Path("/data")
    assert checks.disk_space_check(where, 1_900_000_000).status is Status.WARN
    assert checks.disk_space_check(where, checks.MIN_FREE_BYTES).status is Status.OK
    ok = checks.disk_space_check(where, 12_300_000_000)
    assert ok.status is Status.OK and ok.detail == "12.3 GB free on /data"


def test_disk_space_of_a_missing_directory_is_measured_on_its_parent(tmp_path):
    result = checks.check_disk_space(tmp_path / "not" / "yet")
    assert result.detail.endswith(f"free on {tmp_path}")
    assert not (tmp_path / "not").exists()


def test_write_probe_leaves_nothing_and_reports_what_stops_it(tmp_path):
    assert checks.write_probe(tmp_path) is None
    assert list(tmp_path.iterdir()) == []
    # Permission bits do not stop root, so the refusal comes from where nothing can be written.
    problem = checks.write_probe(tmp_path / "missing")
    assert problem == "No such file or directory"


def test_a_missing_data_directory_is_ok_when_it_can_be_created_and_is_not_created(tmp_path):
    target = tmp_path / "new" / "data"
    result = checks.check_data_dir(target)
    assert result.status is Status.OK and "first run creates it" in result.detail
    assert not (tmp_path / "new").exists()


def test_a_data_directory_below_a_file_cannot_be_created(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = checks.check_data_dir(blocker / "data")
    assert result.status is Status.FAIL
    assert result.detail == f"{blocker / 'data'} cannot be created: {blocker} is a file"


def test_an_existing_directory_that_refuses_writes_fails():
    if not Path("/proc/self").exists():
        pytest.skip("needs Linux /proc: a directory even root cannot write in")
    result = checks.check_data_dir(Path("/proc"))
    assert result.status is Status.FAIL and result.detail.startswith("cannot write in /proc")


def test_a_missing_package_fails():
    result = checks.check_package("emc-no-such-package")
    assert result.status is Status.FAIL and result.detail == "not installed"


def test_organism_is_found_where_the_build_puts_it(tmp_path):
    from emc.organism.experiment import organism_dir
    from emc.organism.manifest import write_manifest
    from emc.organism.recipe import OrganismRecipe

    recipe = OrganismRecipe.small()
    root = organism_dir(tmp_path, recipe)
    root.mkdir(parents=True)
    assert checks.check_organism(tmp_path).detail.startswith("only interrupted builds")
    write_manifest(root, recipe.recipe_hash())
    result = checks.check_organism(tmp_path)
    assert result.status is Status.OK and result.detail.startswith(recipe.recipe_hash())


def write_slot_record(home: Path, started: str | None) -> Path:
    directory = home / "emc-slots" / "gpu"
    directory.mkdir(parents=True)
    record = {
        "pid": os.getpid(),
        "started": started,
        "host": host_name(),
        "since": "2026-01-01T10:00:00",
        "command": "emc trace",
        "slots": 1,
    }
    path = directory / f"{os.getpid()}-0000.json"
    path.write_text(json.dumps(record))
    return path


def test_a_gpu_slot_recorded_for_a_dead_process_is_reported(tmp_path):
    # This PID with another start time is the record of a process that died and whose PID
    # was reused: flows/slots.py counts it as dead.
    record = write_slot_record(tmp_path / "home", started="1")
    result = checks.check_gpu_slots(tmp_path, {"PREFECT_HOME": str(tmp_path / "home")})
    assert result.status is Status.WARN
    assert f"pid {os.getpid()} since 2026-01-01T10:00:00 (emc trace)" in result.detail
    assert record.exists()  # reported, not removed: the next run reclaims it under its lock


def test_a_gpu_slot_held_by_a_live_process_is_ok(tmp_path):
    write_slot_record(tmp_path / "prefect", started=process_start(os.getpid()))
    result = checks.check_gpu_slots(tmp_path, {})  # PREFECT_HOME defaults into the data dir
    assert result.status is Status.OK and result.detail.startswith("held by a live process")


def test_gpu_slots_behind_a_real_server_are_not_checked(tmp_path):
    write_slot_record(tmp_path / "prefect", started="1")
    result = checks.check_gpu_slots(tmp_path, {"PREFECT_API_URL": "http://server:4200/api"})
    assert result.status is Status.OK and result.detail.startswith("not checked")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_prefect_server_that_does_not_answer_fails():
    url = f"http://127.0.0.1:{free_port()}/api"
    result = checks.check_prefect({"PREFECT_API_URL": url})
    assert result.status is Status.FAIL and url in result.detail
    assert "unset PREFECT_API_URL" in result.fix


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


def test_a_prefect_server_is_asked_for_its_health_under_the_api_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert checks.check_prefect({"PREFECT_API_URL": f"{base}/api"}).status is Status.OK
        wrong = checks.check_prefect({"PREFECT_API_URL": f"{base}/other"})
        assert wrong.status is Status.FAIL and "HTTP 404" in wrong.detail
    finally:
        server.shutdown()
        server.server_close()


def test_without_a_server_url_prefect_is_local():
    result = checks.check_prefect({})
    assert result.status is Status.OK and result.detail.startswith("local")
