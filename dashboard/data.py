"""Where the dashboard finds its store. Pages read through short-lived read-only connections."""

from __future__ import annotations

import os

from emc.config import resolve_data_dir
from emc.store import Store


def current_store() -> Store:
    # A new Store per script run: connections are opened per query and never cached, so the
    # dashboard never holds the DuckDB lock while a flow wants to write.
    return Store.in_data_dir(resolve_data_dir(os.environ.get("EMC_DATA_DIR")))
