"""Judgements and token labels, and the history the generator learns from."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from emc.pivotal.feedback import Attempt
from emc.pivotal.judge import Judgement
from emc.store.connection import Store
from emc.store.frames import insert_frame
from emc.store.llm_calls import write_llm_calls
from emc.store.validity import EFFECTIVE_LABELS

JUDGEMENT_COLUMNS = (
    "judgement_id",
    "prompt_id",
    "base_model_id",
    "adapted_model_id",
    "judge_model",
    "status",
    "verdict",
    "outcome",
    "summary",
    "reason",
    "raw_response",
    "llm_call_id",
    "error",
    "measured_verdict",
    "measured_outcome",
    "prob_shift",
    "log_odds_shift",
    "flagged",
)
# Statuses after which a prompt is not judged again by the same judge on a re-run. Transient
# failures (timeouts, HTTP errors) are retried by the next run.
FINAL_STATUSES = ("ok", "label_mismatch", "skipped", "json_error", "schema_error", "truncated")


def insert_judgements(store: Store, judgements: Sequence[Judgement], run_id: str) -> None:
    """Judgements, their token labels and their LLM calls, in one transaction."""
    rows = pd.DataFrame(
        [{**j.model_dump(include=set(JUDGEMENT_COLUMNS)), "run_id": run_id} for j in judgements],
        columns=[*JUDGEMENT_COLUMNS, "run_id"],
    )
    labels = pd.DataFrame(
        [
            {
                "prompt_id": j.prompt_id,
                "token_id": label.token_id,
                "labeller": j.labeller,
                "token": label.token,
                "label": label.label,
                "judgement_id": j.judgement_id,
                "run_id": run_id,
            }
            for j in judgements
            if j.status == "ok"
            for label in j.labels
        ],
        columns=["prompt_id", "token_id", "labeller", "token", "label", "judgement_id", "run_id"],
    )
    calls = [call for j in judgements for call in j.calls]
    with store.write() as conn:
        insert_frame(conn, "judgements", rows, ["judgement_id"], update=False)
        insert_frame(conn, "token_labels", labels, ["prompt_id", "token_id", "labeller"], True)
        if calls:
            write_llm_calls(conn, calls)


def judged_prompt_ids(store: Store, judge_model: str, base_id: str, adapted_id: str) -> set[str]:
    with store.read() as conn:
        rows = conn.execute(
            "SELECT DISTINCT prompt_id FROM judgements WHERE judge_model = ? "
            "AND base_model_id = ? AND adapted_model_id = ? AND list_contains(?, status)",
            [judge_model, base_id, adapted_id, list(FINAL_STATUSES)],
        ).fetchall()
    return {r[0] for r in rows}


def judgement_counts(store: Store, run_id: str | None = None) -> pd.DataFrame:
    """Judgements per verdict: EMC's measured one where there is one (it decides the queue),
    else the judge's, else the status of a failed judgement."""
    where, params = ("WHERE run_id = ?", [run_id]) if run_id else ("", [])
    with store.read() as conn:
        return conn.execute(
            "SELECT coalesce(measured_verdict, verdict, status) AS verdict, count(*) AS prompts "
            f"FROM judgements {where} GROUP BY 1 ORDER BY 2 DESC",
            params,
        ).df()


def generator_attempts(store: Store) -> list[Attempt]:
    """Every judged prompt with its latest successful judgement, newest first."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT p.text, p.format, p.assistant_prefix, coalesce(j.measured_outcome, j.outcome), "
            "j.summary, j.created_at "
            "FROM judgements j JOIN prompts p USING (prompt_id) WHERE j.status = 'ok' "
            "QUALIFY row_number() OVER (PARTITION BY j.prompt_id ORDER BY j.created_at DESC) = 1 "
            "ORDER BY j.created_at DESC"
        ).fetchall()
    fields = ("text", "format", "assistant_prefix", "outcome", "summary", "created_at")
    return [Attempt(**dict(zip(fields, row, strict=True))) for row in rows]


def latest_judgement(store: Store, prompt_id: str) -> dict | None:
    """The newest judgement of a prompt, as a column -> value mapping."""
    with store.read() as conn:
        cursor = conn.execute(
            f"SELECT {', '.join(JUDGEMENT_COLUMNS)}, created_at FROM judgements "
            "WHERE prompt_id = ? ORDER BY created_at DESC LIMIT 1",
            [prompt_id],
        )
        row = cursor.fetchone()
    return dict(zip((*JUDGEMENT_COLUMNS, "created_at"), row, strict=True)) if row else None


def current_labels(store: Store, prompt_id: str) -> dict[int, tuple[str, str]]:
    """token id -> (label, labeller): a person's label wins over a judge's, newest first."""
    with store.read() as conn:
        rows = conn.execute(
            f"SELECT token_id, label, labeller FROM ({EFFECTIVE_LABELS}) WHERE prompt_id = ?",
            [prompt_id],
        ).fetchall()
    return {token_id: (label, labeller) for token_id, label, labeller in rows}


def verdicts_by_day(store: Store) -> pd.DataFrame:
    """Judgements per day and verdict (failed ones under their status), oldest first."""
    with store.read() as conn:
        return conn.execute(
            "SELECT CAST(created_at AS DATE) AS day, coalesce(verdict, status) AS verdict, "
            "count(*) AS judgements FROM judgements GROUP BY 1, 2 ORDER BY 1, 2"
        ).df()


def failed_judgements(store: Store, run_id: str) -> list[tuple[str, str, str]]:
    """(prompt_id, status, error) of every judgement this run made that is not ok."""
    with store.read() as conn:
        return conn.execute(
            "SELECT prompt_id, status, coalesce(error, '') FROM judgements "
            "WHERE run_id = ? AND status <> 'ok' ORDER BY prompt_id",
            [run_id],
        ).fetchall()
