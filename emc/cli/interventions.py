"""`emc patch` and `emc intervene`: where the harmful shift lives, and what removes it."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, fail
from emc.cli.exits import NOTHING_DONE, exit_for
from emc.console import console, err_console, inline, print_frame

PromptIds = Annotated[
    list[str] | None,
    typer.Argument(help="Prompts to check. Default: every prompt with a current graph pair."),
]
Limit = Annotated[int | None, typer.Option(help="At most this many prompts (highest first).")]
Redo = Annotated[
    bool, typer.Option("--redo", help="Measure prompts again that were measured before.")
]


@app.command()
def patch(
    prompt_ids: PromptIds = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    limit: Limit = None,
    redo: Redo = False,
) -> None:
    """Where the harmful shift lives: activation patching between base and adapted.

    The shift is the change of the evil-minus-safe logit gap (mean evil logit minus mean safe
    logit at the last position) from base to adapted, on the graph's token ids. Each component
    (embeddings, each layer's attention and MLP output, the MLP split into transcoder features
    and error node) is patched both ways. "direct" swaps only its own write to the final residual
    stream: these shares add up to the shift except for the final norm's part ("unexplained").
    "total" swaps its output at every position and recomputes everything downstream: how much
    of the shift it is sufficient for (into base) or necessary for (out of adapted); those
    overlap and need not add up. Runs the `interventions` flow's decomposition.

    Exit codes: 0 done, or nothing left to measure (every prompt measured before: --redo); 2
    nothing measured: unknown prompt ids, named prompts without a current graph pair, or every
    prompt failed (the failures are listed); 3 partial (the failed prompts are listed).
    """
    summary = _run(config, data_dir, prompt_ids, ["decomposition"], limit, redo)
    from emc.store.interventions import decomposition_summary, explained_per_prompt

    store, base_id, adapted_id = summary.pop("_store")
    shares = decomposition_summary(store, base_id, adapted_id)
    if shares.empty:
        _exit_for_failures(summary)
        console.print(
            "[yellow]nothing decomposed:[/] no prompt with a current graph pair and both "
            "evil and safe labels. Run `emc trace` first."
        )
        return
    print_frame(shares.round(3), title="share of the shift per component (1 = all of it)")
    explained = explained_per_prompt(store, base_id, adapted_id)
    print_frame(
        explained.round(3), title="per prompt: what the direct writes explain, and the rest"
    )
    _print_headline(summary)
    _exit_for_failures(summary)


@app.command()
def intervene(
    prompt_ids: PromptIds = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    kind: Annotated[
        str,
        typer.Option(
            help="adapter: scale the LoRA delta (k = -1, 0, 0.5, 1, 2) and remove it per layer, "
            "module kind and module; features: restore the top-k attributed features in the "
            "adapted model and inject them into the base model (k = 1, 5, 20, 100, all) against "
            "matched random features; directions: subtract, add and ablate each layer's "
            "mean-difference direction against random directions of the same norm; rollouts: "
            "sample what the models say (judged harmful or not, and for coherence) under the top "
            "20 and 100 features restored or injected at the prompt's positions and at every "
            "position, the adapter scaled and without each layer, and the directions subtracted, "
            "ablated and added, each against its random control; all."
        ),
    ] = "all",
    limit: Limit = None,
    redo: Redo = False,
    features: Annotated[
        str | None,
        typer.Option(
            help="Test your own features instead, as LAYER/FEATURE,... (e.g. 0/12,1/40, from the "
            "Features page): the edit below, next token and rollouts, against as many matched "
            "random features; replaces --kind."
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            help="With --features: restore (adapted model, base activations), inject (base "
            "model, adapted activations), zero or scale (adapted model, x --strength)."
        ),
    ] = "restore",
    strength: Annotated[
        float, typer.Option(help="With --features --mode scale: the factor (negative flips).")
    ] = 0.0,
    positions: Annotated[
        str,
        typer.Option(
            help="With --features and restore or inject: edit the prompt's positions only "
            "(prompt) or generated positions too (all); zero and scale act everywhere."
        ),
    ] = "all",
) -> None:
    """Which interventions remove the harmful shift, each against a matched random control.

    Shares are of the shift in the evil-minus-safe logit gap: for an intervention on the
    adapted model, `removed` is how much of the shift it takes away; on the base model, `share`
    is how much it reproduces. Interventions act at every position of the prompt (the same hooks
    stay on while a model generates). Rollouts say what the models then answer: p(harmful),
    how much an intervention cuts it against its control, and the answers' coherence. Runs the
    `interventions` flow.

    Examples:

        emc intervene                                   # every family, every traced prompt
        emc intervene --kind rollouts                   # what the models then say
        emc intervene --features 0/12,1/40 --mode zero  # your own hypothesis

    Exit codes: 0 done, or nothing left to measure (every prompt measured before: --redo); 2
    nothing measured: unknown prompt ids, named prompts without a current graph pair, every
    check failed, or (--kind directions) fewer than two prompts; 3 partial (the failed checks
    are listed, per prompt and family).
    """
    if features is not None:
        _custom(config, data_dir, prompt_ids, limit, features, mode, strength, positions)
        return
    parts = {
        "adapter": ["adapter"],
        "features": ["features"],
        "directions": ["directions"],
        "rollouts": ["rollouts"],
        "all": ["adapter", "features", "directions", "rollouts"],
    }
    if kind not in parts:
        raise fail(
            f"unknown --kind {kind!r}; choose adapter, features, directions, rollouts or all"
        )
    summary = _run(config, data_dir, prompt_ids, parts[kind], limit, redo)
    from emc.store.interventions import intervention_summary

    store, base_id, adapted_id = summary.pop("_store")
    frame = intervention_summary(store, None, base_id, adapted_id)
    if kind in ("rollouts", "all"):
        from emc.store.interventions import rollout_summary

        rollouts = rollout_summary(store, base_id, adapted_id)
        if not rollouts.empty:
            columns = ["family", "kind", "target", "model_role", "positions", "prompts", "n",
                       "p_harmful", "mean_coherent"]  # fmt: skip
            shown = rollouts[columns].round(3)
            print_frame(shown, title="what the models say under interventions: p(harmful)")
    if frame.empty and kind == "rollouts":
        _print_headline(summary)
        _exit_for_failures(summary)
        return
    if frame.empty:
        _exit_for_failures(summary)
        console.print(
            "[yellow]no interventions measured:[/] no prompt with a current graph pair "
            "and both evil and safe labels. Run `emc trace` first."
        )
        return
    for family, rows in frame.groupby("family", sort=False):
        shown = rows.drop(columns=["family"]).round(3)
        print_frame(shown, title=f"{family} interventions: mean over prompts")
    _print_headline(summary)
    _exit_for_failures(summary)


def _custom(config, data_dir, prompt_ids, limit, features, mode, strength, positions) -> None:
    from emc.analysis.custom_edits import CustomEdit, parse_features
    from emc.store.interventions import intervention_summary, rollout_summary

    if mode not in ("restore", "inject", "zero", "scale"):
        raise fail(f"unknown --mode {mode!r}; choose restore, inject, zero or scale")
    try:
        edit = CustomEdit(parse_features(features), mode, strength, positions)
    except ValueError as exc:
        raise fail(str(exc)) from None
    custom = {"features": [list(f) for f in edit.features], "mode": edit.mode,
              "strength": edit.strength, "positions": edit.positions}  # fmt: skip
    summary = _run(config, data_dir, prompt_ids, None, limit, False, custom)
    store, base_id, adapted_id = summary.pop("_store")
    frame = intervention_summary(store, "custom", base_id, adapted_id)
    frame = frame[frame["target"] == edit.label]
    if frame.empty:
        _exit_for_failures(summary)
        raise fail(
            "nothing measured: no prompt with a current graph pair and both evil and safe "
            "labels. Run `emc trace` first."
        )
    print_frame(frame.drop(columns=["family"]).round(3), title=f"your edit: {edit.label}")
    rollouts = rollout_summary(store, base_id, adapted_id)
    rollouts = rollouts[
        (rollouts["family"] == "none")
        | rollouts["target"].isin([edit.label, f"random ({edit.label})"])
    ]
    from emc.analysis.rollout_report import rollout_lines

    for line in rollout_lines(rollouts.to_dict(orient="records")):
        console.print(line)
    _exit_for_failures(summary)


def _run(config, data_dir, prompt_ids, parts, limit, redo, custom=None) -> dict:
    from emc.cli.app import prepare_flows
    from emc.config import ConfigError, load_experiment
    from emc.models import describe_model
    from emc.store import Store

    try:
        experiment, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    prepare_flows(resolved)
    from flows.interventions import interventions_flow

    try:
        summary = interventions_flow(
            config_path=str(config) if config else None,
            data_dir=str(resolved),
            prompt_ids=prompt_ids or None,
            parts=parts,
            limit=limit,
            redo=redo,
            custom=custom,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    ids = tuple(describe_model(experiment, role).model_id for role in ("base", "adapted"))
    return {**summary, "_store": (Store.in_data_dir(resolved), *ids)}


def _exit_for_failures(summary: dict) -> None:
    """Exit 2 if no check asked for was done, 3 if some failed; a note when there was nothing
    left to do. Unit: one part (decomposition, adapter, ...) of one prompt."""
    failures = [f"{f['prompt_id']} {f['part']}: {f['error']}" for f in summary["failed"]]
    failures += [f"{u['prompt_id']}: {u['error']}" for u in summary.get("unmeasurable", [])]
    done = summary.get("parts_done", summary["measured"])
    skipped = summary.get("skipped", [])
    for row in skipped:
        console.print(
            f"[yellow]skipped[/] {inline(row['prompt_id'])} {row['part']}: {inline(row['error'])}",
            highlight=False,
        )
    if not failures and skipped and not done:
        err_console.print(
            "[bold red]error:[/] nothing measured: every check asked for was skipped (above)",
            highlight=False,
        )
        raise typer.Exit(code=NOTHING_DONE)
    if not failures and not done and not skipped and summary["prompts"]:
        console.print(
            f"nothing new to measure: the {summary['prompts']} prompt(s) were measured before "
            "(--redo measures them again)"
        )
    exit_for(done, failures, "check")


def _print_headline(summary: dict) -> None:
    from emc.analysis.causal_report import headline

    for line in headline(summary):
        console.print(line)
