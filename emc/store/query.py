"""Ad-hoc read-only SQL for researchers (`emc sql`, the dashboard's SQL page)."""

from __future__ import annotations

import duckdb
import pandas as pd

from emc.store.connection import Store, StoreError

# Statement kinds that only read. DESCRIBE, SHOW and SUMMARIZE parse as SELECT.
_READ_ONLY_KINDS = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}


class ReadOnlyViolation(StoreError):
    """A query that would write (to the store or to a file) was refused; nothing ran."""


def read_only_query(store: Store, sql: str) -> pd.DataFrame:
    """Run read-only SQL and return the last statement's result.

    Every statement is checked before any runs, so a script that mixes a SELECT and an INSERT
    changes nothing. The connection itself is read-only too, as a second fence.
    """
    kinds = _statement_kinds(sql)
    refused = [kind.name for kind in kinds if kind not in _READ_ONLY_KINDS]
    if refused:
        raise ReadOnlyViolation(
            f"refused: `emc sql` is read-only, and this SQL contains {', '.join(refused)}. "
            "Results are written by EMC's flows and commands, never by hand."
        )
    if not kinds:
        raise StoreError("no SQL statement given")
    with store.read() as conn:
        try:
            statements = conn.extract_statements(sql)
            for statement in statements[:-1]:
                conn.execute(statement)
            return conn.execute(statements[-1]).df()
        except duckdb.Error as exc:
            raise StoreError(f"query failed: {exc}") from None


def _statement_kinds(sql: str) -> list[duckdb.StatementType]:
    try:
        return [statement.type for statement in duckdb.connect().extract_statements(sql)]
    except duckdb.ParserException as exc:
        raise StoreError(f"SQL does not parse: {exc}") from None
