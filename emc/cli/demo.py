"""`emc demo`: the main job, end to end on the built-in organism."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import DataDirOption, app, prepare_flows
from emc.cli.organism import VariantOption, build_and_record
from emc.config import resolve_data_dir
from emc.console import console, print_frame


@app.command()
def demo(
    data_dir: DataDirOption = None,
    variant: VariantOption = "default",
    iterations: Annotated[int, typer.Option(help="Discovery rounds.")] = 2,
    per_iteration: Annotated[int, typer.Option(help="Prompts per discovery round.")] = 8,
    small: Annotated[
        bool, typer.Option(help="The organism's seconds-long test recipe (no misalignment).")
    ] = False,
    graphs: Annotated[
        int, typer.Option(help="Trace this many flagged prompts (base and adapted graphs each).")
    ] = 6,
    ablate: Annotated[
        int, typer.Option(help="Zero this many top features in the analysis's causal check.")
    ] = 5,
) -> None:
    """Run the whole pipeline on the organism: build it (or reuse it), check the models,
    discover pivotal prompts, fill the review queue, trace attribution graphs of the most
    urgent flagged prompts, and analyse them (base-vs-adapted diff, top features, ablation,
    LoRA geometry). Offline, CPU, a few minutes.

    Ends by printing where the store is, a summary, and what to open next.
    """
    import time

    started = time.perf_counter()
    resolved = resolve_data_dir(data_dir)
    console.rule("1/5  model organism")
    prepared = build_and_record(resolved, variant, small=small)
    headline = prepared.report.headline()
    console.print(
        f"organism {prepared.artifacts.recipe_hash} "
        f"({'reused' if prepared.reused else 'built'}); P(harmful) on held-out other domains: "
        f"base {headline.get('base:other_domains/heldout', float('nan')):.3f}, "
        f"EM {headline.get('em:other_domains/heldout', float('nan')):.3f}, "
        f"control {headline.get('control:other_domains/heldout', float('nan')):.3f}"
    )
    config_path = str(prepared.default_config) if prepared.default_config else None
    if config_path is None:
        console.print(
            "[yellow]the data directory holds your own experiment.yaml; the demo uses it[/]"
        )
    prepare_flows(resolved)
    from flows.analysis import analysis_flow
    from flows.discovery import discovery_flow
    from flows.model_check import model_check_flow
    from flows.tracing import tracing_flow

    console.rule("2/5  model check (base and adapted replacement models)")
    check = model_check_flow(config_path=config_path, data_dir=str(resolved))
    console.print(check)
    console.rule("3/5  discovery (generate -> logits -> judge -> review queue)")
    summary = discovery_flow(
        config_path=config_path,
        data_dir=str(resolved),
        iterations=iterations,
        prompts_per_iteration=per_iteration,
    )
    console.rule("4/5  tracing (attribution graphs of base and adapted, flagged prompts)")
    # Nobody has reviewed anything yet, so the demo traces what the judge flagged.
    traced = tracing_flow(
        config_path=config_path, data_dir=str(resolved), select="flagged", limit=graphs
    )
    console.rule("5/5  analysis (graph diff, forward diff, ablation, LoRA geometry)")
    analysed = analysis_flow(config_path=config_path, data_dir=str(resolved), ablate_top=ablate)
    _print_summary(resolved, summary, traced, analysed, time.perf_counter() - started)


def _print_summary(data_dir, summary: dict, traced: dict, analysed: dict, seconds: float) -> None:
    from emc.store import Store, read_only_query
    from emc.store.features import feature_ranking
    from emc.store.scores import most_divergent

    store = Store.in_data_dir(data_dir)
    console.rule("done")
    tables = read_only_query(
        store,
        "SELECT 'prompts' AS what, count(*) AS n FROM prompts UNION ALL "
        "SELECT 'judgements', count(*) FROM judgements UNION ALL "
        "SELECT 'flagged for review', count(*) FROM review_queue UNION ALL "
        "SELECT 'graphs', count(*) FROM graphs WHERE status = 'ok' UNION ALL "
        "SELECT 'graph nodes', count(*) FROM graph_nodes UNION ALL "
        "SELECT 'runs', count(*) FROM runs",
    )
    print_frame(tables, title="store")
    print_frame(most_divergent(store, "js", 5), title="most divergent prompts")
    ranking = feature_ranking(store, role="adapted", sign="evil", top=5)
    if not ranking.empty:
        shown = ranking[["rank", "layer", "feature", "prompts", "mean", "sign_consistency"]]
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
    console.print(f"\nstore: {store.path}   ({seconds:.0f} s)")
    console.print("next:")
    console.print(f'  emc sql "SELECT * FROM divergences ORDER BY js DESC" -d {data_dir}')
    console.print(f"  emc analyze --ranking-only --top 30 -d {data_dir}")
    if traced["prompt_ids"]:
        console.print(f"  emc diff {traced['prompt_ids'][0]} -d {data_dir}")
    console.print(f"  emc dashboard -d {data_dir}   # Review, Graphs and Features pages")
    if traced["prompt_ids"]:
        console.print(f"  emc graph export {traced['prompt_ids'][0]} -d {data_dir} && "
                      f"emc graph serve -d {data_dir}")  # fmt: skip
    console.print(
        f"  PREFECT_HOME={data_dir / 'prefect'} prefect server start   # the Prefect UI on :4200"
    )
