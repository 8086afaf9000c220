"""Tracing: attribution graphs of base and adapted for the prompts worth explaining.

Prompts come from the review queue (reviewed, or everything flagged) or are named explicitly.
Both models read the token ids discovery stored, so each graph explains the logits that were
labelled. One GPU task per model role holds the `gpu` slot and keeps its model loaded across
prompts; memory is released between prompts. A graph's id hashes everything that decides its
content, so a re-run skips graphs already made and re-tries failed ones: a killed run resumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from emc.config import TracingConfig, load_experiment
from emc.models import describe_model
from emc.pivotal.logits import NextTokens
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.graphs import graph_ids_done, insert_traced, list_graphs, record_failed_graph
from emc.store.judgements import current_labels
from emc.store.prompts import stored_prompt_ids
from emc.store.queue import queued_prompt_ids
from emc.store.scores import load_prompt_scores, scored_prompt_ids
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
from flows.runtime import current_flow_run_id, gpu_slot

ROLES = ("base", "adapted")


@dataclass(frozen=True)
class GraphItem:
    """One graph to make: which prompt, which targets, which ids, and what discovery saw."""

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
) -> list[GraphItem]:
    """The graphs of `role` for these prompts; prompts without discovery logits are left out.

    `model_ids` maps each role to its model id (the flow scores unscored prompts first).
    """
    loaded = load_prompt_scores(store, prompt_ids, model_ids["base"], model_ids["adapted"])
    scores = {s.prompt_id: s for s in loaded}
    items = []
    for prompt_id in (p for p in prompt_ids if p in scores):  # the caller's (priority) order
        prompt_scores = scores[prompt_id]
        labels = {token: label for token, (label, _) in current_labels(store, prompt_id).items()}
        plan = plan_targets(labels, tracing)
        discovery = getattr(prompt_scores, role)
        items.append(
            GraphItem(
                key=graph_key(prompt_id, model_ids[role], plan, tracing),
                plan=plan,
                # Both graphs read the ids the base model's logits came from: one tokenisation.
                input_ids=prompt_scores.base.input_ids,
                discovery=discovery if discovery.status == "ok" else None,
            )
        )
    return items


@task(task_run_name="trace-{role}", **RETRIES)
def trace_graphs(
    config_path: str | None,
    data_dir: str,
    role: str,
    prompt_ids: list[str],
    tracing: TracingConfig,
    run_id: str,
) -> list[dict]:
    """Make the missing graphs of one model; each failure is recorded and the loop goes on."""
    logger = get_run_logger()
    config, _ = load_experiment(config_path, data_dir)
    config = config.model_copy(update={"tracing": tracing})
    store = Store.in_data_dir(data_dir)
    model_ids = {r: describe_model(config, r).model_id for r in ROLES}
    items = plan_graphs(store, tracing, prompt_ids, role, model_ids)
    done = graph_ids_done(store, model_ids[role])
    pending = [item for item in items if item.key.graph_id not in done]
    if not pending:
        return []
    progress = create_progress_artifact(
        progress=0.0, key=f"tracing-{role}", description=f"{role} graphs made or failed"
    )
    results = []
    with gpu_slot():
        loaded = cached_model(config, role)
        upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        for index, item in enumerate(pending, start=1):
            results.append(_trace_one(store, loaded, item, tracing, run_id, data_dir, role))
            row = results[-1]
            logger.info(
                "%s graph %d/%d, prompt %s: %s", role, index, len(pending), item.key.prompt_id,
                row["error"] or f"{row['seconds']:.1f} s, replacement {row['replacement']:.3f}",
            )  # fmt: skip
            update_progress_artifact(progress, 100.0 * index / len(pending))
    return results


def _trace_one(store, loaded, item: GraphItem, tracing, run_id, data_dir, role) -> dict:
    ids = torch.tensor(item.input_ids)

    def attempt(fitted: TracingConfig):
        return trace_prompt(
            loaded, item.key, item.plan, ids, fitted, run_id, item.discovery, data_dir
        )

    row = {"prompt_id": item.key.prompt_id, "role": role, "graph_id": item.key.graph_id}
    try:
        traced, fitted = with_memory_fallback(attempt, tracing)
        record = traced.record
        insert_traced(store, traced)
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
        record_failed_graph(store, item.key, item.input_ids, run_id, message)
        row |= {"status": "failed", "error": message}
    release_memory()
    return row


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    picked = "prompts" if params.get("prompt_ids") else params.get("select") or "queue"
    return f"tracing-{picked}-{params.get('targets') or 'config'}"


@flow(name="tracing", flow_run_name=_run_name)
def tracing_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    select: str | None = None,
    targets: str | None = None,
    limit: int | None = None,
    prompt_ids: list[str] | None = None,
) -> dict:
    """Graphs for base and adapted on the selected prompts (`select`/`targets` override config).

    `prompt_ids` names prompts explicitly; otherwise the review queue is read: `reviewed`
    prompts, or every `flagged` one not rejected, highest priority first, at most `limit`.
    """
    config, resolved = load_experiment(config_path, data_dir)
    overrides = {k: v for k, v in (("select", select), ("targets", targets)) if v is not None}
    tracing = TracingConfig.model_validate({**config.tracing.model_dump(), **overrides})
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "prompt_ids": prompt_ids,
        "limit": limit,
        "tracing": tracing.model_dump(mode="json"),
    }
    with recorded_run(store, "flow", "tracing", params, current_flow_run_id()) as run:
        chosen = _choose_prompts(store, tracing, limit, prompt_ids)
        base_id = describe_model(config, "base").model_id
        adapted_id = describe_model(config, "adapted").model_id
        if set(chosen) - scored_prompt_ids(store, base_id, adapted_id):
            # Graphs must read discovery's token ids, so score what has no logits yet.
            score_pending_prompts(config_path, str(resolved), run.run_id)
        rows = []
        try:
            for role in ROLES:
                rows += trace_graphs(config_path, str(resolved), role, chosen, tracing, run.run_id)
                release_models()  # one model in memory at a time: graphs need the room
        finally:
            release_models()
        summary = _summarize(store, chosen, rows, base_id, adapted_id)
        if rows:
            create_table_artifact(
                key="tracing-graphs", table=rows, description="Graphs made or failed by this run"
            )
        create_markdown_artifact(
            key="tracing-summary", markdown=_summary_markdown(summary), description="Tracing"
        )
        run.summary = {"run_id": run.run_id, **summary}
    return run.summary


def _choose_prompts(
    store: Store, tracing: TracingConfig, limit: int | None, prompt_ids: list[str] | None
) -> list[str]:
    if prompt_ids:
        unknown = sorted(set(prompt_ids) - stored_prompt_ids(store))
        if unknown:
            raise ValueError(f"unknown prompt ids: {', '.join(unknown)}")
        chosen = list(dict.fromkeys(prompt_ids))
    else:
        chosen = queued_prompt_ids(store, reviewed_only=tracing.select == "reviewed")
    return chosen[:limit] if limit is not None else chosen


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


def _summary_markdown(summary: dict) -> str:
    lines = [
        f"Prompts: {summary['prompts']}; graphs made by this run: {summary['made']}, "
        f"failed: {summary['failed']}.",
        f"All graphs of these prompts: {summary['graphs_ok']} ok, "
        f"{summary['graphs_failed']} failed, {summary['mismatches']} with logits that differ "
        "from discovery.",
    ]
    if summary["mean_replacement"] is not None:
        lines.append(f"Mean replacement score {summary['mean_replacement']:.3f}.")
    if summary["failures"]:
        lines += ["", "| prompt | model | error |", "|---|---|---|"]
        lines += [f"| {f['prompt_id']} | {f['role']} | {f['error']} |" for f in summary["failures"]]
    return "\n".join(lines)
