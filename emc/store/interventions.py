"""Causal checks: where the harmful shift lives (activation patching) and what removes it.

`shift_components` holds, per prompt and model pair, each component's share of the shift;
`interventions` each adapter, feature and direction intervention with its gap, its share of the
shift and its matched control. Rows are replaced per prompt, model pair (and family), so a re-run
never duplicates; every row names its run.
"""

from __future__ import annotations

import json

import pandas as pd

from emc.store.analysis import replace_prompt_rows
from emc.store.connection import Store
from emc.store.frames import append_frame

COMPONENT_COLUMNS = (
    "component",
    "layer",
    "direct_into_base",
    "direct_from_adapted",
    "total_into_base",
    "total_from_adapted",
    "gap_base",
    "gap_adapted",
)
INTERVENTION_COLUMNS = (
    "kind",
    "target",
    "strength",
    "positions",
    "model_role",
    "n_targets",
    "gap",
    "share",
    "control_gap",
    "control_share",
    "gap_base",
    "gap_adapted",
    "details",
)
FAMILIES = ("adapter", "features", "direction", "custom")
# The rollouts' families the regular part makes (a custom edit's rows are kept apart).
ROLLOUT_FAMILIES = ("none", "features", "adapter", "direction")
_COMPONENT_ORDER = (
    "layer, list_position(['embed', 'attn', 'mlp', 'mlp_features', 'mlp_error'], component)"
)


def replace_shift_components(
    store: Store,
    ids: tuple[str, str, str],
    rows: pd.DataFrame,
    run_id: str,
    dtype: str,
) -> None:
    """One prompt's decomposition (COMPONENT_COLUMNS), replacing an earlier one."""
    replace_prompt_rows(
        store, "shift_components", rows, COMPONENT_COLUMNS, ids, run_id=run_id, dtype=dtype
    )


def replace_interventions(
    store: Store,
    ids: tuple[str, str, str],
    family: str,
    rows: pd.DataFrame,
    run_id: str,
    dtype: str,
    target: str | None = None,
) -> None:
    """One prompt's interventions of one family (INTERVENTION_COLUMNS), replacing earlier ones
    (with `target`, only that target's: a custom edit replaces its own rows, not other edits')."""
    if family not in FAMILIES:
        raise ValueError(f"unknown intervention family {family!r}; one of {', '.join(FAMILIES)}")
    rows = rows.copy()
    rows["details"] = [None if d is None else json.dumps(d) for d in rows["details"]]
    scope = {"family": family} | ({} if target is None else {"target": target})
    replace_prompt_rows(
        store,
        "interventions",
        rows,
        INTERVENTION_COLUMNS,
        ids,
        scope=scope,
        run_id=run_id,
        dtype=dtype,
    )


def measured_prompts(
    store: Store, table: str, base_model_id: str, adapted_model_id: str, family: str | None = None
) -> set[str]:
    """Prompts with rows in `table` (shift_components, interventions or intervention_rollouts)
    for this model pair."""
    if table not in ("shift_components", "interventions", "intervention_rollouts"):
        raise ValueError(f"not a causal-check table: {table}")
    sql = f"SELECT DISTINCT prompt_id FROM {table} WHERE base_model_id = ? AND adapted_model_id = ?"
    params: list[object] = [base_model_id, adapted_model_id]
    if family is not None:
        sql += " AND family = ?"
        params.append(family)
    with store.read() as conn:
        return {row[0] for row in conn.execute(sql, params).fetchall()}


def causal_model_pairs(store: Store) -> list[tuple[str, str]]:
    """The (base, adapted) model pairs with any causal check, newest first."""
    sql = """
        SELECT base_model_id, adapted_model_id, max(created_at) AS newest FROM (
            SELECT base_model_id, adapted_model_id, created_at FROM shift_components
            UNION ALL
            SELECT base_model_id, adapted_model_id, created_at FROM interventions
        )
        GROUP BY ALL ORDER BY newest DESC, base_model_id, adapted_model_id
    """
    with store.read() as conn:
        return [(base, adapted) for base, adapted, _ in conn.execute(sql).fetchall()]


def prompt_shift_components(
    store: Store, prompt_id: str, base_model_id: str, adapted_model_id: str
) -> pd.DataFrame:
    """One prompt's decomposition (COMPONENT_COLUMNS plus `direct`, both directions averaged),
    in layer order; empty before `emc patch`."""
    sql = f"""
        SELECT {", ".join(COMPONENT_COLUMNS)},
               (direct_into_base + direct_from_adapted) / 2 AS direct
        FROM shift_components
        WHERE prompt_id = ? AND base_model_id = ? AND adapted_model_id = ?
        ORDER BY {_COMPONENT_ORDER}
    """
    with store.read() as conn:
        return conn.execute(sql, [prompt_id, base_model_id, adapted_model_id]).df()


def decomposition_summary(
    store: Store, base_model_id: str | None = None, adapted_model_id: str | None = None
) -> pd.DataFrame:
    """Mean shares per component and layer over every decomposed prompt (of a model pair).

    Columns: component, layer, prompts, direct (both directions averaged), direct_into_base,
    direct_from_adapted, total_into_base, total_from_adapted, mean_shift.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id)
    sql = f"""
        SELECT component, layer, count(*) AS prompts,
               avg((direct_into_base + direct_from_adapted) / 2) AS direct,
               avg(direct_into_base) AS direct_into_base,
               avg(direct_from_adapted) AS direct_from_adapted,
               avg(total_into_base) AS total_into_base,
               avg(total_from_adapted) AS total_from_adapted,
               avg(gap_adapted - gap_base) AS mean_shift
        FROM shift_components {where}
        GROUP BY component, layer
        ORDER BY {_COMPONENT_ORDER}
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


def explained_per_prompt(
    store: Store, base_model_id: str | None = None, adapted_model_id: str | None = None
) -> pd.DataFrame:
    """Per prompt: the shift, the share the direct components account for, and the remainder.

    Embeddings, attention and whole MLPs partition the residual stream; the MLP split does not
    count again. Columns: prompt_id, shift, explained_into_base, explained_from_adapted,
    explained, unexplained, mlp_features, mlp_error, attn.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id)
    sql = f"""
        SELECT prompt_id, any_value(gap_adapted - gap_base) AS shift,
               sum(direct_into_base) FILTER (WHERE component IN ('embed', 'attn', 'mlp'))
                   AS explained_into_base,
               sum(direct_from_adapted) FILTER (WHERE component IN ('embed', 'attn', 'mlp'))
                   AS explained_from_adapted,
               (explained_into_base + explained_from_adapted) / 2 AS explained,
               1 - explained AS unexplained,
               sum((direct_into_base + direct_from_adapted) / 2)
                   FILTER (WHERE component = 'mlp_features') AS mlp_features,
               sum((direct_into_base + direct_from_adapted) / 2)
                   FILTER (WHERE component = 'mlp_error') AS mlp_error,
               sum((direct_into_base + direct_from_adapted) / 2)
                   FILTER (WHERE component = 'attn') AS attn
        FROM shift_components {where}
        GROUP BY prompt_id ORDER BY prompt_id
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


def intervention_summary(
    store: Store,
    family: str | None = None,
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
) -> pd.DataFrame:
    """Mean gap shares per intervention over prompts, with the control beside them.

    Columns: family, kind, target, strength, model_role, prompts, share, control_share,
    removed (1 - share, for interventions on the adapted model), n_targets.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id)
    if family is not None:
        where += (" AND " if where else "WHERE ") + "family = ?"
        params.append(family)
    sql = f"""
        SELECT family, kind, target, strength, model_role, count(*) AS prompts,
               avg(share) AS share, avg(control_share) AS control_share,
               CASE model_role WHEN 'adapted' THEN 1 - avg(share) END AS removed,
               CASE model_role WHEN 'adapted' THEN 1 - avg(control_share) END AS control_removed,
               avg(n_targets) AS n_targets
        FROM interventions {where}
        GROUP BY family, kind, target, strength, model_role
        ORDER BY family, kind, avg(coalesce(n_targets, 0)), target, strength
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


def _pair_filter(base_model_id: str | None, adapted_model_id: str | None):
    clauses, params = [], []
    if base_model_id is not None:
        clauses.append("base_model_id = ?")
        params.append(base_model_id)
    if adapted_model_id is not None:
        clauses.append("adapted_model_id = ?")
        params.append(adapted_model_id)
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


ROLLOUT_COLUMNS = (
    "family",
    "kind",
    "target",
    "model_role",
    "positions",
    "n_features",
    "n",
    "n_harmful",
    "n_unclear",
    "p_harmful",
    "ci_low",
    "ci_high",
    "mean_coherent",
    "examples",
)


def replace_rollouts(
    store: Store,
    ids: tuple[str, str, str],
    rows: pd.DataFrame,
    run_id: str,
    dtype: str,
    judge_model: str,
    temperature: float,
    custom: bool = False,
) -> None:
    """One prompt's rollouts (ROLLOUT_COLUMNS), replacing earlier ones: every regular setting,
    or with `custom` only the models as they are and these rows' custom settings (an edit and its
    control), so other custom edits stay."""
    rows = rows.copy()
    rows["examples"] = [json.dumps(list(e)) for e in rows["examples"]]
    where = "prompt_id = ? AND base_model_id = ? AND adapted_model_id = ?"
    params: list = list(ids)
    if custom:  # the models as they are come again with the same seeds: the same rows
        targets = sorted(set(rows.loc[rows["family"] == "custom", "target"]))
        marks = ", ".join("?" * len(targets)) or "NULL"
        where += f" AND (family = 'none' OR (family = 'custom' AND target IN ({marks})))"
        params += targets
    else:
        where += f" AND family IN ({', '.join('?' * len(ROLLOUT_FAMILIES))})"
        params += list(ROLLOUT_FAMILIES)
    frame = rows[list(ROLLOUT_COLUMNS)].assign(
        prompt_id=ids[0], base_model_id=ids[1], adapted_model_id=ids[2], run_id=run_id,
        dtype=dtype, judge_model=judge_model, temperature=temperature,
    )  # fmt: skip
    with store.write() as conn:
        conn.execute(f"DELETE FROM intervention_rollouts WHERE {where}", params)
        append_frame(conn, "intervention_rollouts", frame)


def rollout_summary(
    store: Store, base_model_id: str | None = None, adapted_model_id: str | None = None
) -> pd.DataFrame:
    """Per setting, over prompts: mean p(harmful), pooled counts, coherence, prompts measured.

    Columns: family, kind, target, model_role, positions, prompts, n_features, n, n_harmful,
    p_harmful
    (pooled), mean_p, mean_coherent, judge_model.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id)
    sql = f"""
        SELECT * FROM (
            SELECT family, kind, target, model_role, positions, count(*) AS prompts,
                   avg(n_features) AS n_features, sum(n) AS n,
                   sum(n_harmful) AS n_harmful, sum(n_harmful) / sum(n) AS p_harmful,
                   avg(p_harmful) AS mean_p, avg(mean_coherent) AS mean_coherent,
                   any_value(judge_model) AS judge_model
            FROM intervention_rollouts {where}
            GROUP BY family, kind, target, model_role, positions
        )
        ORDER BY {_ROLLOUT_ORDER}
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


# Settings in reading order: as is, features, adapter, directions; controls after their setting.
_ROLLOUT_ORDER = """
    list_position(['none', 'features', 'custom', 'adapter', 'direction'], family),
    list_position(['restore', 'inject', 'zero', 'scale', 'without_layer', 'subtract', 'ablate',
                   'add'], kind) NULLS FIRST,
    model_role, positions,
    try_cast(regexp_extract(target, '[0-9]+') AS INTEGER) NULLS FIRST,
    target LIKE 'random%', target
"""


def prompt_rollouts(
    store: Store, prompt_id: str, base_model_id: str, adapted_model_id: str
) -> pd.DataFrame:
    """One prompt's rollouts, in setting order; empty before `emc intervene --kind rollouts`."""
    sql = f"""
        SELECT * EXCLUDE (prompt_id, base_model_id, adapted_model_id)
        FROM intervention_rollouts
        WHERE prompt_id = ? AND base_model_id = ? AND adapted_model_id = ?
        ORDER BY {_ROLLOUT_ORDER}
    """
    with store.read() as conn:
        return conn.execute(sql, [prompt_id, base_model_id, adapted_model_id]).df()


def custom_edits(store: Store, base_model_id: str, adapted_model_id: str) -> pd.DataFrame:
    """The pair's own feature edits (`emc intervene --features`), one row per prompt and edit:
    target (the edit's label), kind, strength, positions, model_role, share, control_share,
    removed (on the adapted model), control_removed, details (JSON: features, control, top
    next tokens before and after), created_at; newest edit first."""
    sql = """
        SELECT prompt_id, target, kind, strength, positions, model_role, share, control_share,
               CASE model_role WHEN 'adapted' THEN 1 - share END AS removed,
               CASE model_role WHEN 'adapted' THEN 1 - control_share END AS control_removed,
               details, created_at
        FROM interventions
        WHERE family = 'custom' AND base_model_id = ? AND adapted_model_id = ?
        ORDER BY max(created_at) OVER (PARTITION BY target) DESC, target, prompt_id
    """
    with store.read() as conn:
        return conn.execute(sql, [base_model_id, adapted_model_id]).df()


def record_causal_outcomes(
    store: Store, base_model_id: str, adapted_model_id: str, run_id: str, rows: list[dict]
) -> None:
    """Keep each failed part of a prompt's causal checks (status `failed`, its error) and forget
    the failures of parts measured now: the table holds what is still failing."""
    measured = [r for r in rows if r["status"] == "ok"]
    failed = [r for r in rows if r["status"] == "failed"]
    if not measured and not failed:
        return
    with store.write() as conn:
        for r in measured + failed:
            conn.execute(
                "DELETE FROM causal_failures WHERE prompt_id = ? AND base_model_id = ? "
                "AND adapted_model_id = ? AND part = ?",
                [r["prompt_id"], base_model_id, adapted_model_id, r["part"]],
            )
        if failed:
            frame = pd.DataFrame(
                {
                    "prompt_id": [r["prompt_id"] for r in failed],
                    "base_model_id": base_model_id,
                    "adapted_model_id": adapted_model_id,
                    "part": [r["part"] for r in failed],
                    "run_id": run_id,
                    "status": "failed",
                    "error": [r["error"] for r in failed],
                }
            )
            append_frame(conn, "causal_failures", frame)


def causal_failures(
    store: Store, base_model_id: str | None = None, adapted_model_id: str | None = None
) -> pd.DataFrame:
    """Parts of causal checks that failed and have not been measured since, newest first."""
    where, params = _pair_filter(base_model_id, adapted_model_id)
    sql = f"SELECT * FROM causal_failures {where} ORDER BY failed_at DESC, prompt_id, part"
    with store.read() as conn:
        return conn.execute(sql, params).df()
