"""What a Prefect server needs before EMC's deployments can run on it, created idempotently.

Global concurrency limits: `gpu` (one model on the GPU at a time, per server) and `store-writer`
(one task loading results into the DuckDB store at a time). Work pools: `emc-process` (workers
that run flows as subprocesses of a checkout or image) and `emc-docker` (workers that start one
container per flow run). Existing objects are left as they are, so a limit someone raised (more
GPUs behind one server) is never reset.
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.runtime import DEFAULT_LIMITS

WORK_POOLS = {"emc-process": "process", "emc-docker": "docker"}


@dataclass(frozen=True)
class SetupAction:
    kind: str  # concurrency limit | work pool
    name: str
    created: bool
    detail: str


def prepare_server(
    limits: dict[str, int] | None = None, pools: dict[str, str] | None = None
) -> list[SetupAction]:
    """Create the missing limits and work pools on the current Prefect API; report each."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.utilities.asyncutils import run_coro_as_sync
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    actions = []
    with get_client(sync_client=True) as client:
        for name, limit in (DEFAULT_LIMITS if limits is None else limits).items():
            try:
                existing = client.read_global_concurrency_limit_by_name(name)
                actions.append(
                    SetupAction("concurrency limit", name, False, f"exists, limit {existing.limit}")
                )
                continue
            except ObjectNotFound:
                pass
            try:
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=limit)
                )
                actions.append(SetupAction("concurrency limit", name, True, f"limit {limit}"))
            except ObjectAlreadyExists:  # created by another process in between
                actions.append(SetupAction("concurrency limit", name, False, "exists"))
        for name, pool_type in (WORK_POOLS if pools is None else pools).items():
            try:
                existing = client.read_work_pool(name)
                actions.append(SetupAction("work pool", name, False, f"exists, {existing.type}"))
                continue
            except ObjectNotFound:
                pass
            template = run_coro_as_sync(
                get_default_base_job_template_for_infrastructure_type(pool_type)
            )
            try:
                client.create_work_pool(
                    WorkPoolCreate(name=name, type=pool_type, base_job_template=template or {})
                )
                actions.append(SetupAction("work pool", name, True, pool_type))
            except ObjectAlreadyExists:
                actions.append(SetupAction("work pool", name, False, "exists"))
    return actions
