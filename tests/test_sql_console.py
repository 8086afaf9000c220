"""The sealed SQL console behind `emc sql`: one read statement, no file or network access.

Every escape class is tried on a real store next to real files; each must be refused with a
message naming what was refused, leak nothing and leave every file as it was.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from types import SimpleNamespace

import duckdb
import pytest
from typer.testing import CliRunner

from emc.cli import app
from emc.runs import recorded_run
from emc.store import ReadOnlyViolation, Store, StoreBusyError, StoreError, read_only_query

SECRET = "emc-secret-value"
runner = CliRunner()


@pytest.fixture
def sealed(tmp_path, monkeypatch) -> SimpleNamespace:
    """A store with one run, secret files beside it in every format the readers take, and the
    working directory in an empty folder, so a relative COPY TO would land where we look."""
    data_dir = tmp_path / "data"
    with recorded_run(Store.in_data_dir(data_dir), "cli", "seeded", {}):
        pass
    files = tmp_path / "files"
    files.mkdir()
    (files / "secret.csv").write_text(f"key,value\n{SECRET},1\n")
    (files / "secret.json").write_text(f'[{{"key": "{SECRET}"}}]\n')
    with duckdb.connect() as conn:
        conn.execute(f"COPY (SELECT '{SECRET}' AS key) TO '{files / 'secret.parquet'}'")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return SimpleNamespace(store=Store.in_data_dir(data_dir), files=files, root=tmp_path)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with its content hash: a write anywhere shows as a difference."""
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


# (SQL with {files} for the folder of secret files, words the refusal must name)
ESCAPES = {
    "read_text": ("SELECT * FROM read_text('{files}/secret.csv')", "secret.csv"),
    "read_blob": ("SELECT * FROM read_blob('{files}/secret.csv')", "secret.csv"),
    "read_csv": ("SELECT * FROM read_csv('{files}/secret.csv')", "secret.csv"),
    "read_csv_auto": ("SELECT * FROM read_csv_auto('{files}/secret.csv')", "secret.csv"),
    "read_parquet": ("SELECT * FROM read_parquet('{files}/secret.parquet')", "secret.parquet"),
    "read_json": ("SELECT * FROM read_json('{files}/secret.json')", "secret.json"),
    "file as table": ("SELECT * FROM '{files}/secret.csv'", "secret.csv"),
    "glob": ("SELECT * FROM glob('{files}/*')", "{files}/*"),
    "sniff_csv": ("SELECT * FROM sniff_csv('{files}/secret.csv')", "secret.csv"),
    "https": ("SELECT * FROM read_csv('https://example.com/data.csv')", "https://example.com"),
    "ATTACH": ("ATTACH '{files}/other.duckdb' AS other", "ATTACH"),
    "DETACH": ("DETACH emc", "DETACH"),
    "USE": ("USE memory", "USE"),
    "COPY TO": ("COPY (SELECT 42 AS answer) TO 'out.csv'", "COPY"),
    "COPY FROM": ("COPY runs FROM '{files}/secret.csv'", "COPY"),
    "EXPLAIN ANALYZE COPY": ("EXPLAIN ANALYZE COPY (SELECT 'x') TO 'file.yaml'", "COPY"),
    "EXPLAIN COPY": ("EXPLAIN COPY (SELECT 'x') TO 'file.yaml'", "COPY"),
    "EXPLAIN options COPY": (
        "EXPLAIN (FORMAT json) /* c */ COPY (SELECT 'x') TO 'file.yaml'",
        "COPY",
    ),
    "INSTALL": ("INSTALL httpfs", "INSTALL"),
    "LOAD": ("LOAD json", "LOAD"),
    "EXPLAIN ANALYZE INSTALL": ("EXPLAIN ANALYZE INSTALL httpfs", "INSTALL"),
    "EXPLAIN ANALYZE LOAD": ("EXPLAIN ANALYZE -- c\n LOAD json", "LOAD"),
    "UPDATE EXTENSIONS": ("UPDATE EXTENSIONS", "UPDATE"),
    "PRAGMA": ("PRAGMA enable_profiling", "PRAGMA"),
    "SET": ("SET enable_external_access = true", "SET"),
    "RESET": ("RESET threads", "RESET"),
    "EXPLAIN ANALYZE SET": ("EXPLAIN ANALYZE SET threads = 1", "SET"),
    "CALL": ("CALL duckdb_settings()", "CALL"),
    "EXPORT DATABASE": ("EXPORT DATABASE 'dump'", "EXPORT"),
    "CREATE SECRET": ("CREATE SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "CREATE"),
    "CHECKPOINT": ("CHECKPOINT", "CHECKPOINT"),
    "DELETE": ("DELETE FROM runs", "DELETE"),
    "INSERT": ("INSERT INTO runs SELECT * FROM runs", "INSERT"),
    "second statement after a semicolon": ("SELECT 1; DELETE FROM runs", "2 statements"),
    "second statement after a comment": (
        "SELECT 1 /* just a read */; COPY (SELECT 1) TO 'x.csv'",
        "2 statements",
    ),
    "second statement after a line comment": ("-- read\nSELECT 1;\nATTACH 'x.duckdb'", "ATTACH"),
    "two reads": ("SELECT 1; SELECT 2", "2 statements"),
}


@pytest.mark.parametrize(("sql", "named"), ESCAPES.values(), ids=ESCAPES.keys())
def test_sealed_console__refuses_every_escape_and_changes_nothing(sealed, sql, named):
    sql, named = (s.format(files=sealed.files) for s in (sql, named))
    before = snapshot(sealed.root)
    with pytest.raises(ReadOnlyViolation) as refused:
        read_only_query(sealed.store, sql)
    message = str(refused.value)
    assert message.startswith("refused"), message
    assert named in message and SECRET not in message
    assert snapshot(sealed.root) == before
    assert read_only_query(sealed.store, "SELECT count(*) AS n FROM runs")["n"].tolist() == [1]


READS = {
    "SELECT": ("SELECT name, status FROM runs", "name", "seeded"),
    "FROM first": ("FROM runs SELECT status", "status", "completed"),
    "WITH": ("WITH r AS (SELECT * FROM runs) SELECT count(*) AS n FROM r", "n", 1),
    "SHOW TABLES": ("SHOW TABLES", "name", "runs"),
    "DESCRIBE": ("DESCRIBE runs", "column_name", "run_id"),
    "SUMMARIZE": ("SUMMARIZE SELECT status FROM runs", "column_name", "status"),
    "EXPLAIN": ("EXPLAIN SELECT * FROM runs", "explain_key", "physical_plan"),
    "EXPLAIN ANALYZE": ("EXPLAIN ANALYZE SELECT * FROM runs", "explain_key", "analyzed_plan"),
    "EXPLAIN with options": ("EXPLAIN (FORMAT json, ANALYZE) SELECT 1", "explain_key", None),
    "EXPLAIN of a parenthesised query": ("EXPLAIN ANALYZE (SELECT 1)", "explain_key", None),
    "comments and a final semicolon": ("-- count\nSELECT 1 AS one; /* done */", "one", 1),
    "non-ASCII comment": ("EXPLAIN /* déjà vu */ SELECT 'é' AS e", "explain_key", None),
}


@pytest.mark.parametrize(("sql", "column", "value"), READS.values(), ids=READS.keys())
def test_sealed_console__runs_one_read_statement(sealed, sql, column, value):
    before = snapshot(sealed.root)
    frame = read_only_query(sealed.store, sql)
    assert column in frame.columns and len(frame) >= 1
    assert value is None or value in frame[column].tolist()
    assert snapshot(sealed.root) == before


def test_sealed_console__reports_bad_and_empty_sql(sealed):
    with pytest.raises(StoreError, match="does not parse"):
        read_only_query(sealed.store, "SELEKT 1")
    with pytest.raises(StoreError, match="no SQL statement"):
        read_only_query(sealed.store, "-- nothing here")


def test_sealed_console__waits_for_a_plain_connection_in_the_same_process(sealed):
    """DuckDB refuses a second connection with other settings to a file this process has open;
    the console waits it out like the file lock instead of failing."""
    impatient = Store(sealed.store.path, lock_timeout_s=0.2)
    with sealed.store.read(), pytest.raises(StoreBusyError, match="stayed locked"):
        read_only_query(impatient, "SELECT 1")
    release = threading.Event()

    def hold() -> None:
        with sealed.store.read():
            release.wait(5)

    holder = threading.Thread(target=hold)
    holder.start()
    threading.Timer(0.3, release.set).start()
    assert read_only_query(sealed.store, "SELECT 1 AS one")["one"].tolist() == [1]
    holder.join()


def test_emc_sql__refuses_reading_a_file_and_prints_nothing_of_it(sealed):
    sql = f"SELECT * FROM read_text('{sealed.files}/secret.csv')"
    result = runner.invoke(app, ["sql", sql, "-d", str(sealed.store.path.parent)])
    assert result.exit_code == 2
    assert "no file or network access" in result.output and SECRET not in result.output
