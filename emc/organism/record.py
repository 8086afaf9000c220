"""Build (or reuse) the organism and record it in the store: one path for the CLI and the flows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from emc.organism.experiment import PreparedOrganism, prepare_organism
from emc.organism.recipe import OrganismRecipe
from emc.runs import recorded_run
from emc.store import OrganismBuildRow, Store, upsert_organism_build

Progress = Callable[[str, int, int], None]


def prepare_and_record(
    data_dir: Path,
    variant: str = "default",
    small: bool = False,
    force: bool = False,
    progress: Progress | None = None,
    run_kind: str = "cli",
    flow_run_id: str | None = None,
) -> PreparedOrganism:
    """Build (or reuse) the organism, make it the default config, record run and report."""
    recipe = (OrganismRecipe.small if small else OrganismRecipe)(variant=variant)
    store = Store.in_data_dir(data_dir)
    params = {"variant": variant, "small": small, "force": force, "recipe": recipe.to_dict()}
    with recorded_run(store, run_kind, "organism-build", params, flow_run_id) as run:
        prepared = prepare_organism(data_dir, recipe, progress, force=force)
        report = prepared.report
        upsert_organism_build(
            store,
            OrganismBuildRow(
                recipe_hash=prepared.artifacts.recipe_hash,
                variant=variant,
                path=str(prepared.artifacts.root),
                run_id=run.run_id,
                build_seconds=report.phase_seconds.get("total"),
                recipe=recipe.to_dict(),
                report=report.to_json(),
            ),
        )
        run.summary = {"recipe_hash": prepared.artifacts.recipe_hash, "reused": prepared.reused}
    return prepared
