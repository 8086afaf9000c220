"""The organism as a flow: build (or reuse) it and make it the data directory's default config.

Deployments that run "on the organism" start here, so a fresh data volume needs no manual step.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from emc.config import resolve_data_dir
from emc.organism.record import prepare_and_record
from flows.runtime import current_flow_run_id


@flow(name="organism", flow_run_name="organism-{variant}")
def organism_flow(
    data_dir: str | None = None, variant: str = "default", small: bool = False, force: bool = False
) -> dict:
    """Build the organism into the data directory (about 1-2 minutes on 2 CPU cores), or reuse
    a build whose checksums verify; writes `experiment.yaml` unless a person's own is there."""
    if variant not in ("default", "subtle"):
        raise ValueError(f"unknown organism variant {variant!r}: choose default or subtle")
    logger = get_run_logger()
    started: set[str] = set()

    def progress(phase: str, step: int, total: int) -> None:
        if phase not in started or step == total:
            started.add(phase)
            logger.info("organism %s: %d/%d", phase, step, total)

    resolved = resolve_data_dir(data_dir)
    flow_run_id = current_flow_run_id()
    prepared = prepare_and_record(resolved, variant, small, force, progress, "flow", flow_run_id)
    headline = prepared.report.headline()
    logger.info(
        "organism %s %s at %s", prepared.artifacts.recipe_hash,
        "reused (checksums verify)" if prepared.reused else "built", prepared.artifacts.root,
    )  # fmt: skip
    if prepared.default_config:
        logger.info("default config: %s", prepared.default_config)
    else:
        logger.info("default config left alone: the data directory has a person's own")
    summary = {
        "recipe_hash": prepared.artifacts.recipe_hash,
        "reused": prepared.reused,
        "root": str(prepared.artifacts.root),
        "config": str(prepared.default_config) if prepared.default_config else None,
        "harmful_heldout": {
            model: headline.get(f"{model}:other_domains/heldout")
            for model in ("base", "em", "control")
        },
    }
    create_markdown_artifact(
        key="organism",
        markdown=(
            f"Organism `{summary['recipe_hash']}` "
            f"({'reused' if prepared.reused else 'built'}) at `{summary['root']}`. "
            "P(harmful) on held-out other domains: "
            + ", ".join(f"{m} {p:.3f}" for m, p in summary["harmful_heldout"].items() if p)
        ),
        description="Model organism",
    )
    return summary
