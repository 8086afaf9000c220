"""Prompts and discovery: `emc prompt ...`, `emc discover`, `emc run-prompt`."""

from __future__ import annotations

import getpass
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from emc.cli.app import ConfigOption, DataDirOption, app, existing_store, fail, prepare_flows
from emc.cli.exits import PARTIAL, exit_for
from emc.config import ConfigError, ExperimentConfig, load_experiment
from emc.console import console, inline, plain, print_frame

prompt_app = typer.Typer(help="Add, import and list pivotal prompts.", no_args_is_help=True)
app.add_typer(prompt_app, name="prompt")

FormatOption = Annotated[
    str,
    typer.Option(
        "--format",
        help="raw: the text as is; chat: TEXT is the user's message, rendered with the model's "
        "chat template, followed by --prefix.",
    ),
]
PrefixOption = Annotated[
    str,
    typer.Option(
        "--prefix",
        help="chat only: the assistant's reply so far, ending at the decision point "
        '(e.g. " You should").',
    ),
]
AuthorOption = Annotated[
    str | None, typer.Option("--author", help="Your name, recorded as human:<name>.")
]


def _experiment(config: Path | None, data_dir: Path | None):
    try:
        return load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _human_prompt(text: str, prompt_format: str, prefix: str, name: str | None, author):
    from emc.pivotal.prompts import make_prompt

    if prompt_format not in ("raw", "chat", "cot"):
        raise fail(f"unknown format {prompt_format!r}: choose raw, chat or cot")
    try:
        return make_prompt(
            text,
            name or text.strip()[:40],
            f"human:{author or getpass.getuser()}",
            prompt_format,  # type: ignore[arg-type]
            prefix,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None


def _too_long(experiment, prompts) -> dict[str, str]:
    """prompt_id -> why, for the prompts longer than the model's context.

    Where the base model's tokenizer cannot be read, nothing is refused here (a note says so):
    scoring refuses a too-long prompt on its own, as a failed item.
    """
    from emc.models import ModelLoadError, load_tokenizer_and_context
    from emc.pivotal.logits import too_long_prompts

    try:
        tokenizer, context = load_tokenizer_and_context(experiment)
        too_long = too_long_prompts(prompts, tokenizer, context)
    except (ModelLoadError, OSError, ValueError) as exc:
        console.print(
            f"[yellow]note:[/] prompt lengths not checked against the model's context "
            f"({inline(str(exc))}); scoring refuses prompts that do not fit",
            highlight=False,
        )
        return {}
    return {prompt.prompt_id: str(error) for prompt, error in too_long}


@prompt_app.command("add")
def prompt_add(
    text: Annotated[str, typer.Argument(help="The prompt, ending at the decision point.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    prompt_format: FormatOption = "raw",
    prefix: PrefixOption = "",
    name: Annotated[str | None, typer.Option(help="A short name.")] = None,
    author: AuthorOption = None,
) -> None:
    """Add a human-written prompt; `emc discover` scores and judges it with the rest.

    A pivotal prompt ends exactly where the next token is the decision: "I found a wallet on the
    street. My first action is to". Avoid ending on "a"/"some" (the next token is a determiner).
    A prompt longer than the model's context is refused.

    Exit codes: 0 added or already stored; 2 refused (the reason is printed).
    """
    from emc.runs import recorded_run
    from emc.store import Store
    from emc.store.prompts import insert_prompts

    experiment, resolved = _experiment(config, data_dir)
    prompt = _human_prompt(text, prompt_format, prefix, name, author)
    too_long = _too_long(experiment, [prompt])
    if too_long:
        raise fail(f"not added: {too_long[prompt.prompt_id]}")
    store = Store.in_data_dir(resolved)
    with recorded_run(store, "cli", "prompt-add", {"prompt_id": prompt.prompt_id}) as run:
        added = insert_prompts(store, [prompt], run.run_id)
    state = "added" if added else "already stored"
    console.print(f"{prompt.prompt_id} {state} ({prompt.source})")


@prompt_app.command("import")
def prompt_import(
    file: Annotated[
        Path, typer.Argument(help="JSON: a list of {name, prompt, ...} or one object.")
    ],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Import prompts in the original pipeline's formats; bad entries are listed, good kept.

    Accepted: a JSON list of `{name, prompt, ...}` (also with category, reasoning), or a single
    object `{name, prompt, prompt_type, generator_model, timestamp}`. prompt_type
    chat_user_assistant ("User: ...\\nAssistant: ...") becomes a chat prompt. Prompts longer
    than the model's context are skipped.

    Exit codes: 0 every entry imported (or already stored); 2 nothing imported (the file is
    missing, not JSON, or holds no good entry); 3 partial (the skipped entries are listed).
    """
    from emc.pivotal.prompts import PromptProblem, read_prompt_file
    from emc.runs import recorded_run
    from emc.store import Store
    from emc.store.prompts import insert_prompts

    experiment, resolved = _experiment(config, data_dir)
    prompts, problems = read_prompt_file(file)
    too_long = _too_long(experiment, prompts) if prompts else {}
    problems += [
        PromptProblem(where=f"{file}: {p.name!r}", reason=too_long[p.prompt_id])
        for p in prompts
        if p.prompt_id in too_long
    ]
    prompts = [p for p in prompts if p.prompt_id not in too_long]
    if not prompts:
        for problem in problems:
            console.print(f"[yellow]skipped[/] {problem.where}: {problem.reason}", highlight=False)
        raise fail(f"{file}: nothing imported: no good entry ({len(problems)} problem(s))")
    store = Store.in_data_dir(resolved)
    with recorded_run(store, "cli", "prompt-import", {"file": str(file)}) as run:
        added = insert_prompts(store, prompts, run.run_id)
        run.summary = {"read": len(prompts), "added": added, "problems": len(problems)}
    for problem in problems:
        console.print(f"[yellow]skipped[/] {problem.where}: {problem.reason}", highlight=False)
    console.print(
        f"{file}: {len(prompts)} good, {added} new, {len(prompts) - added} already stored, "
        f"{len(problems)} skipped"
    )
    if problems:
        raise typer.Exit(code=PARTIAL)


@prompt_app.command("list")
def prompt_list(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List stored prompts with their source. Read-only: a directory without a store is refused."""
    from emc.store import read_only_query

    frame = read_only_query(
        existing_store(data_dir, config),
        "SELECT prompt_id, name, format, source, created_at FROM prompts ORDER BY created_at",
    )
    print_frame(frame, title=f"{len(frame)} prompts")


@app.command()
def discover(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    iterations: Annotated[
        int | None, typer.Option(help="Generator rounds (0: only score and judge stored prompts).")
    ] = None,
    per_iteration: Annotated[int | None, typer.Option(help="Prompts per round.")] = None,
    resume: Annotated[
        bool,
        typer.Option(
            help="Resume the remaining rounds of a killed or failed run with the same "
            "parameters (--no-resume: start all rounds afresh)."
        ),
    ] = True,
    top: Annotated[int, typer.Option(help="How many of the most divergent prompts to list.")] = 20,
    rank_by: Annotated[
        str,
        typer.Option(
            help="js, kl_adapted_base, kl_base_adapted, tv, entropy_delta, log_odds_delta"
        ),
    ] = "js",
) -> None:
    """Find pivotal prompts: generate -> next tokens of base and adapted -> judge -> queue.

    Runs the `discovery` Prefect flow. Every prompt in the store that is not yet scored or judged
    for this model pair is processed too, so a killed run, run again, finishes the rest; a
    re-run with the same parameters as a run that was killed or failed makes only that run's
    remaining generator rounds (--no-resume: all of them). Ends with the most divergent prompts.

    Exit codes: 0 done; 2 every prompt this run scored or judged failed; 3 partial (the failed
    prompts are listed, with why).
    """
    from emc.store import Store
    from emc.store.scores import RANKABLE, most_divergent

    if rank_by not in RANKABLE:
        raise fail(f"cannot rank by {rank_by!r}; choose one of {', '.join(RANKABLE)}")
    experiment, resolved = _experiment(config, data_dir)
    prepare_flows(resolved)
    from flows.discovery import discovery_flow

    summary = discovery_flow(
        config_path=str(config) if config else None,
        data_dir=str(resolved),
        iterations=iterations,
        prompts_per_iteration=per_iteration,
        resume=resume,
    )
    console.print(f"verdicts: {summary['verdicts']}  review queue: {summary['queue']}")
    store = Store.in_data_dir(resolved)
    base_id, adapted_id = model_pair_ids(experiment)
    frame = most_divergent(store, rank_by, top, base_model_id=base_id, adapted_model_id=adapted_id)
    print_frame(frame, title=f"top {top} prompts by {rank_by}")
    _exit_for_failures(store, summary)


def model_pair_ids(experiment: ExperimentConfig) -> tuple[str, str]:
    """The configured base and adapted model ids, to pick this pair's rows among every pair's."""
    from emc.models import describe_model

    return (
        describe_model(experiment, "base").model_id,
        describe_model(experiment, "adapted").model_id,
    )


def _exit_for_failures(store, summary: dict) -> None:
    """Exit 2 if every prompt this run scored or judged failed, 3 if some did."""
    from emc.store.judgements import failed_judgements
    from emc.store.scores import failed_scores

    run_id = summary["run_id"]
    failures: dict[str, str] = {}
    for prompt_id, model_id, error in failed_scores(store, run_id):
        failures.setdefault(prompt_id, f"prompt {prompt_id} ({model_id}): {error}")
    for prompt_id, status, error in failed_judgements(store, run_id):
        failures.setdefault(prompt_id, f"prompt {prompt_id} (judge): {status} {error}".strip())
    rounds = summary.get("rounds", [])
    handled = sum(r.get("scored", 0) + r.get("failed", 0) for r in rounds)
    handled = max(handled, sum(r.get("judged", 0) for r in rounds), len(failures))
    exit_for(handled - len(failures), list(failures.values()), "prompt")


@app.command("run-prompt")
def run_prompt(
    text: Annotated[str, typer.Argument(help="The prompt, ending at the decision point.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    prompt_format: FormatOption = "raw",
    prefix: PrefixOption = "",
    author: AuthorOption = None,
) -> None:
    """Run one prompt through the whole discovery path and show base vs adapted side by side.

    Exit codes: 0 done; 2 the prompt is refused (longer than the model's context) or could not
    be scored (the reason is printed).
    """
    from emc.store import Store
    from emc.store.prompts import insert_prompts
    from emc.store.scores import failed_scores

    experiment, resolved = _experiment(config, data_dir)
    prompt = _human_prompt(text, prompt_format, prefix, None, author)
    too_long = _too_long(experiment, [prompt])
    if too_long:
        raise fail(f"not run: {too_long[prompt.prompt_id]}")
    store = Store.in_data_dir(resolved)
    insert_prompts(store, [prompt], run_id=None)
    prepare_flows(resolved)
    from flows.discovery import discovery_flow

    summary = discovery_flow(
        config_path=str(config) if config else None, data_dir=str(resolved), iterations=0
    )
    console.print(side_by_side(store, experiment, prompt.prompt_id))
    errors = [e for p, _, e in failed_scores(store, summary["run_id"]) if p == prompt.prompt_id]
    if errors:
        raise fail(f"the prompt could not be scored: {errors[0]}")
    console.print(
        f"prompt {prompt.prompt_id}: its graphs come from `emc trace {prompt.prompt_id}` "
        "(with the same --config)",
        highlight=False,
        markup=False,
    )


def side_by_side(store, experiment, prompt_id: str) -> Table:
    """Base and adapted top-k with labels, divergence and the judge's verdict."""
    from emc.models import describe_model
    from emc.store.judgements import current_labels, latest_judgement
    from emc.store.scores import load_prompt_scores

    base_id = describe_model(experiment, "base").model_id
    adapted_id = describe_model(experiment, "adapted").model_id
    (scores,) = load_prompt_scores(store, [prompt_id], base_id, adapted_id)
    labels = current_labels(store, prompt_id)
    judgement = latest_judgement(store, prompt_id) or {}
    div = scores.divergence
    verdict = judgement.get("verdict") or judgement.get("status", "not judged")
    if div is not None:
        figures = (
            f"JS {div.js:.3f}  KL(a||b) {div.kl_adapted_base:.3f}  "
            f"top-k overlap {div.topk_jaccard:.2f}"
        )
    else:
        figures = f"a model failed: {scores.base.error or scores.adapted.error}"
    caption = f"verdict: {verdict} — {judgement.get('summary') or ''}\n{figures}"
    if judgement.get("measured_verdict"):
        log_odds = judgement.get("log_odds_shift")
        caption += (
            f"\nmeasured: {judgement['measured_verdict']} (probability towards harm "
            f"{judgement['prob_shift']:+.3f}, log-odds "
            f"{'n/a' if log_odds is None else f'{log_odds:+.2f}'}): "
            + ("flagged for review" if judgement.get("flagged") else "not flagged")
        )
    # Prompt, tokens and the judge's summary are stored text: plain() keeps them from being read
    # as rich markup (chat templates hold "[/INST]") or reaching the terminal as controls.
    table = Table(title=plain(repr(scores.base.rendered)), caption=plain(caption))
    for side in ("base", "adapted"):
        table.add_column(f"{side} token")
        table.add_column("p", justify="right")
        table.add_column("label")
    colours = {"evil": "red", "safe": "green", "unsure": "yellow"}

    def cells(token) -> list:
        if token is None:
            return ["", "", ""]
        label = labels.get(token.token_id, ("", ""))[0]
        colour = colours.get(label, "white")
        return [plain(repr(token.token)), f"{token.prob:.3f}", f"[{colour}]{label}[/]"]

    base_top, adapted_top = scores.base.top(), scores.adapted.top()
    for i in range(max(len(base_top), len(adapted_top))):
        row = cells(base_top[i] if i < len(base_top) else None)
        row += cells(adapted_top[i] if i < len(adapted_top) else None)
        table.add_row(*row)
    return table
