"""`emc prefect ...`: get a Prefect server ready for EMC's deployments."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from emc.cli.app import app, fail
from emc.console import console, print_frame
from flows.server_setup import TRACE_AFTER_REVIEWS, TRACE_WITHIN_SECONDS

prefect_app = typer.Typer(
    help="Prefect server set-up for EMC's deployments and workers (see prefect.yaml), and the "
    "switches of their schedules and triggers.",
    no_args_is_help=True,
)
app.add_typer(prefect_app, name="prefect")


POOLS = ("process", "docker")


@prefect_app.command("setup")
def setup(
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy",
            help="Also register every deployment of ./prefect.yaml (`prefect deploy --all`).",
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            "-d",
            help="The data directory (as the workers see it) for every flow run of the "
            "emc-process pool: its EMC_DATA_DIR, used when a run names no data_dir.",
        ),
    ] = None,
    trace_after: Annotated[
        int | None,
        typer.Option(
            "--trace-after",
            min=1,
            help="Tracing starts by itself once this many reviews were saved for one store "
            "(Prefect variable emc_trace_after_reviews; default 3). Takes effect with --deploy.",
        ),
    ] = None,
    within: Annotated[
        str | None,
        typer.Option(
            "--within",
            help="...within this window: seconds, or with a unit (90m, 2h, 1d) "
            "(emc_trace_within_seconds; default 1h). Takes effect with --deploy.",
        ),
    ] = None,
) -> None:
    """Create what EMC's deployments need on the server at PREFECT_API_URL; safe to repeat.

    The `gpu` global concurrency limit (1: one model on a GPU at a time; raise it in the UI for
    more GPUs behind one server), the `store-writer` limit (1: one task loading results into the
    DuckDB store at a time), the work pools `emc-process` and `emc-docker`, and the variables the
    tracing trigger reads. What exists is left as it is, except what an option sets. Then start
    a worker: `prefect worker start --pool emc-process`; `emc prefect status` shows which
    schedules and triggers are active.
    """
    url = _api_url()
    variables = {}
    if trace_after is not None:
        variables[TRACE_AFTER_REVIEWS] = trace_after
    if within is not None:
        variables[TRACE_WITHIN_SECONDS] = _seconds(within)
    resolved = str(data_dir.expanduser().resolve()) if data_dir is not None else None
    from flows.server_setup import prepare_server

    try:
        actions = prepare_server(variables=variables, data_dir=resolved)
    except Exception as exc:  # unreachable server, refused request
        raise fail(f"could not prepare the server at {url}: {exc}") from None
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(action) for action in actions])
    print_frame(frame, title=f"Prefect server {url}")
    if deploy:
        _deploy_all()
        _print_switches(url)
    console.print(f"Prefect UI: {url.removesuffix('/api')}/deployments")


@prefect_app.command("status")
def status() -> None:
    """Each EMC deployment on the server, with its schedules and triggers and whether they are
    active (after `emc prefect setup --deploy`: the process pool's, not the Docker pool's)."""
    _print_switches(_api_url())


@prefect_app.command("pause")
def pause(
    pool: Annotated[
        str, typer.Option(help="Whose schedules and triggers: process, docker or all.")
    ] = "all",
) -> None:
    """Pause the schedules and triggers of EMC's deployments: nothing starts by itself until
    `emc prefect resume`. Runs already started go on; `prefect deployment run` still works."""
    _switch(False, pool)


@prefect_app.command("resume")
def resume(
    pool: Annotated[
        str, typer.Option(help="Whose schedules and triggers: process, docker or all.")
    ] = "process",
) -> None:
    """Resume the schedules and triggers of EMC's deployments on a pool. Resume one pool only:
    with both, every review would start two tracing runs."""
    _switch(True, pool)


def _switch(active: bool, pool: str) -> None:
    url = _api_url()
    if pool not in (*POOLS, "all"):
        raise fail(f"--pool {pool!r}: choose process, docker or all")
    from flows.server_setup import POOL_OF, switch_deployments

    pools = [POOL_OF[p] for p in POOLS] if pool == "all" else [POOL_OF[pool]]
    try:
        changed = switch_deployments(active, pools)
    except Exception as exc:
        raise fail(f"could not reach the server at {url}: {exc}") from None
    for line in changed:
        console.print(line)
    if not changed:
        state = "active" if active else "paused"
        console.print(f"nothing to change: every schedule and trigger there is already {state}")
    _print_switches(url)


def _print_switches(url: str) -> None:
    import pandas as pd

    from flows.server_setup import deployment_switches

    try:
        rows = deployment_switches()
    except Exception as exc:
        raise fail(f"could not reach the server at {url}: {exc}") from None
    if not rows:
        console.print("no EMC deployments on this server: `emc prefect setup --deploy`")
        return
    frame = pd.DataFrame([dataclasses.asdict(row) for row in rows])
    print_frame(frame, title=f"EMC deployments at {url}")


def _api_url() -> str:
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        raise fail(
            "PREFECT_API_URL is not set: point it at the server to prepare, e.g. "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` after `prefect server start`"
        )
    return url


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> int:
    """'3600', '90m', '2h', '1d' as seconds."""
    value = text.strip().lower()
    unit = _UNITS.get(value[-1:])
    number = value[:-1] if unit else value
    try:
        seconds = int(float(number) * (unit or 1))
    except ValueError:
        raise fail(f"--within {text!r}: give seconds or a number with s, m, h or d") from None
    if seconds <= 0:
        raise fail(f"--within {text!r}: the window must be longer than 0 s")
    return seconds


def _deploy_all() -> None:
    if not Path("prefect.yaml").is_file():
        raise fail("no prefect.yaml here: run `emc prefect setup --deploy` from the EMC checkout")
    prefect = Path(sys.executable).with_name("prefect")
    command = [str(prefect), "--no-prompt", "deploy", "--all"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = result.stdout[-2000:] + result.stderr[-2000:]
        raise fail(f"`prefect deploy --all` failed:\n{output}")
    console.print("deployments registered from prefect.yaml; list them: `prefect deployment ls`")
