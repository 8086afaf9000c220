"""The SQL page over the store the flows made (discovery and behaviour on the small organism), its
saved queries and their store functions.

The page must be `emc sql` in a browser: the same guard, the same messages, the same result."""

from __future__ import annotations

import hashlib
import io
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest
from typer.testing import CliRunner

from dashboard.views import sql as view
from emc.cli import app
from emc.features.labels import FeatureLabel
from emc.store import STORE_FILE_NAME, Store, StoreError, read_only_query
from emc.store.feature_labels import save_labels
from emc.store.saved_queries import (
    delete_saved_query,
    get_saved_query,
    query_author,
    save_query,
    saved_queries,
)
from tests.apptest_pages import page_test

README = Path(__file__).resolve().parent.parent / "README.md"
DIVERGENT = "SELECT prompt_id, name, js, k, text FROM divergences JOIN prompts USING (prompt_id) "
DIVERGENT += "ORDER BY js DESC, prompt_id"
runner = CliRunner()


@pytest.fixture
def store(behaviour_store, tmp_path, monkeypatch) -> Store:
    """A private copy of the flows' store (the page saves into it), with one feature label."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in behaviour_store.data_dir.glob(f"{STORE_FILE_NAME}*"):
        shutil.copy(path, data_dir / path.name)
    monkeypatch.setenv("EMC_DATA_DIR", str(data_dir))
    store = Store.in_data_dir(data_dir)
    label = FeatureLabel(transcoders_ref="tc", layer=1, feature=7, labeller="human:ana",
                         label="wallet theft", run_id="test")  # fmt: skip
    save_labels(store, [label])
    return store


def open_page(**params: str) -> AppTest:
    page = page_test("sql")
    for name, value in params.items():
        page.query_params[name] = value
    page.run()
    assert not page.exception
    return page


def rerun(page: AppTest) -> AppTest:
    page.run()
    assert not page.exception
    return page


def typed(page: AppTest, sql: str) -> AppTest:
    page.text_area(key=view.TEXT).input(sql)
    return rerun(page)


def result_table(page: AppTest) -> pd.DataFrame:
    """The result table: the first table on the page (the saved list comes after it)."""
    assert page.dataframe, "no result table"
    return page.dataframe[0].value


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_a_query_runs_and_its_table_is_the_consoles(store):
    page = typed(open_page(), DIVERGENT)
    expected = read_only_query(store, DIVERGENT)
    assert len(expected) > 0  # discovery scored prompts
    pd.testing.assert_frame_equal(result_table(page).reset_index(drop=True), expected)
    caption = next(c.value for c in page.caption if " in " in c.value and "row" in c.value)
    assert re.fullmatch(rf"{len(expected)} rows? in \d+\.\d{{3}} s", caption)
    assert page.query_params == {"sql": DIVERGENT}  # the URL holds what is on screen
    assert not page.error


REFUSED = {
    "a write": "DELETE FROM runs",
    "a second statement": "SELECT count(*) FROM runs; DROP TABLE runs",
    "a file read": "SELECT * FROM read_csv('{files}/secret.csv')",
    "a file write": "COPY (SELECT * FROM runs) TO '{files}/leak.csv'",
    "an attach": "ATTACH '{files}/other.duckdb' AS other",
}


@pytest.mark.parametrize("sql", REFUSED.values(), ids=REFUSED.keys())
def test_refused_statements_show_emc_sqls_message_and_change_nothing(store, tmp_path, sql):
    files = tmp_path / "files"
    files.mkdir()
    (files / "secret.csv").write_text("key\nemc-secret-value\n")
    sql = sql.format(files=files)
    before = snapshot(tmp_path)
    runs = read_only_query(store, "SELECT count(*) AS n FROM runs")["n"][0]
    with pytest.raises(StoreError) as refused:
        read_only_query(store, sql)
    message = str(refused.value)
    assert message.startswith("refused") and "emc-secret-value" not in message

    page = typed(open_page(), sql)
    assert [e.value for e in page.error] == [message]
    cli = runner.invoke(app, ["sql", sql, "-d", str(store.path.parent)])
    assert cli.exit_code == 2
    assert " ".join(f"error: {message}".split()) in " ".join(cli.output.split())

    assert not page.download_button  # nothing to download from a refusal
    assert snapshot(tmp_path) == before
    assert read_only_query(store, "SELECT count(*) AS n FROM runs")["n"][0] == runs


@pytest.fixture
def downloads(monkeypatch) -> list[tuple[bytes, str, str | None]]:
    """What each download button would serve: (data, mime type, file name)."""
    served: list[tuple[bytes, str, str | None]] = []
    keep = MemoryMediaFileStorage.load_and_get_id

    def record(self, data, mimetype, kind, filename=None):
        served.append((data, mimetype, filename))
        return keep(self, data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", record)
    return served


def test_downloads_read_back_as_the_result(store, downloads):
    sql = (
        "SELECT r.run_id, r.name, r.started_at, r.pid, r.code_dirty, d.prompt_id, d.js, d.k, "
        "[d.k, 1] AS pair FROM runs r JOIN divergences d USING (run_id) ORDER BY d.prompt_id"
    )
    expected = read_only_query(store, sql)
    assert len(expected) > 0
    typed(open_page(), sql)
    files = {name: (data, mime) for data, mime, name in downloads}
    assert set(files) == {"query.csv", "query.parquet"}

    csv, mime = files["query.csv"]
    assert mime == "text/csv"
    back = pd.read_csv(io.BytesIO(csv))
    plain = ["run_id", "name", "pid", "code_dirty", "prompt_id", "js", "k"]
    pd.testing.assert_frame_equal(back[plain], expected[plain], check_dtype=False)
    assert (pd.to_datetime(back["started_at"]) == expected["started_at"]).all()

    parquet, mime = files["query.parquet"]
    assert mime == "application/vnd.apache.parquet"
    back = pd.read_parquet(io.BytesIO(parquet))
    # The same instants: DuckDB names the zone Etc/UTC, Parquet readers UTC.
    back["started_at"] = back["started_at"].dt.tz_convert(expected["started_at"].dt.tz)
    assert back["pair"].map(list).tolist() == expected["pair"].map(list).tolist()
    pd.testing.assert_frame_equal(back.drop(columns="pair"), expected.drop(columns="pair"))


def test_save_load_and_delete_round_trip(store):
    sql = "SELECT name, status FROM runs ORDER BY started_at"
    page = typed(open_page(), sql)
    page.text_input(key=view.SAVE_NAME).input("runs by start")
    page.text_input(key=view.SAVE_DESCRIPTION).input("every run, oldest first")
    page.text_input(key=view.AUTHOR).input(" ana ")
    page.button(key="sql-save").click()
    rerun(page)
    assert [s.value for s in page.success] == ["Saved 'runs by start' as human:ana."]
    saved = get_saved_query(store, "runs by start")
    assert (saved.sql, saved.description, saved.author) == (sql, "every run, oldest first",
                                                            "human:ana")  # fmt: skip
    assert page.query_params == {"query": "runs by start"}  # the URL names the saved query
    listed = page.dataframe[1].value
    assert listed[listed["kind"] == "saved"]["name"].tolist() == ["runs by start"]

    # A shared URL loads it in a new session and runs it.
    shared = open_page(query="runs by start")
    assert shared.text_area(key=view.TEXT).value == sql
    pd.testing.assert_frame_equal(
        result_table(shared).reset_index(drop=True), read_only_query(store, sql)
    )

    # Saving the name again replaces it; the first save's time stays.
    typed(shared, "SELECT name FROM runs")
    shared.text_input(key=view.AUTHOR).input("bo")
    shared.button(key="sql-save").click()
    rerun(shared)
    again = get_saved_query(store, "runs by start")
    assert (again.sql, again.author) == ("SELECT name FROM runs", "human:bo")
    assert again.created_at == saved.created_at and again.updated_at > saved.updated_at
    assert [q.name for q in saved_queries(store)] == ["runs by start"]

    shared.button(key="sql-delete").click()
    rerun(shared)
    assert get_saved_query(store, "runs by start") is None
    assert "Deleted 'runs by start'" in shared.success[0].value
    assert shared.text_area(key=view.TEXT).value == "SELECT name FROM runs"  # kept in the box
    assert shared.query_params == {"sql": "SELECT name FROM runs"}
    assert not any(b.key == "sql-delete" for b in shared.button)  # nothing loaded to delete


def test_saving_needs_a_name_a_person_and_a_statement_the_console_runs(store):
    page = typed(open_page(), "SELECT 1 AS one")
    page.text_input(key=view.SAVE_NAME).input("one")
    page.button(key="sql-save").click()
    rerun(page)
    assert "a name is needed" in page.error[0].value

    page.text_input(key=view.AUTHOR).input("ana")
    page.text_input(key=view.SAVE_NAME).input("recent-runs")
    page.button(key="sql-save").click()
    rerun(page)
    assert "built-in example" in page.error[0].value

    typed(page, "DROP TABLE runs")
    page.text_input(key=view.SAVE_NAME).input("drop")
    page.button(key="sql-save").click()
    rerun(page)
    assert any(e.value.startswith("Not saved: refused DROP") for e in page.error)
    assert saved_queries(store) == []


def test_a_url_loads_text_a_saved_query_or_an_example(store):
    page = open_page(sql="SELECT count(*) AS n FROM runs")
    assert (
        result_table(page)["n"].tolist()
        == read_only_query(store, "SELECT count(*) AS n FROM runs")["n"].tolist()
    )

    missing = open_page(query="nobody saved this")
    assert missing.warning[0].value == "No saved query or example named 'nobody saved this'."
    assert missing.query_params == {}

    example = open_page(query="recent-runs")
    assert example.text_area(key=view.TEXT).value == view.EXAMPLES_BY_NAME["recent-runs"].sql
    assert example.query_params == {"query": "recent-runs"}


def test_the_picker_loads_an_example_and_never_saves_over_the_query_loaded_before(store):
    save_query(store, "mine", "SELECT 1 AS one", "human:ana", "a one")
    page = open_page(query="mine")
    assert page.text_input(key=view.SAVE_NAME).value == "mine"  # saving again replaces it
    page.selectbox(key=view.PICK).select("most-divergent-prompts")
    rerun(page)
    example = view.EXAMPLES_BY_NAME["most-divergent-prompts"]
    assert page.text_area(key=view.TEXT).value == example.sql
    assert len(result_table(page)) == len(read_only_query(store, example.sql))
    assert page.text_input(key=view.SAVE_NAME).value == ""
    assert page.query_params == {"query": "most-divergent-prompts"}


@pytest.mark.parametrize("example", view.EXAMPLES, ids=lambda e: e.name)
def test_every_example_runs_on_the_flows_store(store, example):
    expected = read_only_query(store, example.sql)
    page = open_page(query=example.name)
    assert not page.error
    pd.testing.assert_frame_equal(result_table(page).reset_index(drop=True), expected)
    if example.name == "most-divergent-prompts":
        assert len(expected) > 0 and expected["js"].is_monotonic_decreasing
    if example.name == "labelled-features":
        assert expected[["layer", "feature", "label"]].values.tolist() == [[1, 7, "wallet theft"]]
    if example.name == "evil-token-features":
        assert list(expected.columns) == ["layer", "feature", "prompts"]


def test_the_readme_example_is_the_readmes_query():
    text = README.read_text()
    start = text.index("Which features feed the evil token")
    block = re.search(r"```sql\n(.*?)\n```", text[start:], re.S).group(1)
    assert view.EXAMPLES_BY_NAME["evil-token-features"].sql == block


# The store's saved queries


def test_saved_queries_store__replace_list_and_delete(tmp_path):
    store = Store.in_data_dir(tmp_path / "data")
    first = save_query(store, " b ", "SELECT 1", "human:ana", " one ")
    assert (first.name, first.description) == ("b", "one")
    save_query(store, "a", "SELECT 2", "human:bo")
    replaced = save_query(store, "b", "SELECT 3", "human:cy", "")
    assert (replaced.sql, replaced.author, replaced.description) == ("SELECT 3", "human:cy", None)
    assert replaced.created_at == first.created_at
    assert [q.name for q in saved_queries(store)] == ["a", "b"]
    assert delete_saved_query(store, "b") and not delete_saved_query(store, "b")
    assert [q.name for q in saved_queries(store)] == ["a"]


@pytest.mark.parametrize(
    ("name", "sql", "author", "message"),
    [
        ("", "SELECT 1", "human:ana", "needs a name"),
        ("x", "  ", "human:ana", "no SQL"),
        ("x", "SELECT 1", "ana", "human:<name>"),
        ("x", "SELECT 1", "human: ", "human:<name>"),
        ("x" * 101, "SELECT 1", "human:ana", "at most 100"),
    ],
)
def test_saved_queries_store__refuses_what_it_cannot_credit_or_name(
    tmp_path, name, sql, author, message
):
    store = Store.in_data_dir(tmp_path / "data")
    with pytest.raises(ValueError, match=re.escape(message)):
        save_query(store, name, sql, author)
    assert saved_queries(store) == []


def test_query_author_credits_a_person():
    assert query_author(" ana ") == "human:ana"
    with pytest.raises(ValueError, match="a name is needed"):
        query_author("  ")


def test_file_stem_and_caption():
    assert view.file_stem("runs by start/…") == "runs-by-start"
    assert view.file_stem(None) == view.file_stem("..") == "query"
    assert view.result_caption(1, 0.01234) == "1 row in 0.012 s"
    assert view.result_caption(12345, 2) == "12,345 rows in 2.000 s"
