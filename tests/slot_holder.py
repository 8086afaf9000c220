"""A process that takes the data directory's `gpu` slot and holds it until it is killed.

`python -m tests.slot_holder DATA_DIR` prints "holding" once it has the slot. Fault tests kill it
(SIGKILL, as `kill -9` of a run in a GPU step) or let other runs wait on it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def main(data_dir: str) -> None:
    from flows.runtime import configure_prefect

    configure_prefect(Path(data_dir))
    from flows.runtime import gpu_slot

    with gpu_slot():
        print("holding", flush=True)
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1])
