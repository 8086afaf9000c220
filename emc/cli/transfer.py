"""Data in and out of the store: `emc import` (the original pipeline's results) and `emc export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, data_dir_from, fail, require_store
from emc.cli.exits import exit_partial
from emc.config import ConfigError
from emc.console import console, print_frame

export_app = typer.Typer(help="Write datasets out of the store.", no_args_is_help=True)
app.add_typer(export_app, name="export")

EXPORT_SUFFIXES: dict[str, Literal["parquet", "jsonl"]] = {".parquet": "parquet", ".jsonl": "jsonl"}


def _data_dir(data_dir: Path | None, config: Path | None) -> Path:
    try:
        return data_dir_from(data_dir, config)
    except ConfigError as exc:
        raise fail(str(exc)) from None


@app.command("import")
def import_command(
    path: Annotated[
        Path,
        typer.Argument(help="The original pipeline's `results/` or `results/pivotal_tokens/`."),
    ],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Import the original pipeline's results: prompts, logits, verdicts, labels, reviews, queue.

    Safe to run again: records already imported are left as they are. Files that cannot be read
    are listed with the reason and skipped; everything else is imported. Logits become models
    `legacy:<model>` (`legacy:graph:<model>` for graph_runs/); tokens the original stored
    without an id get a negative id derived from the token string.

    Exit codes: 0 everything read (new or already stored); 2 nothing read (not a results
    folder, or every file skipped); 3 partial (the skipped files are listed, with why).
    """
    import pandas as pd

    from emc.importer import find_results_root, import_results
    from emc.runs import recorded_run
    from emc.store import Store

    try:
        find_results_root(path)
    except FileNotFoundError as exc:
        raise fail(str(exc)) from None
    store = Store.in_data_dir(_data_dir(data_dir, config))
    with recorded_run(store, "cli", "import", {"path": str(path.resolve())}) as run:
        report = import_results(store, path, run.run_id)
        run.summary = report.summary()
    print_frame(pd.DataFrame(report.rows()), title=f"imported {report.root}")
    for problem in sorted(report.skipped, key=lambda p: p.path):
        console.print(f"[yellow]skipped[/] {problem.path}: {problem.reason}", highlight=False)
    for problem in sorted(report.warnings, key=lambda p: p.path):
        console.print(f"[dim]note[/] {problem.path}: {problem.reason}", highlight=False)
    console.print(
        f"skipped files: {len(report.skipped)}, notes: {len(report.warnings)}, run {run.run_id}",
        highlight=False,
    )
    read = sum(count.read for count in report.counts.values())
    if not read:
        raise fail(
            f"{path}: nothing imported: no results read ({len(report.skipped)} file(s) skipped)"
        )
    if report.skipped:
        exit_partial(f"{read} record(s) read, {len(report.skipped)} file(s) skipped (listed above)")


@export_app.command("labels")
def export_labels(
    out: Annotated[Path, typer.Argument(help="OUT.parquet or OUT.jsonl: the format follows.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    include_rejected: Annotated[
        bool, typer.Option(help="Also export prompts a person rejected as bad.")
    ] = False,
) -> None:
    """Export the labelled tokens: one row per token, the person's label over the judge's.

    Columns: prompt_id, prompt, format, assistant_prefix, base_model_id, adapted_model_id,
    token_id, token, label, labeller, judge_label, judge_model, reviewer, review_action,
    explanation.
    """
    from emc.store.export import write_labelled_tokens

    file_format = EXPORT_SUFFIXES.get(out.suffix.lower())
    if file_format is None:
        raise fail(f"cannot tell the format of {out}: name it *.parquet or *.jsonl")
    if not out.parent.is_dir():
        raise fail(f"folder {out.parent} does not exist")
    store = require_store(_data_dir(data_dir, config))
    rows = write_labelled_tokens(store, out, file_format, include_rejected)
    console.print(f"{rows} labelled tokens written to {out}", highlight=False)
