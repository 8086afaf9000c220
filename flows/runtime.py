"""Prefect conventions shared by every flow: where Prefect keeps state, and the GPU slot.

`configure_prefect` must run before Prefect is imported: Prefect reads these settings at import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from emc.config import DATA_DIR_ENV, ConfigError
from emc.faults import armed, fault_point

GPU_LIMIT = "gpu"
STORE_WRITER_LIMIT = "store-writer"
DEFAULT_LIMITS = {GPU_LIMIT: 1, STORE_WRITER_LIMIT: 1}


def configure_prefect(data_dir: Path) -> None:
    """Ephemeral Prefect with its home inside the data directory, analytics off.

    Explicit settings in the environment (a server URL, another home) win.
    """
    os.environ.setdefault("PREFECT_HOME", str(Path(data_dir) / "prefect"))
    # Prefect cannot start its API (SQLite) in a home it failed to create.
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # The ephemeral API server gets 20 s to start; on two busy cores it sometimes needs more.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    if "PREFECT_API_URL" not in os.environ and "prefect" not in sys.modules:
        # Our own temporary server instead of Prefect's: it dies with this process, even on
        # kill -9 (see flows/local_server.py). Once Prefect is imported (tests), its settings
        # are fixed and Prefect's own server or the test harness is used.
        from flows.local_server import start_local_server
        from flows.slots import LOCAL_API_ENV

        timeout = float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
        url = start_local_server(Path(os.environ["PREFECT_HOME"]).expanduser(), timeout)
        os.environ["PREFECT_API_URL"] = os.environ[LOCAL_API_ENV] = url


def deployment_data_dir(data_dir: str | None) -> str | None:
    """`data_dir` as given, unless this is a deployment run with no data directory at all.

    A worker's working directory is nobody's store: rather than write a silent ./emc-data there,
    a deployment run without `data_dir` and without the pool's EMC_DATA_DIR stops at once.
    """
    if data_dir or os.environ.get(DATA_DIR_ENV):
        return data_dir
    from prefect.runtime import deployment

    if deployment.id:
        raise ConfigError(
            f"deployment {deployment.name!r} was run without a data directory: pass the "
            "data_dir parameter, or give the work pool one with `emc prefect setup --data-dir "
            "DIR` (it sets EMC_DATA_DIR for every flow run of the pool)"
        )
    return data_dir


_ensured: set[str] = set()


def ensure_concurrency_limit(name: str, limit: int) -> None:
    """Create a global concurrency limit if the server has none by that name (idempotent)."""
    if name in _ensured:
        return
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # Another process may create it between our read and our create.
            with suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
    _ensured.add(name)


@contextmanager
def gpu_slot() -> Iterator[None]:
    """Hold the single `gpu` slot. A missing limit is created, never skipped; a slot held by a
    dead process is reclaimed, and a wait is logged (flows/slots.py)."""
    from flows.slots import hold_slot

    ensure_concurrency_limit(GPU_LIMIT, DEFAULT_LIMITS[GPU_LIMIT])
    with hold_slot(GPU_LIMIT):
        if armed("gpu-step:"):  # the flow's name is a lookup: only when a test asks for it
            fault_point(f"gpu-step:{current_flow_name()}")
        yield


@contextmanager
def store_writer_slot() -> Iterator[None]:
    """Hold the single `store-writer` slot: one task loading results into the store at a time."""
    from flows.slots import hold_slot

    ensure_concurrency_limit(STORE_WRITER_LIMIT, DEFAULT_LIMITS[STORE_WRITER_LIMIT])
    with hold_slot(STORE_WRITER_LIMIT):
        yield


def current_flow_name() -> str | None:
    from prefect.runtime import flow_run

    return flow_run.flow_name or None


def current_flow_run_id() -> str | None:
    from prefect.runtime import flow_run

    return str(flow_run.id) if flow_run.id else None


def announce(event: str, data_dir: str | Path, payload: dict) -> None:
    """Tell a listening Prefect server this stage's news (`emc.events`): its triggers may start
    the next stage. A stage run inside a parent flow says so, and starts nothing."""
    from prefect.runtime import flow_run

    from emc.events import emit

    chain = flow_run.parent_flow_run_id is None
    emit(event, data_dir, {"flow_run_id": current_flow_run_id(), **payload}, chain=chain)


def retry_unless_permanent(task, task_run, state) -> bool:
    """Retry condition: bad input (config, model files, NaNs) will fail again, so do not retry."""
    from emc.config import ConfigError
    from emc.models import ModelLoadError, NonFiniteActivationError

    try:
        state.result()
    except (ConfigError, ModelLoadError, NonFiniteActivationError):
        return False
    except Exception:
        return True
    return True
