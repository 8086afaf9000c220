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

Shards (`shards` > 0; a Prefect server and workers): for `continuations`, `em` and `generate`,
the samples each model still lacks (the plan, whose ids are known without loading a model, minus
what the store holds) are split into `shards` chunks per model of about equal size, each the
run of the `behaviour-shard` deployment (`behaviour_shard_flow`) that any worker of its pool may
take, on this machine or another. A shard never opens the store: it loads its model, draws its
samples and writes each context's as a sample bundle into the spool (`spool_dir`, default
DATA_DIR/spool, shared with this machine; `emc.store.sample_bundles`); then, its model released,
it judges them with the config's judge and writes them again with their scores and the judge's
calls, so the LLM calls are spread over the workers too (a worker that cannot reach the judge
stops judging after a context whose scores all failed, and leaves it to this flow). This flow
waits for every shard, loads the spool into the store (one ingest at a time: the `store-writer`
slot), then goes on from the store as the local path does: it judges whatever is still unjudged
or failed, and summarises. A shard that did not complete fails the run (`ShardsIncomplete`)
after what reached the spool was loaded; a re-run loads whatever is still in the spool first,
then hands out only the samples still missing, so nothing is drawn or stored twice.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict

from emc.behaviour.generate import (
    Context,
    PlanItem,
    generate_missing,
    plan_ids,
    prompt_contexts,
    question_contexts,
    sampling_key,
)
from emc.behaviour.judges import make_response_judge, response_judge_id, to_judge
from emc.behaviour.questions import Question, load_questions, organism_questions
from emc.behaviour.records import Metric
from emc.behaviour.sampling import ContextTooLongError, SamplingParams
from emc.behaviour.summary import continuation_rows, em_answers, em_rates, prompt_verdicts
from emc.config import ConfigError, ExperimentConfig, load_experiment
from emc.events import EVALUATION_COMPLETED
from emc.models import NonFiniteActivationError, describe_model
from emc.organism.lexicon import Lexicon
from emc.pivotal.prompts import PromptRecord
from emc.runs import recorded_run
from emc.store import Store, upsert_model
from emc.store.behaviour import (
    existing_generation_ids,
    generation_key,
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
from emc.store.sample_bundles import (
    ContextFailure,
    ingest_sample_bundles,
    pending_sample_bundles,
    write_sample_bundle,
)
from emc.store.validity import rejected_prompts
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.parameters import EvaluationParameters, takes
from flows.reporting import rounded_rows
from flows.runtime import (
    announce,
    current_flow_run_id,
    deployment_data_dir,
    gpu_slot,
    store_writer_slot,
)
from flows.shards import ShardsIncomplete, incomplete, start_shard, wait_for

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


# --- shards: the same samples drawn (and judged) by workers that never open the store --------


class SampleWork(BaseModel):
    """One context to sample from, and which of its samples to draw.

    Plain data (JSON), so that a shard of work can be a deployment's parameter: a prompt
    (perhaps with a labelled token forced after it) or one paraphrase of a question, which the
    worker renders with its model's tokenizer, as the local path does.
    """

    model_config = ConfigDict(frozen=True)

    purpose: Literal["continuation", "em_eval", "generate"]
    indices: list[int]  # the sample indices to draw
    sample0_id: str  # the planned id of the context's sample 0: the worker checks it plans the same
    prompt: PromptRecord | None = None
    forced_token_id: int | None = None
    token_label: str | None = None
    question: Question | None = None
    paraphrase: int | None = None

    def context(self, tokenizer) -> Context:
        if self.question is not None:
            return question_contexts([self.question], tokenizer)[self.paraphrase or 0]
        if self.prompt is None:
            raise ValueError("a sample work item names a prompt or a question")
        labels = (
            {self.forced_token_id: self.token_label or ""}
            if self.forced_token_id is not None
            else None
        )
        return prompt_contexts(self.prompt, tokenizer, self.purpose, labels)[-1]


def plan_samples(
    config: ExperimentConfig,
    model_id: str,
    purpose: str,
    prompts: list[PromptRecord],
    labels: dict[str, dict[int, str]],
    questions: list[Question],
    samples: int,
) -> list[tuple[SampleWork, list[str]]]:
    """Every context one model samples for a part, with the ids of all its samples, in the
    local path's order (questions, then each prompt and its labelled tokens).

    No model or tokenizer is needed: a sample's id hashes the model id, the context's key (the
    prompt id, or the question paraphrase's key), the forced token, the sampling and its index.
    """
    params = SamplingParams.from_config(config.behaviour)
    sampling = sampling_key(params, config.behaviour.seed)
    specs: list[dict] = [
        {"purpose": "em_eval", "question": q, "paraphrase": i}
        for q in questions
        for i in range(len(q.paraphrases))
    ]
    for prompt in prompts:
        specs.append({"purpose": purpose, "prompt": prompt})
        specs += [
            {"purpose": purpose, "prompt": prompt, "forced_token_id": token, "token_label": label}
            for token, label in sorted(labels.get(prompt.prompt_id, {}).items())
        ]
    planned = []
    for spec in specs:
        key = (
            spec["question"].key(spec["paraphrase"])
            if "question" in spec
            else spec["prompt"].prompt_id
        )
        forced = spec.get("forced_token_id")
        ids = [
            generation_key(model_id, spec["purpose"], key, i, sampling, forced)
            for i in range(samples)
        ]
        if ids:
            planned.append((SampleWork(**spec, indices=list(range(samples)), sample0_id=ids[0]),
                            ids))  # fmt: skip
    return planned


def pending_samples(store: Store, planned: list[tuple[SampleWork, list[str]]]) -> list[SampleWork]:
    """The planned samples the store does not hold yet, context by context."""
    existing = existing_generation_ids(store, [g for _, ids in planned for g in ids])
    pending = []
    for work, ids in planned:
        missing = [i for i in work.indices if ids[i] not in existing]
        if missing:
            pending.append(work.model_copy(update={"indices": missing}))
    return pending


def split_work(items: list[SampleWork], shards: int) -> list[list[SampleWork]]:
    """`shards` chunks with about equal numbers of samples. Each chunk is a run of contexts in
    order, so a context is split at most where one chunk ends and the next begins; a chunk is
    empty when there are fewer samples than shards."""
    units = [(n, i) for n, work in enumerate(items) for i in work.indices]
    chunks = []
    for k in range(shards):
        grouped: dict[int, list[int]] = {}
        for n, i in units[k * len(units) // shards : (k + 1) * len(units) // shards]:
            grouped.setdefault(n, []).append(i)
        chunks.append([items[n].model_copy(update={"indices": ix}) for n, ix in grouped.items()])
    return chunks


@task(task_run_name="sample-{role}-to-spool", **RETRIES)
def sample_to_spool(
    config: ExperimentConfig,
    role: str,
    items: list[SampleWork],
    run_id: str,
    spool_dir: str,
    judge: bool = True,
) -> dict:
    """`generate_samples` (and `judge_samples`) for a worker that cannot write the store.

    With the `gpu` slot held, each context's samples are drawn and written as a bundle at once,
    so a killed shard keeps what it drew. The model released, each context's samples are judged
    and written again with their scores (the ingest keeps a stored sample as it is and adds the
    scores). A context that cannot be sampled becomes a bundle that names it and why.
    """
    logger = get_run_logger()
    params = SamplingParams.from_config(config.behaviour)
    drawn: list[list] = []
    failed = 0
    with gpu_slot():
        loaded = cached_model(config, role)
        model = loaded.identity.to_row(first_run_id=run_id)
        for work in items:
            context = work.context(loaded.tokenizer)
            item = PlanItem(context, max(work.indices) + 1)
            plan_ids([item], model.model_id, params, config.behaviour.seed)
            if item.ids[0] != work.sample0_id:
                raise ConfigError(
                    f"{role} on this worker plans other sample ids than the flow that made the "
                    f"shard (model {model.model_id}): its model files, adapter or sampling "
                    "differ; workers must see the same models and config as the store's host"
                )
            wanted = set(work.indices)
            existing = {g for i, g in enumerate(item.ids) if i not in wanted}
            rows = []
            try:
                for batch in generate_missing(
                    loaded, [item], existing, params, config.behaviour.seed, run_id,
                    config.behaviour.batch_size,
                ):  # fmt: skip
                    rows += batch
            except (ContextTooLongError, NonFiniteActivationError) as exc:
                failure = _context_failure(role, context, exc)
                logger.warning("%s", failure["error"])
                failure = ContextFailure(purpose=context.purpose, **failure)
                write_sample_bundle(spool_dir, model, run_id, [], failures=[failure])
                failed += 1
                continue
            write_sample_bundle(spool_dir, model, run_id, rows)
            drawn.append(rows)
    release_models()  # judging needs no model; free the memory for whatever runs next
    judged = _judge_to_spool(config, drawn, model, run_id, spool_dir) if judge else 0
    samples = sum(len(rows) for rows in drawn)
    logger.info("%s: %d samples drawn, %d judged, %d contexts failed", role, samples, judged,
                failed)  # fmt: skip
    return {"drawn": samples, "judged": judged, "failed": failed}


def _judge_to_spool(config, drawn: list[list], model, run_id: str, spool_dir: str) -> int:
    """Judge each context's samples and write them again with their scores; returns how many
    samples were judged. Judging on the worker only spreads the work: whatever it leaves (the
    judge cannot be built here, or is unreachable) the evaluation flow judges after the ingest."""
    logger = get_run_logger()
    if not drawn:
        return 0
    try:
        judge = make_response_judge(config)
    except Exception as exc:  # e.g. no API key on this worker: the flow judges instead
        logger.warning("not judging on this worker (%s: %s)", type(exc).__name__, exc)
        return 0
    judged = 0
    for rows in drawn:
        metrics = METRICS_FOR[rows[0].purpose]
        try:
            scores = judge.score_many(
                [to_judge(row.model_dump()) for row in rows], metrics, run_id=run_id
            )
        except Exception as exc:  # a judge that raises (it should not): leave it to the flow
            logger.warning("judging stopped on this worker (%s: %s)", type(exc).__name__, exc)
            break
        write_sample_bundle(spool_dir, model, run_id, rows, scores)
        judged += len(rows)
        if scores and all(s.status == "failed" for s in scores):
            logger.warning(
                "judging stopped on this worker: every score of a context failed (%s); the "
                "evaluation flow judges the rest",
                scores[0].error,
            )
            break
    return judged


@flow(name="behaviour-shard", flow_run_name="behaviour-shard-{role}-{shard}")
def behaviour_shard_flow(
    config: ExperimentConfig,
    role: str,
    items: list[SampleWork],
    run_id: str,
    spool_dir: str,
    shard: int = 0,
    judge: bool = True,
) -> dict:
    """One shard of a behaviour part, on whichever worker takes it: its samples (judged, when
    `judge` and the judge is reachable from here) become sample bundles in `spool_dir`, shared
    with the store's host, never rows in a store it may not reach. `config` is the evaluation's
    (its adapter included); its model paths must be valid on the worker.

    Args:
        config: The evaluation's experiment config, its adapter included.
        role: Which model samples: base or adapted.
        items: The samples to draw, context by context, with their ids.
        run_id: The EMC run that started this shard; every sample names it.
        spool_dir: Where the sample bundles go, shared with the store's host.
        shard: This shard's number within its run.
        judge: Judge the samples here when the config's judge is reachable.
    """
    try:
        result = sample_to_spool(config, role, items, run_id, spool_dir, judge)
    finally:
        release_models()
    return {"shard": shard, "role": role, **result}


@task(task_run_name="ingest-samples")
def ingest_samples(data_dir: str, spool_dir: str) -> dict:
    """Load the spool's sample bundles into the store, one ingest at a time (`store-writer`)."""
    with store_writer_slot():
        report = ingest_sample_bundles(Store.in_data_dir(data_dir), spool_dir)
    if report.rejected:
        get_run_logger().error("rejected sample bundles: %s", report.rejected)
    return asdict(report)


@dataclass(frozen=True)
class Sharding:
    """Where a part's samples are drawn when `shards` > 0 (see the module)."""

    shards: int
    spool_dir: str
    deployment: str


def _sample(config, data_dir, store, roles, ids, purpose, prompt_ids, labels, questions, n,
            run_id, sharding: Sharding | None) -> dict[str, dict]:  # fmt: skip
    """Each model's samples for a part, here or on shards: per role its model id, the ids of
    every planned sample, how many were new, and the contexts that failed."""
    if sharding is None:
        return {
            role: generate_samples(config, data_dir, role, purpose, prompt_ids, labels,
                                   questions, n, run_id)
            for role in roles
        }  # fmt: skip
    return _sample_on_shards(config, data_dir, store, roles, ids, purpose, prompt_ids, labels,
                             questions, n, run_id, sharding)  # fmt: skip


def _sample_on_shards(config, data_dir, store, roles, ids, purpose, prompt_ids, labels,
                      questions, n, run_id, sharding: Sharding) -> dict[str, dict]:  # fmt: skip
    """Hand each model's missing samples to `sharding.shards` runs of the shard deployment,
    wait for all, load the spool; raise ShardsIncomplete if a shard did not complete."""
    logger = get_run_logger()
    spool = sharding.spool_dir
    prompts = get_prompts(store, prompt_ids) if prompt_ids else []
    planned = {role: plan_samples(config, ids[role], purpose, prompts, labels, questions, n)
               for role in roles}  # fmt: skip
    wanted = {role: [g for _, gids in planned[role] for g in gids] for role in roles}
    missing = {role: set(wanted[role]) - existing_generation_ids(store, wanted[role])
               for role in roles}  # fmt: skip
    judge_id, metrics = response_judge_id(config), METRICS_FOR[purpose]
    unjudged = {role: set(unscored_generations(store, judge_id, metrics, wanted[role]))
                for role in roles}  # fmt: skip
    ingested: list[dict] = []
    if pending_sample_bundles(spool):  # left by an earlier run's shards: load before planning
        ingested += ingest_samples(data_dir, spool)["ingested"]
    started = []
    for role in roles:
        for shard, chunk in enumerate(split_work(pending_samples(store, planned[role]),
                                                 sharding.shards)):  # fmt: skip
            if not chunk:
                continue
            parameters = {
                "config": config.model_dump(mode="json"),
                "role": role,
                "items": [work.model_dump(mode="json") for work in chunk],
                "run_id": run_id,
                "spool_dir": spool,
                "shard": shard,
            }
            started.append(start_shard(sharding.deployment, parameters))
            size = sum(len(w.indices) for w in chunk)
            logger.info("%s shard %d: %d samples of %d contexts -> %s", role, shard, size,
                        len(chunk), sharding.deployment)  # fmt: skip
    finished = wait_for(started)
    if started:
        ingested += ingest_samples(data_dir, spool)["ingested"]
    broken = incomplete(finished)
    if broken:
        raise ShardsIncomplete(
            f"{len(broken)} behaviour shard(s) did not complete ({'; '.join(broken)}); the "
            "samples they wrote to the spool were loaded, run the command again for the rest"
        )
    result = {}
    for role in roles:
        mine = [b for b in ingested if b["model_id"] == ids[role] and b["run_id"] == run_id]
        now = existing_generation_ids(store, wanted[role])
        still = set(unscored_generations(store, judge_id, metrics, wanted[role]))
        result[role] = {
            "model_id": ids[role],
            "ids": wanted[role],
            "new": len(missing[role] & now),
            "failed": [
                {k: f[k] for k in ("prompt_id", "question_id", "role", "error")}
                for b in mine
                for f in b["failures"]
                if f["purpose"] == purpose
            ],
            "judged_on_workers": len(unjudged[role] - still),
            "unscorable_on_workers": sum(
                b["scores"].get("unscorable", 0) for b in mine if b["judge_model"] == judge_id
            ),
        }
    return result


def _with_workers(judged: dict, generated: dict[str, dict]) -> dict:
    """The flow's judging counts plus what shards judged (`on_workers`), when sharded."""
    if not any("judged_on_workers" in r for r in generated.values()):
        return judged
    on_workers = sum(r["judged_on_workers"] for r in generated.values())
    return {
        **judged,
        "judged": judged["judged"] + on_workers,
        "unscorable": judged.get("unscorable", 0)
        + sum(r["unscorable_on_workers"] for r in generated.values()),
        "on_workers": on_workers,
    }


def _run_name() -> str:
    from prefect.runtime import flow_run

    parts = flow_run.parameters.get("parts") or PARTS[:2]
    return "evaluation-" + "+".join(parts)


@flow(name="evaluation", flow_run_name=_run_name)
@takes(EvaluationParameters)
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
    shards: int = 0,
    spool_dir: str | None = None,
    shard_deployment: str = "behaviour-shard/samples-to-spool",
) -> dict:
    """Sample, judge and summarise behaviour for base and adapted model (see the module).

    `shards` > 0 hands the samples of `continuations`, `em` and `generate` to that many runs per
    model of `shard_deployment`, on any worker of its pool (other machines included); they
    write sample bundles to `spool_dir` (default DATA_DIR/spool, which they must share) and this
    flow loads them into the store, then judges what is left and summarises as without shards.
    """
    data_dir = deployment_data_dir(data_dir)
    parts = list(parts or PARTS[:2])
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    if shards < 0:
        raise ValueError("shards must be 0 or more")
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
        "shards": shards,
        "behaviour": config.behaviour.model_dump(mode="json"),
        "judge": config.judge.model,
    }
    if prompt_ids and {"continuations", "generate"} & set(parts):
        require_stored_prompts(store, prompt_ids)
    ids = {role: describe_model(config, role).model_id for role in roles}
    summary: dict = {"models": ids, "judge": config.judge.model}
    sharding = (
        Sharding(shards, spool_dir or str(Path(resolved) / "spool"), shard_deployment)
        if shards
        else None
    )
    with recorded_run(store, "flow", "evaluation", params, current_flow_run_id()) as run:
        try:
            if "continuations" in parts:
                summary["continuations"] = _continuations(
                    config, str(resolved), store, roles, ids, prompt_ids, samples, limit,
                    run.run_id, sharding,
                )  # fmt: skip
            if "em" in parts:
                summary["em"] = _em(
                    config, str(resolved), store, roles, ids, questions_path, samples, limit,
                    run.run_id, sharding,
                )  # fmt: skip
            if "features" in parts:
                summary["features"] = {
                    role: _ranking_or_failure(config, str(resolved), role, run.run_id)
                    for role in roles
                }
            if "generate" in parts:
                summary["generate"] = _generate(
                    config, str(resolved), store, roles, ids, prompt_ids or [], samples,
                    run.run_id, sharding,
                )  # fmt: skip
        finally:
            release_models()
        _publish(summary)
        run.summary = {"run_id": run.run_id, **summary}
    announce(EVALUATION_COMPLETED, resolved, {"run_id": run.run_id, "parts": parts,
                                              "models": summary["models"]})  # fmt: skip
    return run.summary


def _continuations(config, data_dir, store, roles, ids, prompt_ids, samples, limit, run_id,
                   sharding=None):  # fmt: skip
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
    generated = _sample(config, data_dir, store, roles, ids, "continuation", chosen, labels, [],
                        n, run_id, sharding)  # fmt: skip
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "continuation", all_ids, run_id)
    judged = _with_workers(judged, generated)
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


def _em(config, data_dir, store, roles, ids, questions_path, samples, limit, run_id,
        sharding=None):  # fmt: skip
    questions = (
        load_questions(Path(questions_path)) if questions_path else default_questions(config)
    )[:limit]
    n = samples or config.behaviour.eval_samples
    generated = _sample(config, data_dir, store, roles, ids, "em_eval", [], {}, questions, n,
                        run_id, sharding)  # fmt: skip
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "em_eval", all_ids, run_id)
    judged = _with_workers(judged, generated)
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


def _generate(config, data_dir, store, roles, ids, prompt_ids, samples, run_id, sharding=None):
    if not prompt_ids:
        raise ValueError("name the prompts to generate from")
    n = samples or config.behaviour.continuation_samples
    generated = _sample(config, data_dir, store, roles, ids, "generate", prompt_ids, {}, [], n,
                        run_id, sharding)  # fmt: skip
    all_ids = [g for result in generated.values() for g in result["ids"]]
    judged = judge_samples(config, data_dir, "generate", all_ids, run_id)
    judged = _with_workers(judged, generated)
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
        create_table_artifact(
            key="em-rates", table=rounded_rows(rows), description="EM rate per model"
        )
        for r in rows:
            lines.append(
                f"- {r['model_id']}: EM rate {r['em_rate']:.3f} "
                f"[{r['low']:.3f}, {r['high']:.3f}] over {r['counted']} answers"
            )
    create_markdown_artifact(key="behaviour", markdown="\n".join(lines))
