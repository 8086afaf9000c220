"""`emc study`: several fine-tunes of one base, each compared with it, side by side."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, fail, prepare_flows
from emc.config import ConfigError, load_config, resolve_data_dir
from emc.console import console, print_frame

StagesOption = Annotated[
    str | None,
    typer.Option(
        help="Comma-separated stages to run per pair, in pipeline order: check, discovery, "
        "tracing, analysis, behaviour, interventions, cards. Default: all (the pipeline)."
    ),
]


@app.command()
def study(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    fine_tune: Annotated[
        list[str] | None,
        typer.Option("--fine-tune", "-f", help="Run only this fine-tune of the study (repeat)."),
    ] = None,
    stages: StagesOption = None,
    iterations: Annotated[int, typer.Option(help="Discovery rounds per pair.")] = 2,
    per_iteration: Annotated[int, typer.Option(help="Prompts per discovery round.")] = 8,
    graphs: Annotated[int, typer.Option(help="Trace this many flagged prompts per pair.")] = 6,
) -> None:
    """Run a study: every fine-tune the config lists under `study:` against the same base.

    Each fine-tune runs as its own pair into the one store (its config is written to
    `<data dir>/study/<name>.yaml`, usable with any command's -c); each pair's discovery also
    scores the prompts the others generated. Ends with the pairs side by side on the prompts
    every pair judged: how many each flags (a control fine-tune's flag rate is the funnel's
    false-positive rate), how far it moves probability towards harm, graphs traced. Pick a pair
    on the dashboard's pages to compare graphs and features.

    Example: `emc study -c my-study.yaml --stages discovery,tracing,analysis`.
    """
    if config is None:
        raise fail("pass the study's config with -c (its fine-tunes listed under `study:`)")
    try:
        resolved = resolve_data_dir(data_dir, load_config(config))
    except ConfigError as exc:
        raise fail(str(exc)) from None
    prepare_flows(resolved)
    from flows.study import study_flow

    result = study_flow(
        config_path=str(config),
        data_dir=str(resolved),
        fine_tunes=fine_tune or None,
        stages=split_stages(stages),
        iterations=iterations,
        prompts_per_iteration=per_iteration,
        graphs=graphs,
    )
    print_study(result)


def split_stages(stages: str | None) -> list[str] | None:
    return [s.strip() for s in stages.split(",") if s.strip()] if stages else None


def print_study(result: dict) -> None:
    import pandas as pd

    frame = pd.DataFrame(result["pairs"])
    print_frame(frame.round(4), title="the study's pairs, on the prompts every pair judged")
    console.print(
        f"pair configs: {result['data_dir']}/study/<name>.yaml; compare pairs on the dashboard "
        "(`emc dashboard`) or with `emc sql`",
        highlight=False,
        markup=False,
    )
