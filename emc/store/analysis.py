"""What the analysis flow measures with the models loaded: forward-pass differences, activation
deltas, ablations, and the adapter's geometry against the transcoders.

Rows are keyed by prompt and model ids, so a re-run replaces a prompt's measurements instead of
adding duplicates; every row names the run that made it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Literal

import pandas as pd
from pydantic import BaseModel

from emc.store.connection import Store
from emc.store.frames import append_frame, insert_frame

FORWARD_COLUMNS = ("layer", "rel_diff", "max_abs_diff", "upstream_of_adapter", "diverged")
DELTA_COLUMNS = (
    "layer",
    "feature",
    "base_activation",
    "adapted_activation",
    "delta",
    "base_positions",
    "adapted_positions",
)
_MODELS_KEY = ["prompt_id", "base_model_id", "adapted_model_id"]


class AblationRecord(BaseModel):
    """One ablation: a set of features zeroed at every position of one prompt, in one model."""

    run_id: str
    prompt_id: str
    model_id: str
    kind: Literal["top", "control"]
    metric: str
    features: list[dict]  # {layer, feature, positions_active}
    n_interventions: int
    evil_prob_before: float
    evil_prob_after: float
    safe_prob_before: float
    safe_prob_after: float
    evil_share_before: float | None
    evil_share_after: float | None
    logit_gap_before: float | None
    logit_gap_after: float | None
    dtype: str

    @property
    def ablation_id(self) -> str:
        """One ablation per prompt, model, kind and ranking metric: a re-run replaces it, also
        when the ranking's top features have changed since (the old ones are then stale)."""
        identity = [self.prompt_id, self.model_id, self.kind, self.metric]
        return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]


def replace_forward_diffs(
    store: Store,
    prompt_id: str,
    base_model_id: str,
    adapted_model_id: str,
    run_id: str,
    rows: pd.DataFrame,
    tolerance: float,
    dtype: str,
) -> None:
    """A prompt's per-layer forward differences (FORWARD_COLUMNS), replacing earlier ones."""
    ids = (prompt_id, base_model_id, adapted_model_id)
    constants = {"run_id": run_id, "tolerance": tolerance, "dtype": dtype}
    replace_prompt_rows(store, "forward_diffs", rows, FORWARD_COLUMNS, ids, **constants)


def replace_activation_deltas(
    store: Store,
    prompt_id: str,
    base_model_id: str,
    adapted_model_id: str,
    run_id: str,
    deltas: pd.DataFrame,
) -> None:
    """A prompt's activation deltas (DELTA_COLUMNS), replacing earlier ones."""
    ids = (prompt_id, base_model_id, adapted_model_id)
    replace_prompt_rows(store, "activation_deltas", deltas, DELTA_COLUMNS, ids, run_id=run_id)


def measured_prompt_ids(store: Store, base_model_id: str, adapted_model_id: str) -> set[str]:
    """Prompts whose forward differences are stored for these models (a re-run skips them)."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT DISTINCT prompt_id FROM forward_diffs "
            "WHERE base_model_id = ? AND adapted_model_id = ?",
            [base_model_id, adapted_model_id],
        ).fetchall()
    return {r[0] for r in rows}


def activation_delta_summary(
    store: Store, base_model_id: str, adapted_model_id: str, top: int | None = None
) -> pd.DataFrame:
    """Per (layer, feature), over the measured prompts: which features the fine-tune moved most.

    Each prompt stores only its largest deltas per layer, so a feature absent from a prompt's
    rows moved little there and counts as 0 in the means. Columns: rank, layer, feature,
    prompts (where stored), mean_delta, mean_abs_delta, measured (prompts measured at all).
    """
    sql = """
        WITH measured AS (
            SELECT count(DISTINCT prompt_id) AS n FROM forward_diffs
            WHERE base_model_id = ? AND adapted_model_id = ?
        ),
        per_feature AS (
            SELECT layer, feature, count(*) AS prompts,
                   sum(delta) / any_value(m.n) AS mean_delta,
                   sum(abs(delta)) / any_value(m.n) AS mean_abs_delta,
                   any_value(m.n) AS measured
            FROM activation_deltas, measured m
            WHERE base_model_id = ? AND adapted_model_id = ? AND m.n > 0
            GROUP BY layer, feature
        )
        SELECT row_number() OVER (ORDER BY mean_abs_delta DESC, layer, feature) AS rank, *
        FROM per_feature ORDER BY rank
    """
    ids = [base_model_id, adapted_model_id]
    with store.read() as conn:
        frame = conn.execute(sql + (" LIMIT ?" if top else ""), ids * 2 + ([top] if top else []))
        return frame.df()


def insert_ablations(store: Store, records: Sequence[AblationRecord]) -> None:
    """Store ablations; one with the same prompt, model, kind and metric is replaced."""
    if not records:
        return
    frame = pd.DataFrame(
        [
            {"ablation_id": r.ablation_id, **r.model_dump(), "features": json.dumps(r.features)}
            for r in records
        ]
    )
    with store.write() as conn:
        insert_frame(conn, "ablations", frame, ["ablation_id"], update=True)


def ablation_results(store: Store, model_id: str | None = None) -> pd.DataFrame:
    """Every stored ablation, one row each, with the change in evil probability and share."""
    where, params = ("WHERE model_id = ?", [model_id]) if model_id else ("", [])
    with store.read() as conn:
        return conn.execute(
            "SELECT prompt_id, model_id, kind, metric, features, n_interventions, "
            "evil_prob_before, evil_prob_after, evil_prob_after - evil_prob_before "
            "AS evil_prob_change, evil_share_before, evil_share_after, "
            "evil_share_after - evil_share_before AS evil_share_change, "
            "logit_gap_before, logit_gap_after, logit_gap_after - logit_gap_before "
            "AS logit_gap_change, safe_prob_before, safe_prob_after, dtype, "
            f"run_id, created_at FROM ablations {where} ORDER BY prompt_id, kind DESC",
            params,
        ).df()


def replace_lora_geometry(
    store: Store,
    adapter_model_id: str,
    run_id: str,
    comparisons: pd.DataFrame,
    features: pd.DataFrame,
) -> None:
    """An adapter's comparisons (with histogram columns) and top features, replacing earlier."""
    with store.write() as conn:
        for table in ("lora_comparisons", "lora_features"):
            conn.execute(f"DELETE FROM {table} WHERE adapter_model_id = ?", [adapter_model_id])
        for table, frame in (("lora_comparisons", comparisons), ("lora_features", features)):
            if frame.empty:
                continue
            rows = frame.assign(adapter_model_id=adapter_model_id, run_id=run_id)
            stored = _table_columns(conn, table)
            append_frame(conn, table, rows[[c for c in rows.columns if c in stored]])


def lora_comparisons(store: Store, adapter_model_id: str | None = None) -> pd.DataFrame:
    """Stored comparisons, least-chance-like first (null_percentile descending)."""
    order = "null_percentile DESC, best_cosine DESC, module, direction"
    return _lora_rows(store, "lora_comparisons", adapter_model_id, order)


def lora_features(store: Store, adapter_model_id: str | None = None) -> pd.DataFrame:
    """Stored top-aligned features per comparison."""
    order = "module, direction, compared_with, layer, abs_rank"
    return _lora_rows(store, "lora_features", adapter_model_id, order)


def _lora_rows(store: Store, table: str, adapter_model_id: str | None, order: str) -> pd.DataFrame:
    where, params = "", []
    if adapter_model_id is not None:
        where, params = "WHERE adapter_model_id = ?", [adapter_model_id]
    with store.read() as conn:
        return conn.execute(f"SELECT * FROM {table} {where} ORDER BY {order}", params).df()


def _table_columns(conn, table: str) -> set[str]:
    rows = conn.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
    ).fetchall()
    return {r[0] for r in rows}


def replace_prompt_rows(
    store: Store,
    table: str,
    rows: pd.DataFrame,
    columns: Sequence[str],
    ids: tuple[str, str, str],
    scope: dict[str, object] | None = None,
    **constants: object,
) -> None:
    """Replace one prompt and model pair's rows of `table` with `rows` plus the constant columns.

    `ids` are the (prompt, base model, adapted model) the rows belong to; `scope` narrows what
    is replaced to rows with these column values (and sets them on the new rows).
    """
    _check(rows, columns, table)
    keys = dict(zip(_MODELS_KEY, ids, strict=True)) | (scope or {})
    frame = rows[list(columns)].assign(**keys, **constants)
    with store.write() as conn:
        where = " AND ".join(f"{k} = ?" for k in keys)
        conn.execute(f"DELETE FROM {table} WHERE {where}", list(keys.values()))
        append_frame(conn, table, frame)


def _check(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} rows lack columns {missing}")
