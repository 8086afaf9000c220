"""Base and adapted graphs of one prompt, matched: the unit every comparison starts from.

Two graphs pair up when they explain the same prompt with the same targets and parameters, one
made by a base model and one by an adapted model (roles from the `models` table). A store may hold
several adapted models (the EM adapter and a control), so a prompt can have several pairs.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from emc.store.connection import Store


class GraphPair(BaseModel):
    prompt_id: str
    targets: str
    base_graph_id: str
    adapted_graph_id: str
    base_model_id: str
    adapted_model_id: str
    base_replacement: float | None
    adapted_replacement: float | None
    created_at: datetime  # of the newer graph


# The pairing itself, `b` the base graph and `a` the adapted one; other modules select from it.
PAIR_JOIN = """
    FROM graphs b
    JOIN models mb ON mb.model_id = b.model_id AND mb.role = 'base'
    JOIN graphs a ON a.prompt_id = b.prompt_id AND a.targets = b.targets
                 AND a.params::VARCHAR = b.params::VARCHAR
    JOIN models ma ON ma.model_id = a.model_id AND ma.role = 'adapted'
    WHERE b.status = 'ok' AND a.status = 'ok'
"""
_PAIRS = f"""
    SELECT b.prompt_id, b.targets, b.graph_id, a.graph_id, b.model_id, a.model_id,
           b.replacement, a.replacement, greatest(b.created_at, a.created_at) AS created_at
    {PAIR_JOIN}
"""


def graph_pairs(
    store: Store,
    prompt_id: str | None = None,
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
) -> list[GraphPair]:
    """Successful base/adapted pairs, newest first, optionally narrowed to a prompt or models."""
    where, params = [], []
    for column, value in (
        ("b.prompt_id", prompt_id),
        ("b.model_id", base_model_id),
        ("a.model_id", adapted_model_id),
    ):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    clause = "".join(f" AND {w}" for w in where)
    with store.read() as conn:
        rows = conn.execute(
            f"{_PAIRS}{clause} ORDER BY created_at DESC, b.prompt_id, b.targets", params
        ).fetchall()
    fields = tuple(GraphPair.model_fields)
    return [GraphPair.model_validate(dict(zip(fields, row, strict=True))) for row in rows]
