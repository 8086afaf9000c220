"""`emc analyze`: which transcoder features drive the evil tokens, ranked across prompts."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, data_dir_from, fail, require_store
from emc.cli.exits import exit_for
from emc.config import ConfigError, load_experiment
from emc.console import console, inline, print_frame


@app.command()
def analyze(
    prompt_ids: Annotated[
        list[str] | None,
        typer.Argument(help="Prompts to analyse. Default: every prompt with a graph pair."),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    top: Annotated[int, typer.Option(help="How many features to list.")] = 30,
    metric: Annotated[
        str,
        typer.Option(
            help="total_diff: mean multi-hop effect on evil targets minus on safe ones; "
            "direct_diff: the same for direct edges; *_weighted_*: weighted by target "
            "probability; *_cohens_d: effect sizes; contrastive_total/direct: effect on the "
            "evil-minus-safe direction (contrastive graphs)."
        ),
    ] = "total_diff",
    model: Annotated[str, typer.Option(help="adapted, base or all.")] = "adapted",
    targets: Annotated[
        str | None,
        typer.Option(help="Only graphs with these targets (labelled, contrastive, salient)."),
    ] = None,
    layer: Annotated[int | None, typer.Option(help="Only this layer.")] = None,
    min_prompts: Annotated[int, typer.Option(help="Present in at least this many prompts.")] = 1,
    sign: Annotated[
        str,
        typer.Option(help="evil: features pushing evil over safe; safe: the reverse; any: |mean|."),
    ] = "evil",
    ablate: Annotated[
        int, typer.Option(help="Zero this many top features in the adapted model (0: none).")
    ] = 5,
    ranking_only: Annotated[
        bool,
        typer.Option(
            "--ranking-only", help="Only print the ranking from stored graphs; load no model."
        ),
    ] = False,
    redo: Annotated[
        bool, typer.Option("--redo", help="Measure prompts again that were measured before.")
    ] = False,
) -> None:
    """Which transcoder features drive the evil tokens, and did the fine-tune change them?

    Each traced graph stores, per feature kept by pruning, its direct and total (multi-hop)
    effect on every target, and per (layer, feature) the evil-vs-safe statistics (means,
    difference, Welch t, Cohen's d). The ranking aggregates them over prompts by (layer,
    feature) — one value per prompt, its newest graph: prompts where the feature is present,
    mean and median, sign consistency, mean Welch t.

    Unless --ranking-only, this first runs the `analysis` Prefect flow on every prompt with a
    base/adapted graph pair: both models on the graph's token ids (the first layer where their
    residual streams differ — a difference upstream of the adapter is reported as a loading
    error — and every feature's activation delta), the top --ablate features zeroed at every
    position in the adapted model against a matched random control, and the adapter's output
    directions against the transcoders. It ends with the ground-truth check: do the top features
    agree with what the fine-tune demonstrably changed? A prompt whose forward passes or
    ablation fail is stored as failed (status, error) while the others are measured; the next
    run tries it again. Exit code 3 if some prompts failed (listed), 2 if every one did.

    Tables for your own SQL: feature_effects, feature_stats, graph_layers, forward_diffs,
    activation_deltas, ablations, lora_comparisons, lora_features. `emc diff PROMPT_ID` shows one
    prompt's base-vs-adapted diff.
    """
    from emc.store import Store
    from emc.store.features import RANKING_METRICS, feature_ranking

    if metric not in RANKING_METRICS:
        raise fail(f"unknown --metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    if model not in ("adapted", "base", "all"):
        raise fail(f"unknown --model {model!r}: choose adapted, base or all")
    if sign not in ("evil", "safe", "any"):
        raise fail(f"unknown --sign {sign!r}: choose evil, safe or any")
    if ablate < 0:
        raise fail("--ablate must be 0 or more")
    try:
        resolved = data_dir_from(data_dir, config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    summary = None
    if ranking_only:
        store = require_store(resolved)  # only reads: a mistyped -d must not make a store
    else:
        summary = _run_analysis(config, resolved, prompt_ids, metric, ablate, redo)
        store = Store.in_data_dir(resolved)
    ranking = feature_ranking(
        store,
        metric,
        role=None if model == "all" else model,
        targets=targets,
        layer=layer,
        min_prompts=min_prompts,
        sign=sign,
        top=top,
    )
    if ranking.empty:
        console.print(
            "[yellow]no features to rank:[/] no traced graph matches. Run `emc trace` first "
            "(graphs need evil and safe labels), or relax --min-prompts / --targets / --layer."
        )
        print_left_out(store)
        exit_for_failures(summary)
        return
    # A per-layer feature writes only its own layer: the column speaks for cross-layer ones.
    per_layer = (ranking["last_layer"] == ranking["layer"]).all()
    shown = ranking.drop(columns=["model_id", "last_layer"] if per_layer else ["model_id"]).round(
        {"mean": 4, "median": 4, "sign_consistency": 2, "mean_t": 2, "positions": 1}
    )
    print_frame(shown, title=f"top {len(ranking)} features by {metric} ({model} model)")
    print_left_out(store)
    if summary is not None:
        print_analysis_summary(summary)
    exit_for_failures(summary)


def exit_for_failures(summary: dict | None) -> None:
    """Exit 2 if every prompt the flow worked on failed, 3 if some did. Unit: one prompt, its
    failed steps on one line (the forward passes, the ablation)."""
    if summary is None:
        return
    steps: dict[str, list[str]] = {}
    for failure in summary["failed"]:
        steps.setdefault(failure["prompt_id"], []).append(f"{failure['step']}: {failure['error']}")
    failures = [f"{prompt_id} {'; '.join(errors)}" for prompt_id, errors in steps.items()]
    exit_for(summary["done"], failures, "prompt")


def print_left_out(store) -> None:
    """Say what the ranking did not count: rejected prompts and stale graphs."""
    from emc.store.validity import left_out_of_rankings

    left_out = left_out_of_rankings(store)
    if left_out["rejected_prompts"] or left_out["stale_graphs"]:
        console.print(
            f"left out: {left_out['rejected_prompts']} rejected prompt(s), "
            f"{left_out['stale_graphs']} stale graph(s) (traced before a relabel; `emc trace` "
            "traces them again)"
        )


def _run_analysis(config, resolved, prompt_ids, metric, ablate, redo) -> dict:
    from emc.cli.app import prepare_flows

    prepare_flows(resolved)
    from flows.analysis import analysis_flow

    try:
        return analysis_flow(
            config_path=str(config) if config else None,
            data_dir=str(resolved),
            prompt_ids=prompt_ids or None,
            metric=metric,
            ablate_top=ablate,
            redo=redo,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None


def print_analysis_summary(summary: dict) -> None:
    if not summary["prompts"]:
        console.print("[yellow]no base/adapted graph pairs to analyse:[/] run `emc trace` first.")
        return
    console.print(
        f"analysed {summary['prompts']} prompts (measured now: {summary['measured']}); "
        f"first layer where base and adapted differ: {summary['first_divergent_layer']}"
    )
    if summary["loading_errors"]:
        console.print(
            f"[red bold]loading error[/] on {summary['loading_errors']} prompt(s): base and "
            "adapted differ upstream of the adapter's first layer, so the adapted model was not "
            "built on this base. See `emc diff PROMPT_ID`."
        )
    console.print(summary["ground_truth"])  # the failures are listed last, by exit_for


@app.command()
def diff(
    prompt_id: Annotated[
        str | None,
        typer.Argument(help="A prompt (or a unique prefix). Default: all prompts, aggregated."),
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    metric: Annotated[str, typer.Option(help="The feature_stats effect compared.")] = "total_diff",
    top: Annotated[int, typer.Option(help="How many features to list.")] = 20,
) -> None:
    """Base vs adapted graphs: which features one has and the other lacks, how their effect on
    evil-minus-safe changed, and where the base transcoders stop explaining the adapted model.

    For one prompt: features in both graphs / only one, the features whose effect changed most,
    per layer the error share of influence in each graph, the effect deltas and (after
    `emc analyze`) the forward-pass difference, and the strongest token-to-target paths to the
    most probable evil token, gained or lost; a rejected prompt or a stale pair is marked.
    Without a prompt: the same over every pair, rejected prompts and stale pairs left out.
    Read-only: a directory without a store is refused.
    """
    from emc.store.features import RANKING_METRICS
    from emc.store.graph_diff import graph_diff_summary, layer_diff_summary, prompt_graph_diff
    from emc.store.graph_pairs import graph_pairs
    from emc.store.interventions import prompt_shift_components

    if metric not in RANKING_METRICS:
        raise fail(f"unknown --metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    try:
        resolved = data_dir_from(data_dir, config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    store = require_store(resolved)
    pairs = graph_pairs(store)
    if not pairs:
        raise fail("no base/adapted graph pairs in the store: run `emc trace` first")
    if prompt_id is None:
        counted = [p for p in pairs if not p.stale and not p.rejected]
        print_frame(
            graph_diff_summary(store, metric, top=top).round(4),
            title=f"features whose {metric} changed most, over {len(counted)} pairs",
        )
        print_frame(layer_diff_summary(store).round(4), title="per layer, over those pairs")
        print_left_out(store)
        return
    matches = sorted({p.prompt_id for p in pairs if p.prompt_id.startswith(prompt_id)})
    if len(matches) != 1:
        found = "no" if not matches else "several"
        raise fail(f"{found} traced prompts match {prompt_id!r}: {', '.join(matches[:5])}")
    pair = next(p for p in pairs if p.prompt_id == matches[0])
    result = prompt_graph_diff(store, pair, metric)
    if pair.rejected:
        console.print(
            f"[yellow bold]rejected[/] prompt {pair.prompt_id}: {inline(pair.rejection_badge)}. "
            "It counts in no ranking or summary."
        )
    if pair.stale:
        console.print(
            "[yellow bold]stale[/]: these graphs were traced for labels that are no longer the "
            "prompt's; `emc trace` traces them again."
        )
    console.print(
        f"prompt {pair.prompt_id} ({pair.targets}): {result.shared} features in both graphs, "
        f"{result.only_base} only in base, {result.only_adapted} only in adapted; replacement "
        f"{pair.base_replacement:.3f} -> {pair.adapted_replacement:.3f}"
    )
    if result.forward_error:
        console.print(
            f"[red]forward passes failed:[/] {inline(result.forward_error)} "
            "(`emc analyze` tries again)"
        )
    elif result.forward.empty:
        console.print("forward passes not compared yet: run `emc analyze`.")
    elif result.loading_error:
        console.print(
            f"[red bold]loading error:[/] base and adapted differ at layer "
            f"{result.first_divergent_layer}, upstream of the adapter."
        )
    else:
        console.print(f"first layer where the models differ: {result.first_divergent_layer}")
    print_frame(result.layers.round(4), title="per layer")
    columns = ["layer", "feature", "label", "presence", "base_effect", "adapted_effect"]
    columns += ["effect_delta", "base_activation", "adapted_activation", "measured_delta"]
    print_frame(result.features.head(top)[columns].round(4), title=f"largest changes of {metric}")
    shares = prompt_shift_components(store, pair.prompt_id, pair.base_model_id,
                                     pair.adapted_model_id)  # fmt: skip
    if shares.empty:
        console.print("where the shift lives: not measured yet (run `emc patch`).")
    else:
        shown = shares[["component", "layer", "direct", "total_into_base", "total_from_adapted"]]
        print_frame(shown.round(3), title="where the shift lives: share per component (emc patch)")
    _print_paths(store, pair)


def _print_paths(store, pair) -> None:
    from emc.store.graph_diff import pair_paths

    found = pair_paths(store, pair, k=PATHS)
    if found is None or found.paths.empty:
        console.print("paths: no evil target in these graphs.")
        return
    target = repr(found.token) if found.token is not None else "the evil-minus-safe direction"
    shown = found.paths[["change", "path", "base_weight", "adapted_weight", "delta"]]
    print_frame(
        shown.head(PATHS).round(4),
        title=f"strongest paths to {target}, gained or lost (top {PATHS} of each graph)",
    )


PATHS = 8


@app.command()
def lora(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    top: Annotated[int, typer.Option(help="How many comparisons to list.")] = 20,
    directions: Annotated[
        int | None, typer.Option(help="Singular directions per module (default: all).")
    ] = None,
    null: Annotated[
        int, typer.Option(help="Random directions for the chance reference (fewer: faster).")
    ] = 500,
) -> None:
    """Which transcoder features the adapter writes into: LoRA output directions vs transcoders.

    Each adapted module's output directions (left singular vectors of (alpha/r)·B·A) are
    compared with the encoders of the layers that read them and with the decoders of their own
    layer. Lists the comparisons whose best |cosine| is least likely under chance: the
    percentile column is where that cosine falls among random directions of the same size
    (a best |cosine| of 0.4 is chance at d_model 64).
    """
    from emc.analysis.lora_geometry import lora_geometry_for

    try:
        experiment, _ = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    if experiment.models.adapter is None:
        raise fail("the config names no adapter (models.adapter): nothing to compare")
    geometry = lora_geometry_for(experiment, top=top, n_directions=directions, n_null=null)
    comparisons = geometry.comparisons.sort_values("null_percentile", ascending=False).head(top)
    columns = ["module", "direction", "singular_value", "compared_with", "layer"]
    columns += ["best_feature", "best_cosine", "null_q99", "null_percentile"]
    rounding = {"singular_value": 3, "best_cosine": 3, "null_q99": 3, "null_percentile": 1}
    shown = comparisons[columns].round(rounding)
    print_frame(shown, title=f"LoRA output directions vs transcoders (d_model {geometry.d_model})")
    above = int((geometry.comparisons["null_percentile"] >= 99).sum())
    console.print(
        f"{above} of {len(geometry.comparisons)} comparisons reach the 99th percentile of chance "
        f"(about {len(geometry.comparisons) / 100:.1f} expected by chance alone)."
    )
