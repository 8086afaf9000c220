"""One node of one graph, as the dashboard's Graphs page details it: its effect on each target.

`feature_effects` holds, per graph, kept feature node and target, the node's direct effect (the
edge weight into the target's logit) and its total effect (along every path); the target's side
(evil, safe, other, or direction for a custom target) comes from the graph's own labels
(`graphs.params` evil_ids and safe_ids), as in `emc.store.feature_detail`.
"""

from __future__ import annotations

import pandas as pd

from emc.store.connection import Store

NODE_EFFECT_COLUMNS = (
    "target",
    "token_id",
    "label",
    "side",
    "prob",
    "direct",
    "total",
    "direct_weighted",
    "total_weighted",
)

_NODE_EFFECTS = """
    WITH labelled AS (
        SELECT graph_id,
               coalesce(json_extract(params, '$.evil_ids')::INTEGER[], []) AS evil_ids,
               coalesce(json_extract(params, '$.safe_ids')::INTEGER[], []) AS safe_ids
        FROM graphs
        WHERE graph_id = ?
    )
    SELECT e.target, e.token_id, e.label,
           CASE WHEN e.token_id IS NULL THEN 'direction'
                WHEN list_contains(l.evil_ids, e.token_id) THEN 'evil'
                WHEN list_contains(l.safe_ids, e.token_id) THEN 'safe'
                ELSE 'other' END AS side,
           e.prob, e.direct, e.total, e.direct_weighted, e.total_weighted
    FROM feature_effects e
    JOIN labelled l USING (graph_id)
    WHERE e.node = ?
    ORDER BY e.target
"""


def node_effects(store: Store, graph_id: str, node: int) -> pd.DataFrame:
    """The node's effect on each of the graph's targets (NODE_EFFECT_COLUMNS), in target order.

    Empty for a node with no stored effects: `feature_effects` holds kept feature nodes only.
    """
    with store.read() as conn:
        frame = conn.execute(_NODE_EFFECTS, [graph_id, int(node)]).df()
    return frame[list(NODE_EFFECT_COLUMNS)]
