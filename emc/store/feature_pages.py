"""Reads the dashboard's Features page needs beyond the rankings: how many prompts each model's
ranking counts (the N of a feature's k/N prompts), and the target logits of one graph (the
Base-vs-adapted path view's target picker).
"""

from __future__ import annotations

import pandas as pd

from emc.store.connection import Store
from emc.store.features import LATEST_GRAPHS, RANKING_METRICS


def ranked_prompts(store: Store, metric: str = "total_diff") -> dict[str, int]:
    """Per model: the prompts its ranking by `metric` counts, those whose counted graph has the
    metric defined for at least one feature (what a feature's `prompts` can be out of)."""
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    sql = f"""
        WITH latest AS ({LATEST_GRAPHS})
        SELECT lg.model_id, count(DISTINCT lg.prompt_id) AS prompts
        FROM latest lg
        WHERE EXISTS (
            SELECT 1 FROM feature_stats s
            WHERE s.graph_id = lg.graph_id AND s.{metric} IS NOT NULL AND isfinite(s.{metric})
        )
        GROUP BY lg.model_id
    """
    with store.read() as conn:
        rows = conn.execute(sql).fetchall()
    return {str(model_id): int(prompts) for model_id, prompts in rows}


def graph_targets(store: Store, graph_id: str) -> pd.DataFrame:
    """The graph's token targets (its logit nodes), most probable first: token_id, token, prob,
    side (evil | safe | other, from the ids the graph was traced for)."""
    sql = """
        WITH labelled AS (
            SELECT coalesce(json_extract(params, '$.evil_ids')::INTEGER[], []) AS evil_ids,
                   coalesce(json_extract(params, '$.safe_ids')::INTEGER[], []) AS safe_ids
            FROM graphs WHERE graph_id = ?
        )
        SELECT n.token_id, n.token, n.prob,
               CASE WHEN list_contains(l.evil_ids, n.token_id) THEN 'evil'
                    WHEN list_contains(l.safe_ids, n.token_id) THEN 'safe'
                    ELSE 'other' END AS side
        FROM graph_nodes n, labelled l
        WHERE n.graph_id = ? AND n.kind = 'logit' AND n.token_id IS NOT NULL
        ORDER BY n.prob DESC NULLS LAST, n.token_id
    """
    with store.read() as conn:
        return conn.execute(sql, [graph_id, graph_id]).df()
