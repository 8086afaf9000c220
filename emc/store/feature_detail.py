"""One transcoder feature, (layer, feature), across every prompt and model that kept it.

Per prompt and model: the positions the pruned graph kept it at, its activation there, and its
evil-vs-safe statistics (`feature_stats`, in the family of the chosen ranking metric); per target:
its direct and total effects summed over positions, with the target's side from the graph's own
labels. Like the ranking, each prompt counts once per model and targets: its newest graph made
for its current labels. Unlike the ranking, rejected prompts and stale graphs (see
`emc.store.validity`) are listed too, marked, so a person sees why a prompt does not count.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from emc.store.connection import Store
from emc.store.features import RANKING_METRICS, Sign, feature_ranking
from emc.store.validity import CHOSEN_GRAPHS

_PROMPTS = """
    WITH latest AS ({latest}),
    kept AS (
        SELECT graph_id, count(*) AS positions, sum(activation) AS activation_sum,
               max(activation) AS activation_max
        FROM graph_nodes
        WHERE kind = 'feature' AND layer = ? AND feature = ?
        GROUP BY graph_id
    ),
    stats AS (SELECT * FROM feature_stats WHERE layer = ? AND feature = ?)
    SELECT lg.prompt_id, p.name AS prompt_name, p.text AS prompt_text, lg.role, lg.model_id,
           lg.targets, lg.graph_id, k.positions, k.activation_sum, k.activation_max,
           s.{family}_evil_mean AS evil_mean, s.{family}_safe_mean AS safe_mean,
           s.{family}_diff AS diff, s.{family}_welch_t AS t, s.{metric} AS value,
           lg.stale, lg.rejected, lg.rejected_by, lg.reject_reason
    FROM kept k
    JOIN latest lg USING (graph_id)
    LEFT JOIN stats s USING (graph_id)
    LEFT JOIN prompts p ON p.prompt_id = lg.prompt_id
    ORDER BY lg.prompt_id, lg.role, lg.model_id, lg.targets
"""

_TARGETS = """
    WITH latest AS ({latest}),
    labelled AS (
        SELECT graph_id,
               coalesce(json_extract(params, '$.evil_ids')::INTEGER[], []) AS evil_ids,
               coalesce(json_extract(params, '$.safe_ids')::INTEGER[], []) AS safe_ids
        FROM graphs
    )
    SELECT lg.prompt_id, lg.role, lg.model_id, lg.targets, lg.graph_id, e.target, e.token_id,
           e.label,
           CASE WHEN e.token_id IS NULL THEN 'direction'
                WHEN list_contains(l.evil_ids, e.token_id) THEN 'evil'
                WHEN list_contains(l.safe_ids, e.token_id) THEN 'safe'
                ELSE 'other' END AS side,
           max(e.prob) AS prob, sum(e.direct) AS direct, sum(e.total) AS total,
           count(*) AS positions
    FROM feature_effects e
    JOIN latest lg USING (graph_id)
    JOIN labelled l USING (graph_id)
    WHERE e.layer = ? AND e.feature = ?
    GROUP BY ALL
    ORDER BY lg.prompt_id, lg.role, lg.model_id, lg.targets, e.target
"""


@dataclass(frozen=True)
class FeatureDetail:
    """`feature_detail`'s result.

    `prompts`: one row per graph (prompt, model, targets) whose pruned graph kept the feature:
    prompt_id, prompt_name, prompt_text, role, model_id, targets, graph_id, positions (kept),
    activation_sum, activation_max (over those positions), evil_mean, safe_mean, diff, t (the
    metric family's evil and safe means, their difference and Welch t), value (the metric), stale
    (the graph was traced for labels that are no longer the prompt's), rejected, rejected_by and
    reject_reason (a person rejected the prompt). Stale and rejected rows are not in the ranking.
    `targets`: one row per graph and target: prompt_id, role, model_id, targets, graph_id, target
    (its index), token_id, label, side (evil | safe | other | direction), prob, direct and total
    (summed over the kept positions), positions.
    `base_rank`, `adapted_rank`: its rank in `feature_ranking` of that role for the same metric
    and sign (None where it is not ranked); `base_ranked`, `adapted_ranked`: how many are.
    """

    layer: int
    feature: int
    metric: str
    prompts: pd.DataFrame
    targets: pd.DataFrame
    base_rank: int | None
    adapted_rank: int | None
    base_ranked: int
    adapted_ranked: int

    @property
    def found(self) -> bool:
        return not self.prompts.empty


def metric_family(metric: str) -> str:
    """The effect a ranking metric is computed from: total, direct, total_weighted, ..."""
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    for suffix in ("_diff", "_cohens_d"):
        if metric.endswith(suffix):
            return metric.removesuffix(suffix)
    return metric.removeprefix("contrastive_")


def feature_detail(
    store: Store,
    layer: int,
    feature: int,
    metric: str = "total_diff",
    sign: Sign = "any",
    targets: str | None = None,
) -> FeatureDetail:
    """Everything stored about one feature; `targets` narrows to one target mode."""
    family = metric_family(metric)
    keys = [int(layer), int(feature)]
    with store.read() as conn:
        prompts = conn.execute(
            _PROMPTS.format(latest=CHOSEN_GRAPHS, family=family, metric=metric), keys + keys
        ).df()
        effects = conn.execute(_TARGETS.format(latest=CHOSEN_GRAPHS), keys).df()
    if targets is not None:
        prompts = prompts[prompts["targets"] == targets].reset_index(drop=True)
        effects = effects[effects["targets"] == targets].reset_index(drop=True)
    ranks = {}
    for role in ("base", "adapted"):
        ranking = feature_ranking(store, metric, role=role, targets=targets, sign=sign, top=None)
        mine = ranking[(ranking["layer"] == layer) & (ranking["feature"] == feature)]
        ranks[role] = (None if mine.empty else int(mine["rank"].min()), len(ranking))
    return FeatureDetail(
        layer=int(layer),
        feature=int(feature),
        metric=metric,
        prompts=prompts,
        targets=effects,
        base_rank=ranks["base"][0],
        adapted_rank=ranks["adapted"][0],
        base_ranked=ranks["base"][1],
        adapted_ranked=ranks["adapted"][1],
    )


def feature_layers(store: Store) -> list[int]:
    """The layers with feature statistics in some successful graph, in order."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT DISTINCT s.layer FROM feature_stats s JOIN graphs g USING (graph_id) "
            "WHERE g.status = 'ok' ORDER BY s.layer"
        ).fetchall()
    return [int(r[0]) for r in rows]
