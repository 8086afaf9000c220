"""Causal checks: where the harmful shift lives, and which interventions remove it.

For every prompt with a current base/adapted graph pair (the analysis flow's prompts, or the
named ones), one GPU task holds both models and, on the graph's token ids and labelled targets:

- decomposes the shift of the evil-minus-safe gap by activation patching (`decomposition`);
- scales the adapter and removes it layer by layer, module kind by kind and module by module
  (`adapter`);
- restores the top-k attributed features in the adapted model and injects them into the base
  model, against matched random features (`features`);
- subtracts, adds and ablates the mean-difference direction of each layer, with each prompt
  left out of its own direction, against random directions of the same norm (`directions`);
- samples what the models then *say* with the top-k features restored in the adapted model or
  injected into the base model, against matched random features, each continuation judged
  harmful, safe or unclear (`rollouts`).

Rows are replaced per prompt and model pair, so a re-run adds no duplicates; prompts already
measured are skipped unless `redo`. A prompt that fails is reported and the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from emc.analysis.adapter_interventions import adapter_effects
from emc.analysis.decomposition import decompose_shift
from emc.analysis.directions import (
    direction_effects,
    last_position_residuals,
    leave_one_out_means,
)
from emc.analysis.feature_interventions import DOSES, dose_response
from emc.analysis.lora_geometry import read_lora_updates
from emc.analysis.rollouts import feature_rollouts
from emc.behaviour.judges import make_response_judge
from emc.behaviour.sampling import SamplingParams
from emc.config import load_experiment
from emc.models import describe_model
from emc.models.factory import resolve_adapter_dir
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.interventions import (
    explained_per_prompt,
    intervention_summary,
    measured_prompts,
    replace_interventions,
    replace_rollouts,
    replace_shift_components,
    rollout_summary,
)
from emc.store.prompts import get_prompts
from emc.tracing import release_memory
from flows.analysis import PromptInputs, analysis_inputs
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.runtime import current_flow_run_id, gpu_slot

# Top-k features restored or injected while sampling (rollouts).
ROLLOUT_KS = (20, 100)
PARTS = ("decomposition", "adapter", "features", "directions", "rollouts")


@task(task_run_name="causal-checks-{n_prompts}-prompts", **RETRIES)
def measure_causal(
    config_path: str | None,
    data_dir: str,
    prompts: list[PromptInputs],
    todo: dict[str, list[str]],
    n_prompts: int,
    run_id: str,
    doses: list[int],
) -> list[dict]:
    """The parts `todo` names for each prompt, both models loaded once.

    Directions are the mean over every prompt in `prompts` (each left out of its own), so all of
    them are read even when only some need measuring (the flow skips directions below two).
    """
    logger = get_run_logger()
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    progress = create_progress_artifact(
        progress=0.0, key="interventions-prompts", description="prompts checked"
    )
    needed = {part for parts in todo.values() for part in parts}
    rows: list[dict] = []
    judge = make_response_judge(config) if "rollouts" in needed else None
    prompt_text = {p.prompt_id: p for p in get_prompts(store, [i.prompt_id for i in prompts])}
    with gpu_slot():
        base = cached_model(config, "base")
        adapted = cached_model(config, "adapted")
        for loaded in (base, adapted):
            upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        ids_of = (base.identity.model_id, adapted.identity.model_id)
        dtype = adapted.precision.dtype_name
        updates = read_lora_updates(resolve_adapter_dir(config))[0] if "adapter" in needed else []
        directions = _directions(base, adapted, prompts) if "directions" in needed else {}
        pending = [item for item in prompts if todo.get(item.prompt_id)]
        for index, item in enumerate(pending, start=1):
            ids = torch.tensor(item.input_ids)
            targets = {t: "evil" for t in item.evil_ids} | {t: "safe" for t in item.safe_ids}
            key = (item.prompt_id, *ids_of)
            for part in todo[item.prompt_id]:
                row = {"prompt_id": item.prompt_id, "part": part}
                try:
                    if part == "rollouts":
                        count = _rollouts(
                            config, store, key, base, adapted, ids, targets, judge,
                            prompt_text.get(item.prompt_id), run_id, dtype,
                        )  # fmt: skip
                    else:
                        count = _measure(
                            part,
                            store,
                            key,
                            base,
                            adapted,
                            ids,
                            targets,
                            updates,
                            directions.get(item.prompt_id),
                            doses,
                            run_id,
                            dtype,
                        )
                    rows.append(row | {"status": "ok", "rows": count})
                except Exception as exc:  # this prompt's part fails; the rest go on
                    error = f"{type(exc).__name__}: {exc}"
                    rows.append(row | {"status": "failed", "error": error})
                    logger.warning("prompt %s, %s: %s", item.prompt_id, part, error)
                release_memory()
            update_progress_artifact(progress, 100.0 * index / len(pending))
        release_models()
    return rows


def _measure(
    part, store, key, base, adapted, ids, targets, updates, direction, doses, run_id, dtype
) -> int:
    if part == "decomposition":
        result = decompose_shift(base, adapted, ids, targets)
        frame = pd.DataFrame(
            [
                {**c.model_dump(), "gap_base": result.gap_base, "gap_adapted": result.gap_adapted}
                for c in result.components
            ]
        )
        replace_shift_components(store, key, frame, run_id, dtype)
        return len(frame)
    if part == "adapter":
        effects = adapter_effects(base, updates, ids, targets)
        gaps = {"gap_base": effects.gap_base, "gap_adapted": effects.gap_hooked}
        records = [
            _row(
                s.scope,
                s.target,
                s.model_role,
                s.gap,
                s.share,
                **gaps,
                strength=s.scale,
                n_targets=_modules_touched(s, updates),
            )
            for s in effects.settings
        ]
        family = "adapter"
    elif part == "features":
        gap_base, gap_adapted, results = dose_response(base, adapted, ids, targets, doses)
        records = [
            _row(
                r.mode,
                "all" if r.k is None else f"top {r.k}",
                "adapted" if r.mode == "restore" else "base",
                r.gap,
                r.share,
                gap_base,
                gap_adapted,
                n_targets=len(r.features),
                control_gap=r.control_gap,
                control_share=r.control_share,
                details={"features": [list(f) for f in r.features]},
            )
            for r in results
        ]
        family = "features"
    elif part == "directions":
        if direction is None:
            raise ValueError("mean-difference directions need at least two prompts")
        gap_base, gap_adapted, results = direction_effects(base, adapted, ids, targets, direction)
        records = [
            _row(
                r.mode,
                "every layer" if r.layer < 0 else f"layer {r.layer}",
                "base" if r.mode == "add" else "adapted",
                r.gap,
                r.share,
                gap_base,
                gap_adapted,
                strength=r.strength,
                n_targets=1,
                control_gap=r.control_gap,
                control_share=r.control_share,
                details={"norm": r.norm},
            )
            for r in results
        ]
        family = "direction"
    else:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    replace_interventions(store, key, family, pd.DataFrame(records), run_id, dtype)
    return len(records)


def _rollouts(config, store, key, base, adapted, ids, targets, judge, prompt, run_id, dtype):
    """What the models say with the top-k features restored or injected, against controls."""
    params = SamplingParams.from_config(config.behaviour)
    question = prompt.text if prompt is not None else ""
    prefix = prompt.assistant_prefix if prompt is not None and prompt.format == "chat" else ""
    results = feature_rollouts(
        base, adapted, ids, targets, judge, question, prefix, ks=ROLLOUT_KS,
        n=config.behaviour.continuation_samples, params=params, seed=config.behaviour.seed,
    )  # fmt: skip
    frame = pd.DataFrame([r.model_dump() for r in results])
    replace_rollouts(store, key, frame, run_id, dtype, judge.model_id, config.behaviour.temperature)
    return len(frame)


def _row(
    kind: str,
    target: str,
    role: str,
    gap: float,
    share: float,
    gap_base: float,
    gap_adapted: float,
    strength: float = 0.0,
    n_targets: int | None = None,
    control_gap: float | None = None,
    control_share: float | None = None,
    details: dict | None = None,
) -> dict:
    return {
        "kind": kind,
        "target": target,
        "strength": float(strength),
        "positions": "all",
        "model_role": role,
        "n_targets": n_targets,
        "gap": gap,
        "share": share,
        "control_gap": control_gap,
        "control_share": control_share,
        "gap_base": gap_base,
        "gap_adapted": gap_adapted,
        "details": details,
    }


def _modules_touched(setting, updates) -> int:
    if setting.scope == "scale":
        return len(updates)
    if setting.scope == "without_module":
        return 1
    if setting.scope.endswith("_layer"):
        return sum(f"layer {u.layer}" == setting.target for u in updates)
    return sum(u.kind == setting.target for u in updates)


def _directions(base, adapted, prompts: Sequence[PromptInputs]) -> dict[str, torch.Tensor]:
    """Each prompt's leave-one-out mean-difference directions, (n_layers, d_model)."""
    if len(prompts) < 2:
        return {}
    differences = []
    for item in prompts:
        ids = torch.tensor(item.input_ids)
        differences.append(
            last_position_residuals(adapted, ids) - last_position_residuals(base, ids)
        )
    means = leave_one_out_means(torch.stack(differences))
    return {item.prompt_id: means[i] for i, item in enumerate(prompts)}


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    parts = params.get("parts")
    picked = "prompts" if params.get("prompt_ids") else "all-pairs"
    return f"interventions-{picked}" + ("" if not parts else "-" + "+".join(parts))


@flow(name="interventions", flow_run_name=_run_name)
def interventions_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    prompt_ids: list[str] | None = None,
    parts: list[str] | None = None,
    limit: int | None = None,
    doses: list[int] | None = None,
    redo: bool = False,
) -> dict:
    """Causal checks on every prompt with a base/adapted graph pair (or the named ones).

    `parts`: any of decomposition, adapter, features, directions (default: all). Directions are
    measured on the prompts of this run together (each left out of its own direction).
    """
    parts = list(parts or PARTS)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    config, resolved = load_experiment(config_path, data_dir)
    if config.models.adapter is None:
        raise ValueError("the config names no adapter (models.adapter): nothing to intervene on")
    store = Store.in_data_dir(resolved)
    doses = list(doses or DOSES)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "prompt_ids": prompt_ids,
        "parts": parts,
        "limit": limit,
        "doses": doses,
        "redo": redo,
    }
    with recorded_run(store, "flow", "interventions", params, current_flow_run_id()) as run:
        base_id = describe_model(config, "base").model_id
        adapted_id = describe_model(config, "adapted").model_id
        inputs = [p for p in analysis_inputs(store, base_id, adapted_id, prompt_ids) if p.evil_ids
                  and p.safe_ids][:limit]  # fmt: skip
        done = {part: set() if redo else _done(store, part, base_id, adapted_id) for part in parts}
        todo = {p.prompt_id: [part for part in parts if p.prompt_id not in done[part]]
                for p in inputs}  # fmt: skip
        rows: list[dict] = []
        if "directions" in parts and len(inputs) < 2:  # a mean direction needs two prompts
            for prompt_id, pending in todo.items():
                if "directions" in pending:
                    pending.remove("directions")
                    reason = "fewer than two prompts"
                    rows.append(
                        {"prompt_id": prompt_id, "part": "directions", "status": "skipped",
                         "error": reason}
                    )  # fmt: skip
        n_pending = sum(bool(t) for t in todo.values())
        try:
            if n_pending:
                rows += measure_causal(
                    config_path, str(resolved), inputs, todo, n_pending, run.run_id, doses
                )
        finally:
            release_models()
        summary = causal_summary(store, base_id, adapted_id)
        summary |= {
            "prompts": len(inputs),
            "measured": len({r["prompt_id"] for r in rows if r["status"] == "ok"}),
            "failed": [r for r in rows if r["status"] == "failed"],
            "skipped": [r for r in rows if r["status"] == "skipped"],
        }
        _publish(summary)
        run.summary = {"run_id": run.run_id, **summary}
    return run.summary


def _done(store: Store, part: str, base_id: str, adapted_id: str) -> set[str]:
    """Prompts this part has measured already."""
    if part == "decomposition":
        return measured_prompts(store, "shift_components", base_id, adapted_id)
    if part == "rollouts":
        return measured_prompts(store, "intervention_rollouts", base_id, adapted_id)
    family = {"adapter": "adapter", "features": "features", "directions": "direction"}[part]
    return measured_prompts(store, "interventions", base_id, adapted_id, family)


def causal_summary(store: Store, base_id: str, adapted_id: str) -> dict:
    """The headline numbers: how much the decomposition explains, and the best narrow
    interventions of each family against their controls."""
    explained = explained_per_prompt(store, base_id, adapted_id)
    interventions = intervention_summary(store, None, base_id, adapted_id)
    summary: dict = {
        "decomposed_prompts": len(explained),
        "explained": _mean(explained, "explained"),
        "unexplained": _mean(explained, "unexplained"),
        "attention_share": _mean(explained, "attn"),
        "mlp_features_share": _mean(explained, "mlp_features"),
        "mlp_error_share": _mean(explained, "mlp_error"),
    }
    removals = interventions[interventions["model_role"] == "adapted"]
    narrow = removals[
        ((removals["family"] == "features") & (removals["n_targets"] <= 20))
        | ((removals["family"] == "direction") & (removals["target"] != "every layer"))
        | (removals["kind"] == "without_module")
    ]
    rollouts = rollout_summary(store, base_id, adapted_id)
    if not rollouts.empty:
        summary["rollouts"] = {
            f"{r.kind} {r.target} ({r.model_role})": {
                "p_harmful": float(r.p_harmful), "n": int(r.n), "prompts": int(r.prompts)}
            for r in rollouts.itertuples()
        }  # fmt: skip
    best = narrow.sort_values("removed", ascending=False).head(1)
    if len(best):
        row = best.iloc[0]
        summary["best_narrow"] = {
            "family": row["family"],
            "kind": row["kind"],
            "target": row["target"],
            "removed": float(row["removed"]),
            "control_removed": None
            if pd.isna(row["control_removed"])
            else float(row["control_removed"]),
            "prompts": int(row["prompts"]),
        }
    return summary


def _mean(frame: pd.DataFrame, column: str) -> float | None:
    values = frame[column].dropna() if column in frame else []
    return float(values.mean()) if len(values) else None


def headline(summary: dict) -> list[str]:
    """The decomposition's and the best narrow intervention's sentences, for people."""
    lines = []
    if summary.get("explained") is not None:
        lines.append(
            f"decomposition over {summary['decomposed_prompts']} prompts: the direct writes "
            f"explain {summary['explained']:.1%} of the shift on average (unexplained "
            f"{summary['unexplained']:.1%}); MLP features {summary['mlp_features_share']:.1%}, "
            f"MLP error nodes {summary['mlp_error_share']:.1%}, attention "
            f"{summary['attention_share']:.1%}"
        )
    best = summary.get("best_narrow")
    if best:
        control = best["control_removed"]
        lines.append(
            "best narrow intervention (at most 20 features, one layer's direction or one "
            f"module): {best['family']} {best['kind']} {best['target']} removes "
            f"{best['removed']:.1%} of the shift"
            + ("" if control is None else f"; its matched control {control:.1%}")
        )
    lines += rollout_lines(summary.get("rollouts") or {})
    return lines


def rollout_lines(rollouts: dict) -> list[str]:
    """What the models then say: p(harmful) of their continuations under each feature edit."""
    if not rollouts:
        return []

    def p(name: str) -> str:
        row = rollouts.get(name)
        return "?" if row is None else f"{row['p_harmful']:.2f}"

    prompts = next(iter(rollouts.values()))["prompts"]
    lines = [
        f"what the models then say (p(harmful) of sampled continuations, {prompts} prompts): "
        f"base {p('none as is (base)')}, adapted {p('none as is (adapted)')}"
    ]
    ks = sorted({int(name.split()[2]) for name in rollouts if name.startswith("restore top")})
    for k in ks:
        lines.append(
            f"  top {k} features restored in adapted: {p(f'restore top {k} (adapted)')} "
            f"(random {k}: {p(f'restore random {k} (adapted)')}); injected into base: "
            f"{p(f'inject top {k} (base)')} (random {k}: {p(f'inject random {k} (base)')})"
        )
    return lines


def _publish(summary: dict) -> None:
    lines = [
        f"Prompts: {summary['prompts']}; measured now: {summary['measured']}; failed parts: "
        f"{len(summary['failed'])}.",
        *headline(summary),
    ]
    create_markdown_artifact(
        key="interventions-summary", markdown="\n\n".join(lines), description="Causal checks"
    )
    if summary["failed"]:
        create_table_artifact(
            key="interventions-failures", table=summary["failed"], description="Failed parts"
        )
