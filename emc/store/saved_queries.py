"""Saved queries (`saved_queries`): SQL a person saved by name on the dashboard's SQL page.

A saved query is only text: it runs through the sealed console (`read_only_query`) like any
typed SQL, so saving can never widen what the console runs. Saving a name again replaces its
SQL, description and author (`human:<name>`, who saved it last); `created_at` keeps the first
save and `updated_at` the last.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from emc.store.connection import Store

NAME_CHARS = 100
_COLUMNS = ("name", "sql", "description", "author", "created_at", "updated_at")


class SavedQuery(BaseModel):
    name: str
    sql: str
    description: str | None = None
    author: str  # human:<name>
    created_at: datetime
    updated_at: datetime


def query_author(person: str) -> str:
    """`human:<name>`, the credit a saved query carries; a name is required."""
    person = person.strip()
    if not person:
        raise ValueError("a name is needed to save a query: who saved it is stored with it")
    return f"human:{person}"


def save_query(
    store: Store, name: str, sql: str, author: str, description: str | None = None
) -> SavedQuery:
    """Save `sql` as `name` (trimmed); a name saved before is replaced. Returns the row."""
    name = name.strip()
    if not name:
        raise ValueError("a saved query needs a name")
    if len(name) > NAME_CHARS:
        raise ValueError(f"a saved query's name is at most {NAME_CHARS} characters")
    if not sql.strip():
        raise ValueError("there is no SQL to save")
    if not author.startswith("human:") or not author.removeprefix("human:").strip():
        raise ValueError(f"a saved query's author is human:<name>, not {author!r}")
    description = (description or "").strip() or None
    with store.write() as conn:
        conn.execute(
            "INSERT INTO saved_queries (name, sql, description, author, created_at, updated_at) "
            "VALUES (?, ?, ?, ?, now(), now()) ON CONFLICT (name) DO UPDATE SET "
            "sql = excluded.sql, description = excluded.description, "
            "author = excluded.author, updated_at = excluded.updated_at",
            [name, sql, description, author],
        )
        row = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM saved_queries WHERE name = ?", [name]
        ).fetchone()
    return _to_query(row)


def saved_queries(store: Store) -> list[SavedQuery]:
    """Every saved query, by name."""
    if not store.exists():
        return []
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM saved_queries ORDER BY lower(name), name"
        ).fetchall()
    return [_to_query(row) for row in rows]


def get_saved_query(store: Store, name: str) -> SavedQuery | None:
    if not store.exists():
        return None
    with store.read() as conn:
        row = conn.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM saved_queries WHERE name = ?", [name.strip()]
        ).fetchone()
    return _to_query(row) if row else None


def delete_saved_query(store: Store, name: str) -> bool:
    """Delete the saved query `name`; False when there was none."""
    with store.write() as conn:
        deleted = conn.execute(
            "DELETE FROM saved_queries WHERE name = ? RETURNING name", [name.strip()]
        ).fetchall()
    return bool(deleted)


def _to_query(row: tuple) -> SavedQuery:
    return SavedQuery.model_validate(dict(zip(_COLUMNS, row, strict=True)))
