"""The reviewed label dataset: one row per labelled token, written to Parquet or JSON lines.

DuckDB writes both formats itself (`COPY ... TO`), so pyarrow is not needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import pandas as pd

from emc.store.connection import Store

ExportFormat = Literal["parquet", "jsonl"]
_COPY_FORMAT = {"parquet": "parquet", "jsonl": "json"}  # DuckDB's json is one object per line

# A person's label wins over a judge's; among several of a kind, the newest. The model pair is
# the one of the judgement the label came from, else the prompt's newest judgement. A prompt a
# person rejected (their newest review is a rejection) is no data, unless asked for.
_LABELS_SQL = """
WITH
human AS (
    SELECT * FROM token_labels WHERE starts_with(labeller, 'human:')
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id, token_id ORDER BY created_at DESC, labeller) = 1
),
judge AS (
    SELECT * FROM token_labels WHERE starts_with(labeller, 'judge:')
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id, token_id ORDER BY created_at DESC, labeller) = 1
),
labelled AS (SELECT DISTINCT prompt_id, token_id FROM token_labels),
review AS (
    SELECT * FROM reviews
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id, reviewer ORDER BY created_at DESC, review_id) = 1
),
last_review AS (
    SELECT prompt_id, action FROM reviews
    QUALIFY row_number() OVER (PARTITION BY prompt_id ORDER BY created_at DESC, review_id) = 1
),
newest_judgement AS (
    SELECT * FROM judgements
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id ORDER BY created_at DESC, judgement_id) = 1
)
SELECT
    t.prompt_id,
    p.text AS prompt,
    p.format,
    p.assistant_prefix,
    coalesce(lj.base_model_id, nj.base_model_id) AS base_model_id,
    coalesce(lj.adapted_model_id, nj.adapted_model_id) AS adapted_model_id,
    t.token_id,
    coalesce(h.token, j.token) AS token,
    coalesce(h.label, j.label) AS label,
    coalesce(h.labeller, j.labeller) AS labeller,
    j.label AS judge_label,
    substr(j.labeller, length('judge:') + 1) AS judge_model,
    h.labeller AS reviewer,
    r.action AS review_action,
    coalesce(h.explanation, r.explanation) AS explanation
FROM labelled t
JOIN prompts p USING (prompt_id)
LEFT JOIN human h ON h.prompt_id = t.prompt_id AND h.token_id = t.token_id
LEFT JOIN judge j ON j.prompt_id = t.prompt_id AND j.token_id = t.token_id
LEFT JOIN review r ON r.prompt_id = t.prompt_id AND r.reviewer = h.labeller
LEFT JOIN judgements lj ON lj.judgement_id = coalesce(h.judgement_id, j.judgement_id)
LEFT JOIN newest_judgement nj ON nj.prompt_id = t.prompt_id
LEFT JOIN last_review x ON x.prompt_id = t.prompt_id
WHERE ? OR x.action IS DISTINCT FROM 'reject'
ORDER BY t.prompt_id, t.token_id
"""


def labelled_tokens(store: Store, include_rejected: bool = False) -> pd.DataFrame:
    with store.read() as conn:
        return conn.execute(_LABELS_SQL, [include_rejected]).df()


def write_labelled_tokens(
    store: Store, path: Path, file_format: ExportFormat, include_rejected: bool = False
) -> int:
    """Write the dataset to `path`; returns how many rows were written."""
    query = f"COPY ({_LABELS_SQL}) TO ? (FORMAT {_COPY_FORMAT[file_format]})"
    with store.read() as conn:
        return conn.execute(query, [include_rejected, str(path)]).fetchone()[0]
