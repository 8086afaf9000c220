"""Named points where a fault-injection test kills a run, exactly as `kill -9` would.

`EMC_KILL_AT=<point>` in the environment makes the process SIGKILL itself when it reaches that
point (no cleanup, no `finally`, no `atexit`). Tests use it to kill a flow at a known step and
check that a re-run completes without hanging or duplicating. Unset, a point costs one lookup.
"""

from __future__ import annotations

import os
import signal

KILL_AT_ENV = "EMC_KILL_AT"


def fault_point(name: str) -> None:
    """Die here, now, if the environment asks for it."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
