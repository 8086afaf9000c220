"""Shards: a stage's work handed to runs of a deployment, which any worker of its pool may take
(on this machine or another), and waited for here.

A shard never opens the store: it writes bundles into a spool directory shared with the store's
host, and the stage that started it loads them (`emc.store.bundles`,
`emc.store.sample_bundles`). These helpers start the runs and wait for them, for tracing and
the behaviour stage alike.
"""

from __future__ import annotations

import time
from typing import Any


class ShardsIncomplete(RuntimeError):
    """Some shards did not complete; what they wrote to the spool was loaded, and a re-run of
    the stage does the rest."""


def start_shard(deployment: str, parameters: dict[str, Any]):
    """Start a run of `deployment` ("flow-name/deployment-name") and return it at once, without
    waiting for a worker to take it."""
    from prefect.deployments import run_deployment

    return run_deployment(deployment, parameters=parameters, timeout=0)


def wait_for(flow_runs: list, poll_seconds: float = 2.0) -> list:
    """The runs, read again once every one of them is in a final state (completed, failed,
    crashed, cancelled)."""
    from prefect.client.orchestration import get_client

    if not flow_runs:
        return []
    with get_client(sync_client=True) as client:
        while True:
            current = [client.read_flow_run(r.id) for r in flow_runs]
            if all(r.state is not None and r.state.is_final() for r in current):
                return current
            time.sleep(poll_seconds)


def incomplete(flow_runs: list) -> list[str]:
    """`name: state` of each finished run that did not complete."""
    return [
        f"{r.name}: {r.state.name if r.state else 'no state'}"
        for r in flow_runs
        if r.state is None or not r.state.is_completed()
    ]
