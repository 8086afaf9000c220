"""Next-token results: `next_tokens`, `logits` and `divergences`."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pandas as pd

from emc.pivotal.divergence import Divergence, LabelMass
from emc.pivotal.logits import NextTokens, PromptScores, TokenScore
from emc.store.connection import Store
from emc.store.frames import insert_frame

RANKABLE = ("js", "kl_adapted_base", "kl_base_adapted", "tv", "entropy_delta", "log_odds_delta")


def insert_prompt_scores(store: Store, scores: Sequence[PromptScores], k: int, run_id: str) -> None:
    """Write both models' next tokens and the divergence in one transaction (all or nothing)."""
    dists = [s.base for s in scores] + [s.adapted for s in scores]
    next_tokens = pd.DataFrame(
        [{**d.model_dump(exclude={"tokens"}), "run_id": run_id} for d in dists]
    )
    logits = pd.DataFrame(
        [
            {"prompt_id": d.prompt_id, "model_id": d.model_id, **t.model_dump(), "run_id": run_id}
            for d in dists
            for t in d.tokens
        ],
        columns=["prompt_id", "model_id", *TokenScore.model_fields, "run_id"],
    )
    divergences = pd.DataFrame(
        [
            {
                "prompt_id": s.prompt_id,
                "base_model_id": s.base.model_id,
                "adapted_model_id": s.adapted.model_id,
                "run_id": run_id,
                "k": k,
                **s.divergence.model_dump(),
            }
            for s in scores
            if s.divergence is not None
        ]
    )
    with store.write() as conn:
        insert_frame(conn, "next_tokens", next_tokens, ["prompt_id", "model_id"], update=True)
        conn.execute(
            "DELETE FROM logits WHERE list_contains(?, prompt_id || '|' || model_id)",
            [[f"{d.prompt_id}|{d.model_id}" for d in dists]],
        )
        insert_frame(conn, "logits", logits, ["prompt_id", "model_id", "token_id"], update=True)
        insert_frame(
            conn,
            "divergences",
            divergences,
            ["prompt_id", "base_model_id", "adapted_model_id"],
            update=True,
        )


def scored_prompt_ids(store: Store, base_model_id: str, adapted_model_id: str) -> set[str]:
    """Prompts already scored successfully for this model pair (what a re-run can skip)."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT prompt_id FROM divergences WHERE base_model_id = ? AND adapted_model_id = ?",
            [base_model_id, adapted_model_id],
        ).fetchall()
    return {r[0] for r in rows}


def load_prompt_scores(
    store: Store, prompt_ids: Iterable[str], base_model_id: str, adapted_model_id: str
) -> list[PromptScores]:
    ids = list(prompt_ids)
    with store.read() as conn:
        dists = conn.execute(
            "SELECT prompt_id, model_id, rendered, input_ids, dtype, backend, status, error "
            "FROM next_tokens WHERE list_contains(?, prompt_id) AND list_contains(?, model_id)",
            [ids, [base_model_id, adapted_model_id]],
        ).fetchall()
        tokens = conn.execute(
            "SELECT prompt_id, model_id, token_id, token, rank, logit, prob, in_top_k FROM logits "
            "WHERE list_contains(?, prompt_id) AND list_contains(?, model_id) ORDER BY rank",
            [ids, [base_model_id, adapted_model_id]],
        ).fetchall()
        divs = conn.execute(
            f"SELECT prompt_id, {', '.join(Divergence.model_fields)} FROM divergences "
            "WHERE list_contains(?, prompt_id) AND base_model_id = ? AND adapted_model_id = ?",
            [ids, base_model_id, adapted_model_id],
        ).fetchall()
    by_key: dict[tuple[str, str], NextTokens] = {}
    for row in dists:
        fields = ("prompt_id", "model_id", "rendered", "input_ids", "dtype", "backend")
        values = dict(zip((*fields, "status", "error"), row, strict=True))
        by_key[(row[0], row[1])] = NextTokens(**values)
    for row in tokens:
        fields = ("token_id", "token", "rank", "logit", "prob", "in_top_k")
        by_key[(row[0], row[1])].tokens.append(
            TokenScore(**dict(zip(fields, row[2:], strict=True)))
        )
    divergence_by_prompt = {
        r[0]: Divergence(**dict(zip(Divergence.model_fields, r[1:], strict=True))) for r in divs
    }
    return [
        PromptScores(
            prompt_id=pid,
            base=by_key[(pid, base_model_id)],
            adapted=by_key[(pid, adapted_model_id)],
            divergence=divergence_by_prompt.get(pid),
        )
        for pid in ids
        if (pid, base_model_id) in by_key and (pid, adapted_model_id) in by_key
    ]


def update_label_mass(
    store: Store,
    prompt_id: str,
    base_model_id: str,
    adapted_model_id: str,
    mass: LabelMass,
    labels_from: str,
) -> None:
    with store.write() as conn:
        conn.execute(
            "UPDATE divergences SET p_evil_base = ?, p_evil_adapted = ?, p_safe_base = ?, "
            "p_safe_adapted = ?, log_odds_base = ?, log_odds_adapted = ?, rank_changes = ?, "
            "labels_from = ? WHERE prompt_id = ? AND base_model_id = ? AND adapted_model_id = ?",
            [
                mass.p_evil_base,
                mass.p_evil_adapted,
                mass.p_safe_base,
                mass.p_safe_adapted,
                mass.log_odds_base,
                mass.log_odds_adapted,
                json.dumps({str(k): v for k, v in mass.rank_changes.items()}),
                labels_from,
                prompt_id,
                base_model_id,
                adapted_model_id,
            ],
        )


def most_divergent(
    store: Store,
    rank_by: str = "js",
    top: int = 20,
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
) -> pd.DataFrame:
    """The most divergent prompts, with the prompt's name and text, for `emc discover`.

    Scores of every model pair share the table; pass the current pair's ids, or a switched
    adapter shows the previous pair's rows. None leaves that side unfiltered.
    """
    if rank_by not in RANKABLE:
        raise ValueError(f"cannot rank by {rank_by!r}; choose one of {', '.join(RANKABLE)}")
    order = "log_odds_adapted - log_odds_base" if rank_by == "log_odds_delta" else rank_by
    where, params = _pair_filter(base_model_id, adapted_model_id)
    with store.read() as conn:
        return conn.execute(
            f"SELECT d.prompt_id, p.name, round(d.js, 3) AS js, "
            f"round(d.kl_adapted_base, 2) AS kl_ab, round(d.topk_jaccard, 2) AS overlap, "
            f"round(d.p_evil_base, 3) AS evil_b, round(d.p_evil_adapted, 3) AS evil_a, "
            f"round(d.log_odds_adapted - d.log_odds_base, 2) AS dlogodds "
            f"FROM divergences d JOIN prompts p USING (prompt_id) {where}"
            f"ORDER BY {order} DESC NULLS LAST LIMIT ?",
            [*params, top],
        ).df()


def _pair_filter(base_model_id: str | None, adapted_model_id: str | None) -> tuple[str, list[str]]:
    """A WHERE clause (empty, or ending in a space) and its parameters for the given ids."""
    asked = [("d.base_model_id", base_model_id), ("d.adapted_model_id", adapted_model_id)]
    given = [(column, value) for column, value in asked if value is not None]
    if not given:
        return "", []
    clause = " AND ".join(f"{column} = ?" for column, _ in given)
    return f"WHERE {clause} ", [value for _, value in given]


def unscored_prompt_ids(store: Store, base_model_id: str, adapted_model_id: str) -> list[str]:
    """Prompts with no next-token row for one of the two models, oldest first."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT p.prompt_id FROM prompts p WHERE "
            "(SELECT count(*) FROM next_tokens n WHERE n.prompt_id = p.prompt_id "
            " AND list_contains(?, n.model_id)) < 2 ORDER BY p.created_at, p.prompt_id",
            [[base_model_id, adapted_model_id]],
        ).fetchall()
    return [r[0] for r in rows]


def failed_scores(store: Store, run_id: str) -> list[tuple[str, str, str]]:
    """(prompt_id, model_id, error) of every next-token row this run recorded as failed."""
    with store.read() as conn:
        return conn.execute(
            "SELECT prompt_id, model_id, coalesce(error, '') FROM next_tokens "
            "WHERE run_id = ? AND status = 'failed' ORDER BY prompt_id, model_id",
            [run_id],
        ).fetchall()
