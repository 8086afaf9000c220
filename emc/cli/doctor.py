"""`emc doctor`: check the install and the environment, and say what to fix."""

from __future__ import annotations

import pandas as pd
import typer

from emc.cli.app import DataDirOption, app
from emc.config import resolve_data_dir
from emc.console import console, inline, print_frame
from emc.doctor import Check, Status, any_failed, counts, run_checks

_COLOURS = {Status.OK: "green", Status.WARN: "yellow", Status.FAIL: "bold red"}


@app.command()
def doctor(data_dir: DataDirOption = None) -> None:
    """Check the install and the environment, and print what to fix.

    - **install**: Python and EMC's key packages, against the versions EMC pins; torch's
      CPU or CUDA build.
    - **data directory**: a directory (or one that can be created), writable (a temporary file
      is created and removed), at least 2 GB free.
    - **store**: present, readable, and its schema version against this EMC's (older: migrated
      by the next write; newer: upgrade EMC). Opened read-only: never created or migrated.
    - **organism**: a built organism in the data directory.
    - **prefect**: the server at PREFECT_API_URL answers /health (3 s), or each command starts
      its own; `gpu` slots still recorded for dead processes.
    - **browser**: Debian's chromium and playwright, for the browser tests.
    - **gpu**: the CUDA devices torch sees; none is fine (EMC runs on CPU in fp32).

    Exit codes: 0 when no check failed (warnings allowed); 1 when at least one failed.
    """
    resolved = resolve_data_dir(data_dir)
    checks = run_checks(resolved)
    print_frame(_as_frame(checks), title=f"emc doctor: {resolved}")
    _print_fixes(checks)
    tally = counts(checks)
    console.print(", ".join(f"[{_COLOURS[s]}]{tally[s]} {s}[/]" for s in Status), highlight=False)
    if any_failed(checks):
        raise typer.Exit(code=1)


def _as_frame(checks: list[Check]) -> pd.DataFrame:
    rows = [{"check": c.name, "status": str(c.status), "detail": c.detail} for c in checks]
    return pd.DataFrame(rows, columns=["check", "status", "detail"])


def _print_fixes(checks: list[Check]) -> None:
    # Below the table, not in it: a fix is a command to copy, and a table column would wrap it.
    todo = [c for c in checks if c.status is not Status.OK and c.fix]
    if not todo:
        return
    console.print("to fix:")
    for c in sorted(todo, key=lambda c: c.status is not Status.FAIL):  # failures first
        console.print(
            f"  [{_COLOURS[c.status]}]{c.status}[/] {inline(c.name)}: {inline(c.fix)}",
            highlight=False,
        )
