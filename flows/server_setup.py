"""What a Prefect server needs before EMC's deployments can run on it, created idempotently, and
the switches of the deployments' schedules and triggers afterwards.

Global concurrency limits: `gpu` (one model on the GPU at a time, per server) and `store-writer`
(one task loading results into the DuckDB store at a time). Work pools: `emc-process` (workers
that run flows as subprocesses of a checkout or image) and `emc-docker` (workers that start one
container per flow run). The Prefect variables the triggers read when they are deployed
(`emc_trace_after_reviews`, `emc_trace_within_seconds`). Existing objects are left as they are,
so a limit someone raised (more GPUs behind one server) is never reset; only what a person asks
for (a data directory for a pool, another review count) changes what exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from emc.config import DATA_DIR_ENV
from flows.runtime import DEFAULT_LIMITS

WORK_POOLS = {"emc-process": "process", "emc-docker": "docker"}
POOL_OF = {"process": "emc-process", "docker": "emc-docker"}
TRACE_AFTER_REVIEWS = "emc_trace_after_reviews"
TRACE_WITHIN_SECONDS = "emc_trace_within_seconds"
DEFAULT_VARIABLES = {TRACE_AFTER_REVIEWS: 3, TRACE_WITHIN_SECONDS: 3600}
EMC_TAG = "emc"


@dataclass(frozen=True)
class SetupAction:
    kind: str  # concurrency limit | work pool
    name: str
    created: bool
    detail: str


def prepare_server(
    limits: dict[str, int] | None = None,
    pools: dict[str, str] | None = None,
    variables: dict[str, int] | None = None,
    data_dir: str | None = None,
) -> list[SetupAction]:
    """Create the missing limits, work pools and variables on the current Prefect API; report
    each. `variables` given are set even where they exist; `data_dir` becomes the process
    pool's EMC_DATA_DIR."""
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
        actions += _set_variables(client, variables or {})
        if data_dir is not None:
            actions.append(_set_pool_data_dir(client, POOL_OF["process"], data_dir))
    return actions


def _set_variables(client, chosen: dict[str, int]) -> list[SetupAction]:
    from prefect.client.schemas.actions import VariableCreate, VariableUpdate

    actions = []
    for name, default in DEFAULT_VARIABLES.items():
        existing = client.read_variable_by_name(name)
        if existing is None:
            value = chosen.get(name, default)
            client.create_variable(VariableCreate(name=name, value=value, tags=[EMC_TAG]))
            actions.append(SetupAction("variable", name, True, str(value)))
        elif name in chosen and existing.value != chosen[name]:
            client.update_variable(VariableUpdate(name=name, value=chosen[name]))
            actions.append(SetupAction("variable", name, False, f"set to {chosen[name]}"))
        else:
            actions.append(SetupAction("variable", name, False, f"exists, {existing.value}"))
    return actions


def _set_pool_data_dir(client, pool: str, data_dir: str) -> SetupAction:
    """Every flow run of `pool` gets EMC_DATA_DIR=data_dir unless a deployment says otherwise."""
    from prefect.client.schemas.actions import WorkPoolUpdate

    template = client.read_work_pool(pool).base_job_template
    env = template["variables"]["properties"]["env"]
    env["default"] = {**(env.get("default") or {}), DATA_DIR_ENV: data_dir}
    client.update_work_pool(pool, WorkPoolUpdate(base_job_template=template))
    return SetupAction("work pool", pool, False, f"{DATA_DIR_ENV}={data_dir}")


@dataclass(frozen=True)
class DeploymentSwitches:
    """One EMC deployment: what can start it, and whether each is active."""

    deployment: str  # flow/deployment
    pool: str
    schedules: str  # e.g. "0 */6 * * * (active)" or ""
    triggers: str  # e.g. "emc.review.saved x3 within 3600 s (active)" or ""


def deployment_switches() -> list[DeploymentSwitches]:
    """Every deployment tagged `emc` on the current server, with its schedules and triggers."""
    from prefect.client.orchestration import get_client

    rows = []
    with get_client(sync_client=True) as client:
        for deployment, flow_name in _emc_deployments(client):
            schedules = ", ".join(
                f"{getattr(s.schedule, 'cron', s.schedule)} ({'active' if s.active else 'paused'})"
                for s in deployment.schedules
            )
            automations = client.read_resource_related_automations(
                f"prefect.deployment.{deployment.id}"
            )
            triggers = ", ".join(
                f"{_describe_trigger(a.trigger)} ({'active' if a.enabled else 'paused'})"
                for a in automations
            )
            rows.append(
                DeploymentSwitches(
                    deployment=f"{flow_name}/{deployment.name}",
                    pool=deployment.work_pool_name or "",
                    schedules=schedules,
                    triggers=triggers,
                )
            )
    return sorted(rows, key=lambda r: (r.pool, r.deployment))


def switch_deployments(active: bool, pools: list[str]) -> list[str]:
    """Resume (`active`) or pause every schedule and trigger of the EMC deployments on `pools`;
    what changed, one line each."""
    from prefect.client.orchestration import get_client

    changed = []
    with get_client(sync_client=True) as client:
        for deployment, flow_name in _emc_deployments(client):
            if deployment.work_pool_name not in pools:
                continue
            name = f"{flow_name}/{deployment.name}"
            for schedule in deployment.schedules:
                if schedule.active != active:
                    client.update_deployment_schedule(deployment.id, schedule.id, active=active)
                    changed.append(f"{name}: schedule {'resumed' if active else 'paused'}")
            for automation in client.read_resource_related_automations(
                f"prefect.deployment.{deployment.id}"
            ):
                if automation.enabled != active:
                    if active:
                        client.resume_automation(automation.id)
                    else:
                        client.pause_automation(automation.id)
                    changed.append(f"{name}: trigger {'resumed' if active else 'paused'}")
    return changed


def _emc_deployments(client) -> list[tuple[Any, str]]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterTags

    deployments = client.read_deployments(
        deployment_filter=DeploymentFilter(tags=DeploymentFilterTags(all_=[EMC_TAG]))
    )
    flows = {}
    for deployment in deployments:
        if deployment.flow_id not in flows:
            flows[deployment.flow_id] = client.read_flow(deployment.flow_id).name
    return [(d, flows[d.flow_id]) for d in deployments]


def _describe_trigger(trigger: Any) -> str:
    expect = ", ".join(sorted(getattr(trigger, "expect", None) or [])) or "an event"
    threshold = getattr(trigger, "threshold", 1)
    within = getattr(trigger, "within", None)
    seconds = int(within.total_seconds()) if within is not None else 0
    return f"{expect}" + (f" x{threshold} within {seconds} s" if threshold > 1 else "")
