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

prefect_app = typer.Typer(
    help="Prefect server set-up for scheduled deployments and workers (see prefect.yaml).",
    no_args_is_help=True,
)
app.add_typer(prefect_app, name="prefect")


@prefect_app.command("setup")
def setup(
    deploy: Annotated[
        bool,
        typer.Option(
            "--deploy",
            help="Also register every deployment of ./prefect.yaml (`prefect deploy --all`).",
        ),
    ] = False,
) -> None:
    """Create what EMC's deployments need on the server at PREFECT_API_URL; safe to repeat.

    The `gpu` global concurrency limit (1: one model on a GPU at a time; raise it in the UI for
    more GPUs behind one server), the `store-writer` limit (1: one task loading results into the
    DuckDB store at a time), and the work pools `emc-process` and `emc-docker`. What exists is
    left as it is. Then start a worker: `prefect worker start --pool emc-process`.
    """
    if not os.environ.get("PREFECT_API_URL"):
        raise fail(
            "PREFECT_API_URL is not set: point it at the server to prepare, e.g. "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api` after `prefect server start`"
        )
    from flows.server_setup import prepare_server

    try:
        actions = prepare_server()
    except Exception as exc:  # unreachable server, refused request
        url = os.environ["PREFECT_API_URL"]
        raise fail(f"could not prepare the server at {url}: {exc}") from None
    import pandas as pd

    frame = pd.DataFrame([dataclasses.asdict(action) for action in actions])
    print_frame(frame, title=f"Prefect server {os.environ['PREFECT_API_URL']}")
    if deploy:
        _deploy_all()


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
