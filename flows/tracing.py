"""Tracing: attribution graphs of base and adapted for the prompts worth explaining.

Prompts come from the review queue (reviewed, or everything flagged) or are named explicitly.
Both models read the token ids discovery stored, so each graph explains the logits that were
labelled. One GPU task per model role holds the `gpu` slot and keeps its model loaded across
prompts; memory is released between prompts. A graph's id hashes everything that decides its
content, so a re-run skips graphs already made and re-tries failed ones: a killed run resumes.

Rejected prompts are never selected from the queue; one named explicitly is traced, with a
warning. A stale graph (traced for labels a person has since changed, see `emc.store.validity`)
of these models is traced again for the current labels on every run, whatever the selection or
limit, unless its prompt is rejected; the new graph supersedes it everywhere that counts graphs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from pydantic import BaseModel, ConfigDict

from emc.config import TracingConfig, load_experiment
from emc.events import GRAPHS_COMPLETED
from emc.faults import fault_point
from emc.models import describe_model
from emc.pivotal.logits import NextTokens
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.bundles import ingest_bundles, write_failed_bundle, write_traced_bundle
from emc.store.graphs import graph_ids_done, insert_traced, list_graphs, record_failed_graph
from emc.store.judgements import current_labels
from emc.store.models import ModelRow
from emc.store.prompts import require_stored_prompts
from emc.store.queue import queued_prompt_ids
from emc.store.scores import load_prompt_scores, scored_prompt_ids
from emc.store.validity import rejected_prompts, stale_graphs
from emc.tracing import (
    GraphKey,
    TargetPlan,
    graph_key,
    plan_targets,
    release_memory,
    trace_prompt,
    with_memory_fallback,
)
from flows.discovery import RETRIES, score_pending_prompts
from flows.model_cache import cached_model, release_models
from flows.parameters import TracingParameters, takes
from flows.reporting import id_list, prompt_links, rounded_rows, run_logger, with_prompt_links
from flows.runtime import (
    announce,
    current_flow_run_id,
    deployment_data_dir,
    gpu_slot,
    store_writer_slot,
)
from flows.shards import incomplete, start_shard, wait_for

ROLES = ("base", "adapted")


class GraphItem(BaseModel):
    """One graph to make: which prompt, which targets, which ids, and what discovery saw.

    Plain data (JSON), so that a shard of items can be a deployment's parameter.
    """

    model_config = ConfigDict(frozen=True)

    key: GraphKey
    plan: TargetPlan
    input_ids: list[int]
    discovery: NextTokens | None  # None when discovery's forward pass failed


def plan_graphs(
    store: Store,
    tracing: TracingConfig,
    prompt_ids: list[str],
    role: str,
    model_ids: Mapping[str, str],
    retrace: Sequence[Sequence[str]] = (),
) -> list[GraphItem]:
    """The graphs of `role` for these prompts; prompts without discovery logits are left out.

    `model_ids` maps each role to its model id (the flow scores unscored prompts first).
    `retrace` adds (prompt id, targets mode) pairs: stale graphs to make again, each in its own
    target mode, for the prompt's current labels.
    """
    wanted = [(p, tracing.targets) for p in prompt_ids] + [(p, str(t)) for p, t in retrace]
    wanted = list(dict.fromkeys(wanted))
    loaded = load_prompt_scores(
        store, list(dict.fromkeys(p for p, _ in wanted)), model_ids["base"], model_ids["adapted"]
    )
    scores = {s.prompt_id: s for s in loaded}
    items = []
    for prompt_id, mode in (w for w in wanted if w[0] in scores):  # the caller's order
        prompt_scores = scores[prompt_id]
        labels = {token: label for token, (label, _) in current_labels(store, prompt_id).items()}
        fitted = tracing.model_copy(update={"targets": mode})
        plan = plan_targets(labels, fitted)
        discovery = getattr(prompt_scores, role)
        items.append(
            GraphItem(
                key=graph_key(prompt_id, model_ids[role], plan, fitted),
                plan=plan,
                # Both graphs read the ids the base model's logits came from: one tokenisation.
                input_ids=prompt_scores.base.input_ids,
                discovery=discovery if discovery.status == "ok" else None,
            )
        )
    return items


def pending_items(
    store: Store,
    tracing: TracingConfig,
    prompt_ids: list[str],
    role: str,
    model_ids: Mapping[str, str],
    retrace: Sequence[Sequence[str]] = (),
) -> list[GraphItem]:
    """The graphs of `role` for these prompts (and `retrace`) that the store does not hold yet."""
    items = plan_graphs(store, tracing, prompt_ids, role, model_ids, retrace)
    done = graph_ids_done(store, model_ids[role])
    pending = [item for item in items if item.key.graph_id not in done]
    logger = run_logger()
    wanted = list(dict.fromkeys([*prompt_ids, *(p for p, _ in retrace)]))
    if not wanted:
        return pending
    planned = {item.key.prompt_id for item in items}
    unscored = [p for p in wanted if p not in planned]
    if unscored:
        logger.warning(
            "%s: %d prompt(s) left out, no discovery logits for these models: %s",
            role, len(unscored), id_list(unscored),
        )  # fmt: skip
    logger.info(
        "%s: %d graph(s) planned, %d already stored (skipped), %d to make",
        role, len(items), len(items) - len(pending), len(pending),
    )  # fmt: skip
    return pending


class StoreSink:
    """Where the local path puts each graph: straight into the store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def ok(self, traced) -> None:
        insert_traced(self.store, traced)

    def failed(self, item: GraphItem, run_id: str, message: str) -> None:
        record_failed_graph(self.store, item.key, item.input_ids, run_id, message)


class SpoolSink:
    """Where a worker without the store puts each graph: a bundle in the shared spool."""

    def __init__(self, spool_dir: str, model: ModelRow) -> None:
        self.spool_dir, self.model = spool_dir, model

    def ok(self, traced) -> None:
        write_traced_bundle(self.spool_dir, traced, self.model)

    def failed(self, item: GraphItem, run_id: str, message: str) -> None:
        write_failed_bundle(self.spool_dir, item.key, item.input_ids, run_id, message, self.model)


@task(task_run_name="trace-{role}", **RETRIES)
def trace_graphs(
    config_path: str | None,
    data_dir: str,
    role: str,
    prompt_ids: list[str],
    tracing: TracingConfig,
    run_id: str,
    retrace: list[list[str]] | None = None,
) -> list[dict]:
    """Make the missing graphs of one model; each failure is recorded and the loop goes on."""
    config, _ = load_experiment(config_path, data_dir)
    config = config.model_copy(update={"tracing": tracing})
    store = Store.in_data_dir(data_dir)
    model_ids = {r: describe_model(config, r).model_id for r in ROLES}
    pending = pending_items(store, tracing, prompt_ids, role, model_ids, retrace or ())
    if not pending:
        return []
    with gpu_slot():
        loaded = cached_model(config, role)
        upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        return _trace_all(loaded, pending, tracing, run_id, data_dir, role, StoreSink(store))


@task(task_run_name="trace-{role}-to-spool", **RETRIES)
def trace_to_spool(
    config_path: str | None,
    data_dir: str,
    role: str,
    items: list[GraphItem],
    tracing: TracingConfig,
    run_id: str,
    spool_dir: str,
) -> list[dict]:
    """`trace_graphs` for a worker that cannot write the store: each graph becomes a bundle."""
    config, _ = load_experiment(config_path, data_dir)
    config = config.model_copy(update={"tracing": tracing})
    with gpu_slot():
        loaded = cached_model(config, role)
        sink = SpoolSink(spool_dir, loaded.identity.to_row(first_run_id=run_id))
        return _trace_all(loaded, items, tracing, run_id, data_dir, role, sink)


def _trace_all(loaded, items, tracing, run_id, data_dir, role, sink) -> list[dict]:
    logger = get_run_logger()
    progress = create_progress_artifact(
        progress=0.0, key=f"tracing-{role}", description=f"{role} graphs made or failed"
    )
    results = []
    for index, item in enumerate(items, start=1):
        results.append(_trace_one(sink, loaded, item, tracing, run_id, data_dir, role))
        fault_point("graph-stored")
        row = results[-1]
        log = logger.warning if row["error"] else logger.info
        log(
            "%s graph %d/%d, prompt %s: %s", role, index, len(items), item.key.prompt_id,
            f"failed: {row['error']}" if row["error"]
            else f"{row['seconds']:.1f} s, replacement {row['replacement']:.3f}",
        )  # fmt: skip
        update_progress_artifact(progress, 100.0 * index / len(items))
    return results


def _trace_one(sink, loaded, item: GraphItem, tracing, run_id, data_dir, role) -> dict:
    ids = torch.tensor(item.input_ids)

    def attempt(fitted: TracingConfig):
        return trace_prompt(
            loaded, item.key, item.plan, ids, fitted, run_id, item.discovery, data_dir
        )

    row = {"prompt_id": item.key.prompt_id, "role": role, "graph_id": item.key.graph_id}
    try:
        traced, fitted = with_memory_fallback(attempt, tracing)
        record = traced.record
        sink.ok(traced)
        row |= {
            "status": "ok",
            "seconds": record.seconds,
            "replacement": record.replacement,
            "completeness": record.completeness,
            "error_score_ratio": record.error_score_ratio,
            "kept_features": record.kept_features,
            "kept_edges": record.kept_edges,
            "logit_mismatch": record.logit_mismatch,
            "mismatch_flag": bool(record.logit_mismatch_exceeds),
            "batch_size": fitted.batch_size,
            "error": None,
        }
        del traced
    except Exception as exc:  # an item's failure: record it and go on with the next prompt
        message = f"{type(exc).__name__}: {exc}"
        sink.failed(item, run_id, message)
        row |= {"status": "failed", "error": message}
    release_memory()
    return row


@flow(name="trace-shard", flow_run_name="trace-shard-{role}-{shard}")
def trace_shard_flow(
    config_path: str | None,
    data_dir: str | None,
    role: str,
    items: list[GraphItem],
    tracing: TracingConfig,
    run_id: str,
    spool_dir: str,
    shard: int = 0,
) -> dict:
    """One shard of a tracing run, on whichever worker takes it: its graphs become bundles in
    `spool_dir` (shared with the store's host), never rows in a store it may not reach.

    Args:
        config_path: The experiment config as the worker sees it (empty: the data directory's).
        data_dir: The data directory as the worker sees it, for the config and its models.
        role: Which model traces: base or adapted.
        items: The graphs to make (prompt, targets, token ids, discovery's logits).
        tracing: The tracing settings of the run that started this shard.
        run_id: The EMC run that started this shard; every graph names it.
        spool_dir: Where the bundles go, shared with the store's host.
        shard: This shard's number within its run.
    """
    logger = get_run_logger()
    logger.info("%s shard %d: %d graph(s), bundles to %s", role, shard, len(items), spool_dir)
    try:
        rows = trace_to_spool(
            config_path, str(data_dir or ""), role, items, tracing, run_id, spool_dir
        )
    finally:
        release_models()
    failed = sum(r["status"] == "failed" for r in rows)
    logger.info("%s shard %d done: %d made, %d failed", role, shard, len(rows) - failed, failed)
    return {
        "shard": shard,
        "role": role,
        "made": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
    }


@task(task_run_name="ingest-results")
def ingest_results(data_dir: str, spool_dir: str) -> dict:
    """Load the spool's bundles into the store, one ingest at a time (`store-writer` slot)."""
    with store_writer_slot():
        report = ingest_bundles(Store.in_data_dir(data_dir), spool_dir)
    run_logger().info("ingested %d bundle(s) from %s", len(report.ingested), spool_dir)
    if report.rejected:
        get_run_logger().error("rejected bundles: %s", report.rejected)
    return {"ingested": report.ingested, "rejected": report.rejected}


def _dispatch_shards(
    store: Store, data_dir: str, chosen: list[str], tracing: TracingConfig, run_id: str,
    shards: int, spool_dir: str, deployment: str, config_path: str | None,
    model_ids: Mapping[str, str], retrace: Sequence[Sequence[str]] = (),
) -> list[dict]:  # fmt: skip
    """Run each role's pending graphs as `shards` runs of the shard deployment, wait for all,
    ingest what they wrote; raise if a shard did not complete (a re-run makes the rest)."""
    logger = get_run_logger()
    started = []
    for role in ROLES:
        items = pending_items(store, tracing, chosen, role, model_ids, retrace)
        for shard in range(shards):
            chunk = items[shard::shards]
            if not chunk:
                continue
            parameters = {
                "config_path": config_path,
                "data_dir": data_dir,
                "role": role,
                "items": [item.model_dump(mode="json") for item in chunk],
                "tracing": tracing.model_dump(mode="json"),
                "run_id": run_id,
                "spool_dir": spool_dir,
                "shard": shard,
            }
            started.append(start_shard(deployment, parameters))
            logger.info("%s shard %d: %d graphs -> %s", role, shard, len(chunk), deployment)
    if started:
        logger.info("waiting for %d shard run(s)", len(started))
    finished = wait_for(started)
    ingested = ingest_results(data_dir, spool_dir)
    roles = {model_id: role for role, model_id in model_ids.items()}
    made = {g.graph_id: g for g in list_graphs(store) if g.graph_id in set(ingested["ingested"])}
    rows = [
        {"prompt_id": g.prompt_id, "role": roles.get(g.model_id, "?"), "graph_id": g.graph_id,
         "status": g.status, "error": g.error}
        for g in made.values()
    ]  # fmt: skip
    broken = incomplete(finished)
    if broken:
        raise RuntimeError(
            f"{len(broken)} tracing shard(s) did not complete ({'; '.join(broken)}); their "
            "graphs that reached the spool were ingested, run tracing again for the rest"
        )
    return rows


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    picked = "prompts" if params.get("prompt_ids") else params.get("select") or "queue"
    return f"tracing-{picked}-{params.get('targets') or 'config'}"


@flow(name="tracing", flow_run_name=_run_name)
@takes(TracingParameters)
def tracing_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    select: str | None = None,
    targets: str | None = None,
    limit: int | None = None,
    prompt_ids: list[str] | None = None,
    shards: int = 0,
    spool_dir: str | None = None,
    shard_deployment: str = "trace-shard/graphs-to-spool",
) -> dict:
    """Graphs for base and adapted on the selected prompts (`select`/`targets` override config).

    `prompt_ids` names prompts explicitly (a rejected one is traced, with a warning); otherwise
    the review queue is read: `reviewed` prompts, or every `flagged` one, never a rejected one,
    highest priority first, at most `limit`. Stale graphs of these models are traced again for
    their prompts' current labels, in addition (only the named prompts' when prompts are named).
    `shards` > 0 hands the graphs to that many runs per model of `shard_deployment`, on any
    worker of its pool (other machines included); they write bundles to `spool_dir` (default
    DATA_DIR/spool, which they must share) and this flow loads them into the store.
    """
    data_dir = deployment_data_dir(data_dir)
    config, resolved = load_experiment(config_path, data_dir)
    overrides = {k: v for k, v in (("select", select), ("targets", targets)) if v is not None}
    tracing = TracingConfig.model_validate({**config.tracing.model_dump(), **overrides})
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "prompt_ids": prompt_ids,
        "limit": limit,
        "shards": shards,
        "tracing": tracing.model_dump(mode="json"),
    }
    logger = get_run_logger()
    with recorded_run(store, "flow", "tracing", params, current_flow_run_id()) as run:
        chosen = _choose_prompts(store, tracing, limit, prompt_ids)
        model_ids = {r: describe_model(config, r).model_id for r in ROLES}
        base_id, adapted_id = model_ids["base"], model_ids["adapted"]
        rejected = _named_rejections(store, chosen if prompt_ids else [])
        stale = [
            g
            for g in stale_graphs(store, model_ids.values(), prompt_ids)
            if prompt_ids or not g.rejected
        ]
        retrace = [list(pair) for pair in dict.fromkeys((g.prompt_id, g.targets) for g in stale)]
        if stale:
            logger.info(
                "%d stale graph(s), traced for labels since changed, are traced again: %s",
                len(stale), id_list(sorted({g.prompt_id for g in stale})),
            )  # fmt: skip
        chosen = list(dict.fromkeys([*chosen, *(p for p, _ in retrace)]))
        if not chosen:
            logger.info("nothing to trace: %s", _nothing_hint(tracing, prompt_ids))
        unscored = set(chosen) - scored_prompt_ids(store, base_id, adapted_id)
        if unscored:
            # Graphs must read discovery's token ids, so score what has no logits yet.
            logger.info("%d prompt(s) have no discovery logits yet: scoring first", len(unscored))
            score_pending_prompts(config_path, str(resolved), run.run_id)
        rows = []
        if shards:
            spool = spool_dir or str(Path(resolved) / "spool")
            rows = _dispatch_shards(store, str(resolved), chosen, tracing, run.run_id, shards,
                                    spool, shard_deployment, config_path, model_ids,
                                    retrace)  # fmt: skip
        else:
            try:
                for role in ROLES:
                    rows += trace_graphs(
                        config_path, str(resolved), role, chosen, tracing, run.run_id, retrace
                    )
                    release_models()  # one model in memory at a time: graphs need the room
            finally:
                release_models()
        summary = _summarize(store, chosen, rows, base_id, adapted_id)
        summary["stale"] = _stale_outcomes(store, stale, model_ids)
        summary["rejected"] = rejected
        _log_outcome(summary)
        if rows:
            create_table_artifact(
                key="tracing-graphs",
                table=with_prompt_links(rounded_rows(rows)),
                description="Graphs made or failed by this run",
            )
        create_markdown_artifact(
            key="tracing-summary", markdown=_summary_markdown(summary, rows), description="Tracing"
        )
        run.summary = {"run_id": run.run_id, **summary}
    if summary["made"]:
        made_for = sorted({r["prompt_id"] for r in rows if r["status"] == "ok"})
        announce(GRAPHS_COMPLETED, resolved, {"run_id": run.run_id, "prompt_ids": made_for,
                                              "made": summary["made"],
                                              "failed": summary["failed"]})  # fmt: skip
    return run.summary


def _choose_prompts(
    store: Store, tracing: TracingConfig, limit: int | None, prompt_ids: list[str] | None
) -> list[str]:
    logger = get_run_logger()
    if prompt_ids:
        require_stored_prompts(store, prompt_ids)
        chosen = list(dict.fromkeys(prompt_ids))
    else:
        chosen = queued_prompt_ids(store, reviewed_only=tracing.select == "reviewed")
        logger.info("review queue: %d %s prompt(s), rejected ones left out", len(chosen),
                    tracing.select)  # fmt: skip
    if limit is not None and len(chosen) > limit:
        logger.info("limit %d: the first %d by priority, %d left for a later run", limit, limit,
                    len(chosen) - limit)  # fmt: skip
        chosen = chosen[:limit]
    if chosen:
        logger.info("selected %d prompt(s) to trace: %s", len(chosen), id_list(chosen))
    return chosen


def _nothing_hint(tracing: TracingConfig, prompt_ids: list[str] | None) -> str:
    """Why a run found no prompt, and the command that would give it one."""
    if prompt_ids:
        return "no prompt named"
    if tracing.select == "reviewed":
        return (
            "no reviewed prompt in the review queue; review some on the dashboard's Review "
            "page, or run `emc trace --select flagged`"
        )
    return "the review queue is empty; run `emc discover` to fill it"


def _log_outcome(summary: dict) -> None:
    logger = get_run_logger()
    logger.info(
        "tracing done: %d graph(s) made, %d failed; these prompts now have %d ok and %d failed "
        "graph(s)",
        summary["made"], summary["failed"], summary["graphs_ok"], summary["graphs_failed"],
    )  # fmt: skip
    if summary["failures"]:
        logger.warning(
            "%d graph(s) failed: %s", len(summary["failures"]),
            id_list([f"{f['role']} of {f['prompt_id']}" for f in summary["failures"]]),
        )  # fmt: skip
    if summary["mismatches"]:
        logger.warning(
            "%d graph(s) have logits that differ from discovery's", summary["mismatches"]
        )


def _named_rejections(store: Store, prompt_ids: list[str]) -> list[dict]:
    """The named prompts a person rejected: traced as asked, with a warning each."""
    rejections = rejected_prompts(store, prompt_ids)
    for rejection in rejections.values():
        get_run_logger().warning(
            "prompt %s is %s; traced because it was named, but rankings and summaries leave it "
            "out",
            rejection.prompt_id, rejection.badge,
        )  # fmt: skip
    return [{"prompt_id": r.prompt_id, "badge": r.badge} for r in rejections.values()]


def _stale_outcomes(store: Store, found: list, model_ids: Mapping[str, str]) -> list[dict]:
    """Each stale graph found at the start, with the graph that now supersedes it (or None)."""
    if not found:
        return []
    roles = {model_id: role for role, model_id in model_ids.items()}
    now = stale_graphs(
        store, model_ids.values(), [g.prompt_id for g in found], include_superseded=True
    )
    superseded = {g.graph_id: g.superseded_by for g in now}
    return [
        {
            "graph_id": g.graph_id,
            "prompt_id": g.prompt_id,
            "role": roles.get(g.model_id, "?"),
            "targets": g.targets,
            "change": g.change,
            "superseded_by": superseded.get(g.graph_id),
        }
        for g in found
    ]


def _summarize(
    store: Store, chosen: list[str], rows: list[dict], base_id: str, adapted_id: str
) -> dict:
    """Counts over every graph of the chosen prompts, not only this run's (a re-run skips)."""
    wanted = set(chosen)
    graphs = [g for m in (base_id, adapted_id) for g in list_graphs(store, m)]
    graphs = [g for g in graphs if g.prompt_id in wanted]
    ok = [g for g in graphs if g.status == "ok"]
    return {
        "prompts": len(chosen),
        "prompt_ids": chosen,
        "made": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "graphs_ok": len(ok),
        "graphs_failed": len(graphs) - len(ok),
        "mismatches": sum(bool(g.logit_mismatch_exceeds) for g in ok),
        "failures": [
            {"prompt_id": r["prompt_id"], "role": r["role"], "error": r["error"]}
            for r in rows
            if r["status"] == "failed"
        ],
        "mean_replacement": _mean([g.replacement for g in ok]),
        "mean_seconds": _mean([g.seconds for g in ok]),
    }


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def _summary_markdown(summary: dict, rows: Sequence[dict] = ()) -> str:
    lines = [
        f"Prompts: {summary['prompts']}; graphs made by this run: {summary['made']}, "
        f"failed: {summary['failed']}.",
        f"All graphs of these prompts: {summary['graphs_ok']} ok, "
        f"{summary['graphs_failed']} failed, {summary['mismatches']} with logits that differ "
        "from discovery.",
    ]
    if summary["mean_replacement"] is not None:
        lines.append(f"Mean replacement score {summary['mean_replacement']:.3f}.")
    for stale in summary.get("stale", []):
        outcome = (
            f"traced again as {stale['superseded_by']}"
            if stale["superseded_by"]
            else "still stale: tracing it again failed"
        )
        lines.append(
            f"Stale {stale['role']} graph {stale['graph_id']} of {stale['prompt_id']} "
            f"({stale['targets']}; labels changed: {stale['change']}): {outcome}."
        )
    for rejected in summary.get("rejected", []):
        lines.append(f"Prompt {rejected['prompt_id']} is {rejected['badge']}; traced as named.")
    if summary["failures"]:
        lines += ["", "| prompt | model | error |", "|---|---|---|"]
        lines += [f"| {f['prompt_id']} | {f['role']} | {f['error']} |" for f in summary["failures"]]
    lines += _dashboard_lines(summary["prompt_ids"], rows)
    return "\n".join(lines)


def _dashboard_lines(prompt_ids: list[str], rows: Sequence[dict], shown: int = 30) -> list[str]:
    """A line per prompt (the first `shown`) with its dashboard links; the pair this run made
    for it, where it made both graphs, is the one the Graphs link opens."""
    if not prompt_ids:
        return []
    made = {(r["prompt_id"], r["role"]): r["graph_id"] for r in rows if r["status"] == "ok"}
    lines = ["", "On the dashboard:", ""]
    for prompt_id in prompt_ids[:shown]:
        base, adapted = made.get((prompt_id, "base")), made.get((prompt_id, "adapted"))
        pair = f"{base}/{adapted}" if base and adapted else None
        lines.append(f"- `{prompt_id}`: {prompt_links(prompt_id, pair)}")
    if len(prompt_ids) > shown:
        lines.append(f"- and {len(prompt_ids) - shown} more")
    return lines
