"""The `emc` command: `app` collects the command groups defined in this package."""

from emc.cli import demo, discovery, graph, organism, tracing, transfer  # noqa: F401  (registers commands)
from emc.cli.app import app

__all__ = ["app"]
