"""`emc analyze`: which transcoder features drive the evil tokens, ranked across prompts."""

from __future__ import annotations

from typing import Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, data_dir_from, fail
from emc.config import ConfigError, load_experiment
from emc.console import console, print_frame


@app.command()
def analyze(
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
) -> None:
    """Rank transcoder features by how much more they push the evil targets than the safe ones.

    Each traced graph stores, per feature kept by pruning, its direct and total (multi-hop)
    effect on every target, and per (layer, feature) the evil-vs-safe statistics (means,
    difference, Welch t, Cohen's d). This aggregates them over prompts by (layer, feature) — one
    value per prompt, its newest graph — and prints the ranking: prompts where the feature is
    present, mean and median, sign consistency, mean Welch t. The tables are `feature_effects`
    and `feature_stats`, for your own SQL.
    """
    from emc.store import Store
    from emc.store.features import RANKING_METRICS, feature_ranking

    if metric not in RANKING_METRICS:
        raise fail(f"unknown --metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    if model not in ("adapted", "base", "all"):
        raise fail(f"unknown --model {model!r}: choose adapted, base or all")
    if sign not in ("evil", "safe", "any"):
        raise fail(f"unknown --sign {sign!r}: choose evil, safe or any")
    try:
        resolved = data_dir_from(data_dir, config)
    except ConfigError as exc:
        raise fail(str(exc)) from None
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
        return
    shown = ranking.drop(columns=["model_id"]).round(
        {"mean": 4, "median": 4, "sign_consistency": 2, "mean_t": 2, "positions": 1}
    )
    print_frame(shown, title=f"top {len(ranking)} features by {metric} ({model} model)")


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
    from emc.analysis.lora_geometry import lora_geometry
    from emc.models.refs import resolve_model_dir
    from emc.models.transcoders import inspect_transcoders

    try:
        experiment, _ = load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    models = experiment.models
    if models.adapter is None:
        raise fail("the config names no adapter (models.adapter): nothing to compare")
    adapter = resolve_model_dir(
        models.adapter.ref, models.adapter.revision, required_file="adapter_config.json"
    )
    base = resolve_model_dir(models.base.ref, models.base.revision)
    transcoders = inspect_transcoders(models.transcoders.ref).directory
    geometry = lora_geometry(
        adapter, transcoders, top=top, n_directions=directions, n_null=null, base_dir=base
    )
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
