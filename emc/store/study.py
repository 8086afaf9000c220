"""A study's pairs side by side: one base, several fine-tunes, the same prompts.

Every pair's discovery scores the prompts the others generated, so the comparison is made on the
prompts every pair has a judgement for: how many each fine-tune flags, how far it moves
probability towards harm, and how many graphs were traced. A control fine-tune is the study's
negative: its flag rate on the same prompts is the funnel's false-positive rate.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from emc.store.connection import Store

STUDY_COLUMNS = (
    "fine_tune",
    "adapted_model_id",
    "shared_prompts",  # judged on every pair of the study
    "flagged",
    "flag_rate",
    "mean_prob_shift",
    "max_prob_shift",
    "graphs",  # traced graphs of the adapted model (ok)
)


def compare_pairs(store: Store, pairs: Mapping[str, tuple[str, str]]) -> pd.DataFrame:
    """One row per fine-tune name -> (base model id, adapted model id), in the given order."""
    if not pairs:
        return pd.DataFrame(columns=list(STUDY_COLUMNS))
    wanted = pd.DataFrame(
        [(name, base, adapted) for name, (base, adapted) in pairs.items()],
        columns=["fine_tune", "base_model_id", "adapted_model_id"],
    )
    with store.read() as conn:
        conn.register("study_pairs", wanted)
        frame = conn.execute(
            """
            WITH latest AS (
                SELECT s.fine_tune, j.prompt_id, j.flagged, j.prob_shift
                FROM judgements j
                JOIN study_pairs s USING (base_model_id, adapted_model_id)
                WHERE j.status = 'ok'
                QUALIFY row_number() OVER (
                    PARTITION BY s.fine_tune, j.prompt_id ORDER BY j.created_at DESC
                ) = 1
            ),
            shared AS (
                SELECT prompt_id FROM latest GROUP BY prompt_id
                HAVING count(DISTINCT fine_tune) = (SELECT count(*) FROM study_pairs)
            ),
            counts AS (
                SELECT l.fine_tune,
                       count(*) AS shared_prompts,
                       count(*) FILTER (WHERE l.flagged) AS flagged,
                       avg(l.prob_shift) AS mean_prob_shift,
                       max(l.prob_shift) AS max_prob_shift
                FROM latest l JOIN shared USING (prompt_id)
                GROUP BY l.fine_tune
            ),
            traced AS (
                SELECT g.model_id, count(*) AS graphs
                FROM graphs g WHERE g.status = 'ok' GROUP BY g.model_id
            )
            SELECT s.fine_tune, s.adapted_model_id,
                   coalesce(c.shared_prompts, 0) AS shared_prompts,
                   coalesce(c.flagged, 0) AS flagged,
                   CASE WHEN c.shared_prompts > 0 THEN c.flagged / c.shared_prompts END
                       AS flag_rate,
                   c.mean_prob_shift, c.max_prob_shift,
                   coalesce(t.graphs, 0) AS graphs
            FROM study_pairs s
            LEFT JOIN counts c USING (fine_tune)
            LEFT JOIN traced t ON t.model_id = s.adapted_model_id
            """
        ).df()
        conn.unregister("study_pairs")
    order = {name: i for i, name in enumerate(pairs)}
    frame = frame.sort_values("fine_tune", key=lambda s: s.map(order)).reset_index(drop=True)
    return frame[list(STUDY_COLUMNS)]
