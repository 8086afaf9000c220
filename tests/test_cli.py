from __future__ import annotations

import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.runs import recorded_run
from emc.store import Store, list_runs

runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path):
    data_dir = tmp_path / "data"
    with recorded_run(Store.in_data_dir(data_dir), "cli", "seeded", {"a": 1}):
        pass
    return data_dir


def test_sql_prints_rows(data_dir):
    result = runner.invoke(app, ["sql", "SELECT name, status FROM runs", "-d", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert "seeded" in result.output and "completed" in result.output


def test_sql_csv_and_env_var_data_dir(data_dir, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(data_dir))
    result = runner.invoke(app, ["sql", "SELECT name FROM runs", "--format", "csv"])
    assert result.exit_code == 0
    assert result.output.splitlines() == ["name", "seeded"]


def test_sql_write_is_refused_and_changes_nothing(data_dir):
    result = runner.invoke(app, ["sql", "DELETE FROM runs", "-d", str(data_dir)])
    assert result.exit_code == 2
    assert "read-only" in result.output
    assert len(list_runs(Store.in_data_dir(data_dir))) == 1


def test_runs_lists_recent_runs(data_dir):
    result = runner.invoke(app, ["runs", "-d", str(data_dir)])
    assert result.exit_code == 0 and "cli-seeded-" in result.output


def test_config_check_names_the_bad_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("models:\n  base: {ref: x}\n  transcoders: {ref: y}\nruntime: {devcie: cpu}\n")
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 2
    assert "runtime.devcie: unknown field" in result.output and "device" in result.output


def test_commands_without_a_config_explain_how_to_get_one(tmp_path):
    result = runner.invoke(app, ["config", "show", "-d", str(tmp_path / "empty")])
    assert result.exit_code == 2
    assert "emc organism build" in result.output


@pytest.mark.parametrize("command", [[], ["sql"], ["check"], ["config", "show"], ["runs"]])
def test_help_teaches(command):
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "--data-dir" in result.output or "Commands" in result.output


def test_prefect_setup_needs_a_server_and_says_how_to_start_one(monkeypatch):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["prefect", "setup"])
    assert result.exit_code == 2
    assert "PREFECT_API_URL is not set" in result.output and "prefect server start" in result.output


def test_sharded_tracing_needs_a_server(monkeypatch, tmp_path):
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    result = runner.invoke(app, ["trace", "--shards", "2", "-d", str(tmp_path)])
    assert result.exit_code == 2 and "set PREFECT_API_URL" in result.output
