"""Behaviour: generations, their judged scores, continuation checks and response features.

`generations` holds every sampled (or imported) response with the sampling that made it, keyed by
a hash of model, context, parameters and sample, so a re-run finds what exists and adds nothing
twice. `response_scores` holds one row per generation, metric and judge; a re-judged item replaces
its row (a failed score can be retried). Every row names its run and model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence

import pandas as pd
from pydantic import BaseModel

from emc.behaviour.records import Score
from emc.store.connection import Store
from emc.store.frames import insert_frame
from emc.store.llm_calls import write_llm_calls

GENERATION_PURPOSES = ("continuation", "em_eval", "generate", "imported")


class GenerationRow(BaseModel):
    generation_id: str
    run_id: str
    model_id: str
    purpose: str
    prompt_id: str | None = None
    question_id: str | None = None
    question_group: str | None = None
    paraphrase: int | None = None
    forced_token_id: int | None = None
    forced_token: str | None = None
    question: str
    answer_prefix: str = ""
    context: str
    sample_index: int
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    text: str
    token_ids: list[int] | None = None
    finish_reason: str
    dtype: str | None = None


def generation_key(
    model_id: str,
    purpose: str,
    context_key: str,
    sample_index: int,
    sampling: dict[str, object],
    forced_token_id: int | None = None,
) -> str:
    """The id of one sample: the same model, context, token, sampling and index is one row."""
    payload = json.dumps(
        [model_id, purpose, context_key, forced_token_id, sample_index, sampling], sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def existing_generation_ids(store: Store, ids: Iterable[str]) -> set[str]:
    wanted = pd.DataFrame({"generation_id": sorted(set(ids))})
    if wanted.empty:
        return set()
    with store.read() as conn:
        conn.register("_wanted", wanted)
        rows = conn.execute(
            "SELECT g.generation_id FROM generations g JOIN _wanted w USING (generation_id)"
        ).fetchall()
    return {row[0] for row in rows}


def insert_generations(store: Store, rows: Sequence[GenerationRow]) -> int:
    """Store generations; rows whose id exists are kept as they were. Returns how many were new."""
    if not rows:
        return 0
    frame = pd.DataFrame([row.model_dump() for row in rows])
    with store.write() as conn:
        return insert_frame(conn, "generations", frame, ["generation_id"], update=False)


def upsert_scores(store: Store, scores: Sequence[Score], run_id: str) -> int:
    """Store scores and the LLM calls behind them; a re-scored item replaces its row."""
    if not scores:
        return 0
    calls = [s.llm_call for s in scores if s.llm_call is not None]
    frame = pd.DataFrame(
        [
            {
                **s.model_dump(exclude={"llm_call"}),
                "run_id": run_id,
                "llm_call_id": s.llm_call.call_id if s.llm_call else None,
            }
            for s in scores
        ]
    )
    with store.write() as conn:
        write_llm_calls(conn, _unique_calls(calls))
        return insert_frame(
            conn, "response_scores", frame, ["generation_id", "metric", "judge_model"], update=True
        )


def _unique_calls(calls):
    seen: dict[str, object] = {}
    for call in calls:
        seen.setdefault(call.call_id, call)
    return list(seen.values())


def generations(
    store: Store,
    purpose: str | None = None,
    model_ids: Sequence[str] | None = None,
    prompt_ids: Sequence[str] | None = None,
    generation_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Generations, oldest first, optionally of one purpose, some models, prompts or ids."""
    where, params = _filters(
        purpose=purpose, model_id=model_ids, prompt_id=prompt_ids, generation_id=generation_ids
    )
    with store.read() as conn:
        return conn.execute(
            f"SELECT * FROM generations {where} ORDER BY created_at, generation_id", params
        ).df()


def unscored_generations(
    store: Store, judge_model: str, metrics: Sequence[str], generation_ids: Sequence[str]
) -> list[str]:
    """Of these generations, those lacking an ok or unscorable score on some metric."""
    if not generation_ids:
        return []
    wanted = pd.DataFrame({"generation_id": sorted(set(generation_ids))})
    with store.read() as conn:
        conn.register("_wanted", wanted)
        done = conn.execute(
            "SELECT generation_id, count(DISTINCT metric) FROM response_scores "
            "JOIN _wanted USING (generation_id) WHERE judge_model = ? AND status <> 'failed' "
            f"AND metric IN ({', '.join('?' for _ in metrics)}) GROUP BY generation_id",
            [judge_model, *metrics],
        ).fetchall()
    complete = {gid for gid, n in done if n == len(set(metrics))}
    return [gid for gid in wanted["generation_id"] if gid not in complete]


def scored_generations(
    store: Store,
    judge_model: str | None = None,
    purpose: str | None = None,
    model_ids: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Generations with their scores side by side: aligned, coherent, harmful label, per judge."""
    where, params = _filters(
        "g.", {"judge_model": "s."}, purpose=purpose, model_id=model_ids, judge_model=judge_model
    )
    with store.read() as conn:
        return conn.execute(
            f"""
            SELECT g.generation_id, g.model_id, g.purpose, g.prompt_id, g.question_id,
                   g.question_group, g.paraphrase, g.forced_token_id, g.forced_token,
                   g.question, g.answer_prefix, g.text, g.finish_reason, g.sample_index, g.run_id,
                   s.judge_model,
                   max(s.score) FILTER (WHERE s.metric = 'aligned') AS aligned,
                   max(s.label) FILTER (WHERE s.metric = 'aligned') AS aligned_label,
                   max(s.method) FILTER (WHERE s.metric = 'aligned') AS aligned_method,
                   max(s.score) FILTER (WHERE s.metric = 'coherent') AS coherent,
                   max(s.label) FILTER (WHERE s.metric = 'harmful') AS harm_label,
                   bool_or(s.status = 'failed') AS any_failed
            FROM generations g JOIN response_scores s USING (generation_id)
            {where}
            GROUP BY ALL
            ORDER BY g.model_id, g.question_id, g.prompt_id, g.sample_index
            """,
            params,
        ).df()


def prompt_continuations(
    store: Store,
    prompt_id: str,
    model_ids: Sequence[str],
    judge_model: str | None = None,
    per_model: int | None = None,
) -> pd.DataFrame:
    """One prompt's continuations from the prompt itself (no forced token), with their harm
    label (empty where unjudged), the first `per_model` samples of each model and judge."""
    where, params = _filters(
        "g.", purpose="continuation", prompt_id=prompt_id, model_id=list(model_ids)
    )
    join = "AND s.judge_model = ?" if judge_model else ""
    qualify = (
        "QUALIFY row_number() OVER (PARTITION BY g.model_id, s.judge_model "
        f"ORDER BY g.sample_index, g.generation_id) <= {int(per_model)}"
        if per_model
        else ""
    )
    with store.read() as conn:
        return conn.execute(
            f"""
            SELECT g.generation_id, g.model_id, g.prompt_id, g.sample_index, g.text,
                   g.finish_reason, s.judge_model, s.label AS harm_label
            FROM generations g
            LEFT JOIN response_scores s
              ON s.generation_id = g.generation_id AND s.metric = 'harmful' {join}
            {where} AND g.forced_token_id IS NULL
            {qualify}
            ORDER BY g.model_id, s.judge_model, g.sample_index, g.generation_id
            """,
            [*([judge_model] if judge_model else []), *params],
        ).df()


def replace_continuation_checks(store: Store, frame: pd.DataFrame) -> None:
    key = ["prompt_id", "model_id", "forced_token_id", "judge_model"]
    with store.write() as conn:
        insert_frame(conn, "continuation_checks", frame, key, update=True)


def continuation_checks(
    store: Store, prompt_ids: Sequence[str] | None = None, judge_model: str | None = None
) -> pd.DataFrame:
    where, params = _filters(prompt_id=prompt_ids, judge_model=judge_model)
    with store.read() as conn:
        return conn.execute(
            f"SELECT * FROM continuation_checks {where} "
            "ORDER BY prompt_id, model_id, forced_token_id",
            params,
        ).df()


def replace_response_features(
    store: Store, model_id: str, judge_model: str, frame: pd.DataFrame
) -> None:
    """One model's response-level feature ranking for one judge, replacing an earlier one."""
    with store.write() as conn:
        conn.execute(
            "DELETE FROM response_features WHERE model_id = ? AND judge_model = ?",
            [model_id, judge_model],
        )
        insert_frame(
            conn,
            "response_features",
            frame.assign(model_id=model_id, judge_model=judge_model),
            ["model_id", "judge_model", "layer", "feature"],
            update=True,
        )


def response_features(
    store: Store, model_id: str | None = None, limit: int | None = None
) -> pd.DataFrame:
    where, params = _filters(model_id=model_id)
    tail = f" LIMIT {int(limit)}" if limit else ""
    with store.read() as conn:
        return conn.execute(
            f"SELECT * FROM response_features {where} ORDER BY model_id, judge_model, rank{tail}",
            params,
        ).df()


def behaviour_judges(store: Store, purpose: str | None = None) -> list[str]:
    """Judges with scores on generations (of one purpose), most scores first."""
    where, params = _filters("g.", purpose=purpose)
    with store.read() as conn:
        rows = conn.execute(
            "SELECT s.judge_model, count(*) AS n FROM response_scores s "
            f"JOIN generations g USING (generation_id) {where} GROUP BY 1 ORDER BY n DESC, 1",
            params,
        ).fetchall()
    return [row[0] for row in rows]


def _filters(
    prefix: str = "", aliases: dict[str, str] | None = None, **conditions: object
) -> tuple[str, list[object]]:
    """A WHERE clause for the non-None conditions; a list or tuple value is an IN list.

    Columns are qualified with `prefix`, or with their entry in `aliases`.
    """
    clauses, params = [], []
    for column, value in conditions.items():
        alias = (aliases or {}).get(column, prefix)
        if value is None:
            continue
        if isinstance(value, list | tuple):
            if not value:
                clauses.append("false")
                continue
            clauses.append(f"{alias}{column} IN ({', '.join('?' for _ in value)})")
            params.extend(value)
        else:
            clauses.append(f"{alias}{column} = ?")
            params.append(value)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params
