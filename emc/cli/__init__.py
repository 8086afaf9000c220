"""The `emc` command: `app` collects the command groups defined in this package."""

from emc.cli import (  # noqa: F401  (registers commands)
    analysis,
    behaviour,
    demo,
    discovery,
    doctor,
    features,
    graph,
    interventions,
    judge,
    models,
    organism,
    server,
    study,
    tracing,
    transfer,
)
from emc.cli.app import app

__all__ = ["app"]
