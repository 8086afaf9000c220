"""`emc trace`: attribution graphs of base and adapted for reviewed or flagged prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, get_args

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, check_shards, fail, prepare_flows
from emc.cli.exits import exit_for
from emc.config import ConfigError, TracingConfig, load_experiment
from emc.console import console, print_frame


@app.command()
def trace(
    prompt_ids: Annotated[
        list[str] | None,
        typer.Argument(help="Prompts to trace. Default: the review queue (see --select)."),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    select: Annotated[
        str | None,
        typer.Option(
            help="reviewed: prompts a person reviewed (not rejected); flagged: every prompt in "
            "the review queue but rejected ones. Default: tracing.select in the config. Stale "
            "graphs (traced before a relabel) are traced again in addition."
        ),
    ] = None,
    targets: Annotated[
        str | None,
        typer.Option(
            help="labelled: exactly the labelled tokens; contrastive: the evil-minus-safe "
            "direction; salient: the top logits by cumulative probability. Default: "
            "tracing.targets in the config."
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Trace at most this many prompts, by review priority.")
    ] = None,
    shards: Annotated[
        int,
        typer.Option(
            help="Split each model's graphs into this many runs of the trace-shard deployment, "
            "for the workers of its pool (several GPUs or machines). Needs PREFECT_API_URL."
        ),
    ] = 0,
    spool: Annotated[
        Path | None,
        typer.Option(
            help="With --shards: the directory shards write result bundles to, shared by every "
            "worker and this machine. Default: DATA_DIR/spool."
        ),
    ] = None,
    shard_deployment: Annotated[
        str, typer.Option(help="With --shards: the deployment that runs a shard.")
    ] = "trace-shard/graphs-to-spool",
) -> None:
    """Make attribution graphs for the base and the adapted model on the same token ids.

    Runs the `tracing` Prefect flow: circuit-tracer attributes each prompt's next token to its
    targets, the pruned nodes and edges go to the store's `graph_nodes` and `graph_edges`, and a
    `graphs` row holds the quality scores. Graphs already made are skipped and failed ones are
    tried again, so a killed run, run again, finishes the rest.

    Rejected prompts are never selected from the queue; a rejected prompt named here is traced
    with a warning (rankings and summaries still leave it out). A graph traced before its prompt
    was relabelled is stale: every run lists the stale graphs of these models and traces them
    again for the current labels (beyond --limit; with prompt ids, only theirs), and the new
    graph supersedes the stale one in rankings and diffs.

    With --shards N (and a Prefect server), each model's graphs are split into N runs of the
    `trace-shard` deployment, which any worker of its pool may take, on this machine or another.
    Shards never open the store: they write result bundles to the shared --spool directory, and
    this command loads them into the store (one ingest at a time, `store-writer` slot).

    Then: `emc graph export PROMPT_ID` for circuit-tracer's viewer, or the dashboard's Graphs
    page.

    Exit codes: 0 done, or nothing to do (no prompt selected, or every graph already made); 2
    nothing made: unknown prompt ids, or every graph this run tried failed (the failures are
    listed); 3 partial (the failed graphs are listed, per prompt and model).
    """
    for option, value in (("select", select), ("targets", targets)):
        choices = get_args(TracingConfig.model_fields[option].annotation)
        if value is not None and value not in choices:
            raise fail(f"unknown --{option} {value!r}: choose {' or '.join(choices)}")
    check_shards(shards)
    try:
        _, resolved = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    prepare_flows(resolved)
    from flows.tracing import tracing_flow

    try:
        summary = tracing_flow(
            config_path=str(config) if config else None,
            data_dir=str(resolved),
            select=select,
            targets=targets,
            limit=limit,
            prompt_ids=prompt_ids or None,
            shards=shards,
            spool_dir=str(spool) if spool else None,
            shard_deployment=shard_deployment,
        )
    except ValueError as exc:  # unknown prompt ids
        raise fail(str(exc)) from None
    print_summary(resolved, summary)
    failures = [f"{f['prompt_id']} ({f['role']}): {f['error']}" for f in summary["failures"]]
    exit_for(summary["made"], failures, "graph")


def print_summary(data_dir, summary: dict) -> None:
    from emc.store import Store
    from emc.store.graphs import graphs_overview

    for rejected in summary.get("rejected", []):
        console.print(
            f"[yellow]warning:[/] prompt {rejected['prompt_id']} is {rejected['badge']}. Traced "
            "because you named it; rankings and diff summaries leave it out."
        )
    if not summary["prompts"]:
        console.print(
            "[yellow]no prompts to trace:[/] the review queue has none in the selection. Review "
            "some in `emc dashboard`, use --select flagged, or name prompt ids."
        )
        return
    store = Store.in_data_dir(data_dir)
    frame = graphs_overview(store, summary["prompt_ids"])
    print_frame(frame, title=f"graphs of {summary['prompts']} prompts")
    console.print(
        f"made {summary['made']}, failed {summary['failed']}; all graphs of these prompts: "
        f"{summary['graphs_ok']} ok, {summary['graphs_failed']} failed"
    )
    if summary["mismatches"]:
        console.print(
            f"[yellow]{summary['mismatches']} graph(s) disagree with discovery's logits[/] "
            "(column logit_mismatch): the graph may not explain the labelled distribution."
        )
    print_stale(summary.get("stale", []))
    if not summary["made"] and not summary["failed"]:
        console.print(
            f"nothing to do: every graph of these {summary['prompts']} prompt(s) is already made"
        )


def print_stale(stale: list[dict]) -> None:
    """The stale graphs a run found (traced for labels since changed) and what became of them."""
    if not stale:
        return
    console.print(
        f"[yellow]{len(stale)} stale graph(s)[/] were traced before their prompt was relabelled; "
        "traced again for the current labels:"
    )
    for graph in stale:
        outcome = (
            f"re-traced as {graph['superseded_by']}"
            if graph["superseded_by"]
            else "[red]still stale[/] (tracing it again failed, see below)"
        )
        console.print(
            f"  stale {graph['role']} graph {graph['graph_id']} of {graph['prompt_id']} "
            f"({graph['targets']}; {graph['change']}): {outcome}"
        )
