"""`emc demo`: the main job, end to end on the built-in organism."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import DataDirOption, app, fail, prepare_flows
from emc.cli.organism import VariantOption
from emc.cli.study import StagesOption, print_study, split_stages
from emc.config import load_experiment, resolve_data_dir
from emc.console import console, print_frame


@app.command()
def demo(
    data_dir: DataDirOption = None,
    variant: VariantOption = "default",
    iterations: Annotated[int, typer.Option(help="Discovery rounds.")] = 2,
    per_iteration: Annotated[int, typer.Option(help="Prompts per discovery round.")] = 8,
    small: Annotated[
        bool, typer.Option(help="The organism's seconds-long test recipe (weaker misalignment).")
    ] = False,
    graphs: Annotated[
        int, typer.Option(help="Trace this many flagged prompts (base and adapted graphs each).")
    ] = 6,
    ablate: Annotated[
        int, typer.Option(help="Zero this many top features in the analysis's causal check.")
    ] = 5,
    continuation_samples: Annotated[
        int, typer.Option(help="Continuations per context in the flagged prompts' check.")
    ] = 10,
    eval_samples: Annotated[
        int, typer.Option(help="Answers per question paraphrase and model in the EM evaluation.")
    ] = 5,
    study: Annotated[
        bool,
        typer.Option(
            "--study",
            help="Study three fine-tunes of the organism's base as three pairs: em, subtle (a "
            "rank-1 LoRA, trained on first use) and control; ends with the pairs side by side.",
        ),
    ] = False,
    stages: StagesOption = None,
) -> None:
    """Run the whole pipeline on the organism: build it (or reuse it), check the models,
    discover pivotal prompts, fill the review queue, trace attribution graphs of the most
    urgent flagged prompts, analyse them (base-vs-adapted diff, top features, ablation, LoRA
    geometry), check behaviour (do the flagged prompts' continuations turn harmful; EM rate of
    base, EM adapter and control adapter), run the causal checks (where the shift lives, what
    removes it), and make feature cards for the top-ranked features and those the checks name
    (top-activating texts of the organism's corpus, logit effects). Offline, CPU, a few minutes.

    Ends by printing where the store is, a summary, and what to open next.
    """
    import time

    if variant not in ("default", "subtle"):
        raise fail(f"unknown variant {variant!r}: choose default or subtle")
    if stages and not study:
        raise fail("--stages goes with --study (the demo runs every stage)")
    started = time.perf_counter()
    resolved = resolve_data_dir(data_dir)
    prepare_flows(resolved)
    if study:
        from flows.study import study_flow

        console.rule("study: em, subtle and control, each against the organism's base")
        result = study_flow(
            data_dir=str(resolved),
            organism=variant,
            small_organism=small,
            stages=split_stages(stages),
            iterations=iterations,
            prompts_per_iteration=per_iteration,
            graphs=graphs,
            ablate_top=ablate,
            continuation_samples=continuation_samples,
            eval_samples=eval_samples,
        )
        print_study(result)
        console.print(f"done in {time.perf_counter() - started:.0f} s")
        return
    from flows.pipeline import pipeline_flow

    console.rule(
        "pipeline: organism -> check -> discovery -> tracing -> analysis -> behaviour -> causal "
        "-> feature cards"
    )
    # The same flow the `pipeline` deployments run; each stage is a subflow with its own logs.
    result = pipeline_flow(
        data_dir=str(resolved),
        organism=variant,
        small_organism=small,
        iterations=iterations,
        prompts_per_iteration=per_iteration,
        select="flagged",  # nobody has reviewed anything yet: trace what the judge flagged
        graphs=graphs,
        ablate_top=ablate,
        continuation_samples=continuation_samples,
        eval_samples=eval_samples,
    )
    organism = result["organism"]
    harmful = organism["harmful_heldout"]
    console.print(
        f"organism {organism['recipe_hash']} ({'reused' if organism['reused'] else 'built'}); "
        "P(harmful) on held-out other domains: "
        + ", ".join(f"{m} {p:.3f}" for m, p in harmful.items() if p is not None)
    )
    if organism["config"] is None:
        console.print("[yellow]the data directory holds your own experiment.yaml; it was used[/]")
    _print_summary(
        resolved,
        result["discovery"],
        result["tracing"],
        result["analysis"],
        result["interventions"],
        time.perf_counter() - started,
        result["behaviour"],
        result["feature_cards"],
    )


def _print_summary(
    data_dir,
    summary: dict,
    traced: dict,
    analysed: dict,
    causal: dict,
    seconds: float,
    behaviour: dict,
    cards: dict,
) -> None:
    from emc.cli.discovery import model_pair_ids
    from emc.store import Store, read_only_query
    from emc.store.features import feature_ranking
    from emc.store.scores import most_divergent
    from flows.pipeline import STORE_COUNTS

    store = Store.in_data_dir(data_dir)
    console.rule("done")
    tables = read_only_query(store, STORE_COUNTS)
    print_frame(tables, title="store")
    # The flows ran on the data directory's config (the organism's, or the person's own there).
    config, _ = load_experiment(None, data_dir)
    base_id, adapted_id = model_pair_ids(config)
    divergent = most_divergent(store, "js", 5, base_model_id=base_id, adapted_model_id=adapted_id)
    print_frame(divergent, title="most divergent prompts")
    ranking = feature_ranking(store, role="adapted", sign="evil", top=5)
    if not ranking.empty:
        columns = ["rank", "layer", "feature", "label", "prompts", "mean", "sign_consistency"]
        shown = ranking[columns]
        print_frame(shown.round(4), title="features pushing evil over safe (adapted, total effect)")
    console.print(f"verdicts: {summary['verdicts']}")
    if traced["mean_replacement"] is not None:
        console.print(
            f"graphs: {traced['graphs_ok']} ok, {traced['graphs_failed']} failed, mean "
            f"replacement score {traced['mean_replacement']:.3f}"
        )
    if analysed["prompts"]:
        console.print(
            f"analysis: base and adapted first differ at layer "
            f"{analysed['first_divergent_layer']}; loading errors: {analysed['loading_errors']}"
        )
        console.print(analysed["ground_truth"])
    from emc.analysis.causal_report import headline

    for line in headline(causal):
        console.print(line)
    from flows.pipeline import behaviour_lines, feature_cards_line

    for line in behaviour_lines(behaviour):
        console.print(line)
    console.print(feature_cards_line(cards), highlight=False, markup=False)
    console.print(f"\nstore: {store.path}   ({seconds:.0f} s)")
    console.print("next:")
    console.print(f'  emc sql "SELECT * FROM divergences ORDER BY js DESC" -d {data_dir}')
    console.print(f"  emc analyze --ranking-only --top 30 -d {data_dir}")
    if traced["prompt_ids"]:
        console.print(f"  emc diff {traced['prompt_ids'][0]} -d {data_dir}")
    console.print(f"  emc intervene -d {data_dir}   # which interventions remove the shift")
    if cards["features"]:
        layer, feature = cards["features"][0]
        console.print(f"  emc feature show {layer}/{feature} -d {data_dir}   # what a feature is")
    console.print(f"  emc eval rates -d {data_dir}   # EM rate per model, with intervals")
    console.print(f"  emc dashboard -d {data_dir}   # Review, Graphs, Features, Behaviour, ...")
    if traced["prompt_ids"]:
        console.print(f"  emc graph export {traced['prompt_ids'][0]} -d {data_dir} && "
                      f"emc graph serve -d {data_dir}")  # fmt: skip
    console.print(
        f"  PREFECT_HOME={data_dir / 'prefect'} prefect server start   # the Prefect UI on :4200"
    )
