"""Named points where a fault-injection test kills a run, exactly as `kill -9` would.

`EMC_KILL_AT=<point>` in the environment makes the process SIGKILL itself when it first reaches
that point (no cleanup, no `finally`, no `atexit`); `EMC_KILL_AT=<point>#<n>` when it reaches it
for the n-th time in this process. Tests use it to kill a flow at a known step and check that a
re-run completes without hanging or duplicating. Unset, a point costs one lookup.

Points: `discovery-round-<n>` (a round judged), `gpu-step:<flow>` (a GPU step of that flow has
its slot; `<flow>` is the Prefect flow's name), `graph-stored` (a graph and its rows written),
`pipeline-after-<stage>` (a pipeline stage finished).
"""

from __future__ import annotations

import os
import signal
from collections import Counter

KILL_AT_ENV = "EMC_KILL_AT"
_reached: Counter[str] = Counter()


def armed(prefix: str) -> bool:
    """Whether a kill point starting with `prefix` is asked for (so its name is worth making)."""
    return os.environ.get(KILL_AT_ENV, "").startswith(prefix)


def fault_point(name: str) -> None:
    """Die here, now, if the environment asks for it."""
    wanted = os.environ.get(KILL_AT_ENV)
    if not wanted or not wanted.startswith(name):
        return
    _reached[name] += 1
    point, _, nth = wanted.partition("#")
    if point == name and _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
