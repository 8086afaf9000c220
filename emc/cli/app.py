"""The `emc` command. Each subcommand parses options, then calls the library or a flow.

Flows are imported inside commands, after `configure_prefect` has pointed Prefect at the data
directory: Prefect reads its settings at import time.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from emc.config import ConfigError, dump_config, load_config, load_experiment, resolve_data_dir
from emc.console import (
    MACHINE_FORMATS,
    OUTPUT_FORMATS,
    console,
    err_console,
    inline,
    print_frame,
    write_frame,
)

if TYPE_CHECKING:
    from emc.store import Store

app = typer.Typer(
    name="emc",
    help=(
        "EMC: find where a LoRA fine-tune made a language model misaligned.\n\n"
        "Start with `emc demo`: it builds the offline model organism (a tiny Llama with a planted "
        "emergent misalignment) and runs the pipeline on it. Results land in one DuckDB store in "
        "the data directory; query it with `emc sql`, browse it with `emc dashboard`.\n\n"
        "A failure prints one message with its causes and writes the traceback to a log file "
        "(it says where); add `--debug` to any command to see the traceback instead."
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
    # Messages quote SQL, stored text and DuckDB's errors: shown as written, never as markup.
    err_console.print(f"[bold red]error:[/] {inline(message)}", highlight=False)
    return typer.Exit(code=2)


def check_shards(shards: int) -> None:
    """--shards N hands work to Prefect workers: refuse it without a server to hand it to."""
    if shards < 0:
        raise fail("--shards must be 0 or more")
    if shards and not os.environ.get("PREFECT_API_URL"):
        raise fail(
            "--shards hands work to Prefect workers: set PREFECT_API_URL to their server and "
            "register the deployments (`emc prefect setup --deploy`)"
        )


def data_dir_from(data_dir: Path | None, config: Path | None = None) -> Path:
    loaded = load_config(config) if config else None
    return resolve_data_dir(data_dir, loaded)


def existing_store(data_dir: Path | None, config: Path | None = None) -> Store:
    """The chosen data directory's store, for commands that only read it."""
    try:
        return require_store(data_dir_from(data_dir, config))
    except ConfigError as exc:
        raise fail(str(exc)) from None


def require_store(data_dir: Path) -> Store:
    """The store in `data_dir`, or exit naming where EMC looked and how the directory is chosen.

    Reading commands never create a store: a mistyped -d would otherwise leave a new, empty
    store behind that answers every question with nothing.
    """
    from emc.store import Store, StoreMissingError

    try:
        return Store.open_existing(data_dir)
    except StoreMissingError as exc:
        raise fail(
            f"{exc}. The data directory comes from -d/--data-dir, else EMC_DATA_DIR, else the "
            "config's data_dir, else ./emc-data: point it at the directory `emc demo` or a flow "
            "wrote to. Nothing was created."
        ) from None


def prepare_flows(data_dir: Path) -> None:
    """Point Prefect at the data directory (starting its API) before any flow is imported."""
    from flows.local_server import LocalServerError
    from flows.runtime import configure_prefect

    # Ctrl-C stops a flow within seconds, also when emc was started in the background of a
    # script, which starts it with SIGINT ignored.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        configure_prefect(data_dir)
    except LocalServerError as exc:
        raise fail(str(exc)) from None
    from emc.cli.errors import quiet_prefect_tracebacks

    quiet_prefect_tracebacks()


@app.command()
def sql(
    query: Annotated[str, typer.Argument(help='One statement, e.g. "SELECT * FROM runs".')],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    output: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="table (for people), or csv, json, parquet (for machines: written raw).",
        ),
    ] = "table",
    out_file: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", help="Write csv, json or parquet to this file instead of stdout."
        ),
    ] = None,
) -> None:
    """Run one **read-only** SQL statement against the store and print the result.

    Sealed: one SELECT, WITH, SHOW, DESCRIBE, SUMMARIZE, or EXPLAIN of one of those. Anything
    else (INSERT, COPY, ATTACH, INSTALL, LOAD, SET, PRAGMA, CALL, EXPORT, a second statement) is
    refused before it runs, and the connection has no file or network access, so read_csv(),
    read_text(), glob() and URLs are refused too. A directory without a store is refused.

    Tables: `runs`, `prompts`, `divergences`, `graphs`, ...; `SHOW TABLES` lists them all.

    Formats: table fits the terminal and escapes control characters in stored text. csv and
    json are written raw to stdout, exact and never wrapped:

    `emc sql "SELECT name, status FROM runs" -f csv > runs.csv`

    parquet is binary: give --output FILE, or redirect stdout (refused on a terminal).
    """
    from emc.store import StoreError, read_only_query

    if output not in OUTPUT_FORMATS:
        raise fail(f"unknown format {output!r}: choose {', '.join(OUTPUT_FORMATS)}")
    if out_file is not None and output not in MACHINE_FORMATS:
        raise fail(f"--output takes a machine format: add -f {' or -f '.join(MACHINE_FORMATS)}")
    if output == "parquet" and out_file is None and sys.stdout.isatty():
        raise fail("parquet is binary: give --output FILE, or redirect stdout to a file")
    store = existing_store(data_dir, config)
    try:
        frame = read_only_query(store, query)
    except StoreError as exc:
        raise fail(str(exc)) from None
    if output == "table":
        print_frame(frame)
    else:
        write_frame(frame, output, out_file)


@app.command()
def runs(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    limit: Annotated[int, typer.Option(help="How many recent runs to show.")] = 20,
) -> None:
    """List recent flow and CLI runs with their status and code version.

    Read-only: a directory without a store is refused.
    """
    import pandas as pd

    from emc.store import list_runs

    records = list_runs(existing_store(data_dir, config), limit=limit)
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
    plan: Annotated[
        bool,
        typer.Option(
            "--plan",
            help="Print the memory the config needs per device (weights, transcoders, "
            "attribution at 32/128/512 tokens) and advice on batch size and offload; load "
            "nothing, run no flow.",
        ),
    ] = False,
) -> None:
    """Load the replacement models (base and adapted) and probe their next tokens.

    Runs the `model-check` Prefect flow: it checks that model, adapter and transcoders fit,
    guards the forward pass against NaN/inf, and stores one probe row per model and prompt.
    With HF_HUB_OFFLINE=1, hub files missing from the caches are listed first, with the
    `emc models fetch` command that fetches them.

    `emc check --plan -c experiment.yaml` only prints the memory plan: per device (cpu at
    fp32, cuda at bf16 unless runtime.precision says otherwise), from safetensors headers and
    config.json, before anything is loaded; pick tracing.batch_size and tracing.offload with it.

    Exit codes: 0 every probe ok (or the plan printed); 2 every probe failed, or hub files are
    missing offline; 3 partial (the failed probes are listed, with why).
    """
    from emc.cli.models import require_fetched, show_plan

    try:
        experiment, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if plan:
        show_plan(experiment)
        return
    require_fetched(experiment, resolved, config)
    prepare_flows(resolved)
    from flows.model_check import model_check_flow

    summary = model_check_flow(
        config_path=str(config) if config else None, data_dir=str(resolved), roles=roles
    )
    console.print({k: v for k, v in summary.items() if k != "failures"})
    from emc.cli.exits import exit_for

    failures = summary.get("failures", [])
    exit_for(summary["probes"] - len(failures), failures, "probe")


@app.command()
def dashboard(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8501,
) -> None:
    """Open the Streamlit dashboard (Runs, Review, Graphs, Features, Interventions, Behaviour,
    SQL) on the data directory's store; every page's URL holds what it shows, so it can be shared.

    Serves http://127.0.0.1:PORT until Ctrl-C or SIGTERM, which stop Streamlit too. Exits
    non-zero, saying why, when Streamlit cannot start (not installed, port taken) or stops with
    an error.
    """
    try:
        resolved = data_dir_from(data_dir, config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    app_path = dashboard_app_path()
    if app_path is None:
        raise fail(
            "cannot find the dashboard (dashboard/app.py): it ships with the EMC checkout, not "
            "the installed package; run `emc dashboard` from an install of the checkout "
            "(`pip install -e .`) or from the folder that holds dashboard/"
        )
    if importlib.util.find_spec("streamlit") is None:
        raise fail(f"Streamlit is not installed for {sys.executable}: pip install streamlit")
    command = [
        sys.executable, "-m", "streamlit", "run", str(app_path),
        "--server.headless", "true", "--server.address", "127.0.0.1",
        "--server.port", str(port), "--browser.gatherUsageStats", "false",
    ]  # fmt: skip
    from emc.store import Store

    if not Store.in_data_dir(resolved).exists():
        # Not refused: a dashboard can be opened before the first run; every page says so.
        console.print(f"no store yet in {resolved}", markup=False, highlight=False)
    console.print(f"dashboard on http://127.0.0.1:{port} (store: {resolved})", highlight=False)
    code = run_until_stopped(command, {**os.environ, "EMC_DATA_DIR": str(resolved)})
    if code != 0:
        raise fail(
            f"Streamlit stopped with exit code {code} (its output is above); if port {port} is "
            "taken, pick another with --port"
        )


def dashboard_app_path() -> Path | None:
    """dashboard/app.py, which lives beside the `emc` package in a checkout, not inside it.

    Looked for next to the imported `emc` (an editable install of the checkout), as the
    importable `dashboard` package (on PYTHONPATH), then in the working directory (the image
    runs from the folder holding dashboard/).
    """
    import emc

    candidates = [Path(emc.__file__).resolve().parent.parent / "dashboard" / "app.py"]
    spec = importlib.util.find_spec("dashboard")
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).resolve().parent / "app.py")
    candidates.append(Path.cwd() / "dashboard" / "app.py")
    return next((path for path in candidates if path.is_file()), None)


def run_until_stopped(command: list[str], env: dict[str, str]) -> int:
    """Run a server in the foreground and return its exit code (0 when stopped by the user).

    Ctrl-C reaches the server from the terminal; a SIGTERM sent to emc alone does not, so it is
    passed on, and the server is always waited for: no process outlives emc.
    """
    try:
        process = subprocess.Popen(command, env=env)
    except OSError as exc:
        raise fail(f"cannot start {command[0]}: {exc}") from None
    # A process started in the background of a non-interactive shell inherits SIGINT ignored.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        console.print("stopped")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


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
