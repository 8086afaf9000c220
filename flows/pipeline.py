"""The full pipeline as one flow: organism -> model check -> discovery -> tracing -> analysis ->
behaviour -> causal checks -> feature cards.

Each stage is its own flow, run here as a subflow, so the Prefect UI shows one parent run with a
child per stage and each stage keeps its own artifacts and `runs` row. The stages are the same
flows the separate deployments and the `emc` commands run; `emc demo` runs this flow.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from emc.config import default_config_path, resolve_data_dir
from emc.faults import fault_point
from emc.runs import recorded_run
from emc.store import RunRecord, Store, read_only_query
from emc.store.runs import adopting_runs, get_run, latest_run_with_params, update_run_summary
from flows.analysis import analysis_flow
from flows.discovery import discovery_flow
from flows.evaluation import evaluation_flow
from flows.feature_cards import feature_cards_flow
from flows.interventions import interventions_flow
from flows.model_check import model_check_flow
from flows.organism import organism_flow
from flows.parameters import PipelineParameters, takes
from flows.reporting import page_url, prompt_links, rounded_rows
from flows.runtime import current_flow_run_id, deployment_data_dir
from flows.tracing import tracing_flow

STORE_COUNTS = (
    "SELECT 'prompts' AS what, count(*) AS n FROM prompts UNION ALL "
    "SELECT 'judgements', count(*) FROM judgements UNION ALL "
    "SELECT 'flagged for review', count(*) FROM review_queue UNION ALL "
    "SELECT 'graphs', count(*) FROM graphs WHERE status = 'ok' UNION ALL "
    "SELECT 'graph nodes', count(*) FROM graph_nodes UNION ALL "
    "SELECT 'forward diffs', count(*) FROM forward_diffs UNION ALL "
    "SELECT 'ablations', count(*) FROM ablations WHERE status = 'ok' UNION ALL "
    "SELECT 'shift components', count(*) FROM shift_components UNION ALL "
    "SELECT 'interventions', count(*) FROM interventions UNION ALL "
    "SELECT 'generations', count(*) FROM generations UNION ALL "
    "SELECT 'continuation checks', count(*) FROM continuation_checks UNION ALL "
    "SELECT 'feature cards', count(*) FROM feature_cards UNION ALL "
    "SELECT 'feature labels', count(*) FROM feature_labels UNION ALL "
    "SELECT 'runs', count(*) FROM runs"
)


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    on = "config" if params.get("config_path") else f"organism-{params.get('organism') or 'own'}"
    return f"pipeline-{on}-{params.get('iterations', 'cfg')}x-trace{params.get('graphs', 6)}"


@flow(name="pipeline", flow_run_name=_run_name)
@takes(PipelineParameters)
def pipeline_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    organism: str | None = "default",
    small_organism: bool = False,
    iterations: int | None = 2,
    prompts_per_iteration: int | None = 8,
    select: str = "flagged",
    graphs: int = 6,
    ablate_top: int = 5,
    continuation_samples: int = 10,
    eval_samples: int = 5,
    resume: bool = True,
) -> dict:
    """Run every stage on the data directory's experiment.

    Without `config_path`, the organism (`organism`: default or subtle; None: use the data
    directory's own experiment.yaml as it is) is built or reused first. Tracing takes the `graphs`
    most urgent prompts of the review queue (`select`: flagged, or reviewed only). Behaviour
    samples `continuation_samples` continuations per context of the flagged prompts and
    `eval_samples` answers per question paraphrase (the organism's control adapter too).

    With `resume`, a run whose last run with the same parameters was killed (or failed) after
    its discovery completed does not repeat discovery: killed anywhere, run again, the pipeline
    ends with the store a run that was never killed would have made.
    """
    data_dir = deployment_data_dir(data_dir)
    logger = get_run_logger()
    started = datetime.now(UTC)  # the organism stage's run is recorded before the pipeline's
    resolved = str(resolve_data_dir(data_dir))
    organism_summary = None
    if config_path is None and organism is not None:
        logger.info("1/8 organism (%s)", organism)
        organism_summary = organism_flow(data_dir=resolved, variant=organism, small=small_organism)
        logger.info(
            "organism %s %s", organism_summary["recipe_hash"],
            "reused" if organism_summary["reused"] else "built",
        )  # fmt: skip
    elif config_path is None and not default_config_path(resolve_data_dir(resolved)).is_file():
        raise ValueError(
            f"no config: pass config_path, or organism=default to build the organism in {resolved}"
        )
    if organism_summary is None:
        logger.info("1/8 organism: skipped, config %s", config_path or "of the data directory")
    stages = {"organism": organism_summary}
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": resolved,
        "organism": organism,
        "small_organism": small_organism,
        "iterations": iterations,
        "prompts_per_iteration": prompts_per_iteration,
        "select": select,
        "graphs": graphs,
        "ablate_top": ablate_top,
        "continuation_samples": continuation_samples,
        "eval_samples": eval_samples,
    }
    with (
        recorded_run(store, "flow", "pipeline", params, current_flow_run_id()) as run,
        adopting_runs(store, run.run_id, since=started),  # its stages' runs name it as parent
    ):
        killed = _killed_run(store, params, run.run_id) if resume else None
        if killed:
            logger.info("resuming: run %s with these parameters failed or was killed",
                        killed.run_id)  # fmt: skip
        logger.info("2/8 model check")
        stages["check"] = model_check_flow(config_path=config_path, data_dir=resolved)
        logger.info("model check: %d probe(s), %d failed", stages["check"]["probes"],
                    stages["check"]["failed"])  # fmt: skip
        done_discovery = _completed_discovery(store, killed)
        if done_discovery is not None:
            # Discovery is the one stage that is not idempotent (it asks for new rounds); every
            # later stage skips the work a killed run already stored.
            logger.info("3/8 discovery: done by %s, killed later; not repeated", killed.run_id)
            stages["discovery"] = done_discovery
        else:
            logger.info("3/8 discovery")
            stages["discovery"] = discovery_flow(
                config_path=config_path,
                data_dir=resolved,
                iterations=iterations,
                prompts_per_iteration=prompts_per_iteration,
            )
        logger.info(
            "discovery: verdicts %s; review queue %s",
            _counts(stages["discovery"].get("verdicts")), _counts(stages["discovery"].get("queue")),
        )  # fmt: skip
        run.summary = {
            "resumed_from": killed.run_id if killed else None,
            "discovery_run": stages["discovery"].get("run_id"),
        }
        update_run_summary(store, run.run_id, run.summary)
        fault_point("pipeline-after-discovery")
        _later_stages(
            stages, config_path, resolved, select, graphs, ablate_top,
            continuation_samples, eval_samples, organism_summary,
        )  # fmt: skip
        run.summary["stages"] = [name for name, value in stages.items() if value is not None]
    counts = read_only_query(store, STORE_COUNTS)
    logger.info("pipeline done: store %s", store.path)
    create_table_artifact(
        key="pipeline-store", table=rounded_rows(counts), description="Rows in the store"
    )
    create_markdown_artifact(
        key="pipeline-summary", markdown=_markdown(store, stages), description="Pipeline"
    )
    return {"data_dir": resolved, "store": str(store.path), "run_id": run.run_id, **stages}


def _later_stages(
    stages: dict,
    config_path: str | None,
    resolved: str,
    select: str,
    graphs: int,
    ablate_top: int,
    continuation_samples: int,
    eval_samples: int,
    organism_summary: dict | None,
) -> None:
    """Tracing, analysis, behaviour, the causal checks and the feature cards, each skipping work
    already stored."""
    logger = get_run_logger()
    logger.info("4/8 tracing")
    stages["tracing"] = tracing_flow(
        config_path=config_path, data_dir=resolved, select=select, limit=graphs
    )
    traced = stages["tracing"]
    logger.info(
        "tracing: %d prompt(s), %d graph(s) made, %d failed", traced["prompts"], traced["made"],
        traced["failed"],
    )  # fmt: skip
    logger.info("5/8 analysis")
    stages["analysis"] = analysis_flow(
        config_path=config_path, data_dir=resolved, ablate_top=ablate_top
    )
    analysed = stages["analysis"]
    logger.info(
        "analysis: %d prompt(s) with graph pairs, %d measured now, %d failed",
        analysed["prompts"], analysed["measured"], len(analysed["failed"]),
    )  # fmt: skip
    # Behaviour before the causal checks: the checks ablate the response direction made from
    # the EM evaluation's judged answers.
    logger.info("6/8 behaviour")
    stages["behaviour"] = behaviour_stage(
        config_path,
        resolved,
        continuation_samples,
        eval_samples,
        compare_control=bool(organism_summary and organism_summary.get("config") is not None),
    )
    for line in behaviour_lines(stages["behaviour"]):
        logger.info("behaviour: %s", line)
    logger.info("7/8 causal checks")
    stages["interventions"] = interventions_flow(config_path=config_path, data_dir=resolved)
    checked = stages["interventions"]
    logger.info(
        "causal checks: %d prompt(s), %d measured now, %d part(s) failed",
        checked["prompts"], checked["measured"], len(checked["failed"]),
    )  # fmt: skip
    fault_point("pipeline-after-causal-checks")
    # Last, so the cards cover every feature a stage names: the ranking's top, the ablated
    # features and those of the feature interventions.
    logger.info("8/8 feature cards")
    stages["feature_cards"] = feature_cards_flow(config_path=config_path, data_dir=resolved)
    logger.info("%s", feature_cards_line(stages["feature_cards"]))


def _counts(counts: dict | None) -> str:
    """{"pending": 4, "done": 0} as `pending 4, done 0`."""
    return ", ".join(f"{k} {v}" for k, v in (counts or {}).items()) or "none"


def _killed_run(store: Store, params: dict, run_id: str) -> RunRecord | None:
    """The latest pipeline run with these parameters, if it failed or was killed (else None)."""
    previous = latest_run_with_params(store, "pipeline", params, exclude=run_id)
    return previous if previous is not None and previous.status == "failed" else None


def _completed_discovery(store: Store, killed: RunRecord | None) -> dict | None:
    """The summary of the discovery a killed pipeline run completed, if it did."""
    run_id = (killed.summary or {}).get("discovery_run") if killed else None
    discovery = get_run(store, run_id) if run_id else None
    if discovery is None or discovery.status != "completed":
        return None
    return discovery.summary


def behaviour_stage(
    config_path: str | None,
    data_dir: str,
    continuation_samples: int,
    eval_samples: int,
    compare_control: bool,
) -> dict:
    """Continuation checks of the flagged prompts, the EM evaluation with response features,
    and (on the organism) the EM evaluation of the control adapter, the negative control."""
    common = {"config_path": config_path, "data_dir": data_dir}
    result = {
        "checks": evaluation_flow(**common, parts=["continuations"], samples=continuation_samples),
        "em": evaluation_flow(**common, parts=["em", "features"], samples=eval_samples),
    }
    if compare_control and _has_control_adapter(config_path, data_dir):
        result["control"] = evaluation_flow(
            **common, parts=["em"], samples=eval_samples, adapter="control", roles=["adapted"]
        )
    return result


def _has_control_adapter(config_path: str | None, data_dir: str) -> bool:
    from pathlib import Path

    from emc.config import load_experiment

    config, _ = load_experiment(config_path, data_dir)
    adapter = config.models.adapter
    return adapter is not None and (Path(adapter.ref).parent / "control").is_dir()


def behaviour_lines(behaviour: dict) -> list[str]:
    """The stage's findings in sentences: confirmed prompts and EM rates per model."""
    lines = []
    checks = behaviour["checks"]["continuations"]
    lines.append(
        f"continuation checks: {checks['confirmed']} of {checks['checked']} flagged prompts "
        f"confirmed by what the adapted model says ({checks['samples_per_context']} samples)"
    )
    names = {v: k for k, v in behaviour["em"]["models"].items()}
    if "control" in behaviour:
        names[behaviour["control"]["models"]["adapted"]] = "control"
    rates = list(behaviour["em"]["em"]["rates"])
    if "control" in behaviour:
        rates += behaviour["control"]["em"]["rates"]
    for r in rates:
        if r["question_group"] in ("all", "other_domains"):
            lines.append(
                f"EM rate {names.get(r['model_id'], r['model_id'])} ({r['question_group']}): "
                f"{r['em_rate']:.3f} [{r['low']:.3f}, {r['high']:.3f}] over {r['counted']} answers"
            )
    return lines


def feature_cards_line(cards: dict) -> str:
    """The feature-cards stage in one sentence."""
    if not cards["features"]:
        return "feature cards: none (no ranked features yet)"
    return (
        f"feature cards: {len(cards['features'])} features ({cards['carded']} carded now, "
        f"{cards['skipped']} before) over {cards['corpus_id']} ({cards['texts']} texts); "
        + _labels_part(cards)
        + f"`emc feature show {cards['features'][0][0]}/{cards['features'][0][1]}` shows one"
    )


def _labels_part(cards: dict) -> str:
    if not cards.get("labeller"):
        return ""
    failed = len(cards["label_failures"])
    return f"labels by {cards['labeller']}: {cards['labelled']} new" + (
        f", {failed} failed; " if failed else "; "
    )


def _markdown(store: Store, stages: dict) -> str:
    traced, analysed = stages["tracing"], stages["analysis"]
    lines = [
        f"Store: `{store.path}`",
        f"Discovery verdicts: {stages['discovery'].get('verdicts')}",
        f"Graphs: {traced['graphs_ok']} ok, {traced['graphs_failed']} failed.",
    ]
    if analysed["prompts"]:
        lines += ["", analysed["ground_truth"]]
    from emc.analysis.causal_report import headline

    lines += ["", *headline(stages["interventions"])]
    lines += ["", *behaviour_lines(stages["behaviour"])]
    lines += ["", feature_cards_line(stages["feature_cards"])]
    lines += [
        "",
        "Next: `emc dashboard -d DATA_DIR` (Review, Graphs, Features), `emc analyze "
        "--ranking-only -d DATA_DIR`, `emc diff PROMPT_ID -d DATA_DIR`, `emc intervene -d "
        "DATA_DIR`, `emc feature show LAYER/FEATURE -d DATA_DIR`.",
        "",
        "Dashboard: "
        + " · ".join(
            f"[{page.title()}]({page_url(page)})"
            for page in ("runs", "review", "graphs", "features", "interventions", "behaviour")
        ),
    ]
    traced_ids = traced.get("prompt_ids") or []
    if traced_ids:
        lines += ["", "Traced prompts:", ""]
        lines += [f"- `{p}`: {prompt_links(p)}" for p in traced_ids[:30]]
        if len(traced_ids) > 30:
            lines.append(f"- and {len(traced_ids) - 30} more")
    return "\n".join(lines)
