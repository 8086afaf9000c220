"""What EMC tells a Prefect server when work arrives or a stage finishes, so deployments can start
the next stage by themselves (the triggers in prefect.yaml).

Every event's resource is the store it concerns, `emc.store.<data directory>`, and its payload
carries the data directory, so a triggered run works on the same store and counts of reviews
are kept per store. An event says whether it may start the next stage (`emc.chain`: `on`): a
stage run inside a parent flow (the pipeline, a study) says `off`, because its parent runs the
next stage itself and a trigger would run it twice.

Events go to the server at PREFECT_API_URL; without one (the `emc` commands' temporary server,
the dashboard on its own) nobody listens, and nothing is sent.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

REVIEW_SAVED = "emc.review.saved"
GRAPHS_COMPLETED = "emc.graphs.completed"
ANALYSIS_COMPLETED = "emc.analysis.completed"
INTERVENTIONS_COMPLETED = "emc.interventions.completed"
EVALUATION_COMPLETED = "emc.evaluation.completed"
EVENTS = (
    REVIEW_SAVED,
    GRAPHS_COMPLETED,
    ANALYSIS_COMPLETED,
    INTERVENTIONS_COMPLETED,
    EVALUATION_COMPLETED,
)
RESOURCE_PREFIX = "emc.store."
LOCAL_API_ENV = "EMC_LOCAL_PREFECT_API"  # set by flows.runtime to the URL of its own server


def store_resource(data_dir: str | Path, chain: bool) -> dict[str, str]:
    """The event resource for the store in `data_dir`."""
    path = str(Path(data_dir).expanduser().resolve())
    return {
        "prefect.resource.id": f"{RESOURCE_PREFIX}{path}",
        "prefect.resource.name": Path(path).name,
        "emc.chain": "on" if chain else "off",
    }


def listening_server() -> str | None:
    """The Prefect API a person set up (triggers may listen there), else None."""
    url = os.environ.get("PREFECT_API_URL")
    if not url or url == os.environ.get(LOCAL_API_ENV):
        return None
    return url


def emit(
    event: str, data_dir: str | Path, payload: dict[str, Any], chain: bool = True
) -> str | None:
    """Send `event` about the store in `data_dir`; its id, or None when no server listens.

    Sending never fails the work that was done: a server that cannot be reached loses the event
    (Prefect logs it), not the review or the graphs.
    """
    if event not in EVENTS:
        raise ValueError(f"unknown EMC event {event!r}; known: {', '.join(EVENTS)}")
    if listening_server() is None:
        return None
    from prefect.events import emit_event

    resource = store_resource(data_dir, chain)
    full = {"data_dir": resource["prefect.resource.id"].removeprefix(RESOURCE_PREFIX), **payload}
    sent = emit_event(event=event, resource=resource, payload=full)
    return str(sent.id) if sent is not None else None


def review_news(review: Any) -> dict[str, Any]:
    """The payload of REVIEW_SAVED for a saved `emc.store.reviews.Review`."""
    return {"prompt_id": review.prompt_id, "reviewer": review.reviewer, "action": review.action}
