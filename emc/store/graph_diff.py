"""Base vs adapted, per prompt and across prompts: what the fine-tune changed in the graphs.

A graph pair (`graph_pairs`) explains one prompt's targets with both models. Per (layer, feature),
position-free as everywhere in the analysis: is it kept in one graph or both, its activation in
each (summed over kept positions), and its evil-minus-safe effect in each (a `feature_stats`
metric). A feature pruned from one graph has no effect there: its delta counts it as 0, and
`presence` says so. Per layer: the error share of influence in each graph (where the base
transcoders stop explaining the adapted model), and, when the analysis flow measured them, the
forward-pass differences and the activation deltas of every feature (not only kept ones).
Summaries over prompts leave out rejected prompts and stale pairs (see `emc.store.validity`);
one pair's diff is made for whichever pair it is given.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from emc.store.connection import Store
from emc.store.feature_labels import shown_labels, shown_labels_for_model
from emc.store.features import RANKING_METRICS
from emc.store.graph_pairs import PAIR_JOIN, GraphPair
from emc.store.graphs import load_graph_rows
from emc.store.validity import GRAPH_STANDING

# The newest pair per (prompt, models, targets): a re-trace with other settings replaces it.
_PAIRS = f"""
    SELECT b.prompt_id, b.targets, b.graph_id AS base_graph_id, a.graph_id AS adapted_graph_id,
           b.model_id AS base_model_id, a.model_id AS adapted_model_id
    {PAIR_JOIN} {{where}}
    QUALIFY row_number() OVER (
        PARTITION BY b.prompt_id, b.model_id, a.model_id, b.targets
        ORDER BY greatest(b.created_at, a.created_at) DESC, b.graph_id, a.graph_id
    ) = 1
"""

_FEATURES = """
    WITH pairs AS ({pairs}),
    kept AS (
        SELECT graph_id, layer, feature, sum(activation) AS activation, count(*) AS positions
        FROM graph_nodes
        WHERE kind = 'feature' AND graph_id IN (
            SELECT base_graph_id FROM pairs UNION ALL SELECT adapted_graph_id FROM pairs)
        GROUP BY ALL
    ),
    effect AS (
        SELECT graph_id, layer, feature, {metric} AS value
        FROM feature_stats
        WHERE graph_id IN (
            SELECT base_graph_id FROM pairs UNION ALL SELECT adapted_graph_id FROM pairs)
    ),
    per_graph AS (
        SELECT k.graph_id, k.layer, k.feature, k.activation, k.positions, e.value AS effect
        FROM kept k LEFT JOIN effect e USING (graph_id, layer, feature)
    ),
    keys AS (
        SELECT DISTINCT p.*, k.layer, k.feature
        FROM pairs p JOIN per_graph k ON k.graph_id IN (p.base_graph_id, p.adapted_graph_id)
    ),
    sides AS (
        SELECT k.prompt_id, k.targets, k.base_model_id, k.adapted_model_id, k.layer, k.feature,
               b.graph_id IS NOT NULL AS in_base, a.graph_id IS NOT NULL AS in_adapted,
               b.activation AS base_activation, a.activation AS adapted_activation,
               b.positions AS base_positions, a.positions AS adapted_positions,
               b.effect AS base_effect, a.effect AS adapted_effect
        FROM keys k
        LEFT JOIN per_graph b
            ON b.graph_id = k.base_graph_id AND b.layer = k.layer AND b.feature = k.feature
        LEFT JOIN per_graph a
            ON a.graph_id = k.adapted_graph_id AND a.layer = k.layer AND a.feature = k.feature
    )
    SELECT s.*, d.delta AS measured_delta
    FROM sides s
    LEFT JOIN activation_deltas d
        ON d.prompt_id = s.prompt_id AND d.base_model_id = s.base_model_id
       AND d.adapted_model_id = s.adapted_model_id AND d.layer = s.layer
       AND d.feature = s.feature AND d.status = 'ok'
"""


@dataclass(frozen=True)
class GraphDiff:
    """One prompt's base-vs-adapted comparison; frames are described in `prompt_graph_diff`."""

    pair: GraphPair
    metric: str
    features: pd.DataFrame
    layers: pd.DataFrame
    forward: pd.DataFrame
    forward_error: str | None = None  # why the forward passes failed, when they did

    @property
    def only_base(self) -> int:
        return int((self.features["presence"] == "base only").sum())

    @property
    def only_adapted(self) -> int:
        return int((self.features["presence"] == "adapted only").sum())

    @property
    def shared(self) -> int:
        return int((self.features["presence"] == "both").sum())

    @property
    def first_divergent_layer(self) -> int | None:
        """The first layer whose output differs between the models; None if unmeasured or none."""
        diverged = self.forward[self.forward["diverged"]]
        return None if diverged.empty else int(diverged["layer"].min())

    @property
    def loading_error(self) -> bool:
        """A difference upstream of the adapter: the two models do not share a base."""
        return bool((self.forward["diverged"] & self.forward["upstream_of_adapter"]).any())


def prompt_graph_diff(store: Store, pair: GraphPair, metric: str = "total_diff") -> GraphDiff:
    """The diff of one pair.

    `features`, one row per (layer, feature) kept in either graph, by |effect_delta|: its shown
    label, presence
    (both, base only, adapted only), base/adapted activation and positions (kept nodes only),
    base/adapted effect (`metric` from `feature_stats`), effect_delta (adapted - base, an absent
    side counting 0), activation_delta (likewise) and measured_delta (the forward-pass delta over
    all positions, where the analysis flow stored one).
    `layers`, one row per layer: error shares and their delta, kept features in each graph and
    only in one, the sums of effect deltas, and the forward-pass rel_diff where measured.
    `forward`: the `forward_diffs` rows of the prompt and models (empty when not measured);
    `forward_error` says why, when the analysis flow's forward passes failed on this prompt.
    """
    features = _feature_sides(
        store,
        metric,
        "AND b.graph_id = ? AND a.graph_id = ?",
        [pair.base_graph_id, pair.adapted_graph_id],
    )
    features = features.sort_values(
        ["abs_effect_delta", "layer", "feature"], ascending=[False, True, True]
    ).reset_index(drop=True)
    forward = _forward_rows(store, pair)
    layers = _layer_rows(store, pair, features, forward)
    columns = [c for c in features.columns if c not in _PAIR_COLUMNS]
    labels = shown_labels_for_model(store, pair.adapted_model_id)
    features["label"] = [labels.get((int(r.layer), int(r.feature))) for r in features.itertuples()]
    columns.insert(columns.index("feature") + 1, "label")
    error = None if len(forward) else _forward_error(store, pair)
    return GraphDiff(pair, metric, features[columns], layers, forward, error)


def graph_diff_summary(
    store: Store,
    metric: str = "total_diff",
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
    targets: str | None = None,
    min_pairs: int = 1,
    top: int | None = 30,
) -> pd.DataFrame:
    """Across prompts, per (layer, feature): the features the fine-tune changed most.

    Rejected prompts and stale pairs are left out.

    Columns: rank, layer, feature, label (shown label), pairs (prompt pairs where it is kept in
    either graph), in_both, only_base, only_adapted, mean_effect_delta (absent sides count 0),
    mean_base_effect, mean_adapted_effect (where present), mean_activation_delta (kept positions),
    and mean_measured_delta (forward-pass deltas where stored). Ranked by |mean_effect_delta|.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id, targets)
    sides = _feature_sides(store, metric, where, params)
    if sides.empty:
        return pd.DataFrame(columns=_SUMMARY_COLUMNS)
    grouped = sides.groupby(["layer", "feature"])
    summary = pd.DataFrame(
        {
            "pairs": grouped.size(),
            "in_both": grouped["presence"].apply(lambda p: int((p == "both").sum())),
            "only_base": grouped["presence"].apply(lambda p: int((p == "base only").sum())),
            "only_adapted": grouped["presence"].apply(lambda p: int((p == "adapted only").sum())),
            "mean_effect_delta": grouped["effect_delta"].mean(),
            "mean_base_effect": grouped["base_effect"].mean(),
            "mean_adapted_effect": grouped["adapted_effect"].mean(),
            "mean_activation_delta": grouped["activation_delta"].mean(),
            "mean_measured_delta": grouped["measured_delta"].mean(),
        }
    ).reset_index()
    summary = summary[summary["pairs"] >= min_pairs]
    summary = summary.assign(order=summary["mean_effect_delta"].abs()).sort_values(
        ["order", "layer", "feature"], ascending=[False, True, True]
    )
    summary.insert(0, "rank", range(1, len(summary) + 1))
    summary = summary.drop(columns="order").reset_index(drop=True)
    labels = (
        shown_labels_for_model(store, adapted_model_id) if adapted_model_id else shown_labels(store)
    )
    summary.insert(
        3, "label", [labels.get((int(r.layer), int(r.feature))) for r in summary.itertuples()]
    )
    return summary.head(top) if top is not None else summary


def layer_diff_summary(
    store: Store,
    base_model_id: str | None = None,
    adapted_model_id: str | None = None,
    targets: str | None = None,
) -> pd.DataFrame:
    """Across prompts, per layer: mean error share in base and adapted graphs and its delta,
    the mean forward-pass rel_diff, and how many prompts diverge there or flag a loading error.
    Rejected prompts and stale pairs are left out.
    """
    where, params = _pair_filter(base_model_id, adapted_model_id, targets)
    sql = f"""
        WITH pairs AS ({_PAIRS.format(where=where)}),
        shares AS (
            SELECT p.prompt_id, p.base_model_id, p.adapted_model_id, lb.layer,
                   lb.error_share AS base_error_share, la.error_share AS adapted_error_share
            FROM pairs p
            JOIN graph_layers lb ON lb.graph_id = p.base_graph_id
            JOIN graph_layers la ON la.graph_id = p.adapted_graph_id AND la.layer = lb.layer
        ),
        forward AS (
            SELECT f.* FROM forward_diffs f
            WHERE (f.prompt_id, f.base_model_id, f.adapted_model_id) IN (
                SELECT (prompt_id, base_model_id, adapted_model_id) FROM pairs)
        )
        SELECT coalesce(s.layer, f.layer) AS layer,
               count(DISTINCT s.prompt_id) AS pairs,
               avg(s.base_error_share) AS base_error_share,
               avg(s.adapted_error_share) AS adapted_error_share,
               avg(s.adapted_error_share - s.base_error_share) AS error_share_delta,
               count(DISTINCT f.prompt_id) AS measured,
               avg(f.rel_diff) AS mean_rel_diff,
               count(DISTINCT f.prompt_id) FILTER (WHERE f.diverged) AS diverged,
               count(DISTINCT f.prompt_id) FILTER (WHERE f.diverged AND f.upstream_of_adapter)
                   AS loading_errors
        FROM shares s
        FULL OUTER JOIN forward f
            ON f.prompt_id = s.prompt_id AND f.base_model_id = s.base_model_id
           AND f.adapted_model_id = s.adapted_model_id AND f.layer = s.layer
        GROUP BY ALL
        ORDER BY layer
    """
    with store.read() as conn:
        return conn.execute(sql, params).df()


_PAIR_COLUMNS = ("prompt_id", "targets", "base_model_id", "adapted_model_id")


@dataclass(frozen=True)
class PairPaths:
    token_id: int | None  # the target: an evil token, or None for a contrastive direction
    token: str | None
    paths: pd.DataFrame  # emc.analysis.paths.path_diff's columns


def pair_paths(
    store: Store, pair: GraphPair, token_id: int | None = None, k: int = 10
) -> PairPaths | None:
    """The strongest token-to-target paths of a stored pair, gained or lost
    (`emc.analysis.paths.path_diff`), to `token_id` or by default the adapted graph's most
    probable evil target (the direction target of a contrastive pair); None when the graphs are
    gone or neither has such a target."""
    from emc.analysis.paths import logit_token, most_probable_evil, path_diff, target_node

    base = load_graph_rows(store, pair.base_graph_id)
    adapted = load_graph_rows(store, pair.adapted_graph_id)
    if base is None or adapted is None:
        return None
    if token_id is None:
        token_id = most_probable_evil(adapted)
        if token_id is None and target_node(adapted, None) is None:
            return None
    labels = shown_labels_for_model(store, pair.adapted_model_id)
    paths = path_diff(base, adapted, token_id, k, labels)
    token = logit_token(adapted, token_id) if token_id is not None else None
    return PairPaths(token_id, token, paths)


_SUMMARY_COLUMNS = [
    "rank",
    "layer",
    "feature",
    "label",
    "pairs",
    "in_both",
    "only_base",
    "only_adapted",
    "mean_effect_delta",
    "mean_base_effect",
    "mean_adapted_effect",
    "mean_activation_delta",
    "mean_measured_delta",
]


# Graphs a summary over prompts may count: not stale, and not of a rejected prompt.
_COUNTED = f"SELECT graph_id FROM ({GRAPH_STANDING}) WHERE NOT stale AND NOT rejected"


def _pair_filter(
    base_model_id: str | None, adapted_model_id: str | None, targets: str | None
) -> tuple[str, list]:
    """The summaries' pairs: current ones of prompts not rejected, narrowed as asked."""
    where = [f"AND b.graph_id IN ({_COUNTED}) AND a.graph_id IN ({_COUNTED})"]
    params = []
    for column, value in (
        ("b.model_id", base_model_id),
        ("a.model_id", adapted_model_id),
        ("b.targets", targets),
    ):
        if value is not None:
            where.append(f"AND {column} = ?")
            params.append(value)
    return " ".join(where), params


def _feature_sides(store: Store, metric: str, where: str, params: list) -> pd.DataFrame:
    if metric not in RANKING_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(RANKING_METRICS)}")
    sql = _FEATURES.format(pairs=_PAIRS.format(where=where), metric=metric)
    with store.read() as conn:
        sides = conn.execute(sql, params).df()
    sides["presence"] = [
        "both" if b and a else "base only" if b else "adapted only"
        for b, a in zip(sides["in_base"], sides["in_adapted"], strict=True)
    ]
    sides["effect_delta"] = sides["adapted_effect"].fillna(0.0) - sides["base_effect"].fillna(0.0)
    sides["abs_effect_delta"] = sides["effect_delta"].abs()
    sides["activation_delta"] = sides["adapted_activation"].fillna(0.0) - sides[
        "base_activation"
    ].fillna(0.0)
    return sides.astype({"layer": "int16", "feature": "int32"})


def _forward_rows(store: Store, pair: GraphPair) -> pd.DataFrame:
    with store.read() as conn:
        return conn.execute(
            "SELECT layer, rel_diff, max_abs_diff, upstream_of_adapter, diverged, tolerance, "
            "dtype, run_id FROM forward_diffs "
            "WHERE prompt_id = ? AND base_model_id = ? AND adapted_model_id = ? ORDER BY layer",
            [pair.prompt_id, pair.base_model_id, pair.adapted_model_id],
        ).df()


def _forward_error(store: Store, pair: GraphPair) -> str | None:
    with store.read() as conn:
        row = conn.execute(
            "SELECT error FROM activation_deltas WHERE status = 'failed' AND prompt_id = ? "
            "AND base_model_id = ? AND adapted_model_id = ?",
            [pair.prompt_id, pair.base_model_id, pair.adapted_model_id],
        ).fetchone()
    return row[0] if row else None


def _layer_rows(
    store: Store, pair: GraphPair, features: pd.DataFrame, forward: pd.DataFrame
) -> pd.DataFrame:
    with store.read() as conn:
        shares = conn.execute(
            "SELECT layer, b.error_share AS base_error_share, "
            "a.error_share AS adapted_error_share, "
            "a.error_share - b.error_share AS error_share_delta "
            "FROM (SELECT * FROM graph_layers WHERE graph_id = ?) b "
            "FULL OUTER JOIN (SELECT * FROM graph_layers WHERE graph_id = ?) a USING (layer) "
            "ORDER BY layer",
            [pair.base_graph_id, pair.adapted_graph_id],
        ).df()
    by_layer = (
        features.assign(
            base_features=features["in_base"].astype(int),
            adapted_features=features["in_adapted"].astype(int),
            only_base=(features["presence"] == "base only").astype(int),
            only_adapted=(features["presence"] == "adapted only").astype(int),
        )
        .groupby("layer")
        .agg(
            base_features=("base_features", "sum"),
            adapted_features=("adapted_features", "sum"),
            only_base=("only_base", "sum"),
            only_adapted=("only_adapted", "sum"),
            effect_delta=("effect_delta", "sum"),
            abs_effect_delta=("abs_effect_delta", "sum"),
        )
        .reset_index()
    )
    layers = shares.merge(by_layer, on="layer", how="outer")
    if not forward.empty:
        layers = layers.merge(
            forward[forward["layer"] >= 0][["layer", "rel_diff", "diverged"]],
            on="layer",
            how="outer",
        )
    else:
        layers = layers.assign(rel_diff=float("nan"), diverged=pd.NA)
    counts = ["base_features", "adapted_features", "only_base", "only_adapted"]
    layers[counts] = layers[counts].fillna(0).astype(int)
    return layers.sort_values("layer").reset_index(drop=True)
