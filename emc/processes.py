"""Is a process still alive? Used to tell a live run or slot holder from one killed with -9.

A PID alone can be reused by a new process after the old one died; where the kernel says when
a process started (Linux /proc), that start time is recorded beside the PID and compared, so a
reused PID does not pass for the process that died.
"""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> str | None:
    """When the process started, in kernel clock ticks since boot (Linux); None elsewhere."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (the command) may hold spaces and parentheses: split after its closing one.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None  # field 22: starttime


def process_alive(pid: int, started: str | None = None) -> bool:
    """True while `pid` runs (not a zombie) and, if `started` is given, is the same process."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return Path("/proc/self").exists() is False  # no /proc (macOS): trust the signal
    except OSError:
        return True
    fields = stat.rpartition(")")[2].split()
    if fields and fields[0] in ("Z", "X"):  # exited, waiting for its parent to reap it
        return False
    return started is None or len(fields) <= 19 or fields[19] == started
