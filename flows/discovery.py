"""Discovery: generate prompts -> next-token logits of base and adapted -> judge -> review queue.

Every stage reads what is missing from the store and writes under deterministic keys, so a
killed run, run again, completes the rest without duplicates. Prompts from any source (the
generator, `emc prompt add`, imported files) go through the same stages.

Generator rounds resume too. A run records in its `runs` row how many rounds it has generated
(after each round's prompts are stored). A new run whose parameters (config, data directory,
rounds, prompts per round) equal those of the latest discovery run with those parameters, when
that run failed (raised, or was killed: the next run marks a dead process's row failed), makes
only the rounds that run did not: killed after round 2 of 3, the re-run generates round 3;
killed while scoring its last round, the re-run scores and judges that round's prompts only.
A completed run is never resumed: running the same command again asks for new rounds.
`resume=False` (`emc discover --no-resume`) always makes every round.
"""

from __future__ import annotations

import torch
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from emc.config import load_experiment
from emc.faults import fault_point
from emc.models import describe_model
from emc.pivotal.backends import make_generator, make_judge
from emc.pivotal.judge import Judgement
from emc.pivotal.logits import score_prompts
from emc.pivotal.verdicts import (
    VerdictRules,
    assess,
    measure_shift,
    needs_review,
    review_priority,
)
from emc.runs import recorded_run
from emc.store import Store, insert_llm_calls
from emc.store.judgements import (
    generator_attempts,
    insert_judgements,
    judged_prompt_ids,
    judgement_counts,
)
from emc.store.prompts import get_prompts, insert_prompts, stored_prompt_ids
from emc.store.queue import QueueItem, enqueue, list_queue, queue_counts
from emc.store.reviews import generator_feedback, judge_examples
from emc.store.runs import latest_run_with_params, update_run_summary
from emc.store.scores import (
    insert_prompt_scores,
    load_prompt_scores,
    scored_prompt_ids,
    unscored_prompt_ids,
    update_label_mass,
)
from flows.model_cache import cached_model, release_models
from flows.parameters import DiscoveryParameters, takes
from flows.reporting import id_list, prompt_links, rounded_rows, run_logger
from flows.runtime import current_flow_run_id, deployment_data_dir, gpu_slot, retry_unless_permanent

RETRIES = {
    "retries": 2,
    "retry_delay_seconds": [5, 30],
    "retry_condition_fn": retry_unless_permanent,
}


@task(task_run_name="generate-{n}-prompts", **RETRIES)
def generate_prompts(config_path: str | None, data_dir: str, n: int, run_id: str) -> dict:
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    generator = make_generator(config)
    proposal = generator.propose(
        n,
        generator_attempts(store),
        generator_feedback(store),
        stored_prompt_ids(store),
        config.discovery.generator_budget_tokens,
        run_id,
    )
    insert_llm_calls(store, proposal.calls)
    added = insert_prompts(store, proposal.prompts, run_id)
    logger = run_logger()  # the tasks also run alone (`.fn`), outside any run
    logger.info(
        "generator %s: %d prompt(s) proposed, %d new, %d rejected",
        generator.model_id, len(proposal.prompts), added, len(proposal.rejected),
    )  # fmt: skip
    for text, reason in proposal.rejected[:5]:
        logger.info("generator rejected %r: %s", text[:60], reason)
    return {"generator": generator.model_id, "added": added, "rejected": len(proposal.rejected)}


@task(task_run_name="score-prompts", **RETRIES)
def score_pending_prompts(config_path: str | None, data_dir: str, run_id: str) -> dict:
    """Top-k logits and divergence for every prompt not yet scored for this model pair."""
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    base_id = describe_model(config, "base").model_id
    adapted_id = describe_model(config, "adapted").model_id
    pending = get_prompts(store, unscored_prompt_ids(store, base_id, adapted_id))
    logger = run_logger()
    if not pending:
        logger.info("nothing to score: every stored prompt has logits for this model pair")
        return {"scored": 0, "failed": 0}
    logger.info("scoring %d prompt(s): %s", len(pending), id_list([p.prompt_id for p in pending]))
    batch_size = config.discovery.batch_size
    with gpu_slot():
        while True:
            try:
                scores = score_prompts(
                    cached_model(config, "base"),
                    cached_model(config, "adapted"),
                    pending,
                    k=config.top_k,
                    batch_size=batch_size,
                )
                break
            except torch.OutOfMemoryError:
                if batch_size == 1:
                    raise
                release_models()
                batch_size = max(1, batch_size // 2)
                logger.warning("out of memory while scoring: batch size %d now", batch_size)
    insert_prompt_scores(store, scores, config.top_k, run_id)
    failed = sum(s.divergence is None for s in scores)
    for s in (s for s in scores if s.divergence is None):
        error = next((t.error for t in (s.base, s.adapted) if t.status != "ok"), None)
        logger.warning("scoring prompt %s failed: %s", s.prompt_id, error)
    logger.info("scored %d prompt(s), %d failed", len(scores) - failed, failed)
    return {"scored": len(scores) - failed, "failed": failed, "batch_size": batch_size}


@task(task_run_name="judge-prompts", **RETRIES)
def judge_pending_prompts(config_path: str | None, data_dir: str, run_id: str) -> dict:
    """Judge scored prompts this judge has not judged; flagged ones enter the review queue."""
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    judge = make_judge(config)
    base_id = describe_model(config, "base").model_id
    adapted_id = describe_model(config, "adapted").model_id
    done = judged_prompt_ids(store, judge.model_id, base_id, adapted_id)
    todo = sorted(scored_prompt_ids(store, base_id, adapted_id) - done)
    logger = run_logger()
    if not todo:
        logger.info("nothing to judge: %s has judged every scored prompt", judge.model_id)
        return {"judged": 0, "flagged": 0}
    logger.info("judging %d prompt(s) with %s (%d judged before)", len(todo), judge.model_id,
                len(done))  # fmt: skip
    prompts = {p.prompt_id: p for p in get_prompts(store, todo)}
    scores = load_prompt_scores(store, todo, base_id, adapted_id)
    items = [(prompts[s.prompt_id], s) for s in scores]
    # The judge proposes; EMC's measured shift decides what a person must review.
    rules = VerdictRules.from_config(config.discovery)
    by_prompt = {s.prompt_id: s for s in scores}
    judgements = [
        assess(j, by_prompt[j.prompt_id], rules)
        for j in judge.judge_many(items, judge_examples(store), run_id)
    ]
    insert_judgements(store, judgements, run_id)

    flagged = []
    for judgement in judgements:
        if judgement.status != "ok":
            continue
        prompt_scores = by_prompt[judgement.prompt_id]
        _store_label_mass(store, judgement, prompt_scores)
        if needs_review(judgement):
            flagged.append(
                QueueItem(
                    prompt_id=judgement.prompt_id,
                    priority=review_priority(judgement),
                    reason=_queue_reason(judgement),
                    judgement_id=judgement.judgement_id,
                )
            )
    new = enqueue(store, flagged, run_id)
    statuses = [j.status for j in judgements]
    for judgement in (j for j in judgements if j.status != "ok"):
        logger.warning(
            "judging prompt %s: %s %s", judgement.prompt_id, judgement.status, judgement.error or ""
        )
    logger.info(
        "judged %d prompt(s), %d ok; %d flagged for review (%d new in the queue): %s",
        len(judgements), statuses.count("ok"), len(flagged), new,
        id_list([f.prompt_id for f in flagged]),
    )  # fmt: skip
    return {"judged": len(judgements), "ok": statuses.count("ok"), "flagged": len(flagged)}


def _queue_reason(judgement: Judgement) -> str:
    reason = f"{judgement.measured_verdict}: {judgement.summary}"
    if judgement.verdict != judgement.measured_verdict:
        reason += f" (judge said {judgement.verdict})"
    return reason


def _store_label_mass(store: Store, judgement: Judgement, scores) -> None:
    labels = {label.token_id: label.label for label in judgement.labels}
    update_label_mass(
        store, judgement.prompt_id, scores.base.model_id, scores.adapted.model_id,
        measure_shift(labels, scores).mass, judgement.labeller,
    )  # fmt: skip


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    rounds = params.get("iterations")
    per_round = params.get("prompts_per_iteration")
    return f"discovery-{'config' if rounds is None else rounds}x{per_round or 'config'}"


@flow(name="discovery", flow_run_name=_run_name)
@takes(DiscoveryParameters)
def discovery_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    iterations: int | None = None,
    prompts_per_iteration: int | None = None,
    resume: bool = True,
) -> dict:
    """Run `iterations` rounds of generate -> score -> judge -> queue (0: only pending prompts).

    With `resume`, a killed or failed run with the same parameters has its remaining rounds
    made instead (see the module's docstring).
    """
    data_dir = deployment_data_dir(data_dir)
    config, resolved = load_experiment(config_path, data_dir)
    iterations = config.discovery.iterations if iterations is None else iterations
    per_round = prompts_per_iteration or config.discovery.prompts_per_iteration
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "iterations": iterations,
        "prompts_per_iteration": per_round,
        "config": config.model_dump(mode="json"),
    }
    with recorded_run(store, "flow", "discovery", params, current_flow_run_id()) as run:
        resumed = _resumable_run(store, params, run.run_id) if resume and iterations else None
        done_before = resumed[1] if resumed else 0
        to_generate = iterations - done_before
        _log_plan(iterations, per_round, resumed, to_generate)
        progress_note = {"rounds_generated": done_before}
        if resumed:
            # Recorded now: killed before its first round, this run still passes on the count.
            progress_note["resumed_from"] = resumed[0]
            update_run_summary(store, run.run_id, progress_note)
        rounds = []
        progress = create_progress_artifact(
            progress=0.0, key="discovery-rounds", description="discovery rounds done"
        )
        try:
            for index in range(max(to_generate, 1)):
                number = done_before + index + 1 if to_generate > 0 else max(done_before, 1)
                if to_generate > 0:
                    get_run_logger().info("round %d/%d", number, iterations)
                generated = {"added": 0}
                if to_generate > 0:
                    generated = generate_prompts(config_path, str(resolved), per_round, run.run_id)
                    progress_note["rounds_generated"] = number
                    update_run_summary(store, run.run_id, progress_note)
                scored = score_pending_prompts(config_path, str(resolved), run.run_id)
                judged = judge_pending_prompts(config_path, str(resolved), run.run_id)
                rounds.append({"round": number, **generated, **scored, **judged})
                update_progress_artifact(progress, 100.0 * len(rounds) / max(to_generate, 1))
                fault_point(f"discovery-round-{number}")
        finally:
            release_models()
        counts = judgement_counts(store, run.run_id)
        create_table_artifact(
            key="discovery-verdicts",
            table=rounded_rows(counts),
            description="Verdicts of this run's judgements",
        )
        queue = queue_counts(store)
        get_run_logger().info(
            "discovery done: verdicts %s; review queue %s",
            ", ".join(f"{v} {n}" for v, n in zip(counts["verdict"], counts["prompts"], strict=True))
            or "none",
            ", ".join(f"{k} {v}" for k, v in queue.items()),
        )  # fmt: skip
        next_up = list(list_queue(store, "pending")["prompt_id"].head(10))
        create_markdown_artifact(
            key="discovery-summary",
            markdown=_summary_markdown(rounds, queue, next_up),
            description="Discovery rounds and review queue",
        )
        run.summary = {
            "run_id": run.run_id,
            **progress_note,
            "rounds": rounds,
            "verdicts": dict(zip(counts["verdict"], counts["prompts"].astype(int), strict=True)),
            "queue": queue,
        }
    return run.summary


def _resumable_run(store: Store, params: dict, run_id: str) -> tuple[str, int] | None:
    """(run id, rounds it generated) of the run to resume: the latest discovery run with these
    parameters, if it failed before generating all its rounds."""
    previous = latest_run_with_params(store, "discovery", params, exclude=run_id)
    if previous is None or previous.status != "failed":
        return None
    # All rounds generated still resumes: the last one may have died before its scoring or
    # judging, which the resumed run finishes without asking for a new round.
    return previous.run_id, (previous.summary or {}).get("rounds_generated", 0)


def _log_plan(iterations: int, per_round: int, resumed: tuple[str, int] | None, to_generate):
    logger = get_run_logger()
    if resumed:
        logger.info(
            "resuming failed run %s: %d of %d round(s) generated before, %d to go",
            resumed[0], resumed[1], iterations, max(to_generate, 0),
        )  # fmt: skip
    if to_generate > 0:
        logger.info("%d round(s) of %d prompt(s) each", to_generate, per_round)
    else:
        logger.info("no new round: scoring and judging the prompts still pending")


def _summary_markdown(
    rounds: list[dict], queue: dict[str, int], next_up: list[str] | None = None
) -> str:
    lines = ["| round | added | scored | failed | judged | flagged |", "|---|---|---|---|---|---|"]
    for r in rounds:
        lines.append(
            f"| {r['round']} | {r.get('added', 0)} | {r.get('scored', 0)} | {r.get('failed', 0)} "
            f"| {r.get('judged', 0)} | {r.get('flagged', 0)} |"
        )
    lines.append("")
    lines.append("Review queue: " + ", ".join(f"{k} {v}" for k, v in queue.items()))
    if next_up:
        lines += ["", "Next to review (highest priority first):", ""]
        lines += [f"- `{prompt_id}`: {prompt_links(prompt_id)}" for prompt_id in next_up]
    return "\n".join(lines)
