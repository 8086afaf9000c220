"""Feature cards: what each feature the analysis names fires on, and what its weights do.

The features are the ones asked for, or by default the top `top` of the adapted model's ranking
(features pushing evil over safe) and of the base-vs-adapted diff, together with the features the
causal checks name (the analysis' ablated top features, narrow feature interventions, a person's own
edits). One GPU task loads the model once and scans the corpus in one pass per chunk of features,
storing each chunk's cards as it finishes. Cards are keyed by model, corpus and feature: a re-run
skips the features already carded for this model and corpus (`redo` makes them again) and never adds
a duplicate.

Then every card of the chosen features is labelled by the config's labeller (an LLM through the
OpenAI-compatible client, or the organism's offline stand-in), each label stored with the
labeller's name and the messages it was sent; features this labeller has labelled are skipped
unless `relabel`. A label that fails (timeout, garbage) is counted, not stored: a re-run asks
again.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from emc.config import ExperimentConfig, load_experiment
from emc.features import (
    DEFAULT_LIMIT,
    DEFAULT_MAX_TOKENS,
    TokenizedCorpus,
    build_cards,
    check_features,
    tokenize_corpus,
)
from emc.features.labels import labels_from
from emc.features.sources import load_corpus
from emc.models import describe_model, load_tokenizer_and_context
from emc.models.transcoders import inspect_transcoders
from emc.pivotal.backends import labeller_id, make_labeller
from emc.runs import recorded_run
from emc.store import Store, insert_llm_calls, upsert_model
from emc.store.feature_cards import (
    carded_features,
    load_cards,
    named_features,
    replace_feature_cards,
)
from emc.store.feature_labels import labelled_features, save_labels
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import graph_diff_summary
from flows.discovery import RETRIES
from flows.model_cache import cached_model, release_models
from flows.parameters import FeatureCardsParameters, takes
from flows.reporting import feature_link, id_list, rounded_rows, run_logger
from flows.runtime import current_flow_run_id, deployment_data_dir, gpu_slot

Feature = tuple[int, int]
CHUNK = 256  # features per corpus pass: a killed run keeps the chunks it finished


def corpus_for(
    config: ExperimentConfig,
    store: Store,
    spec: str | None,
    limit_texts: int | None = DEFAULT_LIMIT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> TokenizedCorpus:
    """The corpus `spec` names, tokenised as the model reads it (no weights are loaded)."""
    tokenizer, context = load_tokenizer_and_context(config)
    corpus = load_corpus(spec, config, store, tokenizer)
    return tokenize_corpus(corpus, tokenizer, limit_texts, min(max_tokens, context or max_tokens))


def transcoder_widths(config: ExperimentConfig) -> list[int]:
    """Features per layer, from the transcoder files' headers (no weights are loaded)."""
    info = inspect_transcoders(config.models.transcoders.ref)
    return [info.d_transcoder] * info.n_layers


def default_features(
    store: Store, config: ExperimentConfig, top: int, metric: str, named: bool
) -> list[Feature]:
    """The adapted model's top `top` evil-pushing features, the top `top` of the base-vs-adapted
    diff (the features whose effect the fine-tune changed most), and the ones causal checks
    name."""
    base_id = describe_model(config, "base").model_id
    adapted_id = describe_model(config, "adapted").model_id
    ranking = feature_ranking(store, metric, model_id=adapted_id, sign="evil", top=top)
    diff = graph_diff_summary(
        store, metric, base_model_id=base_id, adapted_model_id=adapted_id, top=top
    )
    chosen = [(int(r.layer), int(r.feature)) for r in ranking.itertuples()]
    chosen += [(int(r.layer), int(r.feature)) for r in diff.itertuples()]
    if named:
        chosen += named_features(store, base_id, adapted_id)
    return list(dict.fromkeys(chosen))


@task(task_run_name="feature-cards-{n_features}-features", **RETRIES)
def compute_cards(
    config_path: str | None,
    data_dir: str,
    role: str,
    features: list[Feature],
    n_features: int,
    corpus: TokenizedCorpus,
    run_id: str,
    top_examples: int,
    batch_size: int,
) -> list[dict]:
    """Load the model once, scan the corpus per chunk of features, store each chunk's cards."""
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    progress = create_progress_artifact(
        progress=0.0, key="feature-cards-scan", description=f"corpus passes over {corpus.name}"
    )
    chunks = [features[i : i + CHUNK] for i in range(0, len(features), CHUNK)]
    rows = []
    with gpu_slot():
        loaded = cached_model(config, role)
        upsert_model(store, loaded.identity.to_row(first_run_id=run_id))
        try:
            shown = [0.0]
            for index, chunk in enumerate(chunks):

                def step(done: int, total: int, index=index) -> None:
                    percent = 100.0 * (index + done / total) / len(chunks)
                    if percent - shown[0] >= 10 or done == total:  # each update is an API call
                        update_progress_artifact(progress, percent)
                        shown[0] = percent

                cards = build_cards(loaded, corpus, chunk, top_examples, batch_size, step)
                replace_feature_cards(store, cards, run_id)
                rows += [_row(card) for card in cards]
                run_logger().info(
                    "chunk %d/%d: %d card(s) stored", index + 1, len(chunks), len(cards)
                )
        finally:
            release_models()
    return rows


@task(task_run_name="label-{n_features}-features", **RETRIES)
def label_cards(
    config_path: str | None,
    data_dir: str,
    model_id: str,
    corpus_id: str,
    features: list[Feature],
    n_features: int,
    run_id: str,
) -> dict:
    """Label the features' cards; the labels and the LLM calls behind them are stored."""
    config, _ = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(data_dir)
    cards = list(load_cards(store, features, [model_id], corpus_id).values())
    labeller = make_labeller(config)
    try:
        outcomes = labeller.label_cards(cards, run_id)
    finally:
        getattr(getattr(labeller, "client", None), "close", lambda: None)()
    insert_llm_calls(store, [call for outcome in outcomes for call in outcome.calls])
    labels = labels_from(
        outcomes, labeller.labeller_id, config.models.transcoders.ref, cards, run_id
    )
    save_labels(store, labels)
    failed = {f"{o.layer}/{o.feature}": o.error for o in outcomes if o.reply is None}
    for name, error in list(failed.items())[:5]:
        get_run_logger().warning("label for %s failed: %s", name, error)
    if len(failed) > 5:
        run_logger().warning("%d more label(s) failed; a re-run asks again", len(failed) - 5)
    return {"labelled": len(labels), "label_failures": failed}


def _row(card) -> dict:
    top = card.examples[0] if card.examples else None
    return {
        "layer": card.layer,
        "feature": card.feature,
        "max": round(card.stats.max, 4),
        "frequency": round(card.stats.frequency, 5),
        "top logits": " ".join(repr(t.token) for t in card.top_logits[:3]),
        "top example": top.tokens[top.max_position] if top else "",
    }


def _run_name() -> str:
    from prefect.runtime import flow_run

    params = flow_run.parameters
    features = params.get("features")
    picked = f"{len(features)}-features" if features else f"top{params.get('top', 30)}"
    return f"feature-cards-{params.get('role', 'adapted')}-{picked}"


def _label(config, config_path, resolved, store, model_id, corpus_id, chosen, relabel, run_id):
    labeller = labeller_id(config)
    done = set()
    if not relabel:
        done = labelled_features(store, config.models.transcoders.ref, labeller)
    pending = [f for f in chosen if f not in done]
    outcome = {"labelled": 0, "label_failures": {}}
    if not pending:
        get_run_logger().info(
            "labels: %s labelled every feature before; skipped (`--relabel` asks again)", labeller
        )
    if pending:
        outcome = label_cards(
            config_path, str(resolved), model_id, corpus_id, pending, len(pending), run_id
        )
    get_run_logger().info(
        "labels by %s: %d new, %d before, %d failed",
        labeller, outcome["labelled"], len(chosen) - len(pending), len(outcome["label_failures"]),
    )  # fmt: skip
    return {"labeller": labeller, **outcome}


@flow(name="feature-cards", flow_run_name=_run_name)
@takes(FeatureCardsParameters)
def feature_cards_flow(
    config_path: str | None = None,
    data_dir: str | None = None,
    features: list[list[int]] | None = None,
    top: int = 30,
    corpus: str | None = None,
    limit_texts: int | None = DEFAULT_LIMIT,
    role: str = "adapted",
    metric: str = "total_diff",
    named: bool = True,
    top_examples: int = 10,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    batch_size: int = 32,
    redo: bool = False,
    label: bool = True,
    relabel: bool = False,
) -> dict:
    """Cards for `features` ([layer, feature] pairs), or by default for the top `top` features
    of the adapted model's ranking by `metric` plus (`named`) the features the causal checks
    name, over `corpus` (None: the organism's corpus, else the store's text; `store`; a file)
    capped at `limit_texts` texts of at most `max_tokens` tokens, read by the `role` model;
    then (`label`) the cards are labelled by the config's labeller."""
    data_dir = deployment_data_dir(data_dir)
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    if role not in ("base", "adapted"):
        raise ValueError(f"role must be base or adapted, not {role!r}")
    logger = get_run_logger()
    config, resolved = load_experiment(config_path, data_dir)
    store = Store.in_data_dir(resolved)
    params = {
        "config_path": config_path,
        "data_dir": str(resolved),
        "features": features,
        "top": top,
        "corpus": corpus,
        "limit_texts": limit_texts,
        "role": role,
        "metric": metric,
        "named": named,
        "top_examples": top_examples,
        "max_tokens": max_tokens,
        "redo": redo,
        "label": label,
        "relabel": relabel,
    }
    with recorded_run(store, "flow", "feature-cards", params, current_flow_run_id()) as run:
        if features is not None:
            chosen = list(dict.fromkeys((int(layer), int(f)) for layer, f in features))
        else:
            chosen = default_features(store, config, top, metric, named)
        check_features(chosen, transcoder_widths(config))
        model_id = describe_model(config, role).model_id
        run.summary = {"run_id": run.run_id, "model_id": model_id, "corpus_id": None,
                       "features": [], "carded": 0, "skipped": 0}  # fmt: skip
        if not chosen:
            logger.info(
                "no features to card: no ranking yet; run `emc trace` and `emc analyze` first"
            )
            return run.summary
        source = f"top {top} of the ranking and of the diff by {metric}" + (
            ", and those the causal checks name" if named else ""
        )
        source = "named" if features is not None else source
        logger.info(
            "selected %d feature(s) (%s): %s", len(chosen), source,
            id_list([f"L{layer}/{feature}" for layer, feature in chosen]),
        )  # fmt: skip
        scanned = corpus_for(config, store, corpus, limit_texts, max_tokens)
        done = set() if redo else carded_features(store, model_id, scanned.corpus_id)
        pending = [f for f in chosen if f not in done]
        logger.info(
            "%d features, %d carded before; corpus %s: %d of %d texts, %d tokens",
            len(chosen), len(chosen) - len(pending), scanned.corpus_id, len(scanned.token_ids),
            scanned.available, scanned.tokens,
        )  # fmt: skip
        rows = []
        if not pending:
            logger.info(
                "every feature was carded before on this corpus; skipped (`emc feature cards "
                "--redo` makes them again)"
            )
        if pending:
            rows = compute_cards(
                config_path, str(resolved), role, pending, len(pending), scanned, run.run_id,
                top_examples, batch_size,
            )  # fmt: skip
            shown = rounded_rows(rows)
            for row in shown:
                row["card"] = feature_link(row["layer"], row["feature"])
            create_table_artifact(
                key="feature-cards",
                table=shown,
                description=f"{len(rows)} feature cards over {scanned.corpus_id}",
            )
        labelling = {"labeller": None, "labelled": 0, "label_failures": {}}
        if label:
            labelling = _label(config, config_path, resolved, store, model_id, scanned.corpus_id,
                               chosen, relabel, run.run_id)  # fmt: skip
        run.summary = {
            "run_id": run.run_id,
            "model_id": model_id,
            "corpus_id": scanned.corpus_id,
            **labelling,
            "texts": len(scanned.token_ids),
            "texts_available": scanned.available,
            "tokens": scanned.tokens,
            "features": [list(f) for f in chosen],
            "carded": len(rows),
            "skipped": len(chosen) - len(pending),
        }
    return run.summary
