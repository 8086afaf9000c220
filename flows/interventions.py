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
- samples what the models then *say* under the feature edits (at the prompt's positions and at
  every position, generated ones included), the adapter scaled and without each layer, and the
  directions subtracted, ablated and added, each against its matched random control; every
  continuation judged harmful, safe or unclear and scored for coherence (`rollouts`).

Rows are replaced per prompt and model pair, so a re-run adds no duplicates; prompts already
measured are skipped unless `redo`. A prompt that fails is reported and the others go on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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
from emc.analysis.causal_report import headline, summarize_causal
from emc.analysis.custom_edits import CustomEdit, custom_effect, custom_settings
from emc.analysis.decomposition import decompose_shift
from emc.analysis.directions import (
    direction_effects,
    direction_target,
    last_position_residuals,
    leave_one_out_means,
    mean_response_residuals,
    response_directions,
)
from emc.analysis.feature_interventions import DOSES, dose_response, rank_features
from emc.analysis.lora_geometry import LoraUpdate, read_lora_updates
from emc.analysis.rollouts import as_is_settings, every_setting, run_rollouts
from emc.behaviour.judges import make_response_judge
from emc.behaviour.sampling import SamplingParams
from emc.config import load_experiment
from emc.events import INTERVENTIONS_COMPLETED
from emc.models import LoadedModel, describe_model
from emc.models.factory import resolve_adapter_dir
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.interventions import (
    explained_per_prompt,
    intervention_summary,
    measured_prompts,
    record_causal_outcomes,
    replace_interventions,
    replace_rollouts,
    replace_shift_components,
    rollout_summary,
)
from emc.store.prompts import get_prompts, require_stored_prompts
from emc.tracing import release_memory
from flows.analysis import PromptInputs, analysis_inputs
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.parameters import InterventionsParameters, takes
from flows.reporting import id_list, page_url, prompt_links, rounded_rows, with_prompt_links
from flows.runtime import announce, current_flow_run_id, deployment_data_dir, gpu_slot

# Top-k features restored or injected while sampling (rollouts), and where.
ROLLOUT_KS = (20, 100)
ROLLOUT_POSITIONS = ("prompt", "all")
PARTS = ("decomposition", "adapter", "features", "directions", "rollouts")
# A researcher's own feature edit (`emc intervene --features`): measured only when asked for.
CUSTOM = "custom"


@task(task_run_name="causal-checks-{n_prompts}-prompts", **RETRIES)
def measure_causal(
    config_path: str | None,
    data_dir: str,
    prompts: list[PromptInputs],
    todo: dict[str, list[str]],
    n_prompts: int,
    run_id: str,
    doses: list[int],
    custom: dict | None = None,
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
    judge = make_response_judge(config) if needed & {"rollouts", CUSTOM} else None
    prompt_text = {p.prompt_id: p for p in get_prompts(store, [i.prompt_id for i in prompts])}
    with gpu_slot():
        base = cached_model(config, "base")
        adapted = cached_model(config, "adapted")
        for loaded in (base, adapted):
            upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        ids_of = (base.identity.model_id, adapted.identity.model_id)
        dtype = adapted.precision.dtype_name
        wants = needed & {"adapter", "rollouts"}
        updates = read_lora_updates(resolve_adapter_dir(config))[0] if wants else []
        wants = needed & {"directions", "rollouts"}
        directions = _directions(base, adapted, prompts) if wants else {}
        responses, response_note = (
            _response_direction(config, store, adapted) if wants else (None, "")
        )
        if response_note:
            logger.info("response direction: %s", response_note)
        pending = [item for item in prompts if todo.get(item.prompt_id)]
        for index, item in enumerate(pending, start=1):
            logger.info(
                "prompt %d/%d, %s: %s", index, len(pending), item.prompt_id,
                ", ".join(todo[item.prompt_id]),
            )  # fmt: skip
            case = Case(
                store=store,
                key=(item.prompt_id, *ids_of),
                base=base,
                adapted=adapted,
                ids=torch.tensor(item.input_ids),
                targets={t: "evil" for t in item.evil_ids} | {t: "safe" for t in item.safe_ids},
                updates=updates,
                direction=directions.get(item.prompt_id),
                response_direction=responses,
                run_id=run_id,
                dtype=dtype,
            )
            for part in todo[item.prompt_id]:
                row = {"prompt_id": item.prompt_id, "part": part}
                try:
                    if part == "rollouts":
                        count = _rollouts(config, case, judge, prompt_text.get(item.prompt_id))
                    elif part == CUSTOM:
                        count = _custom(config, case, judge, prompt_text.get(item.prompt_id),
                                        CustomEdit(**custom))  # fmt: skip
                    else:
                        count = _measure(part, case, doses)
                    rows.append(row | {"status": "ok", "rows": count})
                except Exception as exc:  # this prompt's part fails; the rest go on
                    error = f"{type(exc).__name__}: {exc}"
                    rows.append(row | {"status": "failed", "error": error})
                    logger.warning("prompt %s, %s: %s", item.prompt_id, part, error)
                release_memory()
            update_progress_artifact(progress, 100.0 * index / len(pending))
        release_models()
    return rows


@dataclass(frozen=True)
class Case:
    """One prompt's causal checks: where rows go, the models, and what they are measured on."""

    store: Store
    key: tuple[str, str, str]  # prompt, base model and adapted model ids
    base: LoadedModel
    adapted: LoadedModel
    ids: torch.Tensor
    targets: dict[int, str]
    updates: list[LoraUpdate]
    direction: torch.Tensor | None  # (n_layers, d_model): this prompt's leave-one-out means
    response_direction: torch.Tensor | None  # (n_layers, d_model): misaligned - aligned answers
    run_id: str
    dtype: str


def _measure(part: str, case: Case, doses: list[int]) -> int:
    store, key, base, adapted = case.store, case.key, case.base, case.adapted
    ids, targets, updates, direction = case.ids, case.targets, case.updates, case.direction
    run_id, dtype = case.run_id, case.dtype
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
        if direction is None and case.response_direction is None:
            raise ValueError("mean-difference directions need at least two prompts")
        sources = [("", direction), ("responses: ", case.response_direction)]
        records = []
        for prefix, vectors in sources:
            if vectors is None:
                continue
            gap_base, gap_adapted, results = direction_effects(base, adapted, ids, targets, vectors)
            records += [
                _row(
                    r.mode,
                    prefix + direction_target(r),
                    "base" if r.mode == "add" else "adapted",
                    r.gap,
                    r.share,
                    gap_base,
                    gap_adapted,
                    strength=r.strength,
                    n_targets=1,
                    control_gap=r.control_gap,
                    control_share=r.control_share,
                    details={"norm": r.norm, "source": prefix.rstrip(": ") or "prompts"},
                )
                for r in results
            ]
        family = "direction"
    else:
        raise ValueError(f"unknown part {part!r}; choose from {', '.join(PARTS)}")
    replace_interventions(store, key, family, pd.DataFrame(records), run_id, dtype)
    return len(records)


def _custom(config, case: Case, judge, prompt, edit: CustomEdit) -> int:
    """A researcher's feature edit: its next-token share against a matched control, then what
    the edited model says against the control and the models as they are."""
    ranked = rank_features(case.base, case.adapted, case.ids, case.targets)
    seed = config.behaviour.seed
    result = custom_effect(case.base, case.adapted, case.ids, case.targets, edit, seed, ranked)
    record = _row(
        edit.mode, edit.label, edit.model_role, result.gap, result.share, result.gap_base,
        result.gap_adapted, strength=edit.strength, n_targets=len(edit.features),
        control_gap=result.control_gap, control_share=result.control_share,
        details={"features": [list(f) for f in edit.features],
                 "control": [list(f) for f in result.control_features],
                 "top_before": result.top_before, "top_after": result.top_after},
    ) | {"positions": edit.positions}  # fmt: skip
    replace_interventions(
        case.store, case.key, CUSTOM, pd.DataFrame([record]), case.run_id, case.dtype,
        target=edit.label,
    )  # fmt: skip
    settings = as_is_settings(case.base, case.adapted) + custom_settings(
        case.base, case.adapted, edit, result.control_features, ranked
    )
    _sample_and_store(config, case, judge, prompt, settings, custom=True)
    return 1


def _sample_and_store(config, case: Case, judge, prompt, settings, custom: bool = False) -> int:
    params = SamplingParams.from_config(config.behaviour)
    question = prompt.text if prompt is not None else ""
    prefix = prompt.assistant_prefix if prompt is not None and prompt.format == "chat" else ""
    samples, seed = config.behaviour.continuation_samples, config.behaviour.seed
    results = run_rollouts(settings, case.ids, judge, question, prefix, samples, params, seed)
    frame = pd.DataFrame([r.model_dump() for r in results])
    replace_rollouts(
        case.store, case.key, frame, case.run_id, case.dtype, judge.model_id,
        config.behaviour.temperature, custom=custom,
    )  # fmt: skip
    return len(frame)


def _rollouts(config, case: Case, judge, prompt) -> int:
    """What the models say under each family's interventions, against their controls."""
    settings = every_setting(
        case.base, case.adapted, case.ids, case.targets, case.updates, case.direction,
        case.response_direction, ROLLOUT_KS, ROLLOUT_POSITIONS, config.behaviour.seed,
    )  # fmt: skip
    return _sample_and_store(config, case, judge, prompt, settings)


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


def _response_direction(config, store: Store, adapted, per_side: int = 50):
    """The adapted model's response direction from its judged EM answers, and a note when there
    is none (no EM evaluation yet, or too few answers of one kind)."""
    from emc.behaviour.response_features import response_ids
    from flows.evaluation import sampled_em_answers

    answers, texts = sampled_em_answers(store, config, adapted.identity.model_id, per_side)
    if answers.empty:
        return None, "no judged EM answers of the adapted model yet (run `emc eval em`)"
    sides: dict[bool, list[torch.Tensor]] = {True: [], False: []}
    for generation_id, misaligned in zip(answers["generation_id"], answers["misaligned"],
                                         strict=True):  # fmt: skip
        row = texts.loc[generation_id]
        ids, start = response_ids(adapted, row["context"], row["text"], row["token_ids"])
        if start < len(ids):
            sides[bool(misaligned)].append(
                mean_response_residuals(adapted, torch.tensor(ids), start)
            )
    try:
        vectors = response_directions(_stacked(sides[True]), _stacked(sides[False]))
    except ValueError as exc:
        return None, str(exc)
    return vectors, f"{len(sides[True])} misaligned and {len(sides[False])} aligned answers"


def _stacked(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(vectors) if vectors else torch.empty(0)


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    parts = params.get("parts")
    picked = "prompts" if params.get("prompt_ids") else "all-pairs"
    return f"interventions-{picked}" + ("" if not parts else "-" + "+".join(parts))


@flow(name="interventions", flow_run_name=_run_name)
@takes(InterventionsParameters)
def interventions_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    prompt_ids: list[str] | None = None,
    parts: list[str] | None = None,
    limit: int | None = None,
    doses: list[int] | None = None,
    redo: bool = False,
    custom: dict | None = None,
) -> dict:
    """Causal checks on every prompt with a base/adapted graph pair (or the named ones).

    `parts`: any of decomposition, adapter, features, directions, rollouts (default: all).
    Directions are measured on the prompts of this run together (each left out of its own
    direction). `custom` (features as [layer, feature] pairs, mode, strength, positions: a
    `CustomEdit`) measures only that edit, next token and rollouts, against a matched control.
    """
    data_dir = deployment_data_dir(data_dir)
    if custom is not None:
        edit = CustomEdit(**{**custom, "features": tuple(tuple(f) for f in custom["features"])})
        custom = {**custom, "features": edit.features}
        parts = [CUSTOM]
    parts = list(parts or PARTS)
    unknown = sorted(set(parts) - {*PARTS, CUSTOM})
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
        "custom": custom,
    }
    if prompt_ids:
        require_stored_prompts(store, prompt_ids)
    with recorded_run(store, "flow", "interventions", params, current_flow_run_id()) as run:
        base_id = describe_model(config, "base").model_id
        adapted_id = describe_model(config, "adapted").model_id
        inputs = [p for p in analysis_inputs(store, base_id, adapted_id, prompt_ids) if p.evil_ids
                  and p.safe_ids]  # fmt: skip
        # Named prompts that cannot be measured: asked for, so reported (not silently dropped).
        measurable = {p.prompt_id for p in inputs}
        reason = "no current base/adapted graph pair with evil and safe labels (`emc trace` it)"
        unmeasurable = [
            {"prompt_id": p, "error": reason}
            for p in dict.fromkeys(prompt_ids or [])
            if p not in measurable
        ]
        for item in unmeasurable:
            get_run_logger().warning("prompt %s skipped: %s", item["prompt_id"], item["error"])
        if limit is not None and len(inputs) > limit:
            get_run_logger().info("limit %d: %d prompt(s) left for a later run", limit,
                                  len(inputs) - limit)  # fmt: skip
        inputs = inputs[:limit]
        done = {part: set() if redo else _done(store, part, base_id, adapted_id) for part in parts}
        todo = {p.prompt_id: [part for part in parts if p.prompt_id not in done[part]]
                for p in inputs}  # fmt: skip
        _log_selection(inputs, parts, done)
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
        if "directions" in parts and len(inputs) < 2 and inputs:
            get_run_logger().info("directions skipped: a mean direction needs two prompts or more")
        if inputs and not n_pending:
            get_run_logger().info(
                "nothing to measure: every part is stored for these prompts "
                "(`emc intervene --redo` measures them again)"
            )
        try:
            if n_pending:
                rows += measure_causal(
                    config_path, str(resolved), inputs, todo, n_pending, run.run_id, doses, custom
                )
        finally:
            release_models()
        record_causal_outcomes(store, base_id, adapted_id, run.run_id, rows)
        summary = causal_summary(store, base_id, adapted_id)
        summary |= {
            "prompts": len(inputs),
            "measured": len({r["prompt_id"] for r in rows if r["status"] == "ok"}),
            "parts_done": sum(r["status"] == "ok" for r in rows),
            "failed": [r for r in rows if r["status"] == "failed"],
            "skipped": [r for r in rows if r["status"] == "skipped"],
            "unmeasurable": unmeasurable,
        }
        _log_outcome(summary)
        _publish(summary, sorted({r["prompt_id"] for r in rows if r["status"] == "ok"}))
        run.summary = {"run_id": run.run_id, **summary}
    if inputs:
        measured = sorted({r["prompt_id"] for r in rows if r["status"] == "ok"})
        announce(INTERVENTIONS_COMPLETED, resolved, {"run_id": run.run_id, "prompt_ids": measured})
    return run.summary


def _done(store: Store, part: str, base_id: str, adapted_id: str) -> set[str]:
    """Prompts this part has measured already."""
    if part == "decomposition":
        return measured_prompts(store, "shift_components", base_id, adapted_id)
    if part == "rollouts":
        return measured_prompts(store, "intervention_rollouts", base_id, adapted_id)
    if part == CUSTOM:
        return set()  # an edit asked for is measured, whatever was measured before
    family = {"adapter": "adapter", "features": "features", "directions": "direction"}[part]
    return measured_prompts(store, "interventions", base_id, adapted_id, family)


def causal_summary(store: Store, base_id: str, adapted_id: str) -> dict:
    """`summarize_causal` of the pair's stored checks."""
    return summarize_causal(
        explained_per_prompt(store, base_id, adapted_id),
        intervention_summary(store, None, base_id, adapted_id),
        rollout_summary(store, base_id, adapted_id),
    )


def _log_selection(inputs: list[PromptInputs], parts: list[str], done: dict) -> None:
    """The prompts a run checks, and per part how many it skips as measured before."""
    logger = get_run_logger()
    if not inputs:
        logger.info(
            "nothing to check: no prompt has a current graph pair with evil and safe labels; "
            "run `emc trace` first"
        )
        return
    ids = [p.prompt_id for p in inputs]
    logger.info("%d prompt(s) to check (%s): %s", len(ids), ", ".join(parts), id_list(ids))
    for part in parts:
        skipped = len(set(ids) & done[part])
        if skipped:
            logger.info("%s: %d prompt(s) measured before, skipped", part, skipped)


def _log_outcome(summary: dict) -> None:
    logger = get_run_logger()
    logger.info(
        "causal checks done: %d prompt(s) measured, %d part(s) done, %d failed, %d skipped",
        summary["measured"], summary["parts_done"], len(summary["failed"]),
        len(summary["skipped"]),
    )  # fmt: skip
    for row in summary["skipped"]:
        logger.info("skipped: %s of %s: %s", row["part"], row["prompt_id"], row["error"])


def _publish(summary: dict, measured: Sequence[str] = ()) -> None:
    lines = [
        f"Prompts: {summary['prompts']}; measured now: {summary['measured']}; failed parts: "
        f"{len(summary['failed'])}.",
        *headline(summary),
        f"On the dashboard: [Interventions]({page_url('interventions')})",
    ]
    lines += [
        f"Failed: {row['part']} of `{row['prompt_id']}`: {row['error']} "
        f"({prompt_links(row['prompt_id'])})"
        for row in summary["failed"][:30]
    ]
    lines += [f"Measured: `{prompt_id}` ({prompt_links(prompt_id)})" for prompt_id in measured[:30]]
    create_markdown_artifact(
        key="interventions-summary", markdown="\n\n".join(lines), description="Causal checks"
    )
    if summary["failed"]:
        create_table_artifact(
            key="interventions-failures",
            table=with_prompt_links(rounded_rows(summary["failed"])),
            description="Failed parts",
        )
