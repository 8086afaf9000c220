"""The sealed SQL console for researchers (`emc sql`, and any dashboard page that runs typed SQL).

Two fences. The statement is checked before anything runs: exactly one, and only a read (SELECT,
WITH, SHOW, DESCRIBE, SUMMARIZE, or EXPLAIN of one of those; EXPLAIN ANALYZE runs what it
explains). Then it runs on a read-only connection that cannot reach any file but the store, nor
the network, nor extensions (SEALED_SETTINGS), so table functions such as read_text() or glob()
fail even though they parse as SELECT.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO

import duckdb
import pandas as pd

from emc.store.connection import SEALED_SETTINGS, Store, StoreError

# DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first queries parse as SELECT too.
_READ = duckdb.StatementType.SELECT
_EXPLAIN_OPTIONS = {"ANALYZE", "ANALYSE", "VERBOSE"}
_READS = "SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, or EXPLAIN of one of those"


class ReadOnlyViolation(StoreError):
    """SQL the console refuses (a write, a file or network access, a second statement)."""


def read_only_query(store: Store, sql: str) -> pd.DataFrame:
    """Run one read statement on a sealed connection and return its result.

    Refused before anything runs: more than one statement, and every statement that is not a
    read. Refused while running: any access outside the store file (the connection is sealed).
    """
    statement = _single_read(sql)
    with store.read_sealed() as conn:
        try:
            return conn.execute(statement).df()
        except duckdb.PermissionException as exc:
            raise ReadOnlyViolation(
                "refused: the SQL console is read-only and sealed, with no file or network "
                f"access; it reads the store and nothing else. DuckDB: {_first_line(exc)}"
            ) from None
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from None


def write_parquet(frame: pd.DataFrame, target: Path | BinaryIO) -> None:
    """Write a result as Parquet to a file or a binary stream (DuckDB writes it; no pyarrow)."""
    if isinstance(target, Path):
        with duckdb.connect() as conn:
            conn.from_df(frame).write_parquet(str(target))
        return
    # DuckDB writes only to paths: go through a private temporary file.
    with tempfile.TemporaryDirectory(prefix="emc-parquet-") as scratch:
        path = Path(scratch) / "result.parquet"
        write_parquet(frame, path)
        with path.open("rb") as source:
            shutil.copyfileobj(source, target)


def _single_read(sql: str) -> duckdb.Statement:
    statements = _parse(sql)
    if not statements:
        raise StoreError("no SQL statement given")
    if len(statements) > 1:
        kinds = ", ".join(_leading_keyword(s.query) for s in statements)
        raise ReadOnlyViolation(
            f"refused: the SQL console is read-only and runs exactly one statement; this SQL "
            f"has {len(statements)} statements ({kinds}). Send them one at a time."
        )
    (statement,) = statements
    refused = _refused_part(statement)
    if refused:
        raise ReadOnlyViolation(
            f"refused {refused}: the SQL console is read-only; it runs one {_READS}. Results "
            "are written by EMC's flows and commands, never by hand."
        )
    return statement


def _refused_part(statement: duckdb.Statement) -> str | None:
    """What makes this statement not a read (e.g. "COPY", "EXPLAIN ANALYZE INSTALL"), or None."""
    if statement.type == _READ:
        return None
    if statement.type != duckdb.StatementType.EXPLAIN:
        return _leading_keyword(statement.query)
    # EXPLAIN ANALYZE executes the statement it explains, so that statement is classified on
    # its own, re-parsed from the text after EXPLAIN and its options.
    prefix, explained = _split_explain(statement.query)
    try:
        inner = _parse(explained) if explained.strip() else []
    except StoreError:  # text that does not stand alone: refused, never guessed at
        inner = []
    if len(inner) == 1 and inner[0].type == _READ:
        return None
    return f"{prefix} {_leading_keyword(explained) or 'nothing'}"


def _split_explain(text: str) -> tuple[str, str]:
    """("EXPLAIN ANALYZE", the explained statement's text) of an EXPLAIN statement.

    Skips comments, the ANALYZE keyword and a parenthesised option list in any order. The
    tokenizer gives byte offsets, hence the slicing of encoded text.
    """
    raw = text.encode()
    tokens = _tokens(text)
    words = [_token_text(raw, tokens, i) for i in range(len(tokens))]
    prefix, i, depth = [words[0].upper()], 1, 0
    while i < len(tokens):
        word = words[i].upper()
        if word == "(" and not depth and _opens_query(words[i + 1 :]):
            break
        if word == "(" or depth:
            depth += (word == "(") - (word == ")")
        elif word in _EXPLAIN_OPTIONS:
            prefix.append(word)
        else:
            break
        i += 1
    rest = raw[tokens[i][0] :].decode() if i < len(tokens) else ""
    return " ".join(prefix), rest


def _opens_query(following: list[str]) -> bool:
    """Whether a "(" after EXPLAIN opens a parenthesised query rather than the option list."""
    return bool(following) and following[0].upper() in ("SELECT", "WITH", "FROM", "VALUES", "(")


def _leading_keyword(text: str) -> str:
    tokens = _tokens(text)
    return _token_text(text.encode(), tokens, 0).upper() if tokens else ""


def _tokens(text: str) -> list[tuple[int, duckdb.token_type, int]]:
    """(start, kind, end) byte offsets of each token but comments, which the parser ignores."""
    everything = duckdb.tokenize(text) if text.strip() else []
    ends = [start for start, _ in everything[1:]] + [len(text.encode())]
    return [
        (start, kind, end)
        for (start, kind), end in zip(everything, ends, strict=True)
        if kind != duckdb.token_type.comment
    ]


def _token_text(raw: bytes, tokens: list, i: int) -> str:
    start, _, end = tokens[i]
    return raw[start:end].decode().strip()


def _parse(sql: str) -> list[duckdb.Statement]:
    # Parsed on a sealed in-memory connection: parsing never needs the store or an extension.
    try:
        with duckdb.connect(":memory:", config=SEALED_SETTINGS) as conn:
            statements = conn.extract_statements(sql)
        for statement in statements:
            _ = statement.type  # raises for a kind the client cannot name: refuse it here
        return statements
    except duckdb.ParserException as exc:
        raise StoreError(f"SQL does not parse: {exc}") from None
    except ValueError:
        # A statement kind the Python client has no name for (e.g. UPDATE EXTENSIONS).
        raise ReadOnlyViolation(
            f"refused {_leading_keyword(sql)}: the SQL console is read-only; it runs one {_READS}."
        ) from None


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]
