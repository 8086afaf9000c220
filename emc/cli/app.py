"""The `emc` command. Each subcommand parses options, then calls the library or a flow.

Flows are imported inside commands, after `configure_prefect` has pointed Prefect at the data
directory: Prefect reads its settings at import time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from emc.config import ConfigError, dump_config, load_config, load_experiment, resolve_data_dir
from emc.console import console, err_console, print_frame

app = typer.Typer(
    name="emc",
    help=(
        "EMC: find where a LoRA fine-tune made a language model misaligned.\n\n"
        "Start with `emc demo`: it builds the offline model organism (a tiny Llama with a planted "
        "emergent misalignment) and runs the pipeline on it. Results land in one DuckDB store in "
        "the data directory; query it with `emc sql`, browse it with `emc dashboard`."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(help="Inspect and validate experiment configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Experiment YAML. Default: experiment.yaml in the data directory "
        "(written by `emc organism build`).",
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        "-d",
        envvar="EMC_DATA_DIR",
        help="Where the store, organism and graphs live. Default: ./emc-data.",
    ),
]


def fail(message: str) -> typer.Exit:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code=2)


def data_dir_from(data_dir: Path | None, config: Path | None = None) -> Path:
    loaded = load_config(config) if config else None
    return resolve_data_dir(data_dir, loaded)


def prepare_flows(data_dir: Path) -> None:
    from flows.runtime import configure_prefect

    configure_prefect(data_dir)


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help='SQL to run, e.g. "SELECT * FROM runs".')],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table, csv or json")] = "table",
) -> None:
    """Run **read-only** SQL against the store and print the result.

    Writes (INSERT, UPDATE, DELETE, COPY, ATTACH, DDL) are refused before anything runs.
    Tables: `runs`, `models`, `model_checks`, `schema_version`; `SHOW TABLES` lists them all.
    """
    from emc.store import Store, StoreError, read_only_query

    try:
        frame = read_only_query(Store.in_data_dir(data_dir_from(data_dir, config)), query)
    except (StoreError, ConfigError) as exc:
        raise fail(str(exc)) from None
    print_frame(frame, output)


@app.command()
def runs(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    limit: Annotated[int, typer.Option(help="How many recent runs to show.")] = 20,
) -> None:
    """List recent flow and CLI runs with their status and code version."""
    import pandas as pd

    from emc.store import Store, list_runs

    records = list_runs(Store.in_data_dir(data_dir_from(data_dir, config)), limit=limit)
    frame = pd.DataFrame(
        [
            {
                "run": r.run_id,
                "status": r.status,
                "started": r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                "seconds": (r.finished_at - r.started_at).total_seconds()
                if r.finished_at
                else None,
                "code": (r.code_revision or "?")[:8] + ("+dirty" if r.code_dirty else ""),
                "error": r.error or "",
            }
            for r in records
        ],
        columns=["run", "status", "started", "seconds", "code", "error"],
    )
    print_frame(frame, title=f"{len(frame)} most recent runs")


@app.command()
def check(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    roles: Annotated[str, typer.Option(help="Comma-separated: base, adapted.")] = "base,adapted",
) -> None:
    """Load the replacement models (base and adapted) and probe their next tokens.

    Runs the `model-check` Prefect flow: it checks that model, adapter and transcoders fit,
    guards the forward pass against NaN/inf, and stores one probe row per model and prompt.
    """
    try:
        _, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    prepare_flows(resolved)
    from flows.model_check import model_check_flow

    summary = model_check_flow(
        config_path=str(config) if config else None, data_dir=str(resolved), roles=roles
    )
    console.print(summary)


@app.command()
def dashboard(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8501,
) -> None:
    """Open the Streamlit dashboard (review queue, runs, SQL) on the data directory's store."""
    resolved = data_dir_from(data_dir, config)
    app_path = Path(__file__).resolve().parent.parent / "dashboard" / "app.py"
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    console.print(f"dashboard on http://127.0.0.1:{port} (store: {resolved})")
    subprocess.run(command, env={**os.environ, "EMC_DATA_DIR": str(resolved)}, check=False)


@config_app.command("show")
def config_show(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Print the resolved config (defaults filled in, paths made absolute)."""
    try:
        loaded, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    console.print(f"# data directory: {resolved}", highlight=False)
    console.print(dump_config(loaded), highlight=False, markup=False)


@config_app.command("check")
def config_check(path: Annotated[Path, typer.Argument(help="YAML file to validate.")]) -> None:
    """Validate a config file; every wrong or unknown field is named."""
    try:
        load_config(path)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    console.print(f"{path}: ok")


@app.command()
def version() -> None:
    """Print EMC's version, code revision and the versions of its key packages."""
    import emc
    from emc.provenance import code_version, package_versions

    code = code_version()
    console.print(f"emc {emc.__version__} (revision {code.revision}, dirty={code.dirty})")
    for name, value in package_versions().items():
        console.print(f"  {name} {value}")
