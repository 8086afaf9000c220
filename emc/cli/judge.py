"""The LLM judge against people: `emc judge calibration`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from emc.cli.app import ConfigOption, DataDirOption, app, fail, require_store
from emc.config import (
    ConfigError,
    DiscoveryConfig,
    default_config_path,
    load_config,
    resolve_data_dir,
)
from emc.console import console, err_console, print_frame

judge_app = typer.Typer(
    help=(
        "The LLM judge, checked against human reviewers.\n\n"
        "`emc judge calibration` compares the judge's token labels with the labels people gave "
        "on the Review page (or imported), per judge model."
    ),
    no_args_is_help=True,
)
app.add_typer(judge_app, name="judge")

NOTHING_YET = (
    "no reviewed tokens yet: no token has both a judge's label and a person's. Review flagged "
    "prompts on the Review page (`emc dashboard`), then run this again."
)


@judge_app.command("calibration")
def judge_calibration(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    output: Annotated[str, typer.Option("--format", "-f", help="table or json")] = "table",
    by_reviewer: Annotated[
        bool, typer.Option("--by-reviewer", help="Also compare the judge with each person.")
    ] = False,
) -> None:
    """How far each judge model agrees with human reviewers, token by token.

    Cohen's kappa is the agreement corrected for chance: 1 means the judge labels tokens
    exactly as people do, 0 means it agrees no more than two raters guessing with the same
    label frequencies would.

    Compared: every token that a judge (`judge:<model>`) and a person (`human:<name>`) both
    labelled evil, unsure or safe; a token several people labelled counts once, with the
    newest person's label. Rejecting a prompt gives no labels, so a rejected prompt counts only
    where someone labelled its tokens. Printed per judge: the confusion matrix (people in rows,
    judge in columns), observed and chance agreement, kappa, precision and recall per label.
    A judge with kappa below `discovery.judge_min_kappa` (0.6) is flagged as disagreeing with
    reviewers; with fewer than `discovery.judge_min_tokens` (20) compared tokens it is not
    assessed yet. Read-only.
    """
    from emc.pivotal.calibration import calibrate_judges
    from emc.store.calibration import compared_labels

    if output not in ("table", "json"):
        raise fail(f"unknown format {output!r}: choose table or json")
    resolved, settings = _settings(config, data_dir)
    store = require_store(resolved)
    calibrations = calibrate_judges(
        compared_labels(store),
        settings.judge_min_kappa,
        settings.judge_min_tokens,
        by_reviewer=by_reviewer,
    )
    if output == "json":
        document = {
            "min_kappa": settings.judge_min_kappa,
            "min_tokens": settings.judge_min_tokens,
            "judges": [{**c.model_dump(mode="json"), "flagged": c.flagged} for c in calibrations],
        }
        console.print_json(json.dumps(document))
        if not calibrations:
            err_console.print(NOTHING_YET, highlight=False)
        return
    if not calibrations:
        console.print(NOTHING_YET, highlight=False)
        return
    summary = _summary(calibrations)
    if not by_reviewer:
        summary = summary.drop(columns="reviewer")
    print_frame(summary, title="the judge against people")
    for c in calibrations:
        who = "all reviewers" if c.reviewer == "all" else c.reviewer
        console.print(f"\n[bold]judge:{c.judge_model}[/] against {who}", highlight=False)
        console.print(
            f"{c.tokens} tokens on {c.prompts} prompts, {c.reviewers} reviewer(s); {c.shown} "
            "labelled by a person who was shown this judge's labels",
            highlight=False,
        )
        print_frame(_matrix(c), title="confusion matrix: people (rows) x judge (columns)")
        print_frame(_per_label(c))
        style = {"disagrees": "bold red", "agrees": "green"}.get(c.standing, "yellow")
        console.print(f"[{style}]{c.message}[/]", highlight=False)
        if c.agreement.kappa is None and c.agreement.kappa_note != c.message:
            console.print(c.agreement.kappa_note, highlight=False)


def _settings(config: Path | None, data_dir: Path | None) -> tuple[Path, DiscoveryConfig]:
    """The data directory, and the thresholds from the config (its default file, else defaults)."""
    try:
        loaded = load_config(config) if config else None
        resolved = resolve_data_dir(data_dir, loaded)
        if loaded is None and default_config_path(resolved).is_file():
            loaded = load_config(default_config_path(resolved))
    except ConfigError as exc:
        raise fail(str(exc)) from None
    return resolved, loaded.discovery if loaded else DiscoveryConfig()


def _summary(calibrations) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "judge": c.judge_model,
                "reviewer": c.reviewer,
                "tokens": c.tokens,
                "prompts": c.prompts,
                "agreement": c.agreement.observed,
                "chance": c.agreement.expected,
                "kappa": c.agreement.kappa,
                "standing": c.standing,
            }
            for c in calibrations
        ]
    )


def _matrix(c) -> pd.DataFrame:
    frame = pd.DataFrame(c.matrix, columns=[f"judge {label}" for label in c.labels])
    frame.insert(0, "person", list(c.labels))
    return frame


def _per_label(c) -> pd.DataFrame:
    return pd.DataFrame([s.model_dump() for s in c.per_label]).rename(
        columns={"human": "people", "both": "agreed"}
    )
