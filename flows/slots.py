"""Concurrency slots (`gpu`, `store-writer`) that a killed run cannot keep, and waits that say so.

Prefect 3 holds a slot under a lease the holder renews; a dead holder's lease expires and the
server's repossessor frees the slot. Two things break that for EMC's default setup, Prefect in
ephemeral mode with its home in the data directory: an ephemeral server runs no background
services (no repossessor), and it keeps leases in its own memory, which dies with it, while the
slot count lives on in the database. A `kill -9` during a GPU step thus left `gpu` taken for
good, and every later run waited forever without a word.

Slot decay (`slot_decay_per_second`) was rejected: it frees a slot after a fixed time whether its
holder is alive or not, so a live 10-minute trace would lose its exclusive GPU. EMC instead
records who holds what and checks that the holder lives:

- Local API (this data directory's own server or Prefect's ephemeral one, SQLite in
  `PREFECT_HOME`): every holder is a process on this host, so each acquisition and release runs
  under a file lock in `$PREFECT_HOME/emc-slots/NAME/` and writes or deletes a record (PID,
  process start time, host, command). Before each attempt the waiter reconciles: records of dead
  processes are deleted, and taken slots beyond those held by live recorded processes are
  released. That also repairs a slot leaked by an EMC older than this mechanism (taken, with no
  record). A re-run after a kill therefore acquires at once.
- A real server (`PREFECT_API_URL`, other hosts possible): Prefect's own lease, 60 s (its
  minimum), renewed by a background thread; that server's repossessor frees a dead holder's
  slot once its lease expires.

Both poll: one attempt (which never blocks) per `POLL_SECONDS`, in the calling thread, so Ctrl-C
stops a wait at once. While a slot is taken, the waiter logs what it waits for, since when and
who holds it, at once and then every `WAIT_LOG_SECONDS`.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

from emc.events import LOCAL_API_ENV  # set by configure_prefect to its own server's URL
from emc.processes import process_alive, process_start
from emc.provenance import host_name

WAIT_LOG_SECONDS = 15.0
POLL_SECONDS = 1.0
LEASE_SECONDS = 60  # Prefect's minimum


@contextmanager
def hold_slot(name: str) -> Iterator[None]:
    """Hold one slot of the global concurrency limit `name` (which must exist)."""
    directory = local_slot_dir()
    holder = _hold_recorded if directory is not None else _hold_leased
    with holder(name, directory):
        yield


def local_slot_dir() -> Path | None:
    """Where holder records live, or None when holders may be on other hosts (a real server)."""
    try:
        import fcntl  # noqa: F401  (POSIX file locks)
    except ImportError:
        return None
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    url = settings.api.url
    if url is not None and url != os.environ.get(LOCAL_API_ENV):
        return None
    database = settings.server.database.connection_url
    if database is not None and "sqlite" not in database.get_secret_value():
        return None  # a shared database: holders may be anywhere
    return Path(settings.home).expanduser() / "emc-slots"


@contextmanager
def _hold_recorded(name: str, root: Path | None) -> Iterator[None]:
    from prefect.client.orchestration import get_client

    directory = root / name  # type: ignore[operator]
    directory.mkdir(parents=True, exist_ok=True)
    waiting = _Waiting(name)
    with get_client(sync_client=True) as client:
        while True:
            with _file_lock(directory / ".lock"):
                _reclaim(client, name, directory)
                record = _record_holder(directory) if _try_increment(client, name) else None
            if record is not None:
                break
            waiting.report(_describe_holders(_read_records(directory)))
            time.sleep(POLL_SECONDS)
        started = time.monotonic()
        try:
            yield
        finally:
            try:
                with _file_lock(directory / ".lock"):
                    client.release_concurrency_slots(
                        [name], 1, max(time.monotonic() - started, 0.001)
                    )
                    record.unlink(missing_ok=True)
            except Exception as exc:  # the next waiter reclaims it once this process is gone
                _logger().warning(f"could not release the '{name}' slot now ({exc})")


@contextmanager
def _hold_leased(name: str, _root: Path | None) -> Iterator[None]:
    """Prefect's lease, polled like a recorded slot (no blocking call: Ctrl-C stops a wait)."""
    from prefect.client.orchestration import get_client

    waiting = _Waiting(name)
    with get_client(sync_client=True) as client:
        while (lease_id := _try_lease(client, name)) is None:
            waiting.report(
                f"another run (the server frees a dead holder's slot when its {LEASE_SECONDS} s "
                "lease expires)"
            )
            time.sleep(POLL_SECONDS)
        stop = threading.Event()
        renewer = threading.Thread(target=_renew_lease, args=(lease_id, stop), daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            try:
                client.release_concurrency_slots_with_lease(lease_id)
            except Exception as exc:  # the lease expires and the server frees the slot
                _logger().warning(f"could not release the '{name}' slot now ({exc})")


def _try_lease(client, name: str):
    from httpx import HTTPStatusError

    try:
        response = client.increment_concurrency_slots_with_lease(
            names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS
        )
    except HTTPStatusError as exc:
        if exc.response.status_code == 423:  # Locked: every slot is taken
            return None
        raise
    body = response.json()
    if not body.get("limits"):
        raise RuntimeError(f"the concurrency limit {name!r} does not exist or is inactive")
    return body["lease_id"]


def _renew_lease(lease_id, stop: threading.Event) -> None:
    """Renew at 3/4 of the lease; a failed renewal is logged and retried at the next turn."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        while not stop.wait(LEASE_SECONDS * 0.75):
            try:
                client.renew_concurrency_lease(lease_id=lease_id, lease_duration=LEASE_SECONDS)
            except Exception as exc:
                _logger().warning(f"could not renew the slot's lease {lease_id} ({exc})")


class _Waiting:
    """Logs what a task waits for, since when and who holds it: at once, then periodically."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.since = datetime.now()
        self.started = time.monotonic()
        self.next_report = self.started

    def report(self, holders: str) -> None:
        now = time.monotonic()
        if now < self.next_report:
            return
        self.next_report = now + WAIT_LOG_SECONDS
        _logger().warning(
            f"waiting for the '{self.name}' slot since {self.since:%H:%M:%S} "
            f"({now - self.started:.0f} s); held by {holders}"
        )


def _logger():
    from prefect.logging import get_logger, get_run_logger

    try:
        return get_run_logger()
    except Exception:  # outside a flow or task run
        return get_logger("emc.slots")


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released by the kernel if this process dies
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _try_increment(client, name: str) -> bool:
    from httpx import HTTPStatusError

    try:
        response = client.increment_concurrency_slots(names=[name], slots=1, mode="concurrency")
    except HTTPStatusError as exc:
        if exc.response.status_code == 423:  # Locked: every slot is taken
            return False
        raise
    if not response.json():
        raise RuntimeError(f"the concurrency limit {name!r} does not exist or is inactive")
    return True


def _record_holder(directory: Path) -> Path:
    pid = os.getpid()
    record = {
        "pid": pid,
        "started": process_start(pid),
        "host": host_name(),
        "since": datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:200],
        "slots": 1,
    }
    path = directory / f"{pid}-{uuid.uuid4().hex[:8]}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(record))
    os.replace(temporary, path)
    return path


def _read_records(directory: Path) -> list[tuple[Path, dict[str, Any]]]:
    records = []
    for path in sorted(directory.glob("*.json")):
        try:
            records.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue  # released meanwhile
    return records


def _alive(record: dict[str, Any]) -> bool:
    if record.get("host") != host_name():
        return True  # cannot be checked from here: assume it runs
    return process_alive(int(record["pid"]), record.get("started"))


def _reclaim(client, name: str, directory: Path) -> int:
    """Free the slots no live process holds; returns how many. Call under the file lock."""
    live, dead = [], []
    for path, record in _read_records(directory):
        (live if _alive(record) else dead).append((path, record))
    for path, _ in dead:
        path.unlink(missing_ok=True)
    active = client.read_global_concurrency_limit_by_name(name).active_slots
    excess = active - sum(int(record.get("slots", 1)) for _, record in live)
    if excess > 0:
        client.release_concurrency_slots([name], excess, 0.001)
        who = (
            ", ".join(f"pid {r['pid']} ({r.get('command', '?')})" for _, r in dead)
            or "no live process (left by a killed run)"
        )
        _logger().warning(f"released {excess} '{name}' slot(s) held by {who}")
    return max(excess, 0)


def _describe_holders(records: list[tuple[Path, dict[str, Any]]]) -> str:
    if not records:
        return "a run that is about to release it"
    return "; ".join(
        f"pid {r['pid']} on {r.get('host', '?')} since {r.get('since', '?')} "
        f"({r.get('command', '?')})"
        for _, r in records
    )
