"""Base and adapted graphs of one prompt, matched: the unit every comparison starts from.

Two graphs pair up when they explain the same prompt with the same targets and parameters, one
made by a base model and one by an adapted model (roles from the `models` table). A store may hold
several adapted models (the EM adapter and a control), so a prompt can have several pairs.
Every pair says whether it is stale (traced for labels that are no longer the prompt's) and
whether a person rejected its prompt (see `emc.store.validity`), so pages can mark both.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel

from emc.store.connection import Store
from emc.store.validity import GRAPH_STANDING, rejection_badge


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
    stale: bool = False  # either graph was traced for labels that are no longer the prompt's
    rejected: bool = False  # a person rejected the prompt (its newest review is a rejection)
    rejected_by: str | None = None
    reject_reason: str | None = None

    @property
    def rejection_badge(self) -> str | None:
        """`rejected by human:ana: <reason>` for a rejected prompt, else None."""
        return rejection_badge(self.rejected_by, self.reject_reason) if self.rejected else None


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
    SELECT b.prompt_id, b.targets, b.graph_id AS base_graph_id, a.graph_id AS adapted_graph_id,
           b.model_id AS base_model_id, a.model_id AS adapted_model_id,
           b.replacement AS base_replacement, a.replacement AS adapted_replacement,
           greatest(b.created_at, a.created_at) AS created_at
    {PAIR_JOIN} {{where}}
"""
_STANDING_PAIRS = f"""
    WITH standing AS ({GRAPH_STANDING}), pairs AS ({_PAIRS})
    SELECT p.*, sb.stale OR sa.stale AS stale, sb.rejected, sb.rejected_by, sb.reject_reason
    FROM pairs p
    JOIN standing sb ON sb.graph_id = p.base_graph_id
    JOIN standing sa ON sa.graph_id = p.adapted_graph_id
    ORDER BY stale, created_at DESC, prompt_id, targets
"""


def graph_pairs(
    store: Store,
    prompt_id: str | None = None,
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
) -> list[GraphPair]:
    """Successful base/adapted pairs, current before stale, newest first, optionally narrowed to a
    prompt or models. Stale pairs and rejected prompts are included, marked."""
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
        rows = conn.execute(_STANDING_PAIRS.format(where=clause), params).fetchall()
    fields = tuple(GraphPair.model_fields)
    return [GraphPair.model_validate(dict(zip(fields, row, strict=True))) for row in rows]
