"""Which prompts and graphs still count: rejected prompts and stale graphs.

A prompt is **rejected** when its newest review is a rejection (the review queue's `rejected`
state; imported rejections count too). Rejected prompts are no data: rankings, diff summaries
and tracing selections leave them out, and pages that still show one mark it with the reason.

A prompt's **effective labels** are, per token, a person's label (`human:<name>`) over a judge's,
the newest of a kind first. A graph with `labelled` or `contrastive` targets is **stale** when
the evil and safe token ids it was traced for (`graphs.params`) are no longer the evil and safe
tokens of the prompt's effective labels: a person relabelled it after it was traced, or a
person's labels superseded the judge's with other ones. A person who agrees with the judge makes
no graph stale (same targets), `salient` graphs depend on no labels and are never stale, and a
prompt with no labels in the store at all (graphs copied from elsewhere) has nothing to compare
with, so its graphs are not stale either.

A stale graph is **superseded** once an ok graph of the same prompt, model and targets was made
for the current labels (`emc trace` makes it); cross-prompt views read, per prompt, model and
targets, the newest current graph (`COUNTED_GRAPHS`) and never a stale one.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import pandas as pd
from pydantic import BaseModel

from emc.store.connection import Store

# Per prompt and token, the label that decides: a person's over a judge's, newest first.
EFFECTIVE_LABELS = """
    SELECT prompt_id, token_id, label, labeller, token FROM token_labels
    QUALIFY row_number() OVER (
        PARTITION BY prompt_id, token_id
        ORDER BY starts_with(labeller, 'human:') DESC, created_at DESC, labeller
    ) = 1
"""

# Prompts whose newest review is a rejection, with who rejected them and why.
REJECTED_PROMPTS = """
    SELECT prompt_id, reviewer AS rejected_by, reject_reason, created_at AS rejected_at
    FROM (
        SELECT * FROM reviews
        QUALIFY row_number() OVER (
            PARTITION BY prompt_id ORDER BY created_at DESC, review_id DESC
        ) = 1
    )
    WHERE action = 'reject'
"""

# Every graph with the targets it was traced for, the prompt's current ones, and its standing.
GRAPH_STANDING = f"""
    WITH current_targets AS (
        SELECT prompt_id,
               list_sort(coalesce(list(token_id) FILTER (WHERE label = 'evil'), []))
                   AS evil_ids,
               list_sort(coalesce(list(token_id) FILTER (WHERE label = 'safe'), []))
                   AS safe_ids
        FROM ({EFFECTIVE_LABELS})
        GROUP BY prompt_id
    ),
    traced AS (
        SELECT *,
               list_sort(coalesce(json_extract(params, '$.evil_ids')::INTEGER[], []))
                   AS graph_evil_ids,
               list_sort(coalesce(json_extract(params, '$.safe_ids')::INTEGER[], []))
                   AS graph_safe_ids
        FROM graphs
    )
    SELECT g.graph_id, g.prompt_id, g.model_id, g.targets, g.status, g.created_at,
           g.graph_evil_ids, g.graph_safe_ids,
           c.evil_ids AS label_evil_ids, c.safe_ids AS label_safe_ids,
           coalesce(g.targets <> 'salient' AND c.prompt_id IS NOT NULL
                    AND (g.graph_evil_ids <> c.evil_ids OR g.graph_safe_ids <> c.safe_ids),
                    false) AS stale,
           r.prompt_id IS NOT NULL AS rejected, r.rejected_by, r.reject_reason
    FROM traced g
    LEFT JOIN current_targets c USING (prompt_id)
    LEFT JOIN ({REJECTED_PROMPTS}) r USING (prompt_id)
"""

# One ok graph per prompt, model and targets: the newest made for the current labels, else (when
# every one is stale) the newest. Pages that show single prompts read this, marking what is off.
CHOSEN_GRAPHS = f"""
    SELECT s.graph_id, s.prompt_id, s.model_id, s.targets, m.role, s.stale, s.rejected,
           s.rejected_by, s.reject_reason
    FROM ({GRAPH_STANDING}) s LEFT JOIN models m USING (model_id)
    WHERE s.status = 'ok'
    QUALIFY row_number() OVER (
        PARTITION BY s.prompt_id, s.model_id, s.targets
        ORDER BY s.stale, s.created_at DESC, s.graph_id
    ) = 1
"""

# What every cross-prompt aggregate reads: the chosen graphs that are current and not rejected.
COUNTED_GRAPHS = f"SELECT * FROM ({CHOSEN_GRAPHS}) WHERE NOT stale AND NOT rejected"


class Rejection(BaseModel):
    prompt_id: str
    rejected_by: str
    reason: str
    rejected_at: datetime

    @property
    def badge(self) -> str:
        """How pages and the CLI mark the prompt: `rejected by human:ana: off topic`."""
        return rejection_badge(self.rejected_by, self.reason)


class StaleGraph(BaseModel):
    """A graph traced for labels that are no longer the prompt's."""

    graph_id: str
    prompt_id: str
    model_id: str
    targets: str
    created_at: datetime
    graph_evil_ids: list[int]
    graph_safe_ids: list[int]
    label_evil_ids: list[int]
    label_safe_ids: list[int]
    superseded_by: str | None  # the ok graph made for the current labels, if any
    rejected: bool

    @property
    def change(self) -> str:
        """What changed since it was traced, for people: `evil -[5], safe +[5]`."""
        parts = []
        for side, old, new in (
            ("evil", self.graph_evil_ids, self.label_evil_ids),
            ("safe", self.graph_safe_ids, self.label_safe_ids),
        ):
            removed, added = sorted(set(old) - set(new)), sorted(set(new) - set(old))
            moved = [f"-{removed}"] * bool(removed) + [f"+{added}"] * bool(added)
            if moved:
                parts.append(f"{side} {' '.join(moved)}")
        return ", ".join(parts)


def rejection_badge(rejected_by: str | None, reason: str | None) -> str:
    """The mark a rejected prompt carries wherever it is still shown, with the reviewer's reason."""
    return f"rejected by {rejected_by or 'a reviewer'}: {reason or 'no reason given'}"


def rejected_prompts(store: Store, prompt_ids: Iterable[str] | None = None) -> dict[str, Rejection]:
    """prompt id -> its rejection, for the rejected prompts (of `prompt_ids`, if given)."""
    where, params = "", []
    if prompt_ids is not None:
        where, params = "WHERE list_contains(?, prompt_id)", [list(prompt_ids)]
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT prompt_id, rejected_by, coalesce(reject_reason, ''), rejected_at "
            f"FROM ({REJECTED_PROMPTS}) {where} ORDER BY prompt_id",
            params,
        ).fetchall()
    fields = tuple(Rejection.model_fields)
    return {row[0]: Rejection.model_validate(dict(zip(fields, row, strict=True))) for row in rows}


def stale_graphs(
    store: Store,
    model_ids: Iterable[str] | None = None,
    prompt_ids: Iterable[str] | None = None,
    include_superseded: bool = False,
) -> list[StaleGraph]:
    """Stale ok graphs, oldest prompt first; by default only those no current graph replaced yet
    (what `emc trace` re-traces). Narrowed to some models and/or prompts when given."""
    where, params = ["s.stale", "s.status = 'ok'"], []
    for column, values in (("s.model_id", model_ids), ("s.prompt_id", prompt_ids)):
        if values is not None:
            where.append(f"list_contains(?, {column})")
            params.append(list(values))
    if not include_superseded:
        where.append("n.graph_id IS NULL")
    sql = f"""
        WITH standing AS ({GRAPH_STANDING})
        SELECT s.graph_id, s.prompt_id, s.model_id, s.targets, s.created_at,
               s.graph_evil_ids, s.graph_safe_ids, s.label_evil_ids, s.label_safe_ids,
               n.graph_id AS superseded_by, s.rejected
        FROM standing s
        LEFT JOIN (
            SELECT * FROM standing WHERE status = 'ok' AND NOT stale
            QUALIFY row_number() OVER (
                PARTITION BY prompt_id, model_id, targets ORDER BY created_at DESC, graph_id
            ) = 1
        ) n ON n.prompt_id = s.prompt_id AND n.model_id = s.model_id AND n.targets = s.targets
        WHERE {" AND ".join(where)}
        ORDER BY s.prompt_id, s.targets, s.model_id, s.created_at
    """
    with store.read() as conn:
        rows = conn.execute(sql, params).fetchall()
    fields = tuple(StaleGraph.model_fields)
    return [StaleGraph.model_validate(dict(zip(fields, row, strict=True))) for row in rows]


def graph_standing(store: Store, graph_ids: Iterable[str] | None = None) -> pd.DataFrame:
    """Per graph: graph_id, prompt_id, model_id, targets, status, created_at, the evil and safe
    ids it was traced for and the prompt's current ones, stale, rejected, rejected_by and
    reject_reason. For pages and notebooks."""
    where, params = "", []
    if graph_ids is not None:
        where, params = "WHERE list_contains(?, graph_id)", [list(graph_ids)]
    with store.read() as conn:
        return conn.execute(
            f"SELECT * FROM ({GRAPH_STANDING}) {where} ORDER BY prompt_id, created_at", params
        ).df()


def counted_graphs(store: Store) -> pd.DataFrame:
    """The graphs cross-prompt views count: graph_id, prompt_id, model_id, targets, role (one per
    prompt, model and targets; never stale, never of a rejected prompt)."""
    with store.read() as conn:
        return conn.execute(
            f"SELECT graph_id, prompt_id, model_id, targets, role FROM ({COUNTED_GRAPHS}) "
            "ORDER BY prompt_id, model_id, targets"
        ).df()


def left_out_of_rankings(store: Store) -> dict[str, int]:
    """How many prompts are rejected, and how many stale graphs no current one replaced yet:
    what rankings and summaries leave out (for a caption saying so)."""
    with store.read() as conn:
        row = conn.execute(
            f"""
            WITH chosen AS ({CHOSEN_GRAPHS})
            SELECT count(DISTINCT prompt_id) FILTER (WHERE rejected),
                   count(*) FILTER (WHERE stale AND NOT rejected)
            FROM chosen
            """
        ).fetchone()
    return {"rejected_prompts": int(row[0]), "stale_graphs": int(row[1])}
