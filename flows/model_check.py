"""The first flow: load base and adapted replacement models and probe their next tokens.

It proves the whole chain (config -> models -> GPU slot -> store -> artifact) on any config, and
sets the pattern later flows follow: thin tasks over library calls, retries for transient errors,
per-item failures stored as rows.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from emc.checks import probe_next_tokens
from emc.config import load_experiment
from emc.models import load_replacement_model
from emc.runs import recorded_run
from emc.store import Store, insert_model_checks, upsert_model
from flows.parameters import ModelCheckParameters, takes
from flows.reporting import rounded_rows, run_logger
from flows.runtime import current_flow_run_id, deployment_data_dir, gpu_slot, retry_unless_permanent


@task(
    retries=2,
    retry_delay_seconds=[2, 10],
    retry_condition_fn=retry_unless_permanent,
    task_run_name="probe-{role}",
)
def probe_model(config_path: str | None, data_dir: str, role: str, run_id: str) -> list[dict]:
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    with gpu_slot():
        loaded = load_replacement_model(config, role)
        try:
            records = probe_next_tokens(loaded, config.probe_prompts, config.top_k, run_id)
        finally:
            loaded.close()
    identity = loaded.identity
    upsert_model(store, identity.to_row(first_run_id=run_id))
    insert_model_checks(store, records)
    logger = run_logger()
    logger.info("%s model %s: %d probe prompt(s)", role, identity.model_id, len(records))
    for index, r in enumerate(records, start=1):
        if r.status != "ok":
            logger.warning("%s probe %d/%d failed: %s", role, index, len(records), r.error)
        else:
            top = ", ".join(f"{t!r} {p:.2f}" for t, p in zip(r.top_tokens[:3], r.top_probs[:3],
                                                            strict=True))  # fmt: skip
            logger.info("%s probe %d/%d, ...%r: %s", role, index, len(records), r.prompt[-30:], top)
    return [
        {
            "role": role,
            "model": identity.model_id,
            "prompt": r.prompt[-40:],
            "status": r.status,
            "error": r.error or "",
            "top tokens": " ".join(
                f"{token!r}:{prob:.2f}"
                for token, prob in zip(r.top_tokens[:3], r.top_probs[:3], strict=True)
            ),
        }
        for r in records
    ]


@flow(name="model-check", flow_run_name="model-check-{roles}", log_prints=True)
@takes(ModelCheckParameters)
def model_check_flow(
    config_path: str | None = None, data_dir: str | None = None, roles: str = "base,adapted"
) -> dict:
    """Load each model's replacement model and record what it predicts next on probe prompts."""
    data_dir = deployment_data_dir(data_dir)
    config, resolved_dir = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(resolved_dir)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved_dir),
        "roles": roles,
        "config": config.model_dump(mode="json"),
    }
    with recorded_run(store, "flow", "model-check", params, current_flow_run_id()) as run:
        rows = [
            row
            for role in roles.split(",")
            for row in probe_model(config_path, str(resolved_dir), role.strip(), run.run_id)
        ]
        failed = sum(row["status"] != "ok" for row in rows)
        get_run_logger().info("model check done: %d probe(s), %d failed", len(rows), failed)
        create_table_artifact(
            key="model-check",
            table=rounded_rows(rows),
            description=f"{len(rows)} probes, {failed} failed",
        )
        run.summary = {
            "probes": len(rows),
            "failed": failed,
            "run_id": run.run_id,
            "failures": [
                f"{row['role']} on {row['prompt']!r}: {row['error']}"
                for row in rows
                if row["status"] != "ok"
            ],
        }
    return run.summary
