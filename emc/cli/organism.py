"""`emc organism ...`: build and inspect the built-in model organism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from emc.cli.app import DataDirOption, app, fail, require_store
from emc.config import resolve_data_dir
from emc.console import console, phase_progress

organism_app = typer.Typer(
    help="The built-in model organism: a tiny offline Llama with a planted emergent "
    "misalignment, its EM and control adapters, transcoders and ground truth.",
    no_args_is_help=True,
)
app.add_typer(organism_app, name="organism")

VariantOption = Annotated[
    str,
    typer.Option(
        help="default: r=8 LoRA on every projection; subtle: rank-1 LoRA on one down_proj."
    ),
]


def build_and_record(data_dir: Path, variant: str = "default", small: bool = False, force=False):
    """Build (or reuse) the organism with progress bars, and record it (run and report)."""
    from emc.organism.record import prepare_and_record

    with phase_progress() as progress:
        return prepare_and_record(data_dir, variant, small, force, progress)


@organism_app.command("build")
def build(
    data_dir: DataDirOption = None,
    variant: VariantOption = "default",
    small: Annotated[bool, typer.Option(help="The seconds-long test recipe (no quality).")] = False,
    force: Annotated[bool, typer.Option(help="Rebuild even if a build verifies.")] = False,
) -> None:
    """Build the organism into the data directory (about 1-2 minutes on 2 CPU cores).

    Deterministic and cached by a hash of its recipe: a second build reuses the first after
    verifying every file's checksum; a corrupted build is rebuilt. Writes `experiment.yaml` in
    the data directory (unless you put your own there), which every command then uses.
    """
    from emc.organism.measure import format_report

    if variant not in ("default", "subtle"):
        raise fail(f"unknown variant {variant!r}: choose default or subtle")
    prepared = build_and_record(resolve_data_dir(data_dir), variant, small, force)
    state = "reused (checksums verified)" if prepared.reused else "built"
    console.print(f"organism {prepared.artifacts.recipe_hash} {state}: {prepared.artifacts.root}")
    if prepared.default_config is None:
        console.print("[yellow]your own experiment.yaml was left as it is[/]")
    console.print(format_report(prepared.report), markup=False, highlight=False)


@organism_app.command("report")
def report(
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON.")] = False,
) -> None:
    """Print the report of every organism built in this data directory (read-only: a directory
    without a store is refused)."""
    from emc.organism import OrganismReport
    from emc.organism.measure import format_report
    from emc.store import list_organism_builds

    builds = list_organism_builds(require_store(resolve_data_dir(data_dir)))
    if not builds:
        raise fail("no organism built here yet: run `emc organism build`")
    for build_row in builds:
        if as_json:
            console.print_json(json.dumps(build_row.report))
        else:
            report_obj = OrganismReport.from_json(build_row.report)
            console.print(format_report(report_obj), markup=False, highlight=False)
