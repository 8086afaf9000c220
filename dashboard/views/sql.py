"""SQL: one read-only statement on the store, through the same sealed console as `emc sql`.

- The statement runs through `emc.store.read_only_query`, the function `emc sql` calls: one
  read (SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, or EXPLAIN of one of those) on a connection that
  reaches nothing but the store. A write, a second statement or a file access is refused with
  the message `emc sql` prints. The result comes as a table with its row count and time, and as
  CSV and Parquet downloads (what `emc sql -f csv` and `-f parquet` write).
- Saved queries (`emc.store.saved_queries`): a person saves the text under a name, credited
  `human:<name>`; saving a name again replaces it. Built-in examples are shown alongside (not
  stored); each runs on a demo store.
- Shareable URL: `?query=<name>` loads a saved query or an example, `?sql=<text>` loads text.
  The page writes back what is on screen: the loaded query's name while its text is unchanged,
  else the text.

No SQL of the page's own: the store's reads and writes go through emc.store.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import duckdb
import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store, keep_in_url, page_url, query_value
from emc.store import Store, StoreError, read_only_query, write_parquet
from emc.store.saved_queries import (
    SavedQuery,
    delete_saved_query,
    query_author,
    save_query,
    saved_queries,
)

MAX_SHOWN = 10_000  # rows drawn in the table; the downloads hold every row
TEXT, LOADED, RESULT, URL_SEEN, FLASH = (
    "sql-text",
    "sql-loaded",
    "sql-result",
    "sql-url",
    "sql-flash",
)
PICK, SAVE_NAME, SAVE_DESCRIPTION, AUTHOR = (
    "sql-pick",
    "sql-save-name",
    "sql-save-desc",
    "sql-author",
)
REVIEWER = "reviewer"  # the name the Review page keeps across pages (views/review.py NAME)
PLACEHOLDER = "SELECT name, status, started_at FROM runs ORDER BY started_at DESC"


@dataclass(frozen=True)
class Example:
    """A built-in query, shown beside the saved ones and never stored."""

    name: str
    description: str
    sql: str


EXAMPLES: tuple[Example, ...] = (
    Example(
        "evil-token-features",
        "Features that feed the evil token in more than 10 prompts (README, Tracing)",
        """SELECT n.layer, n.feature, count(DISTINCT g.prompt_id) AS prompts
FROM graph_edges e
JOIN graphs g USING (graph_id)
JOIN graph_nodes n ON n.graph_id = e.graph_id AND n.node = e.source AND n.kind = 'feature'
JOIN graph_nodes t ON t.graph_id = e.graph_id AND t.node = e.target AND t.kind = 'logit'
JOIN token_labels l ON l.prompt_id = g.prompt_id AND l.token_id = t.token_id AND l.label = 'evil'
GROUP BY ALL HAVING count(DISTINCT g.prompt_id) > 10 ORDER BY prompts DESC""",
    ),
    Example(
        "most-divergent-prompts",
        "The prompts where base and adapted next-token distributions differ most (JS)",
        """SELECT d.prompt_id, p.name, d.js, d.kl_adapted_base, d.tv, d.p_evil_base,
       d.p_evil_adapted, p.text
FROM divergences d
JOIN prompts p USING (prompt_id)
ORDER BY d.js DESC
LIMIT 50""",
    ),
    Example(
        "labelled-features",
        "Every labelled feature with the label shown (a person's over an LLM's)",
        """SELECT transcoders_ref, layer, feature, label, labeller, labels
FROM feature_label_shown
ORDER BY layer, feature""",
    ),
    Example(
        "recent-runs",
        "The latest runs: what ran, how long it took, how it ended",
        """SELECT run_id, name, status, started_at, finished_at - started_at AS took, error
FROM runs
ORDER BY started_at DESC
LIMIT 50""",
    ),
)
EXAMPLES_BY_NAME = {e.name: e for e in EXAMPLES}


# Running a statement


@dataclass
class QueryResult:
    """One run of a statement: its frame, or the console's message."""

    sql: str
    frame: pd.DataFrame | None
    seconds: float
    error: str | None = None
    _downloads: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def csv(self) -> bytes:
        if "csv" not in self._downloads:
            self._downloads["csv"] = csv_bytes(self.frame)
        return self._downloads["csv"]

    @property
    def parquet(self) -> bytes:
        if "parquet" not in self._downloads:
            self._downloads["parquet"] = parquet_bytes(self.frame)
        return self._downloads["parquet"]


def run_query(store: Store, sql: str) -> QueryResult:
    """`read_only_query`, as `emc sql` runs it, timed; a refusal or failure keeps its message."""
    start = time.perf_counter()
    try:
        frame = read_only_query(store, sql)
    except StoreError as exc:  # refused, does not parse, failed, store busy: emc sql's message
        return QueryResult(sql, None, time.perf_counter() - start, str(exc))
    return QueryResult(sql, frame, time.perf_counter() - start)


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """The result as `emc sql -f csv` writes it (UTF-8, no index)."""
    return frame.to_csv(index=False).encode("utf-8")


def parquet_bytes(frame: pd.DataFrame) -> bytes:
    """The result as `emc sql -f parquet` writes it."""
    buffer = io.BytesIO()
    write_parquet(frame, buffer)
    return buffer.getvalue()


def result_caption(rows: int, seconds: float) -> str:
    return f"{rows:,} row{'' if rows == 1 else 's'} in {seconds:.3f} s"


def file_stem(name: str | None) -> str:
    """A download's file name: the loaded query's name made safe, else `query`."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-.")
    return stem or "query"


# Saved queries and examples


def find_query(name: str | None, saved: Mapping[str, SavedQuery]) -> SavedQuery | Example | None:
    """The saved query or the example called `name` (a saved one cannot take an example's)."""
    if not name:
        return None
    return saved.get(name) or EXAMPLES_BY_NAME.get(name)


def query_table(saved: Sequence[SavedQuery]) -> pd.DataFrame:
    """Saved queries, then the examples: name, kind, description, who saved it, when, the
    SQL and a shareable link."""
    rows = [
        {
            "name": q.name,
            "kind": "saved",
            "description": q.description or "",
            "author": q.author,
            "updated": q.updated_at,
            "sql": q.sql,
            "link": page_url("sql", query=q.name),
        }
        for q in saved
    ] + [
        {
            "name": e.name,
            "kind": "example",
            "description": e.description,
            "author": "",
            "updated": None,
            "sql": e.sql,
            "link": page_url("sql", query=e.name),
        }
        for e in EXAMPLES
    ]
    return pd.DataFrame(
        rows, columns=["name", "kind", "description", "author", "updated", "sql", "link"]
    )


def pick_label(name: str, saved: Mapping[str, SavedQuery]) -> str:
    if not name:
        return "—"
    query = find_query(name, saved)
    if isinstance(query, Example):
        return f"example · {name} — {query.description}"
    if query is None:
        return name
    described = f" — {query.description}" if query.description else ""
    return f"{name}{described} ({query.author})"


# The page


def render() -> None:
    st.title("SQL")
    st.caption(
        "One read-only statement on the store, sealed exactly as `emc sql`: a SELECT, WITH, "
        "SHOW, DESCRIBE, SUMMARIZE, or EXPLAIN of one of those, on a connection that reaches "
        "nothing but the store. Writes, a second statement and file or network access are "
        "refused. `SHOW TABLES` lists the tables; the README's Store section says what they hold."
    )
    store = existing_store("Run `emc demo` to create one.")
    saved = {q.name: q for q in saved_queries(store)}
    follow_url(saved)

    flash = st.session_state.pop(FLASH, None)
    if flash:
        getattr(st, flash[0])(flash[1])

    options = ["", *saved, *EXAMPLES_BY_NAME]
    if st.session_state.get(PICK) not in options:
        st.session_state[PICK] = ""
    st.selectbox(
        "Load a saved query or an example",
        options,
        key=PICK,
        format_func=lambda name: pick_label(name, saved),
        on_change=load_picked,
        args=(saved,),
    )
    text = st.text_area("SQL", key=TEXT, height=200, placeholder=PLACEHOLDER)
    rerun = st.button("Run", type="primary", key="sql-run", help="Run the statement again")

    result: QueryResult | None = st.session_state.get(RESULT)
    if text.strip():
        if rerun or result is None or result.sql != text:
            result = run_query(store, text)
            st.session_state[RESULT] = result
        show_result(result, st.session_state.get(LOADED))
    else:
        st.session_state.pop(RESULT, None)
        st.info("Type one read-only statement, or load a saved query or an example.")

    show_saving(store, saved, text)
    with st.expander(f"Saved queries ({len(saved)}) and examples ({len(EXAMPLES)})"):
        st.dataframe(
            query_table(list(saved.values())),
            hide_index=True,
            width="stretch",
            column_config={"link": st.column_config.LinkColumn("link", display_text="open")},
        )
    write_url(saved, text)


def follow_url(saved: Mapping[str, SavedQuery]) -> None:
    """Load what a link followed or a shared URL names: `?query=` a saved query or an example,
    `?sql=` text. The page's own writing (`write_url`) is not followed again."""
    wanted = (query_value("query"), query_value("sql"))
    if wanted == st.session_state.get(URL_SEEN):
        return
    st.session_state[URL_SEEN] = wanted
    name, text = wanted
    if name:
        query = find_query(name, saved)
        if query is None:
            st.session_state[FLASH] = ("warning", f"No saved query or example named {name!r}.")
            return
        load(query)
    elif text:
        st.session_state[TEXT] = text
        st.session_state[LOADED] = None
        st.session_state[SAVE_NAME] = ""  # never save over the query loaded before by mistake


def write_url(saved: Mapping[str, SavedQuery], text: str) -> None:
    """The loaded query's name while its text is on screen unchanged, else the text."""
    query = find_query(st.session_state.get(LOADED), saved)
    if query is not None and query.sql == text:
        keep_in_url(query=query.name, sql=None)
    else:
        keep_in_url(query=None, sql=text if text.strip() else None)
    st.session_state[URL_SEEN] = (query_value("query"), query_value("sql"))


def load(query: SavedQuery | Example) -> None:
    """Put a saved query or an example in the box. A saved query's name and description go in
    the save fields, so saving after an edit replaces it; an example's name cannot be saved to."""
    st.session_state[TEXT] = query.sql
    st.session_state[LOADED] = query.name
    st.session_state[PICK] = query.name
    saved = isinstance(query, SavedQuery)
    st.session_state[SAVE_NAME] = query.name if saved else ""
    st.session_state[SAVE_DESCRIPTION] = query.description or ""


def load_picked(saved: Mapping[str, SavedQuery]) -> None:
    query = find_query(st.session_state.get(PICK), saved)
    if query is not None:
        load(query)


def show_result(result: QueryResult, loaded: str | None) -> None:
    if result.error is not None:
        st.error(result.error)
        return
    frame = result.frame
    st.caption(result_caption(len(frame), result.seconds))
    st.dataframe(frame.head(MAX_SHOWN), hide_index=True, width="stretch")
    if len(frame) > MAX_SHOWN:
        st.caption(
            f"The first {MAX_SHOWN:,} rows are shown; the downloads hold all {len(frame):,}."
        )
    stem = file_stem(loaded)
    csv_col, parquet_col, _ = st.columns([1, 1, 4])
    csv_col.download_button(
        "⬇️ CSV", result.csv, f"{stem}.csv", "text/csv", key="sql-csv", on_click="ignore"
    )
    try:
        parquet = result.parquet
    except (duckdb.Error, ValueError, TypeError) as exc:
        parquet_col.caption(f"No Parquet for this result: {exc}")
    else:
        parquet_col.download_button(
            "⬇️ Parquet",
            parquet,
            f"{stem}.parquet",
            "application/vnd.apache.parquet",
            key="sql-parquet",
            on_click="ignore",
        )


def show_saving(store: Store, saved: Mapping[str, SavedQuery], text: str) -> None:
    """Save the text under a name (replacing a query of that name), or delete the loaded one."""
    with st.expander("Save or delete", expanded=bool(st.session_state.get(LOADED) in saved)):
        if AUTHOR not in st.session_state:
            st.session_state[AUTHOR] = st.session_state.get(REVIEWER, "")
        name_col, person_col = st.columns(2)
        name_col.text_input("Name", key=SAVE_NAME, placeholder="e.g. flagged-by-judge")
        person_col.text_input("Your name", key=AUTHOR, placeholder="e.g. ana")
        st.text_input("Description", key=SAVE_DESCRIPTION)
        save_col, delete_col = st.columns(2)
        save_col.button(
            "Save",
            key="sql-save",
            on_click=save_current,
            args=(store,),
            disabled=not text.strip(),
            help="Saves the statement above under this name, replacing a saved query of that "
            "name; only a statement the console runs can be saved.",
        )
        loaded = st.session_state.get(LOADED)
        if loaded in saved:
            delete_col.button(
                f"Delete saved query {loaded!r}",
                key="sql-delete",
                on_click=delete_loaded,
                args=(store,),
            )


def save_current(store: Store) -> None:
    """Save the box's statement (the Save button's callback, before the page draws)."""
    name = st.session_state.get(SAVE_NAME, "").strip()
    text = st.session_state.get(TEXT, "")
    try:
        author = query_author(st.session_state.get(AUTHOR, ""))
        if not name:
            raise ValueError("give the query a name")
        if name in EXAMPLES_BY_NAME:
            raise ValueError(f"{name!r} is a built-in example's name: choose another")
    except ValueError as exc:
        st.session_state[FLASH] = ("error", f"Not saved: {exc}.")
        return
    result = st.session_state.get(RESULT)
    if result is None or result.sql != text:
        result = run_query(store, text)
        st.session_state[RESULT] = result
    if result.error is not None:
        st.session_state[FLASH] = ("error", f"Not saved: {result.error}")
        return
    st.session_state[REVIEWER] = author.removeprefix("human:")
    query = save_query(store, name, text, author, st.session_state.get(SAVE_DESCRIPTION))
    st.session_state[LOADED] = st.session_state[PICK] = query.name
    st.session_state[FLASH] = ("success", f"Saved {query.name!r} as {query.author}.")


def delete_loaded(store: Store) -> None:
    name = st.session_state.get(LOADED)
    if name and delete_saved_query(store, name):
        st.session_state[FLASH] = (
            "success",
            f"Deleted {name!r}. Its SQL stays in the box: save it again to keep it.",
        )
    st.session_state[LOADED] = None
    st.session_state[PICK] = ""
