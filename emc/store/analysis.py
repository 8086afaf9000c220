"""What the analysis flow measures with the models loaded: forward-pass differences, activation
deltas, ablations, and the adapter's geometry against the transcoders.

Rows are keyed by prompt and model ids, so a re-run replaces a prompt's measurements instead of
adding duplicates; every row names the run that made it. A prompt whose measurement failed keeps
one row with status 'failed' and the error in its place (like a failed graph), so the failure is
visible to SQL; readers of numbers take `status = 'ok'` rows only, and a re-run replaces it.
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
_MODELS_WHERE = " AND ".join(f"{k} = ?" for k in _MODELS_KEY)


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
        return ablation_id(self.prompt_id, self.model_id, self.kind, self.metric)


class AblationFailure(BaseModel):
    """A prompt's ablation that raised: `kind` is the one being measured (choosing the control's
    features counts as control), `features` what it was to zero ([] if not chosen yet)."""

    run_id: str
    prompt_id: str
    model_id: str
    kind: Literal["top", "control"]
    metric: str
    features: list[dict]  # {layer, feature}
    dtype: str
    error: str

    @property
    def ablation_id(self) -> str:
        return ablation_id(self.prompt_id, self.model_id, self.kind, self.metric)


def ablation_id(prompt_id: str, model_id: str, kind: str, metric: str) -> str:
    """One ablation per prompt, model, kind and ranking metric: a re-run replaces it, also when
    the ranking's top features have changed since (the old ones are then stale)."""
    identity = [prompt_id, model_id, kind, metric]
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


def replace_forward_measurement(
    store: Store,
    prompt_id: str,
    base_model_id: str,
    adapted_model_id: str,
    run_id: str,
    forward: pd.DataFrame,
    deltas: pd.DataFrame,
    tolerance: float,
    dtype: str,
) -> None:
    """A prompt's forward differences and activation deltas, in one transaction: a prompt with
    forward rows counts as measured (a re-run skips it), so it must never lack its deltas."""
    ids = (prompt_id, base_model_id, adapted_model_id)
    constants = {"run_id": run_id, "tolerance": tolerance, "dtype": dtype}
    with store.write() as conn:
        _replace_rows(conn, "forward_diffs", forward, FORWARD_COLUMNS, ids, **constants)
        _replace_rows(conn, "activation_deltas", deltas, DELTA_COLUMNS, ids, run_id=run_id)


def record_failed_forward(
    store: Store, prompt_id: str, base_model_id: str, adapted_model_id: str, run_id: str, error: str
) -> None:
    """A prompt whose forward passes failed: its earlier forward rows go (so a re-run measures
    it again) and its activation deltas become one failed row with the error."""
    keys = dict(zip(_MODELS_KEY, (prompt_id, base_model_id, adapted_model_id), strict=True))
    failed = pd.DataFrame([keys | {"run_id": run_id, "status": "failed", "error": error}])
    with store.write() as conn:
        for table in ("forward_diffs", "activation_deltas"):
            conn.execute(f"DELETE FROM {table} WHERE {_MODELS_WHERE}", list(keys.values()))
        append_frame(conn, "activation_deltas", failed)


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
            WHERE base_model_id = ? AND adapted_model_id = ? AND m.n > 0 AND status = 'ok'
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
    """Store ablations; one with the same prompt, model, kind and metric is replaced, a failed
    one too (the status and error are written so that the update clears them)."""
    if not records:
        return
    frame = _ablation_frame(records, "ok")
    with store.write() as conn:
        insert_frame(conn, "ablations", frame, ["ablation_id"], update=True)


def record_failed_ablations(store: Store, failures: Sequence[AblationFailure]) -> None:
    """One failed row per prompt, model and metric: the prompt's earlier ablations of both kinds
    go, so top and control are always compared on the same prompts."""
    if not failures:
        return
    frame = _ablation_frame(failures, "failed")
    with store.write() as conn:
        for f in failures:
            conn.execute(
                "DELETE FROM ablations WHERE prompt_id = ? AND model_id = ? AND metric = ?",
                [f.prompt_id, f.model_id, f.metric],
            )
        append_frame(conn, "ablations", frame)


def _ablation_frame(rows: Sequence[AblationRecord | AblationFailure], status: str) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"error": None}
            | {"ablation_id": r.ablation_id, **r.model_dump(), "features": json.dumps(r.features)}
            | {"status": status}
            for r in rows
        ]
    )


def ablation_results(
    store: Store, model_id: str | None = None, include_failed: bool = False
) -> pd.DataFrame:
    """Stored ablations, one row each, with the change in evil probability and share.

    Only the measured ones unless `include_failed` (failed rows have NULL numbers and an error).
    """
    where = ["status = 'ok'"] if not include_failed else []
    params = []
    if model_id:
        where.append("model_id = ?")
        params.append(model_id)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    with store.read() as conn:
        return conn.execute(
            "SELECT prompt_id, model_id, kind, metric, features, n_interventions, "
            "evil_prob_before, evil_prob_after, evil_prob_after - evil_prob_before "
            "AS evil_prob_change, evil_share_before, evil_share_after, "
            "evil_share_after - evil_share_before AS evil_share_change, "
            "logit_gap_before, logit_gap_after, logit_gap_after - logit_gap_before "
            "AS logit_gap_change, safe_prob_before, safe_prob_after, dtype, status, error, "
            f"run_id, created_at FROM ablations {clause} ORDER BY prompt_id, kind DESC",
            params,
        ).df()


def analysis_failures(
    store: Store, adapted_model_id: str | None = None, run_id: str | None = None
) -> pd.DataFrame:
    """The analysis' stored failures: step (forward: the forward passes, so neither forward
    diffs nor activation deltas; ablation), prompt_id, model_id (the adapted model), kind (top
    or control, for ablations), metric, error, run_id."""
    sql = """
        SELECT * FROM (
            SELECT 'forward' AS step, prompt_id, adapted_model_id AS model_id,
                   NULL AS kind, NULL AS metric, error, run_id
            FROM activation_deltas WHERE status = 'failed'
            UNION ALL
            SELECT 'ablation', prompt_id, model_id, kind, metric, error, run_id
            FROM ablations WHERE status = 'failed'
        )
        WHERE (? IS NULL OR model_id = ?) AND (? IS NULL OR run_id = ?)
        ORDER BY step, prompt_id, kind
    """
    with store.read() as conn:
        return conn.execute(sql, [adapted_model_id] * 2 + [run_id] * 2).df()


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
    with store.write() as conn:
        _replace_rows(conn, table, rows, columns, ids, scope, **constants)


def _replace_rows(
    conn,
    table: str,
    rows: pd.DataFrame,
    columns: Sequence[str],
    ids: tuple[str, str, str],
    scope: dict[str, object] | None = None,
    **constants: object,
) -> None:
    _check(rows, columns, table)
    keys = dict(zip(_MODELS_KEY, ids, strict=True)) | (scope or {})
    frame = rows[list(columns)].assign(**keys, **constants)
    where = " AND ".join(f"{k} = ?" for k in keys)
    conn.execute(f"DELETE FROM {table} WHERE {where}", list(keys.values()))
    append_frame(conn, table, frame)


def _check(frame: pd.DataFrame, columns: Sequence[str], name: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{name} rows lack columns {missing}")
