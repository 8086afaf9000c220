"""`emc demo` on the small recipe as a researcher runs it (a real process), and the never-killed
reference run shared by the test files that need it.

The reference run is made once per test session: the first pytest-xdist worker to ask makes it
under a file lock and records its output and row counts next to it; a worker asking later reads
them. The counts are taken right after the run, so a test that later types commands into that
store (the README's) does not change what a killed run is compared with.
"""

from __future__ import annotations

import fcntl
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from emc.store import Store, read_only_query
from tests.graph_store import copy_store, seed_organism
from tests.processes import Process

DEMO = ["demo", "--small", "--iterations", "1", "--per-iteration", "2", "--graphs", "1",
        "--continuation-samples", "4", "--eval-samples", "2"]  # fmt: skip
STAGES = ["1/8 organism", "2/8 model check", "3/8 discovery", "4/8 tracing", "5/8 analysis",
          "6/8 behaviour", "7/8 causal checks", "8/8 feature cards"]  # fmt: skip
# Rows that depend on how many runs there were, not on what they found.
PER_RUN_TABLES = {"runs", "model_checks", "schema_version"}


@dataclass
class Demo:
    data_dir: Path
    output: str
    seconds: float
    counts: dict[str, int]  # rows per table right after the run (PER_RUN_TABLES left out)
    pristine: Path  # a copy of the store file right after the run (later tests change the store)


def run_demo(data_dir: Path, kill_at: str | None = None, timeout: float = 900) -> Process:
    env = {"EMC_KILL_AT": kill_at} if kill_at else {}
    process = Process.emc(*DEMO, "-d", str(data_dir), **env)
    process.wait(timeout=timeout)
    return process


def store_counts(data_dir: Path) -> dict[str, int]:
    store = Store.in_data_dir(data_dir)
    tables = read_only_query(
        store,
        "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE'",
    )["table_name"]
    return {
        t: int(read_only_query(store, f'SELECT count(*) FROM "{t}"').iloc[0, 0])
        for t in sorted(tables)
        if t not in PER_RUN_TABLES
    }


def shared_clean_demo(root: Path, small_organism) -> Demo:
    """The session's never-killed demo under `root` (shared by the workers), made on first use."""
    record = root / "clean-demo.json"
    with (root / "clean-demo.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if record.is_file():
            saved = json.loads(record.read_text())
            paths = {key: Path(saved[key]) for key in ("data_dir", "pristine")}
            return Demo(**{**saved, **paths})
        data_dir = root / "clean-demo" / "emc-data"
        seed_organism(small_organism, data_dir)
        start = time.monotonic()
        demo = run_demo(data_dir)
        assert demo.popen.returncode == 0, demo.output[-4000:]
        seconds = time.monotonic() - start
        pristine = root / "clean-demo-pristine"
        copy_store(data_dir, pristine)
        made = Demo(data_dir, demo.output, seconds, store_counts(data_dir), pristine)
        record.write_text(
            json.dumps({**asdict(made), "data_dir": str(data_dir), "pristine": str(pristine)})
        )
        return made
