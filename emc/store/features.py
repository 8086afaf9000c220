"""Features across prompts: per-graph evil-vs-safe statistics aggregated by (layer, feature).

Aggregation is by transcoder feature identity, never by a feature's index in some subset list
(the original pipeline's mistake). Each prompt counts once per model: when a prompt was traced
more than once with the same targets (relabelled, new thresholds), its newest graph made for its
current labels is used. Rejected prompts and stale graphs (traced for labels a person has since
changed; see `emc.store.validity`) never count.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd

from emc.store.connection import Store
from emc.store.validity import COUNTED_GRAPHS

# Columns of `feature_stats` a ranking can use: differences, effect sizes, contrastive effects.
RANKING_METRICS = tuple(
    f"{metric}_{stat}"
    for metric in ("total", "direct", "total_weighted", "direct_weighted")
    for stat in ("diff", "cohens_d")
) + tuple(
    f"contrastive_{metric}" for metric in ("total", "direct", "total_weighted", "direct_weighted")
)
Sign = Literal["any", "evil", "safe"]

# Each prompt's newest ok graph per model and targets made for its current labels, rejected
# prompts left out: what every cross-prompt view reads.
LATEST_GRAPHS = COUNTED_GRAPHS


def feature_ranking(
    store: Store,
    metric: str = "total_diff",
    role: str | None = None,
    model_id: str | None = None,
    targets: str | None = None,
    layer: int | None = None,
    min_prompts: int = 1,
    sign: Sign = "any",
    top: int | None = 30,
) -> pd.DataFrame:
    """Features ranked by their mean `metric` over prompts, one row per (model, layer, feature).

    Columns: rank, role, model_id, layer, feature, last_layer (the last layer the feature writes
    to: its own layer for per-layer transcoders, the model's last for a cross-layer transcoder's,
    read from the graphs' nodes), label (the feature's shown label, a person's
    over an LLM's; None when unlabelled), prompts (where the feature is in the pruned
    graph and the metric is defined), mean, median, sign_consistency (share of those prompts
    whose value has the sign of the mean), positive, negative (prompt counts by sign), mean_t
    (mean Welch t of the same effect, where defined), positions (mean positions per prompt).
    `sign` evil keeps features whose mean is positive (evil more than safe), safe negative ones;
    ranking is by |mean| for any, else by mean in the chosen direction.
    """
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    t_column = metric.replace("_diff", "_welch_t") if metric.endswith("_diff") else None
    where, params = [f"s.{metric} IS NOT NULL", f"isfinite(s.{metric})"], []
    for column, value in (
        ("lg.role", role),
        ("lg.model_id", model_id),
        ("lg.targets", targets),
        ("s.layer", layer),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    having = {"any": "", "evil": " AND avg(value) > 0", "safe": " AND avg(value) < 0"}[sign]
    order = {"any": "abs(mean) DESC", "evil": "mean DESC", "safe": "mean ASC"}[sign]
    t_mean = f"avg(CASE WHEN isfinite(s.{t_column}) THEN s.{t_column} END)" if t_column else "NULL"
    sql = f"""
        WITH latest AS ({LATEST_GRAPHS}),
        per_prompt AS (
            SELECT lg.role, lg.model_id, s.layer, s.feature, lg.prompt_id,
                   avg(s.{metric}) AS value, {t_mean} AS t, avg(s.n_positions) AS positions
            FROM feature_stats s JOIN latest lg USING (graph_id)
            WHERE {" AND ".join(where)}
            GROUP BY ALL
        ),
        ranked AS (
            SELECT role, model_id, layer, feature, count(*) AS prompts,
                   avg(value) AS mean, median(value) AS median,
                   count(*) FILTER (WHERE value > 0) AS positive,
                   count(*) FILTER (WHERE value < 0) AS negative,
                   avg(t) AS mean_t, avg(positions) AS positions
            FROM per_prompt
            GROUP BY ALL
            HAVING count(*) >= ?{having}
        )
        SELECT row_number() OVER (ORDER BY {order}, prompts DESC, layer, feature) AS rank,
               role, model_id, layer, feature,
               coalesce((SELECT max(n.last_layer) FROM graph_nodes n JOIN latest g USING (graph_id)
                         WHERE g.model_id = ranked.model_id AND n.kind = 'feature'
                           AND n.layer = ranked.layer AND n.feature = ranked.feature),
                        layer) AS last_layer,
               (SELECT l.label FROM feature_label_shown l JOIN models m USING (transcoders_ref)
                WHERE m.model_id = ranked.model_id AND l.layer = ranked.layer
                  AND l.feature = ranked.feature) AS label,
               prompts, mean, median,
               CASE WHEN mean > 0 THEN positive WHEN mean < 0 THEN negative ELSE 0 END
                   / prompts AS sign_consistency,
               positive, negative, mean_t, positions
        FROM ranked
        ORDER BY rank
        {"LIMIT ?" if top is not None else ""}
    """
    params.append(min_prompts)
    if top is not None:
        params.append(top)
    with store.read() as conn:
        return conn.execute(sql, params).df()
