"""Short-lived DuckDB connections that wait out the cross-process file lock.

DuckDB lets one process hold a read-write connection, and while it does no other process can open
the file at all, not even read-only. So every reader and writer opens a connection for one
transaction and retries with backoff on the lock error; nothing keeps a connection open across a
long task.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from emc.store.migrations import apply_migrations, latest_version, stored_version

STORE_FILE_NAME = "emc.duckdb"
log = logging.getLogger(__name__)

# The SQL console's connection reaches the store file and nothing else: no files, URLs, ATTACH,
# COPY or extension installs. Given at connect, they hold from the first statement, and DuckDB
# still opens the database file it was started on, so the store stays readable; the lock then
# refuses SET and RESET, so a query cannot switch access back on. Tested with duckdb 2.0.1 (the
# order of the keys does not matter).
SEALED_SETTINGS = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}


class StoreError(RuntimeError):
    """A store operation that cannot be completed; the message says why."""


class StoreBusyError(StoreError):
    """The store stayed locked by another process for longer than the configured wait."""


class StoreMissingError(StoreError):
    """A data directory without a store, where one was required; nothing was created."""


class Store:
    """The DuckDB file of one data directory. Cheap to create; holds no connection."""

    def __init__(self, path: str | Path, lock_timeout_s: float = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s
        self._migrated = False

    @classmethod
    def in_data_dir(cls, data_dir: str | Path, **kwargs: float) -> Store:
        return cls(Path(data_dir) / STORE_FILE_NAME, **kwargs)

    @classmethod
    def open_existing(cls, data_dir: str | Path, **kwargs: float) -> Store:
        """The store of a data directory that must already have one.

        Commands that only read use this: opening a store creates it, so a mistyped directory
        would otherwise become a new, empty store that silently answers every query with nothing.
        """
        store = cls.in_data_dir(data_dir, **kwargs)
        if not store.exists():
            raise StoreMissingError(
                f"there is no store at {store.path} (no {STORE_FILE_NAME} in {Path(data_dir)})"
            )
        return store

    def exists(self) -> bool:
        return self.path.is_file()

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One read-write transaction: committed on success, rolled back on any error."""
        self.ensure_schema()
        with self._connect(read_only=False) as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection; creates and migrates the store first if it does not exist."""
        self.ensure_schema()
        with self._connect(read_only=True) as conn:
            yield conn

    @contextmanager
    def read_sealed(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that can reach nothing but this store (see SEALED_SETTINGS)."""
        self.ensure_schema()
        with self._connect(read_only=True, config=SEALED_SETTINGS) as conn:
            yield conn

    def ensure_schema(self) -> None:
        """Create the file and apply pending migrations, once per Store object."""
        if self._migrated:
            return
        # Readers (the dashboard re-runs on every click) must not take the write lock just to
        # learn that the schema is current, so look first through a read-only connection.
        if self.exists():
            with self._connect(read_only=True) as conn:
                current = stored_version(conn)
            if current == latest_version():
                self._migrated = True
                return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect(read_only=False) as conn:
            apply_migrations(conn)
        self._migrated = True

    @contextmanager
    def _connect(
        self, read_only: bool, config: dict | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        conn = self._open_with_retry(read_only, config or {})
        try:
            yield conn
        finally:
            conn.close()

    def _open_with_retry(self, read_only: bool, config: dict) -> duckdb.DuckDBPyConnection:
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.01
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only, config=config)
            except (duckdb.IOException, duckdb.ConnectionException) as exc:
                if not _is_lock_conflict(exc):
                    raise StoreError(f"cannot open store {self.path}: {exc}") from exc
                if time.monotonic() + delay > deadline:
                    raise StoreBusyError(
                        f"store {self.path} stayed locked by another process for "
                        f"{self.lock_timeout_s:.0f} s; is a long-running process holding a "
                        f"connection open?"
                    ) from exc
            # Jitter keeps two waiting processes from retrying in lock-step.
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 0.5)


def _is_lock_conflict(exc: Exception) -> bool:
    message = str(exc).lower()
    if "different configuration" in message:
        # DuckDB refuses a connection with other settings (sealed vs plain) to a file this
        # process already has open; that lasts as long as the other short-lived connection, so
        # it is waited out like the file lock.
        return True
    return "lock" in message and ("conflicting" in message or "could not set" in message)
