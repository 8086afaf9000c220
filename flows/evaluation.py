"""Behaviour: what the models say, sampled, judged and summarised.

Parts (any of them, in this order):

- `continuations`: for each flagged (or named) prompt, samples from the prompt and from the prompt
  with each labelled evil and safe token forced, per model; each continuation judged harmful,
  safe or unclear; p(harmful) per prompt, model and token with a 95% interval; a token is pivotal
  when forcing it moves p(harmful) by `behaviour.pivotal_delta`; a prompt is confirmed when the
  adapted model follows through on harm where the base model does not.
- `em`: free-form questions (a YAML file, or the organism's own set), samples per paraphrase and
  model, judged aligned and coherent (0-100); the EM rate per model with a bootstrap interval.
- `generate`: samples from the named prompts, judged harmful, safe or unclear.
- `features`: each model's judged EM-evaluation answers (sampled or imported under its id) read
  by its transcoders; features ranked by misaligned minus aligned mean activation over the
  response, and the top 20 compared with the pivotal-token ranking of the graphs.

Generation is a GPU task per model that holds the `gpu` slot and retries; judging is not. Every
sample has a deterministic id, so a killed run, run again, draws and judges only what is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from emc.behaviour.generate import (
    PlanItem,
    generate_missing,
    plan_ids,
    prompt_contexts,
    question_contexts,
)
from emc.behaviour.judges import make_response_judge, response_judge_id, to_judge
from emc.behaviour.questions import Question, load_questions, organism_questions
from emc.behaviour.records import Metric
from emc.behaviour.sampling import ContextTooLongError, SamplingParams
from emc.behaviour.summary import continuation_rows, em_answers, em_rates, prompt_verdicts
from emc.config import ExperimentConfig, load_experiment
from emc.models import NonFiniteActivationError, describe_model
from emc.organism.lexicon import Lexicon
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.behaviour import (
    existing_generation_ids,
    generations,
    insert_generations,
    replace_continuation_checks,
    scored_generations,
    unscored_generations,
    upsert_scores,
)
from emc.store.judgements import current_labels
from emc.store.prompts import get_prompts, require_stored_prompts
from emc.store.queue import queued_prompt_ids
from emc.store.validity import rejected_prompts
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.runtime import current_flow_run_id, gpu_slot

PARTS = ("continuations", "em", "generate", "features")
ROLES = ("base", "adapted")
# Answers per side (misaligned, aligned) read for response-level features; enough for stable
# means on the organism, and each one is a forward pass.
MAX_ANSWERS_PER_SIDE = 100
METRICS_FOR: dict[str, list[Metric]] = {
    "continuation": ["harmful"],
    "generate": ["harmful"],
    "em_eval": ["aligned", "coherent"],
}


def with_adapter(config: ExperimentConfig, adapter: str | None) -> ExperimentConfig:
    """The config with another adapter: a path, or the name of a sibling of the config's adapter
    directory (the organism keeps `em` and `control` side by side)."""
    if not adapter:
        return config
    if config.models.adapter is None:
        raise ValueError("--adapter needs a config that names an adapter (models.adapter)")
    path = Path(adapter).expanduser()
    if not path.exists() and "/" not in adapter:
        sibling = Path(config.models.adapter.ref).parent / adapter
        if sibling.is_dir():
            path = sibling
    if not path.is_dir():
        raise ValueError(
            f"adapter {adapter!r} not found: give a PEFT adapter directory, or the name of one "
            f"next to {config.models.adapter.ref}"
        )
    models = config.models.model_copy(
        update={"adapter": config.models.adapter.model_copy(update={"ref": str(path.resolve())})}
    )
    return config.model_copy(update={"models": models})


@task(task_run_name="generate-{role}-{purpose}", **RETRIES)
def generate_samples(
    config: ExperimentConfig,
    data_dir: str,
    role: str,
    purpose: str,
    prompt_ids: list[str],
    labels: dict[str, dict[int, str]],
    questions: list[Question],
    samples: int,
    run_id: str,
) -> dict:
    """Draw the missing samples of every context for one model; returns their generation ids.

    A context too long for the model, or one whose forward pass is not finite, is reported in
    `failed` (with its prompt or question) and skipped; the others go on.
    """
    logger = get_run_logger()
    store = Store.in_data_dir(data_dir)
    params = SamplingParams.from_config(config.behaviour)
    with gpu_slot():
        loaded = cached_model(config, role)
        upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        contexts = []
        if questions:
            contexts += question_contexts(questions, loaded.tokenizer)
        for prompt in get_prompts(store, prompt_ids):
            contexts += prompt_contexts(
                prompt, loaded.tokenizer, purpose, labels.get(prompt.prompt_id)
            )
        items = [PlanItem(c, samples) for c in contexts]
        plan_ids(items, loaded.identity.model_id, params, config.behaviour.seed)
        existing = existing_generation_ids(store, [g for item in items for g in item.ids])
        failed: list[dict] = []
        new = 0
        for item in items:  # one context at a time: a failed one ends only its own samples
            try:
                for rows in generate_missing(
                    loaded, [item], existing, params, config.behaviour.seed, run_id,
                    config.behaviour.batch_size,
                ):  # fmt: skip
                    new += insert_generations(store, rows)
            except (ContextTooLongError, NonFiniteActivationError) as exc:
                failed.append(_context_failure(role, item.context, exc))
                logger.warning("%s", failed[-1]["error"])
    logger.info("%s, %s: %d new samples, %d existed", role, purpose, new, len(existing))
    return {
        "model_id": loaded.identity.model_id,
        "ids": [g for item in items for g in item.ids],
        "new": new,
        "failed": failed,
    }


def _context_failure(role: str, context, exc: Exception) -> dict:
    """Which context of which prompt or question failed to generate, and why."""
    what = (
        f"prompt {context.prompt_id}"
        if context.prompt_id
        else f"question {context.question_id} (paraphrase {context.paraphrase})"
    )
    if context.forced_token is not None:
        what += f" with {context.forced_token!r} forced"
    return {
        "prompt_id": context.prompt_id,
        "question_id": context.question_id,
        "role": role,
        "error": f"{what} ({role}): {type(exc).__name__}: {exc}",
    }


@task(task_run_name="judge-{purpose}", **RETRIES)
def judge_samples(
    config: ExperimentConfig, data_dir: str, purpose: str, generation_ids: list[str], run_id: str
) -> dict:
    """Score the generations that lack a score from this judge; returns counts by status, and
    the failed scores (`failures`: generation, its prompt or question, metric, error)."""
    store = Store.in_data_dir(data_dir)
    judge = make_response_judge(config)
    metrics = METRICS_FOR[purpose]
    todo = set(unscored_generations(store, judge.model_id, metrics, generation_ids))
    if not todo:
        return {"judged": 0, "failed": 0, "failures": []}
    frame = generations(store, purpose=purpose, generation_ids=sorted(todo))
    items = [to_judge(row) for _, row in frame.iterrows()]
    scores = judge.score_many(items, metrics, run_id=run_id)
    upsert_scores(store, scores, run_id)
    where = frame.set_index("generation_id")[["prompt_id", "question_id"]]
    failures = [
        {
            "generation_id": s.generation_id,
            "prompt_id": _or_none(where.at[s.generation_id, "prompt_id"]),
            "question_id": _or_none(where.at[s.generation_id, "question_id"]),
            "error": f"{_judged_item(where, s.generation_id)}: judge {judge.model_id}, "
            f"{s.metric}: {s.error or 'failed'}",
        }
        for s in scores
        if s.status == "failed"
    ]
    return {
        "judged": len(items),
        "failed": len(failures),
        "unscorable": sum(s.status == "unscorable" for s in scores),
        "failures": failures,
    }


def _judged_item(where: pd.DataFrame, generation_id: str) -> str:
    prompt_id = _or_none(where.at[generation_id, "prompt_id"])
    question_id = where.at[generation_id, "question_id"]
    what = f"prompt {prompt_id}" if prompt_id else f"question {question_id}"
    return f"{what}, sample {generation_id}"


def _or_none(value):
    return None if value is None or pd.isna(value) else value


def _run_name() -> str:
    from prefect.runtime import flow_run

    parts = flow_run.parameters.get("parts") or PARTS[:2]
    return "evaluation-" + "+".join(parts)


@flow(name="evaluation", flow_run_name=_run_name)
def evaluation_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    parts: list[str] | None = None,
    prompt_ids: list[str] | None = None,
    questions_path: str | None = None,
    samples: int | None = None,
    adapter: str | None = None,
    roles: list[str] | None = None,
    limit: int | None = None,
) -> dict:
    """Sample, judge and summarise behaviour for base and adapted model (see the module)."""
    parts = list(parts or PARTS[:2])
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    roles = list(roles or ROLES)
    config, resolved = load_experiment(config_path, data_dir)
    config = with_adapter(config, adapter)
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "parts": parts,
        "prompt_ids": prompt_ids,
        "questions_path": questions_path,
        "samples": samples,
        "adapter": config.models.adapter.ref if config.models.adapter else None,
        "roles": roles,
        "limit": limit,
        "behaviour": config.behaviour.model_dump(mode="json"),
        "judge": config.judge.model,
    }
    if prompt_ids and {"continuations", "generate"} & set(parts):
        require_stored_prompts(store, prompt_ids)
    ids = {role: describe_model(config, role).model_id for role in roles}
    summary: dict = {"models": ids, "judge": config.judge.model}
    with recorded_run(store, "flow", "evaluation", params, current_flow_run_id()) as run:
        try:
            if "continuations" in parts:
                summary["continuations"] = _continuations(
                    config, str(resolved), store, roles, ids, prompt_ids, samples, limit, run.run_id
                )
            if "em" in parts:
                summary["em"] = _em(
                    config, str(resolved), roles, questions_path, samples, limit, run.run_id
                )
            if "features" in parts:
                summary["features"] = {
                    role: _ranking_or_failure(config, str(resolved), role, run.run_id)
                    for role in roles
                }
            if "generate" in parts:
                summary["generate"] = _generate(
                    config, str(resolved), roles, prompt_ids or [], samples, run.run_id
                )
        finally:
            release_models()
        _publish(summary)
        run.summary = {"run_id": run.run_id, **summary}
    return run.summary


def _continuations(config, data_dir, store, roles, ids, prompt_ids, samples, limit, run_id):
    logger = get_run_logger()
    chosen = list(prompt_ids or queued_prompt_ids(store, reviewed_only=False))
    rejected = rejected_prompts(store, chosen)
    if prompt_ids and rejected:
        logger.warning("checking rejected prompts as asked: %s", ", ".join(sorted(rejected)))
    elif rejected:
        chosen = [p for p in chosen if p not in rejected]
    chosen = chosen[:limit]
    labels = {
        pid: {tok: label for tok, (label, _) in current_labels(store, pid).items()
              if label in ("evil", "safe")}
        for pid in chosen
    }  # fmt: skip
    n = samples or config.behaviour.continuation_samples
    generated = {
        role: generate_samples(config, data_dir, role, "continuation", chosen, labels, [], n,
                               run_id)
        for role in roles
    }  # fmt: skip
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "continuation", all_ids, run_id)
    judge_model = response_judge_id(config)
    scored = scored_generations(store, judge_model, "continuation", [ids[r] for r in roles])
    scored = scored[scored["prompt_id"].isin(chosen)]
    checks = continuation_rows(scored, labels, config.behaviour.pivotal_delta)
    if not checks.empty:
        replace_continuation_checks(
            store,
            checks.assign(run_id=run_id, temperature=config.behaviour.temperature,
                          dtype=_dtype(config)),
        )  # fmt: skip
    verdicts = (
        prompt_verdicts(checks, ids["base"], ids["adapted"], config.behaviour.confirm_delta)
        if {"base", "adapted"} <= set(roles)
        else None
    )
    confirmed = int(verdicts["confirmed"].sum()) if verdicts is not None else None
    return {
        "prompts": len(chosen),
        "prompt_ids": chosen,
        "samples_per_context": n,
        "new_samples": sum(r["new"] for r in generated.values()),
        "failed": [f for r in generated.values() for f in r["failed"]],
        "judged": judged,
        "confirmed": confirmed,
        "checked": 0 if verdicts is None else len(verdicts),
        "pivotal_tokens": int(checks["pivotal"].fillna(False).astype(bool).sum())
        if not checks.empty
        else 0,
    }


def default_questions(config: ExperimentConfig) -> list[Question]:
    """The organism's question set, grouped by trained and other domains."""
    if not config.ground_truth:
        raise ValueError(
            "no question file given and this config is not the organism's (no ground_truth): "
            "pass --questions FILE (YAML in the EM paper's format, `emc eval questions` shows one)"
        )
    lexicon = Lexicon.load(Path(config.ground_truth))
    return organism_questions(lexicon.trained_domain)


def _em(config, data_dir, roles, questions_path, samples, limit, run_id):
    questions = (
        load_questions(Path(questions_path)) if questions_path else default_questions(config)
    )[:limit]
    n = samples or config.behaviour.eval_samples
    generated = {
        role: generate_samples(config, data_dir, role, "em_eval", [], {}, questions, n, run_id)
        for role in roles
    }
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "em_eval", all_ids, run_id)
    rates = em_rate_table(Store.in_data_dir(data_dir), config, all_ids)
    return {
        "questions": len(questions),
        "question_ids": [q.id for q in questions],
        "samples_per_paraphrase": n,
        "new_samples": sum(r["new"] for r in generated.values()),
        "failed": [f for r in generated.values() for f in r["failed"]],
        "judged": judged,
        "rates": rates.to_dict(orient="records"),
    }


def em_rate_table(store: Store, config: ExperimentConfig, generation_ids=None):
    """EM rate per model (and per question group) from the configured judge's scores."""
    judge_model = response_judge_id(config)
    scored = scored_generations(store, judge_model, "em_eval")
    if generation_ids is not None:
        scored = scored[scored["generation_id"].isin(set(generation_ids))]
    b = config.behaviour
    answers = em_answers(scored, b.em_aligned_below, b.em_coherent_above)
    overall = em_rates(answers).assign(question_group="all")
    grouped = em_rates(answers, by=("model_id", "question_group"))
    import pandas as pd

    return pd.concat([overall, grouped], ignore_index=True)


@task(task_run_name="response-features-{role}", **RETRIES)
def response_feature_ranking(
    config: ExperimentConfig,
    data_dir: str,
    role: str,
    run_id: str,
    top: int = 200,
    per_side: int = MAX_ANSWERS_PER_SIDE,
) -> dict:
    """Rank one model's features by misaligned vs aligned EM answers; store the top rows.

    At most `per_side` answers of each side are read (the first by generation id, so a re-run
    reads the same ones): each costs a forward pass through the transcoders.
    """
    from emc.behaviour.response_features import (
        mean_response_activation,
        rank_features,
        ranking_overlap,
        response_ids,
    )
    from emc.store.behaviour import replace_response_features
    from emc.store.features import feature_ranking

    store = Store.in_data_dir(data_dir)
    model_id = describe_model(config, role).model_id
    judge_model = response_judge_id(config)
    answers, texts = sampled_em_answers(store, config, model_id, per_side)
    n_mis = int(answers["misaligned"].sum())
    n_al = len(answers) - n_mis
    if n_mis < 2 or n_al < 2:
        reason = f"{n_mis} misaligned and {n_al} aligned answers (need 2 of each)"
        return {"model_id": model_id, "status": "skipped", "reason": reason}
    with gpu_slot():
        loaded = cached_model(config, role)
        vectors = []
        for gid in answers["generation_id"]:
            row = texts.loc[gid]
            ids, start = response_ids(loaded, row["context"], row["text"], row["token_ids"])
            vectors.append(mean_response_activation(loaded, ids, start))
    d_tc = vectors[0].shape[1]
    matrix = np.vstack([v.reshape(-1) for v in vectors])
    keep = ~np.isnan(matrix).any(axis=1)
    flags = answers["misaligned"].to_numpy()[keep]
    ranking = rank_features(matrix[keep][flags], matrix[keep][~flags], d_tc, top)
    replace_response_features(
        store, model_id, judge_model, ranking.assign(run_id=run_id, dtype=_dtype(config))
    )
    pivotal = feature_ranking(store, model_id=model_id, top=20)
    overlap = None
    if not pivotal.empty:
        o = ranking_overlap(
            list(zip(ranking["layer"][:20], ranking["feature"][:20], strict=True)),
            list(zip(pivotal["layer"], pivotal["feature"], strict=True)),
            matrix.shape[1],
        )
        overlap = {"k": o.k, "shared": o.shared, "expected": o.expected, "p_value": o.p_value,
                   "features": [list(f) for f in o.features]}  # fmt: skip
    return {"model_id": model_id, "status": "ok", "misaligned": int(flags.sum()),
            "aligned": int((~flags).sum()), "overlap_with_pivotal": overlap,
            "top": ranking.head(5)[["layer", "feature", "mean_diff", "cohens_d"]]
            .to_dict(orient="records")}  # fmt: skip


def _ranking_or_failure(config: ExperimentConfig, data_dir: str, role: str, run_id: str) -> dict:
    """`response_feature_ranking`, or (once its retries are spent) status `failed` with the
    reason: one model's failure does not stop the other's ranking."""
    try:
        return response_feature_ranking(config, data_dir, role, run_id)
    except Exception as exc:
        get_run_logger().warning("response features of %s failed: %s", role, exc)
        return {
            "model_id": describe_model(config, role).model_id,
            "status": "failed",
            "reason": f"{type(exc).__name__}: {exc}",
        }


def sampled_em_answers(
    store: Store, config, model_id: str, per_side: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The model's judged EM answers that count (with their `misaligned` flag), at most
    `per_side` of each side, the first by generation id so a re-run reads the same ones; and
    their generations (context, text, token ids) indexed by generation id. Response features
    and the interventions' response direction read the same answers."""
    from emc.store.behaviour import generations

    scored = scored_generations(store, response_judge_id(config), model_ids=[model_id])
    scored = scored[scored["purpose"].isin(["em_eval", "imported"])]
    b = config.behaviour
    answers = em_answers(scored, b.em_aligned_below, b.em_coherent_above)
    answers = answers[answers["counted"]]
    answers = (
        answers.sort_values("generation_id").groupby("misaligned", group_keys=False).head(per_side)
    )
    texts = generations(
        store, model_ids=[model_id], generation_ids=answers["generation_id"].tolist()
    ).set_index("generation_id")
    return answers, texts


def _generate(config, data_dir, roles, prompt_ids, samples, run_id):
    if not prompt_ids:
        raise ValueError("name the prompts to generate from")
    n = samples or config.behaviour.continuation_samples
    generated = {
        role: generate_samples(config, data_dir, role, "generate", prompt_ids, {}, [], n, run_id)
        for role in roles
    }
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "generate", all_ids, run_id)
    return {
        "prompts": len(prompt_ids),
        "new_samples": sum(r["new"] for r in generated.values()),
        "failed": [f for r in generated.values() for f in r["failed"]],
        "judged": judged,
        "generation_ids": all_ids,
    }


def _dtype(config: ExperimentConfig) -> str:
    from emc.models.precision import resolve_precision

    return resolve_precision(config.runtime).dtype_name


def _publish(summary: dict) -> None:
    lines = ["# Behaviour", ""]
    cont = summary.get("continuations")
    if cont:
        lines.append(
            f"Continuation checks: {cont['confirmed']} of {cont['checked']} prompts confirmed "
            f"({cont['samples_per_context']} samples per context), "
            f"{cont['pivotal_tokens']} pivotal token rows."
        )
    em = summary.get("em")
    if em and em["rates"]:
        rows = [r for r in em["rates"] if r["question_group"] == "all"]
        create_table_artifact(key="em-rates", table=rows, description="EM rate per model")
        for r in rows:
            lines.append(
                f"- {r['model_id']}: EM rate {r['em_rate']:.3f} "
                f"[{r['low']:.3f}, {r['high']:.3f}] over {r['counted']} answers"
            )
    create_markdown_artifact(key="behaviour", markdown="\n".join(lines))
