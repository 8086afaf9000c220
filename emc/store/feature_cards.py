"""Feature cards: each feature's corpus statistics, weight readings and top examples, per model
and corpus (`feature_cards`, `feature_examples`), and what the rest of the store says about it.

Cards are keyed by (model, corpus, layer, feature): writing a card replaces the earlier one and
its examples in one transaction, so re-runs never duplicate. The context shown with a card (its
activation change, LoRA alignment and ranks) is read from the analysis tables when asked, so it is
as current as the analysis.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

import pandas as pd

from emc.features.records import (
    ActivationStats,
    DeltaInfo,
    Feature,
    FeatureCard,
    FeatureContext,
    FeatureExample,
    LoraInfo,
    RankInfo,
    TokenValue,
)
from emc.store.analysis import activation_delta_summary, lora_features
from emc.store.connection import Store
from emc.store.features import Sign, feature_ranking
from emc.store.frames import append_frame

_KEY = ("model_id", "corpus_id", "layer", "feature")
NARROW_EDIT = 20  # interventions on at most this many features name them (top 1, 5, 20)


def replace_feature_cards(store: Store, cards: Sequence[FeatureCard], run_id: str) -> None:
    """Store cards with their examples, replacing any earlier card of the same key."""
    if not cards:
        return
    card_rows = pd.DataFrame([_card_row(card, run_id) for card in cards])
    example_rows = pd.DataFrame(
        [_example_row(card, example, run_id) for card in cards for example in card.examples]
    )
    keys = card_rows[list(_KEY)]
    with store.write() as conn:
        conn.register("_card_keys", keys)
        try:
            for table in ("feature_cards", "feature_examples"):
                conn.execute(
                    f"DELETE FROM {table} t WHERE EXISTS (SELECT 1 FROM _card_keys k WHERE "
                    + " AND ".join(f"t.{c} = k.{c}" for c in _KEY)
                    + ")"
                )
        finally:
            conn.unregister("_card_keys")
        append_frame(conn, "feature_cards", card_rows)
        if not example_rows.empty:
            append_frame(conn, "feature_examples", example_rows)


def carded_features(store: Store, model_id: str, corpus_id: str) -> set[Feature]:
    """Features with a card for this model and corpus (a re-run skips them)."""
    with store.read() as conn:
        rows = conn.execute(
            "SELECT layer, feature FROM feature_cards WHERE model_id = ? AND corpus_id = ?",
            [model_id, corpus_id],
        ).fetchall()
    return {(int(layer), int(feature)) for layer, feature in rows}


def load_card(
    store: Store, layer: int, feature: int, model_id: str, corpus_id: str | None = None
) -> FeatureCard | None:
    """The feature's card for this model: of `corpus_id`, or the newest of any corpus."""
    cards = load_cards(store, [(layer, feature)], [model_id], corpus_id)
    return cards.get((int(layer), int(feature)))


def load_cards(
    store: Store,
    features: Iterable[Feature] | None = None,
    model_ids: Sequence[str] | None = None,
    corpus_id: str | None = None,
) -> dict[Feature, FeatureCard]:
    """One card per feature (all features, or those named): the first of `model_ids` that has
    one (any model when None), and for it the newest card (of `corpus_id` if given)."""
    where, params = [], []
    if model_ids is not None:
        if not model_ids:
            return {}
        where.append(f"model_id IN ({', '.join('?' * len(model_ids))})")
        params += list(model_ids)
    if corpus_id is not None:
        where.append("corpus_id = ?")
        params.append(corpus_id)
    wanted = None if features is None else {(int(a), int(b)) for a, b in features}
    if wanted is not None and not wanted:
        return {}
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    with store.read() as conn:
        cards = conn.execute(
            f"SELECT * FROM feature_cards {clause} ORDER BY created_at DESC, corpus_id", params
        ).df()
        if wanted is not None:
            cards = cards[_is_in(cards, wanted)]
        preference = {m: i for i, m in enumerate(model_ids or [])}
        order = cards["model_id"].map(preference).fillna(0).sort_values(kind="stable").index
        cards = cards.loc[order].drop_duplicates(["layer", "feature"])
        examples = _examples(conn, cards)
    grouped = {key: rows for key, rows in examples.groupby(list(_KEY), sort=False)}
    empty = examples.iloc[:0]
    return {
        (int(row.layer), int(row.feature)): _card(
            row, grouped.get((row.model_id, row.corpus_id, row.layer, row.feature), empty)
        )
        for row in cards.itertuples(index=False)
    }


def card_summaries(store: Store, model_id: str | None = None) -> pd.DataFrame:
    """Stored cards, one row each: layer, feature, model_id, corpus_id, texts, frequency,
    max_activation, top_tokens (the decoder's top 3), examples, created_at."""
    where, params = ("WHERE c.model_id = ?", [model_id]) if model_id else ("", [])
    sql = f"""
        SELECT c.layer, c.feature, c.model_id, c.corpus_id, c.texts, c.frequency,
               c.max_activation, list_slice(c.top_logit_tokens, 1, 3) AS top_tokens,
               (SELECT count(*) FROM feature_examples e WHERE e.model_id = c.model_id
                AND e.corpus_id = c.corpus_id AND e.layer = c.layer
                AND e.feature = c.feature) AS examples,
               c.created_at
        FROM feature_cards c {where}
        ORDER BY c.layer, c.feature, c.created_at DESC
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


def named_features(store: Store, base_model_id: str, adapted_model_id: str) -> list[Feature]:
    """Features the causal checks name: the analysis' top ablated features, the features of
    narrow feature interventions (at most NARROW_EDIT features) and a person's own edits, in
    (layer, feature) order. Random controls are not named: they are chosen to mean nothing."""
    sql = """
        SELECT features AS named FROM ablations
        WHERE model_id = ? AND kind = 'top' AND status = 'ok'
        UNION ALL
        SELECT json_extract(details, '$.features') FROM interventions
        WHERE base_model_id = ? AND adapted_model_id = ?
          AND (family = 'custom' OR (family = 'features' AND n_targets <= ?))
    """
    with store.read() as conn:
        rows = conn.execute(
            sql, [adapted_model_id, base_model_id, adapted_model_id, NARROW_EDIT]
        ).fetchall()
    named: set[Feature] = set()
    for (value,) in rows:
        for item in json.loads(value) if isinstance(value, str) else value or []:
            if isinstance(item, dict):
                named.add((int(item["layer"]), int(item["feature"])))
            else:
                named.add((int(item[0]), int(item[1])))
    return sorted(named)


def feature_context(
    store: Store,
    layer: int,
    feature: int,
    base_model_id: str,
    adapted_model_id: str,
    metric: str = "total_diff",
    sign: Sign = "evil",
) -> FeatureContext:
    """What the analysis tables say about one feature, as of now."""
    key = (int(layer), int(feature))
    deltas = activation_delta_summary(store, base_model_id, adapted_model_id)
    mine = deltas[(deltas["layer"] == key[0]) & (deltas["feature"] == key[1])]
    delta = None
    if not mine.empty:
        row = mine.iloc[0]
        delta = DeltaInfo(
            rank=int(row["rank"]),
            ranked=len(deltas),
            mean_delta=float(row["mean_delta"]),
            mean_abs_delta=float(row["mean_abs_delta"]),
            prompts=int(row["prompts"]),
            measured=int(row["measured"]),
        )
    aligned = lora_features(store, adapted_model_id)
    aligned = aligned[(aligned["layer"] == key[0]) & (aligned["feature"] == key[1])]
    lora = None
    if not aligned.empty:
        best = aligned.sort_values(["null_percentile", "cosine"], ascending=False).iloc[0]
        lora = LoraInfo(
            module=str(best["module"]),
            direction=int(best["direction"]),
            compared_with=str(best["compared_with"]),
            cosine=float(best["cosine"]),
            null_percentile=float(best["null_percentile"]),
        )
    ranks = []
    for role, model_id in (("adapted", adapted_model_id), ("base", base_model_id)):
        ranking = feature_ranking(store, metric, model_id=model_id, sign=sign, top=None)
        hit = ranking[(ranking["layer"] == key[0]) & (ranking["feature"] == key[1])]
        ranks.append(
            RankInfo(
                role=role,
                metric=metric,
                sign=sign,
                rank=None if hit.empty else int(hit["rank"].iloc[0]),
                ranked=len(ranking),
                mean=None if hit.empty else float(hit["mean"].iloc[0]),
            )
        )
    return FeatureContext(layer=key[0], feature=key[1], delta=delta, lora=lora, ranks=ranks)


def _is_in(frame: pd.DataFrame, features: Iterable[Feature]):
    """A boolean mask of the rows whose (layer, feature) is one of `features`."""
    pairs = pd.MultiIndex.from_arrays([frame["layer"].astype(int), frame["feature"].astype(int)])
    return pairs.isin(list(features))


def card_mask(frame: pd.DataFrame, features: Iterable[Feature]):
    """Rows of a card listing (`card_summaries`) whose feature is one of `features`."""
    return _is_in(frame, features)


def _card_row(card: FeatureCard, run_id: str) -> dict:
    stats = card.stats
    row = {
        "model_id": card.model_id,
        "corpus_id": card.corpus_id,
        "layer": card.layer,
        "feature": card.feature,
        "run_id": run_id,
        "corpus_name": card.corpus_name,
        "texts": stats.texts,
        "positions": stats.positions,
        "active": stats.active,
        "frequency": stats.frequency,
        "max_activation": stats.max,
        "mean_active": stats.mean_active,
        "quantile_levels": stats.quantile_levels,
        "quantile_values": stats.quantile_values,
        "hist_edges": stats.hist_edges,
        "hist_counts": stats.hist_counts,
        "logit_basis": card.logit_basis,
        "dtype": card.dtype,
    }
    for prefix, values in (
        ("top_logit", card.top_logits),
        ("bottom_logit", card.bottom_logits),
        ("encoder_token", card.encoder_tokens),
    ):
        row[f"{prefix}_ids"] = [t.token_id for t in values]
        row[f"{prefix}_values"] = [t.value for t in values]
        row["encoder_tokens" if prefix == "encoder_token" else f"{prefix}_tokens"] = [
            t.token for t in values
        ]
    return row


def _example_row(card: FeatureCard, example: FeatureExample, run_id: str) -> dict:
    return {
        "model_id": card.model_id,
        "corpus_id": card.corpus_id,
        "layer": card.layer,
        "feature": card.feature,
        "rank": example.rank,
        "run_id": run_id,
        "source": example.source,
        "text": example.text,
        "token_ids": example.token_ids,
        "tokens": example.tokens,
        "activations": example.activations,
        "max_position": example.max_position,
        "max_activation": example.max_activation,
        "window_start": example.start,
    }


def _examples(conn, cards: pd.DataFrame) -> pd.DataFrame:
    if cards.empty:
        return pd.DataFrame(columns=[*_KEY, "rank"])
    conn.register("_cards", cards[list(_KEY)])
    try:
        return conn.execute(
            "SELECT e.* FROM feature_examples e JOIN _cards c USING (model_id, corpus_id, layer, "
            "feature) ORDER BY e.layer, e.feature, e.rank"
        ).df()
    finally:
        conn.unregister("_cards")


def _tokens(ids, tokens, values) -> list[TokenValue]:
    return [
        TokenValue(token_id=int(i), token=str(t), value=float(v))
        for i, t, v in zip(ids, tokens, values, strict=True)
    ]


def _card(row, mine: pd.DataFrame) -> FeatureCard:
    """A card from its `feature_cards` row and its `feature_examples` rows."""
    return FeatureCard(
        layer=int(row.layer),
        feature=int(row.feature),
        model_id=row.model_id,
        corpus_id=row.corpus_id,
        corpus_name=row.corpus_name,
        stats=ActivationStats(
            texts=int(row.texts),
            positions=int(row.positions),
            active=int(row.active),
            frequency=float(row.frequency),
            max=float(row.max_activation),
            mean_active=None if pd.isna(row.mean_active) else float(row.mean_active),
            quantile_levels=list(row.quantile_levels),
            quantile_values=list(row.quantile_values),
            hist_edges=list(row.hist_edges),
            hist_counts=[int(c) for c in row.hist_counts],
        ),
        examples=[
            FeatureExample(
                rank=int(e.rank),
                source=e.source,
                text=e.text,
                token_ids=[int(i) for i in e.token_ids],
                tokens=list(e.tokens),
                activations=[float(a) for a in e.activations],
                max_position=int(e.max_position),
                max_activation=float(e.max_activation),
                start=int(e.window_start),
            )
            for e in mine.itertuples(index=False)
        ],
        top_logits=_tokens(row.top_logit_ids, row.top_logit_tokens, row.top_logit_values),
        bottom_logits=_tokens(
            row.bottom_logit_ids, row.bottom_logit_tokens, row.bottom_logit_values
        ),
        encoder_tokens=_tokens(row.encoder_token_ids, row.encoder_tokens, row.encoder_token_values),
        logit_basis=row.logit_basis,
        dtype=row.dtype,
        run_id=row.run_id,
        created_at=row.created_at,
    )
