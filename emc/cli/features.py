"""`emc feature`: feature cards: what a feature fires on, writes, and where the analysis puts it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from emc.cli.app import ConfigOption, DataDirOption, app, fail, prepare_flows
from emc.config import ConfigError, load_experiment
from emc.console import console, inline, print_frame
from emc.features.corpus import DEFAULT_LIMIT

if TYPE_CHECKING:
    from emc.features import FeatureCard, FeatureContext, FeatureExample, TokenValue

feature_app = typer.Typer(
    help=(
        "Feature cards: what a transcoder feature *is*.\n\n"
        "A card holds a feature's top-activating texts from a corpus (the organism's by default) "
        "with the activating tokens highlighted, its activation quantiles and histogram, the "
        "tokens its decoder promotes and suppresses, the tokens that most excite its encoder, "
        "and, from the analysis, its activation change base -> adapted, LoRA alignment and ranks."
    ),
    no_args_is_help=True,
)
app.add_typer(feature_app, name="feature")

ModelRole = Annotated[str, typer.Option("--model", help="Whose activations: adapted or base.")]
CorpusOption = Annotated[
    str | None,
    typer.Option(
        help="Texts to scan: a .txt (paragraphs, or one text per line), .jsonl ('text' field) or "
        ".parquet ('text' column) file; `store` (the store's prompts and generations); "
        "`organism`. Default: the organism's corpus, else the store's text."
    ),
]
LimitTexts = Annotated[
    int, typer.Option(help="Scan at most this many texts, chosen evenly over the corpus.")
]
BAR = " ▁▂▃▄▅▆▇█"


@feature_app.command("show")
def feature_show(
    spec: Annotated[str, typer.Argument(metavar="LAYER/FEATURE", help="e.g. 1/397.")],
    model: ModelRole = "adapted",
    corpus: CorpusOption = None,
    limit_texts: LimitTexts = DEFAULT_LIMIT,
    examples: Annotated[int, typer.Option(help="How many top examples to print.")] = 5,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print a feature's card, computing it first when there is none.

    Without --corpus the newest card of the feature for this model is shown (any corpus); when
    it has none, the card is made on the default corpus (the `feature-cards` flow, for this one
    feature). With --corpus, the card of that corpus, made if missing.

    Exit codes: 0 shown; 2 a malformed LAYER/FEATURE, a feature the transcoders do not have
    (their sizes are named), an unknown --model, or a corpus that cannot be read.
    """
    from emc.store import Store
    from emc.store.feature_cards import load_card

    layer, feature = _feature(spec)
    if model not in ("adapted", "base"):
        raise fail(f"unknown --model {model!r}; choose adapted or base")
    _check_corpus(corpus)
    experiment, resolved = _experiment(config, data_dir)
    _check(experiment, [(layer, feature)])
    from emc.models import describe_model

    store = Store.in_data_dir(resolved)
    model_id = describe_model(experiment, model).model_id
    card = load_card(store, layer, feature, model_id) if corpus is None and store.exists() else None
    if card is None:
        summary = _run_flow(
            config, resolved, features=[[layer, feature]], corpus=corpus,
            limit_texts=limit_texts, role=model,
        )  # fmt: skip
        card = load_card(store, layer, feature, model_id, summary["corpus_id"])
    if card is None:  # the flow stores every card it makes
        raise fail(f"no card was made for {layer}/{feature}")
    _print_card(card, _context(store, experiment, layer, feature), examples)
    _print_labels(store, experiment.models.transcoders.ref, layer, feature)


@feature_app.command("cards")
def feature_cards(
    top: Annotated[
        int,
        typer.Option(
            help="Card the top N features of the adapted model's ranking and of the "
            "base-vs-adapted diff."
        ),
    ] = 30,
    features: Annotated[
        str | None,
        typer.Option(help="Card these features instead, as LAYER/FEATURE,... (e.g. 0/12,1/40)."),
    ] = None,
    corpus: CorpusOption = None,
    limit_texts: LimitTexts = DEFAULT_LIMIT,
    model: ModelRole = "adapted",
    named: Annotated[
        bool,
        typer.Option(
            help="Also card the features the causal checks name (ablated top features, narrow "
            "feature interventions, your own edits)."
        ),
    ] = True,
    redo: Annotated[
        bool, typer.Option("--redo", help="Make cards again that exist for this corpus.")
    ] = False,
    label: Annotated[
        bool,
        typer.Option(
            help="Label each card with the config's labeller (`labeller:`, else the judge's "
            "endpoint; the organism's offline stand-in for the organism)."
        ),
    ] = True,
    relabel: Annotated[
        bool, typer.Option("--relabel", help="Ask the labeller again for labelled features.")
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make feature cards (the `feature-cards` flow) and label them, then list them.

    By default for the top --top features of the adapted model's ranking (pushing evil over safe)
    and of the base-vs-adapted diff (`emc diff`), and the features the causal checks name; features
    already carded for this model and corpus are skipped. One pass over the corpus covers all of
    them.

    Exit codes: 0 done, or nothing to do (a line says so); 2 a malformed --features, a feature
    the transcoders do not have, or a corpus that cannot be read.
    """
    chosen = None
    if features is not None:
        chosen = [list(_feature(part)) for part in features.split(",")]
    if model not in ("adapted", "base"):
        raise fail(f"unknown --model {model!r}; choose adapted or base")
    _check_corpus(corpus)
    experiment, resolved = _experiment(config, data_dir)
    if chosen:
        _check(experiment, [tuple(f) for f in chosen])
    summary = _run_flow(
        config, resolved, features=chosen, top=top, corpus=corpus, limit_texts=limit_texts,
        role=model, named=named, redo=redo, label=label, relabel=relabel,
    )  # fmt: skip
    if not summary["features"]:
        console.print(
            "nothing to card: no ranked features yet (run `emc trace`, then `emc analyze`), and "
            "none named with --features"
        )
        return
    from emc.store import Store
    from emc.store.feature_cards import card_mask, card_summaries
    from emc.store.feature_labels import with_labels

    store = Store.in_data_dir(resolved)
    frame = card_summaries(store, summary["model_id"])
    frame = frame[frame["corpus_id"] == summary["corpus_id"]]
    frame = with_labels(frame[card_mask(frame, [tuple(f) for f in summary["features"]])], store)
    columns = ["layer", "feature", "label", "frequency", "max_activation", "top_tokens"]
    shown = frame[columns].round(4)
    shown = shown.rename(columns={"max_activation": "max", "top_tokens": "promotes"})
    shown["promotes"] = [" ".join(repr(t) for t in tokens) for tokens in shown["promotes"]]
    print_frame(shown, title=f"feature cards over {summary['corpus_id']}")
    console.print(
        f"{summary['carded']} carded now, {summary['skipped']} before; corpus: "
        f"{summary['texts']} of {summary['texts_available']} texts, {summary['tokens']} tokens. "
        "`emc feature show LAYER/FEATURE` prints one.",
        highlight=False,
        markup=False,
    )
    if summary.get("labeller"):
        failures = summary["label_failures"]
        failed = f", {len(failures)} failed (run again to retry): {', '.join(failures)}"
        console.print(
            f"labels by {summary['labeller']}: {summary['labelled']} new"
            + (failed if failures else ""),
            highlight=False,
            markup=False,
        )
        if failures:
            raise typer.Exit(1)


@feature_app.command("label")
def feature_label(
    spec: Annotated[str, typer.Argument(metavar="LAYER/FEATURE", help="e.g. 1/397.")],
    text: Annotated[str, typer.Argument(metavar="LABEL", help="What the feature detects or does.")],
    by: Annotated[str, typer.Option("--by", help="Your name; the label is credited human:NAME.")],
    notes: Annotated[str | None, typer.Option(help="Longer notes: evidence, doubts.")] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Give a feature your label (and notes); it is shown over any LLM's label wherever the
    feature appears: rankings, graphs, diffs, viewer files. Labelling again replaces your label.

    Exit codes: 0 stored; 2 a malformed LAYER/FEATURE, a feature the transcoders do not have, an
    empty or over-long label, or no --by name.
    """
    from emc.features.labels import FeatureLabel, clean_label, human_labeller
    from emc.runs import recorded_run
    from emc.store import Store
    from emc.store.feature_labels import save_labels

    layer, feature = _feature(spec)
    try:
        labeller, label = human_labeller(by), clean_label(text)
    except ValueError as exc:
        raise fail(str(exc)) from None
    experiment, resolved = _experiment(config, data_dir)
    _check(experiment, [(layer, feature)])
    store = Store.in_data_dir(resolved)
    params = {"feature": spec, "labeller": labeller}
    with recorded_run(store, "cli", "feature-label", params) as run:
        save_labels(store, [FeatureLabel(
            transcoders_ref=experiment.models.transcoders.ref, layer=layer, feature=feature,
            labeller=labeller, label=label, notes=notes, run_id=run.run_id,
        )])  # fmt: skip
        run.summary = {"feature": spec, "labeller": labeller}
    console.print(f"{layer}/{feature}: {label!r} ({labeller})", highlight=False, markup=False)


def _check_corpus(corpus: str | None) -> None:
    """A corpus file that is not there is refused before Prefect starts; what is in it is read
    by the flow (a malformed file is refused there, naming the place)."""
    from emc.features.sources import NAMED

    if corpus is not None and corpus not in NAMED and not Path(corpus).is_file():
        raise fail(f"{corpus}: no such file (--corpus takes a file, `store` or `organism`)")


def _feature(text: str) -> tuple[int, int]:
    from emc.features import parse_feature

    try:
        return parse_feature(text)
    except ValueError as exc:
        raise fail(str(exc)) from None


def _experiment(config: Path | None, data_dir: Path | None):
    try:
        return load_experiment(config, data_dir)
    except ConfigError as exc:
        raise fail(str(exc)) from None


def _check(experiment, features) -> None:
    """Refuse features the transcoders do not have before anything loads (exit 2)."""
    from emc.features import check_features
    from emc.models import ModelLoadError
    from emc.models.transcoders import inspect_transcoders

    try:
        info = inspect_transcoders(experiment.models.transcoders.ref)
        check_features(features, [info.d_transcoder] * info.n_layers)
    except (ValueError, ModelLoadError) as exc:
        raise fail(str(exc)) from None


def _run_flow(config: Path | None, resolved: Path, **params) -> dict:
    prepare_flows(resolved)
    from flows.feature_cards import feature_cards_flow

    try:
        return feature_cards_flow(
            config_path=str(config) if config else None, data_dir=str(resolved), **params
        )
    except ValueError as exc:  # a corpus that cannot be read, an unknown feature
        raise fail(str(exc)) from None


def _context(store, experiment, layer: int, feature: int) -> FeatureContext | None:
    """The analysis' view of the feature; None for a config without an adapter."""
    from emc.models import describe_model
    from emc.store.feature_cards import feature_context

    if experiment.models.adapter is None:
        return None
    base_id = describe_model(experiment, "base").model_id
    adapted_id = describe_model(experiment, "adapted").model_id
    return feature_context(store, layer, feature, base_id, adapted_id)


def _print_card(card: FeatureCard, context: FeatureContext | None, n_examples: int) -> None:
    stats = card.stats
    say = console.print
    say(
        f"[bold]feature {card.layer}/{card.feature}[/]  model {inline(card.model_id)}  corpus "
        f"{inline(card.corpus_id)} ({stats.texts} texts, {stats.positions} positions)",
        highlight=False,
    )
    quantiles = dict(zip(stats.quantile_levels, stats.quantile_values, strict=True))
    mean = f"{stats.mean_active:.3f}" if stats.mean_active is not None else "-"
    say(
        f"active at {stats.active} positions ({stats.frequency:.2%}); max {stats.max:.3f}, "
        f"mean when active {mean}; quantiles of active: p50 {quantiles.get(0.5, 0):.3f}, "
        f"p90 {quantiles.get(0.9, 0):.3f}, p99 {quantiles.get(0.99, 0):.3f}",
        highlight=False,
    )
    say(
        f"histogram of active positions, 0 .. {stats.max:.3f}: {_sparkline(stats.hist_counts)}",
        highlight=False,
    )
    say(f"[bold]top examples[/] ({len(card.examples)} kept; the maximum between ⟦ ⟧):")
    for example in card.examples[:n_examples]:
        say(
            f"  {example.rank:>2}. {example.max_activation:7.3f}  {inline(example.source)}  "
            f"{_highlighted(example)}",
            highlight=False,
            soft_wrap=True,
        )
    if not card.examples:
        say("  (never active in this corpus)")
    say(f"[bold]decoder logit effects[/] (per unit activation, through {card.logit_basis}):")
    say(f"  promotes:   {_token_values(card.top_logits)}", highlight=False)
    say(f"  suppresses: {_token_values(card.bottom_logits)}", highlight=False)
    say(f"[bold]encoder's top input tokens:[/] {_token_values(card.encoder_tokens)}")
    if context is not None:
        for line in _context_lines(context):
            say(line, highlight=False)


def _print_labels(store, transcoders_ref: str, layer: int, feature: int) -> None:
    from emc.store.feature_labels import feature_labels

    labels = feature_labels(store, transcoders_ref, [(layer, feature)])
    if not labels:
        console.print(
            "labels: none (`emc feature cards` asks the labeller; `emc feature label "
            f'{layer}/{feature} "TEXT" --by NAME` gives yours)',
            highlight=False,
            markup=False,
        )
    for index, label in enumerate(labels):
        shown = "label" if index == 0 else "also"
        why = label.notes or label.explanation
        extra = f", {label.confidence} confidence" if label.confidence else ""
        console.print(
            f"[bold]{shown}:[/] {inline(label.label)}  ({inline(label.labeller)}{extra})"
            + (f" — {inline(why)}" if why else ""),
            highlight=False,
        )


def _context_lines(context: FeatureContext) -> list[str]:
    delta = context.delta
    lines = [
        "activation change base -> adapted: "
        + (
            f"{delta.mean_delta:+.3f} per prompt (summed over positions, {delta.measured} "
            f"prompts measured); rank {delta.rank} of {delta.ranked} by |change|"
            if delta
            else "not among the stored changes (`emc analyze` measures them)"
        )
    ]
    lora = context.lora
    lines.append(
        "LoRA alignment: "
        + (
            f"{lora.null_percentile:.1f}th percentile of chance, |cos| {abs(lora.cosine):.2f} "
            f"with {inline(lora.module)} direction {lora.direction} ({lora.compared_with})"
            if lora
            else "not among the adapter's top-aligned features (`emc lora`)"
        )
    )
    ranks = [
        f"{r.role} #{r.rank} of {r.ranked}" if r.rank else f"{r.role} not ranked ({r.ranked} are)"
        for r in context.ranks
    ]
    metric = context.ranks[0] if context.ranks else None
    where = f" ({metric.metric}, sign {metric.sign})" if metric else ""
    lines.append(f"rank{where}: " + ", ".join(ranks))
    return lines


def _highlighted(example: FeatureExample) -> str:
    """The window's tokens, the active ones coloured, the maximum in reverse video and between
    ⟦ ⟧ (which stay when the output is not a terminal)."""
    parts = []
    for index, (token, value) in enumerate(zip(example.tokens, example.activations, strict=True)):
        shown = inline(token.replace("\n", "⏎"))
        if index == example.max_position:
            parts.append(f"[bold reverse]⟦{shown}⟧[/]")
        elif value > 0:
            parts.append(f"[cyan]{shown}[/]")
        else:
            parts.append(shown)
    return "".join(parts)


def _token_values(values: list[TokenValue]) -> str:
    return ", ".join(f"{inline(repr(t.token))} {t.value:+.3f}" for t in values)


def _sparkline(counts: list[int]) -> str:
    top = max(counts, default=0)
    if top == 0:
        return "(empty)"
    return "".join(BAR[0 if c == 0 else 1 + round(c / top * (len(BAR) - 2))] for c in counts)
