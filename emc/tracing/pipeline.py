"""One prompt, one model: targets, attribution, rows, scores, agreement and side file.

The flow calls this per prompt and writes the result with `emc.store.graphs.insert_graph`; a
raised error is the item's failure (the flow stores `GraphRecord.failed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from circuit_tracer.graph import Graph

from emc.config import TracingConfig
from emc.models import LoadedModel
from emc.models.dictionary import dictionary_of
from emc.pivotal.logits import NextTokens
from emc.tracing.agreement import LogitAgreement, logit_agreement
from emc.tracing.attribution import targets_for, trace
from emc.tracing.compact import CompactGraph, compact_graph
from emc.tracing.pruning import node_influence
from emc.tracing.quality import GraphQuality, graph_quality, layer_quality
from emc.tracing.record import GraphKey, GraphRecord
from emc.tracing.sidefile import SideFile, write_side_file
from emc.tracing.targets import TargetPlan


@dataclass(frozen=True)
class TracedPrompt:
    record: GraphRecord
    compact: CompactGraph
    quality: GraphQuality
    agreement: LogitAgreement | None  # None without discovery logits
    side_file: SideFile | None
    effects: pd.DataFrame  # EFFECT_COLUMNS: each kept feature node on each target
    stats: pd.DataFrame  # evil vs safe per (layer, feature), from the plan's labels
    layers: pd.DataFrame  # LAYER_COLUMNS: per-layer feature and error influence


def trace_prompt(
    loaded: LoadedModel,
    key: GraphKey,
    plan: TargetPlan,
    input_ids: torch.Tensor,
    config: TracingConfig,
    run_id: str,
    discovery: NextTokens | None = None,
    data_dir: str | Path | None = None,
) -> TracedPrompt:
    """Trace and compact one graph; the dense graph is not kept (call `release_memory` after).

    Raises TargetError (labels), NonFiniteGraphError / NonFiniteActivationError (NaN/inf) or an
    out-of-memory error (see `is_out_of_memory`).
    """
    if config.keep_raw and data_dir is None:
        raise ValueError("tracing.keep_raw needs a data directory for the side files")
    targets = targets_for(loaded, input_ids, plan)
    graph, seconds = trace(loaded, input_ids, targets, config)
    kind = dictionary_of(loaded).kind
    return summarize_graph(
        graph, seconds, key, plan, config, run_id, discovery, data_dir, loaded.tokenizer, kind
    )


def summarize_graph(
    graph: Graph,
    seconds: float,
    key: GraphKey,
    plan: TargetPlan,
    config: TracingConfig,
    run_id: str,
    discovery: NextTokens | None = None,
    data_dir: str | Path | None = None,
    tokenizer=None,
    transcoder_kind: str = "per_layer",
) -> TracedPrompt:
    """Everything after `attribute`: rows, scores, agreement, side file and the summary record."""
    started = time.perf_counter()
    influence = node_influence(graph)
    compact = compact_graph(
        graph,
        config.node_threshold,
        config.edge_threshold,
        tokenizer,
        influence,
        cross_layer=transcoder_kind == "cross_layer",
    )
    quality = graph_quality(graph, influence)
    layers = layer_quality(graph, influence)
    del influence  # an N x N matrix: free it before the side file's copy of the graph
    # Effects need the dense adjacency, which is gone after this function: compute them now,
    # for the features pruning kept. (Imported here: emc.analysis builds on emc.tracing.)
    from emc.analysis.effects import feature_effects
    from emc.analysis.stats import position_free_stats

    kept = compact.nodes.loc[compact.nodes["kind"] == "feature", "node"]
    effects = feature_effects(graph, kept)
    labels = {t: "evil" for t in plan.evil_ids} | {t: "safe" for t in plan.safe_ids}
    stats = position_free_stats(effects, labels)
    ids = graph.input_tokens.tolist()
    agreement = None
    if discovery is not None:
        agreement = logit_agreement(
            compact.targets, ids, discovery, config.logit_tolerance, plan.components()
        )
    side = None
    if config.keep_raw:
        if data_dir is None:
            raise ValueError("tracing.keep_raw needs a data directory for the side files")
        side = write_side_file(graph, data_dir, key.graph_id)
    kinds = compact.nodes["kind"].value_counts()
    record = GraphRecord(
        **key.model_dump(),
        run_id=run_id,
        input_ids=ids,
        status="ok",
        seconds=seconds,
        storage_seconds=time.perf_counter() - started,
        replacement=quality.replacement,
        completeness=quality.completeness,
        error_score_mean=quality.error_score_mean,
        error_score_ratio=quality.error_score_ratio,
        n_active_features=quality.counts.active_features,
        n_features=quality.counts.features,
        n_errors=quality.counts.errors,
        n_tokens=quality.counts.tokens,
        n_logits=quality.counts.logits,
        kept_features=int(kinds.get("feature", 0)),
        kept_errors=int(kinds.get("error", 0)),
        kept_edges=len(compact.edges),
        logit_mismatch=agreement.max_abs_diff if agreement else None,
        logit_mismatch_exceeds=agreement.exceeds if agreement else None,
        side_file=side.path if side else None,
        side_file_sha256=side.sha256 if side else None,
        side_file_bytes=side.bytes if side else None,
        transcoder_kind=transcoder_kind,
    )
    return TracedPrompt(record, compact, quality, agreement, side, effects, stats, layers)
