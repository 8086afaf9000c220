"""A graph's identity and its summary row: what the store's `graphs` table holds per graph."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel

from emc.config import TracingConfig
from emc.tracing.targets import TargetPlan, TargetsMode


class GraphKey(BaseModel):
    """Everything that decides a graph's content; `graph_id` is its hash.

    Labelled token ids are part of it, so relabelling a prompt makes a new graph instead of
    silently keeping one that explains other tokens. Batch size and offloading are not: they
    change memory, not results.
    """

    graph_id: str
    prompt_id: str
    model_id: str
    targets: TargetsMode
    params: dict[str, Any]


def graph_key(prompt_id: str, model_id: str, plan: TargetPlan, config: TracingConfig) -> GraphKey:
    params = {
        **plan.params(),
        "max_feature_nodes": config.max_feature_nodes,
        "node_threshold": config.node_threshold,
        "edge_threshold": config.edge_threshold,
    }
    identity = {"prompt_id": prompt_id, "model_id": model_id, "targets": plan.mode, **params}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    return GraphKey(
        graph_id=digest[:16],
        prompt_id=prompt_id,
        model_id=model_id,
        targets=plan.mode,
        params=params,
    )


class GraphRecord(BaseModel):
    """One graph's row in `graphs`; a failed graph has status failed, an error and no numbers."""

    graph_id: str
    prompt_id: str
    model_id: str
    run_id: str
    targets: TargetsMode
    params: dict[str, Any]
    input_ids: list[int]
    status: Literal["ok", "failed"]
    error: str | None = None
    seconds: float | None = None  # circuit-tracer's attribute()
    storage_seconds: float | None = None  # pruning, scores, rows, side file and database write
    replacement: float | None = None
    completeness: float | None = None
    error_score_mean: float | None = None
    error_score_ratio: float | None = None
    n_active_features: int | None = None
    n_features: int | None = None
    n_errors: int | None = None
    n_tokens: int | None = None
    n_logits: int | None = None
    kept_features: int | None = None
    kept_errors: int | None = None
    kept_edges: int | None = None
    logit_mismatch: float | None = None  # max |graph prob - discovery prob|
    logit_mismatch_exceeds: bool | None = None  # None: no discovery logits to compare with
    side_file: str | None = None  # relative to the data directory
    side_file_sha256: str | None = None
    side_file_bytes: int | None = None
    transcoder_kind: str | None = None  # per_layer | cross_layer
    created_at: datetime | None = None  # set by the store

    @classmethod
    def failed(cls, key: GraphKey, input_ids: list[int], run_id: str, error: str) -> GraphRecord:
        return cls(
            **key.model_dump(), input_ids=input_ids, run_id=run_id, status="failed", error=error
        )
