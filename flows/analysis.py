"""Analysis: what the fine-tune changed, measured with both models loaded, and checked.

For every prompt with a base/adapted graph pair, one GPU task runs both models on the graph's own
token ids: residual streams per layer (the first layer where they differ; a difference upstream of
the adapter's first layer is a loading error) and every transcoder feature's activation (the
features the fine-tune moved most). A second GPU task zeroes the top-ranked features in the
adapted model at every position and, as a control, as many random active features of the same
layers, and records the harmful-token probability before and after. A CPU task compares the
adapter's output directions with the transcoders. The summary sets the ranking against all three.
Measurements are keyed by prompt and models, so a re-run skips what is done and adds no duplicates.
A prompt that fails a step is stored as failed with its error (the others are still measured),
and a re-run tries it again, replacing the failed row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from emc.analysis.ablation import ablate_features, control_features
from emc.analysis.forward_diff import (
    activation_deltas,
    adapter_layers,
    compare_forward,
    default_tolerance,
    feature_activations,
    residual_states,
)
from emc.analysis.ground_truth import compare_with_ground_truth
from emc.analysis.lora_geometry import alignment_histogram, lora_geometry_for
from emc.config import load_experiment
from emc.events import ANALYSIS_COMPLETED
from emc.models import describe_model
from emc.models.factory import resolve_adapter_dir
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.analysis import (
    AblationFailure,
    AblationRecord,
    ablation_results,
    activation_delta_summary,
    insert_ablations,
    lora_features,
    measured_prompt_ids,
    record_failed_ablations,
    record_failed_forward,
    replace_forward_measurement,
    replace_lora_geometry,
)
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import layer_diff_summary
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import list_graphs
from emc.tracing import release_memory
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.parameters import AnalysisParameters, takes
from flows.reporting import feature_link, id_list, prompt_links, rounded, rounded_rows
from flows.runtime import announce, current_flow_run_id, deployment_data_dir, gpu_slot

Feature = tuple[int, int]


@dataclass(frozen=True)
class PromptInputs:
    """What the analysis of one prompt needs: the graphs' token ids and their labelled targets."""

    prompt_id: str
    input_ids: list[int]
    evil_ids: list[int]
    safe_ids: list[int]


def analysis_inputs(
    store: Store, base_model_id: str, adapted_model_id: str, prompt_ids: list[str] | None = None
) -> list[PromptInputs]:
    """One entry per prompt with a current graph pair of these models (its newest adapted graph).

    Stale pairs (traced for labels since changed) are skipped, and so are rejected prompts
    unless named in `prompt_ids`.
    """
    pairs = graph_pairs(store, base_model_id=base_model_id, adapted_model_id=adapted_model_id)
    graphs = {g.graph_id: g for g in list_graphs(store, adapted_model_id)}
    wanted = set(prompt_ids) if prompt_ids else None
    inputs: dict[str, PromptInputs] = {}
    for pair in pairs:  # current before stale, newest first: the first pair of a prompt wins
        if pair.prompt_id in inputs or (wanted is not None and pair.prompt_id not in wanted):
            continue
        if pair.stale or (pair.rejected and wanted is None):
            continue
        graph = graphs[pair.adapted_graph_id]
        inputs[pair.prompt_id] = PromptInputs(
            prompt_id=pair.prompt_id,
            input_ids=list(graph.input_ids),
            evil_ids=list(graph.params.get("evil_ids", [])),
            safe_ids=list(graph.params.get("safe_ids", [])),
        )
    return list(inputs.values())


@task(task_run_name="forward-diffs-{n_prompts}-prompts", **RETRIES)
def measure_forward(
    config_path: str | None,
    data_dir: str,
    prompts: list[PromptInputs],
    n_prompts: int,
    run_id: str,
    top_deltas: int = 50,
) -> list[dict]:
    """Residual-stream differences and activation deltas; one model in memory at a time."""
    logger = get_run_logger()
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    layers = adapter_layers(resolve_adapter_dir(config))
    captured: dict[str, tuple[torch.Tensor, torch.Tensor] | str] = {}
    progress = create_progress_artifact(
        progress=0.0, key="analysis-forward", description="forward passes, base then adapted"
    )
    rows = []
    with gpu_slot():
        base = cached_model(config, "base")
        upsert_model(store, base.identity.to_row(first_run_id=run_id))
        for index, item in enumerate(prompts, start=1):
            captured[item.prompt_id] = _capture(base, item)
            update_progress_artifact(progress, 50.0 * index / len(prompts))
        base_id, dtype = base.identity.model_id, base.precision.dtype_name
        release_models()
        adapted = cached_model(config, "adapted")
        upsert_model(store, adapted.identity.to_row(first_run_id=run_id))
        adapted_id = adapted.identity.model_id
        tolerance = default_tolerance(dtype)
        for index, item in enumerate(prompts, start=1):
            base_side, adapted_side = captured.pop(item.prompt_id), _capture(adapted, item)
            row = {"prompt_id": item.prompt_id}
            failed = next((s for s in (base_side, adapted_side) if isinstance(s, str)), None)
            if failed is not None:
                record_failed_forward(store, item.prompt_id, base_id, adapted_id, run_id, failed)
                rows.append(row | {"status": "failed", "error": failed})
                logger.warning("prompt %s: %s", item.prompt_id, failed)
                continue
            diff = compare_forward(base_side[0], adapted_side[0], layers, tolerance)
            deltas = activation_deltas(
                base_side[1].to_dense(), adapted_side[1].to_dense(), top_deltas
            )
            forward = pd.DataFrame([layer.model_dump() for layer in diff.layers])
            ids = (item.prompt_id, base_id, adapted_id)
            replace_forward_measurement(store, *ids, run_id, forward, deltas, tolerance, dtype)
            rows.append(
                row
                | {
                    "status": "ok",
                    "first_divergent_layer": diff.first_divergent_layer,
                    "first_adapter_layer": diff.first_adapter_layer,
                    "loading_error": diff.loading_error,
                    "error": diff.message if diff.loading_error else None,
                }
            )
            if diff.loading_error:
                logger.error("prompt %s: %s", item.prompt_id, diff.message)
            else:
                logger.info(
                    "forward %d/%d, prompt %s: first divergent layer %s", index, len(prompts),
                    item.prompt_id, diff.first_divergent_layer,
                )  # fmt: skip
            update_progress_artifact(progress, 50.0 + 50.0 * index / len(prompts))
        release_models()
    return rows


def _capture(loaded, item: PromptInputs) -> tuple[torch.Tensor, torch.Tensor] | str:
    """Residual states and (sparse, to keep many prompts in memory) feature activations."""
    ids = torch.tensor(item.input_ids)
    try:
        states = residual_states(loaded, ids)
        activations = feature_activations(loaded, ids).to_sparse()
    except Exception as exc:  # a NaN/inf or a model error fails this prompt, not the run
        return f"{type(exc).__name__}: {exc}"
    finally:
        release_memory()
    return states, activations


@task(task_run_name="ablate-top-{k}", **RETRIES)
def ablate_top_features(
    config_path: str | None,
    data_dir: str,
    prompts: list[PromptInputs],
    features: list[Feature],
    k: int,
    metric: str,
    run_id: str,
    seed: int = 0,
) -> list[dict]:
    """Zero the ranked features (and a matched random control) in the adapted model.

    One row per prompt and kind; a prompt that fails is stored as one failed row instead of its
    two ablations (a top without its control would compare unmatched prompts).
    """
    logger = get_run_logger()
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    labelled = [p for p in prompts if p.evil_ids]
    unlabelled = [p.prompt_id for p in prompts if not p.evil_ids]
    if unlabelled:
        logger.info("%d prompt(s) without evil targets, not ablated: %s", len(unlabelled),
                    id_list(unlabelled))  # fmt: skip
    logger.info("ablating the top %d feature(s) in %d prompt(s)", len(features), len(labelled))
    rows, records, failures = [], [], []
    with gpu_slot():
        adapted = cached_model(config, "adapted")
        model_id, dtype = adapted.identity.model_id, adapted.precision.dtype_name
        for index, item in enumerate(labelled, start=1):
            try:
                results = _ablate_prompt(adapted, item, features, seed)
            except AblationFailed as failed:
                failure = failed.record(item.prompt_id, model_id, metric, run_id, dtype)
                failures.append(failure)
                shown = failure.model_dump(include={"prompt_id", "kind", "error"})
                rows.append(shown | {"status": "failed"})
                logger.warning("prompt %s, %s ablation: %s", item.prompt_id, failed.kind, failed)
            else:
                for kind, result in results.items():
                    records.append(
                        _ablation_record(result, item, model_id, kind, metric, run_id, dtype)
                    )
                    rows.append(_ablation_row(item.prompt_id, kind, result))
                top, control = results["top"], results["control"]
                logger.info(
                    "ablation %d/%d, prompt %s: p(evil) %.3f -> %.3f (top), -> %.3f (control)",
                    index, len(labelled), item.prompt_id, top.evil_prob_before,
                    top.evil_prob_after, control.evil_prob_after,
                )  # fmt: skip
            release_memory()
        release_models()
    insert_ablations(store, records)
    record_failed_ablations(store, failures)
    return rows


class AblationFailed(Exception):
    """A prompt's ablation raised while measuring `kind`, which was to zero `features`."""

    def __init__(self, kind: str, features: list[Feature], error: str) -> None:
        super().__init__(error)
        self.kind, self.features, self.error = kind, features, error

    def record(self, prompt_id, model_id, metric, run_id, dtype) -> AblationFailure:
        """The stored row: one per prompt, in place of its top and control ablations."""
        return AblationFailure(
            run_id=run_id,
            prompt_id=prompt_id,
            model_id=model_id,
            kind=self.kind,
            metric=metric,
            features=[{"layer": layer, "feature": feature} for layer, feature in self.features],
            dtype=dtype,
            error=self.error,
        )


def _ablate_prompt(adapted, item: PromptInputs, features: list[Feature], seed: int) -> dict:
    """{"top": Ablation, "control": Ablation} for one prompt, or AblationFailed."""
    ids = torch.tensor(item.input_ids)
    targets = {t: "evil" for t in item.evil_ids} | {t: "safe" for t in item.safe_ids}
    stage: tuple[str, list[Feature]] = ("control", [])  # its features are chosen first
    results = {}
    try:
        activations = feature_activations(adapted, ids)
        control = control_features(activations, features, set(features), seed=seed)
        for kind, chosen in (("top", features), ("control", control)):
            stage = (kind, chosen)
            results[kind] = ablate_features(adapted, ids, chosen, targets)
    except Exception as exc:  # this prompt fails; the others are still measured
        raise AblationFailed(*stage, f"{type(exc).__name__}: {exc}") from exc
    return results


def _ablation_row(prompt_id: str, kind: str, result) -> dict:
    return {
        "prompt_id": prompt_id,
        "kind": kind,
        "status": "ok",
        "n_interventions": result.n_interventions,
        "evil_prob_before": result.evil_prob_before,
        "evil_prob_after": result.evil_prob_after,
    }


def _ablation_record(
    result, item: PromptInputs, model_id, kind, metric, run_id, dtype
) -> AblationRecord:
    return AblationRecord(
        run_id=run_id,
        prompt_id=item.prompt_id,
        model_id=model_id,
        kind=kind,
        metric=metric,
        features=[f.model_dump() for f in result.features],
        n_interventions=result.n_interventions,
        evil_prob_before=result.evil_prob_before,
        evil_prob_after=result.evil_prob_after,
        safe_prob_before=result.safe_prob_before,
        safe_prob_after=result.safe_prob_after,
        evil_share_before=result.evil_share_before,
        evil_share_after=result.evil_share_after,
        logit_gap_before=result.logit_gap_before,
        logit_gap_after=result.logit_gap_after,
        dtype=dtype,
    )


@task(task_run_name="lora-geometry", **RETRIES)
def measure_lora_geometry(
    config_path: str | None, data_dir: str, adapted_model_id: str, run_id: str, n_null: int
) -> dict:
    """The adapter's output directions against the transcoders (CPU; no model is loaded)."""
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    geometry = lora_geometry_for(config, top=10, n_null=n_null)
    histograms = {
        (h.module, h.direction, h.compared_with, h.layer): h
        for h in alignment_histogram(geometry, bins=40)
    }
    comparisons = geometry.comparisons.copy()
    keys = list(
        zip(
            comparisons["module"],
            comparisons["direction"],
            comparisons["compared_with"],
            comparisons["layer"],
            strict=True,
        )
    )
    comparisons["hist_edges"] = [histograms[k].edges.tolist() for k in keys]
    comparisons["hist_counts"] = [histograms[k].counts.astype(int).tolist() for k in keys]
    comparisons["hist_chance"] = [histograms[k].chance_counts.tolist() for k in keys]
    replace_lora_geometry(store, adapted_model_id, run_id, comparisons, geometry.features)
    above = int((comparisons["null_percentile"] >= 99).sum())
    return {"comparisons": len(comparisons), "beyond_q99": above}


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    picked = "prompts" if params.get("prompt_ids") else "all-pairs"
    return f"analysis-{picked}-top{params.get('ablate_top', 5)}"


@flow(name="analysis", flow_run_name=_run_name)
@takes(AnalysisParameters)
def analysis_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    prompt_ids: list[str] | None = None,
    metric: str = "total_diff",
    ablate_top: int = 5,
    lora_null: int = 500,
    redo: bool = False,
) -> dict:
    """Forward-pass diffs, activation deltas, ablation of the top features, LoRA geometry.

    Works on every prompt with a base/adapted graph pair (or the named ones). `redo` measures
    prompts again that already have forward diffs; ablations and geometry always run again
    (they depend on the current ranking and are cheap).
    """
    data_dir = deployment_data_dir(data_dir)
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    config, resolved = load_experiment(config_path, data_dir)
    if config.models.adapter is None:
        raise ValueError("the config names no adapter (models.adapter): nothing to analyse")
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "prompt_ids": prompt_ids,
        "metric": metric,
        "ablate_top": ablate_top,
        "lora_null": lora_null,
        "redo": redo,
    }
    with recorded_run(store, "flow", "analysis", params, current_flow_run_id()) as run:
        base_id = describe_model(config, "base").model_id
        adapted_id = describe_model(config, "adapted").model_id
        inputs = analysis_inputs(store, base_id, adapted_id, prompt_ids)
        done = set() if redo else measured_prompt_ids(store, base_id, adapted_id)
        pending = [p for p in inputs if p.prompt_id not in done]
        _log_selection(prompt_ids, inputs, pending)
        forward_rows = []
        try:
            if pending:
                forward_rows = measure_forward(
                    config_path, str(resolved), pending, len(pending), run.run_id
                )
            ranking = feature_ranking(store, metric, model_id=adapted_id, sign="evil", top=None)
            top = [(int(r.layer), int(r.feature)) for r in ranking.head(ablate_top).itertuples()]
            ablation_rows = []
            if top and inputs:
                get_run_logger().info(
                    "ranking by %s: %d evil-pushing feature(s); top %d: %s", metric, len(ranking),
                    len(top), ", ".join(f"L{layer}/{feature}" for layer, feature in top),
                )  # fmt: skip
                ablation_rows = ablate_top_features(
                    config_path, str(resolved), inputs, top, len(top), metric, run.run_id
                )
            elif inputs:
                get_run_logger().info("no ablation: no evil-pushing feature ranked yet")
        finally:
            release_models()
        geometry = measure_lora_geometry(
            config_path, str(resolved), adapted_id, run.run_id, lora_null
        )
        summary = _summarize(store, inputs, forward_rows, ablation_rows, ranking, base_id,
                             adapted_id, metric, ablate_top, geometry)  # fmt: skip
        _log_outcome(summary)
        _publish(summary, ranking, forward_rows)
        run.summary = {"run_id": run.run_id, **summary}
    if inputs:
        prompt_ids = sorted({item.prompt_id for item in inputs})
        announce(ANALYSIS_COMPLETED, resolved, {"run_id": run.run_id, "prompt_ids": prompt_ids})
    return run.summary


def _log_selection(
    prompt_ids: list[str] | None, inputs: list[PromptInputs], pending: list[PromptInputs]
) -> None:
    """What the run works on: the prompts with a current graph pair, those measured before."""
    logger = get_run_logger()
    found = [p.prompt_id for p in inputs]
    missing = [p for p in dict.fromkeys(prompt_ids or []) if p not in set(found)]
    if missing:
        logger.warning(
            "%d named prompt(s) skipped, no current graph pair (`emc trace` them): %s",
            len(missing), id_list(missing),
        )  # fmt: skip
    if not inputs:
        logger.info("nothing to analyse: no prompt has a current graph pair; run `emc trace`")
        return
    logger.info("%d prompt(s) with a current graph pair: %s", len(found), id_list(found))
    if len(inputs) > len(pending):
        logger.info(
            "forward diffs: %d prompt(s) measured before, skipped (`emc analyze --redo` to redo)",
            len(inputs) - len(pending),
        )  # fmt: skip
    if pending:
        logger.info("forward diffs: measuring %d prompt(s)", len(pending))


def _log_outcome(summary: dict) -> None:
    get_run_logger().info(
        "analysis done: %d prompt(s) measured now, %d failed, %d ablated; LoRA: %d of %d "
        "comparison(s) beyond the null's 99th percentile",
        summary["measured"], len({f["prompt_id"] for f in summary["failed"]}),
        summary["ablated_prompts"], summary["lora_beyond_q99"], summary["lora_comparisons"],
    )  # fmt: skip


def _summarize(
    store, inputs, forward_rows, ablation_rows, ranking, base_id, adapted_id, metric, k, geometry
) -> dict:
    ablations = ablation_results(store, adapted_id)
    ablations = ablations[ablations["metric"] == metric]
    truth = compare_with_ground_truth(
        ranking,
        activation_delta_summary(store, base_id, adapted_id),
        lora_features(store, adapted_id),
        ablations,
        k=k,
    )
    layers = layer_diff_summary(store, base_id, adapted_id)
    divergent = layers.loc[layers["diverged"] > 0, "layer"]
    a = truth.ablation
    causal = _causal(store, base_id, adapted_id)
    failed = _failures(forward_rows, ablation_rows)
    worked_on = {r["prompt_id"] for r in forward_rows} | {r["prompt_id"] for r in ablation_rows}
    ablated = {r["prompt_id"] for r in ablation_rows if r["status"] == "ok"}
    return {
        "prompts": len(inputs),
        "measured": sum(r["status"] == "ok" for r in forward_rows),
        "failed": failed,
        "done": len(worked_on - {f["prompt_id"] for f in failed}),
        "loading_errors": int(layers["loading_errors"].max()) if len(layers) else 0,
        "first_divergent_layer": int(divergent.min()) if len(divergent) else None,
        "ablated_prompts": len(ablated),
        "top_features": [list(f) for f in truth.top],
        "overlap_changed": len(truth.overlap_changed),
        "expected_overlap": truth.expected_overlap,
        "overlap_lora": len(truth.overlap_lora),
        "lora_aligned": len(truth.lora_aligned),
        "lora_comparisons": geometry["comparisons"],
        "lora_beyond_q99": geometry["beyond_q99"],
        "ablation_top_change": a.top_mean_change if a else None,
        "ablation_control_change": a.control_mean_change if a else None,
        "ablation_top_lowered": a.top_lowered if a else None,
        "ablation_top_gap_change": a.top_mean_gap_change if a else None,
        "ablation_control_gap_change": a.control_mean_gap_change if a else None,
        "ground_truth": truth.markdown() + causal,
    }


def _failures(forward_rows: list[dict], ablation_rows: list[dict]) -> list[dict]:
    """This run's failed items (each also stored as a failed row): prompt_id, step, error."""
    forward = [
        {"prompt_id": r["prompt_id"], "step": "forward", "error": r["error"]}
        for r in forward_rows
        if r["status"] == "failed"
    ]
    ablation = [
        {"prompt_id": r["prompt_id"], "step": f"ablation ({r['kind']})", "error": r["error"]}
        for r in ablation_rows
        if r["status"] == "failed"
    ]
    return forward + ablation


def _causal(store, base_id: str, adapted_id: str) -> str:
    """The causal checks' headline for the ground-truth summary, once `emc patch` / `emc
    intervene` have measured this pair (the pipeline runs them after the analysis)."""
    from emc.analysis.causal_report import headline, summarize_causal
    from emc.store.interventions import (
        explained_per_prompt,
        intervention_summary,
        rollout_summary,
    )

    summary = summarize_causal(
        explained_per_prompt(store, base_id, adapted_id),
        intervention_summary(store, None, base_id, adapted_id),
        rollout_summary(store, base_id, adapted_id),
    )
    lines = headline(summary)
    if not lines:
        return "\n- Causal checks: none yet (`emc patch`, `emc intervene`)."
    return "\n" + "\n".join(
        f"- Causal checks: {line.strip()}" if i == 0 else f"  {line.strip()}"
        for i, line in enumerate(lines)
    )


def _publish(summary: dict, ranking: pd.DataFrame, forward_rows: Sequence[dict] = ()) -> None:
    failed = [
        f"- {f['prompt_id']} {f['step']}: {f['error']} ({prompt_links(f['prompt_id'])})"
        for f in summary["failed"]
    ]
    lines = [
        f"Prompts with graph pairs: {summary['prompts']}; measured now: {summary['measured']}, "
        f"failed: {len({f['prompt_id'] for f in summary['failed']})}.",
        *failed,
        f"First layer where base and adapted differ: {summary['first_divergent_layer']}; "
        f"prompts with a loading error: {summary['loading_errors']}.",
        "",
        summary["ground_truth"],
        *_forward_lines(forward_rows),
    ]
    create_markdown_artifact(
        key="analysis-summary", markdown="\n".join(lines), description="Analysis"
    )
    if not ranking.empty:
        shown = ranking.head(30)[["rank", "layer", "feature", "prompts", "mean", "mean_t"]]
        rows = rounded_rows(shown)
        for row in rows:
            row["card"] = feature_link(row["layer"], row["feature"])
        create_table_artifact(
            key="analysis-ranking",
            table=rows,
            description="Top features by evil-vs-safe effect in the adapted model",
        )


def _forward_lines(forward_rows: Sequence[dict], shown: int = 30) -> list[str]:
    """This run's forward diffs, a row per prompt (the first `shown`) with its dashboard links."""
    if not forward_rows:
        return []
    lines = [
        "",
        "| prompt | forward diff | first divergent layer | dashboard |",
        "|---|---|---|---|",
    ]
    for row in forward_rows[:shown]:
        status = row.get("error") or row["status"]
        layer = rounded(row.get("first_divergent_layer"))
        lines.append(
            f"| {row['prompt_id']} | {status} | {layer} | {prompt_links(row['prompt_id'])} |"
        )
    if len(forward_rows) > shown:
        lines.append(f"\n…and {len(forward_rows) - shown} more prompts.")
    return lines
