"""Features: which transcoder features the fine-tune moved towards evil, and where.

Rank features by their evil-minus-safe effect over prompts, look one up across prompts and
targets, compare a prompt's base and adapted graphs layer by layer, and, once `emc analyze` has
run, see the adapter's geometry against the transcoders and what ablating top features does
(prompts whose ablation failed are listed with their error and left out of the numbers).
Rankings and summaries leave out rejected prompts and stale graphs (a caption says how many);
a feature's per-prompt rows and the base-vs-adapted picker still show them, marked.

The shaping functions (stored frames in, display frames and Altair charts out) are pure, so
tests check them without a browser; the drawing functions below them read through emc.store.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store, pick_pair, rejection_notice
from emc.store import Store
from emc.store.analysis import (
    ablation_results,
    analysis_failures,
    lora_comparisons,
    lora_features,
)
from emc.store.feature_detail import FeatureDetail, feature_detail, feature_layers
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import (
    GraphDiff,
    graph_diff_summary,
    layer_diff_summary,
    prompt_graph_diff,
)
from emc.store.graph_pairs import graph_pairs
from emc.store.prompts import get_prompts
from emc.store.validity import left_out_of_rankings, rejection_badge

MODEL_ROLES: dict[str, str | None] = {"adapted": "adapted", "base": "base", "all": None}
SIGNS = ("any", "evil", "safe")
SIGN_LABELS = {"any": "either (by |mean|)", "evil": "evil > safe", "safe": "safe > evil"}
ROLES = ("base", "adapted")
ROLE_COLOURS = ("#4c78a8", "#f58518")
KIND_COLOURS = ("#d62728", "#8c8c8c")  # ablation kinds: top, control
PROMPT_CHARS = 70  # prompt texts in tables are cut to this many characters
LABEL_CHARS = 24  # prompt labels on chart axes
CHART_HEIGHT = 260
LOADING_ERROR = (
    "Loading error: the models' residual streams differ upstream of the adapter's first layer, "
    "so base and adapted do not share a base model (wrong checkpoint, dtype or tokenizer). "
    "Every difference below is suspect."
)
STALE_PAIR = (
    "Stale pair: these graphs were traced for labels that are no longer the prompt's. Rankings "
    "and summaries leave them out; `emc trace` traces them again."
)
_KEY = re.compile(r"^\s*l?\s*(\d+)\s*[/:,. ]\s*(\d+)\s*$", re.IGNORECASE)


# Ranking and picking a feature


def feature_key(layer: Any, feature: Any) -> str:
    return f"L{int(layer)}/{int(feature)}"


def parse_feature_key(text: str) -> tuple[int, int] | None:
    """(layer, feature) from what a person types: L1/125, 1/125, 1:125, l1 125; else None."""
    match = _KEY.match(text or "")
    return (int(match[1]), int(match[2])) if match else None


def feature_options(ranking: pd.DataFrame) -> list[str]:
    """The ranking's features as keys, best rank first, each once (it may rank in both roles)."""
    keys = [feature_key(r.layer, r.feature) for r in ranking.itertuples()]
    return list(dict.fromkeys(keys))


def ranking_table(ranking: pd.DataFrame) -> pd.DataFrame:
    """The ranking with the feature's identity first and the long model id last."""
    first = ["rank", "layer", "feature", "role", "prompts", "mean", "median", "sign_consistency"]
    rest = [c for c in ranking.columns if c not in first and c != "model_id"]
    return ranking[[*first, *rest, "model_id"]].reset_index(drop=True)


def clicked_row(state: Any) -> int | None:
    """The row a table click selected, from the dataframe's widget state (None: no click)."""
    try:
        rows = state["selection"]["rows"]
    except (KeyError, TypeError):
        return None
    return int(rows[0]) if rows else None


def rank_text(rank: int | None) -> str:
    return "—" if rank is None else str(rank)


# One feature


def shorten(text: Any, limit: int = PROMPT_CHARS) -> str:
    text = "" if _missing(text) else " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def prompt_labels(frame: pd.DataFrame) -> dict[str, str]:
    """A short label per prompt id: its name, with the id where two prompts share a name."""
    names = frame.drop_duplicates("prompt_id").set_index("prompt_id")["prompt_name"]
    names = names.fillna(pd.Series(names.index, index=names.index))
    repeated = names.duplicated(keep=False)
    return {
        pid: shorten(f"{name} · {pid}" if repeated[pid] else name, LABEL_CHARS)
        for pid, name in names.items()
    }


def standing_text(row: Mapping[str, Any]) -> str:
    """A per-prompt row's mark: `⛔ rejected by human:ana: <reason>`, `⚠️ stale`, or nothing."""
    marks = []
    if bool(row.get("rejected")):
        marks.append(f"⛔ {rejection_badge(row.get('rejected_by'), row.get('reject_reason'))}")
    if bool(row.get("stale")):
        marks.append("⚠️ stale: traced before a relabel")
    return "; ".join(marks)


def left_out_text(left_out: Mapping[str, int]) -> str | None:
    """The caption under a ranking or summary saying what it did not count, if anything."""
    rejected, stale = left_out.get("rejected_prompts", 0), left_out.get("stale_graphs", 0)
    if not rejected and not stale:
        return None
    return (
        f"Left out: {rejected} rejected prompt(s) and {stale} stale graph(s) (traced before "
        "their prompt was relabelled; `emc trace` traces them again)."
    )


def prompt_rows(detail: FeatureDetail) -> pd.DataFrame:
    """One row per prompt and model that kept the feature: where, how strongly, its effect.

    `status` marks a rejected prompt (with the reviewer's reason) and a stale graph: both are
    listed here but left out of the ranking.
    """
    rows = detail.prompts
    return pd.DataFrame(
        {
            "prompt_id": rows["prompt_id"],
            "status": [standing_text(r) for r in rows.to_dict("records")],
            "prompt": [shorten(t) for t in rows["prompt_text"]],
            "role": rows["role"],
            "targets": rows["targets"],
            "positions": rows["positions"].astype(int),
            "activation sum": rows["activation_sum"].astype(float),
            "activation max": rows["activation_max"].astype(float),
            "evil mean": rows["evil_mean"].astype(float),
            "safe mean": rows["safe_mean"].astype(float),
            "diff": rows["diff"].astype(float),
            "t": rows["t"].astype(float),
            "model_id": rows["model_id"],
        }
    )


def target_rows(detail: FeatureDetail) -> pd.DataFrame:
    """Per prompt, model and target: the feature's direct and total effect on that target."""
    rows = detail.targets
    labels = prompt_labels(detail.prompts) if len(detail.prompts) else {}
    return pd.DataFrame(
        {
            "prompt": [labels.get(p, p) for p in rows["prompt_id"]],
            "role": rows["role"],
            "target": [repr(str(t)) for t in rows["label"]],
            "token id": rows["token_id"],
            "side": rows["side"],
            "prob": rows["prob"].astype(float),
            "direct": rows["direct"].astype(float),
            "total": rows["total"].astype(float),
        }
    )


def prompt_diff_frame(detail: FeatureDetail) -> pd.DataFrame:
    """prompt, role, diff: the bars of the per-prompt chart (a feature pruned away has none)."""
    rows = detail.prompts.dropna(subset=["diff"])
    labels = prompt_labels(detail.prompts) if len(rows) else {}
    return pd.DataFrame(
        {
            "prompt": [labels[p] for p in rows["prompt_id"]],
            "role": rows["role"].to_numpy(),
            "diff": rows["diff"].astype(float).to_numpy(),
        }
    )


def prompt_diff_chart(frame: pd.DataFrame) -> alt.Chart:
    """Grouped bars: per prompt, the feature's evil-minus-safe effect in base and adapted."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("prompt:N", title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("role:N", sort=list(ROLES)),
            y=alt.Y("diff:Q", title="effect on evil − effect on safe"),
            color=_role_colour(),
            tooltip=["prompt:N", "role:N", alt.Tooltip("diff:Q", format=".4g")],
        )
        .properties(height=CHART_HEIGHT)
    )


# Base vs adapted, one prompt


def diff_counts(diff: GraphDiff) -> dict[str, int]:
    return {"Shared": diff.shared, "Only base": diff.only_base, "Only adapted": diff.only_adapted}


def divergence_text(diff: GraphDiff) -> str:
    """The first layer whose output differs: 'L3', 'embeddings', 'none' or 'not measured'."""
    if diff.forward.empty:
        return "not measured"
    layer = diff.first_divergent_layer
    if layer is None:
        return "none"
    return "embeddings" if layer < 0 else f"L{layer}"


def loading_errors_text(layers: pd.DataFrame) -> str | None:
    """Across prompts: where loading errors were found (`layer_diff_summary` rows), or None."""
    flagged = layers[layers["loading_errors"].fillna(0) > 0]
    if flagged.empty:
        return None
    where = ", ".join(
        f"{'embeddings' if layer < 0 else f'L{layer}'} ({count} prompt{'s' * (count != 1)})"
        for layer, count in zip(
            flagged["layer"].astype(int), flagged["loading_errors"].astype(int), strict=True
        )
    )
    return (
        f"Loading error at {where}: the models differ upstream of the adapter, so they do not "
        "share a base model. See those prompts under Base vs adapted."
    )


def changed_features(features: pd.DataFrame, top: int = 30) -> pd.DataFrame:
    """The features whose effect changed most (|effect_delta|), with where they are kept."""
    columns = [
        "layer",
        "feature",
        "presence",
        "base_effect",
        "adapted_effect",
        "effect_delta",
        "base_activation",
        "adapted_activation",
        "measured_delta",
    ]
    ordered = features.sort_values(
        ["abs_effect_delta", "layer", "feature"], ascending=[False, True, True]
    )
    return ordered[columns].head(top).reset_index(drop=True)


def layer_effect_frame(layers: pd.DataFrame) -> pd.DataFrame:
    """Long frame (layer, measure, value): the summed effect delta and |effect delta| per layer."""
    frame = layers[["layer", "effect_delta", "abs_effect_delta"]].dropna(subset=["layer"])
    long = frame.rename(
        columns={"effect_delta": "effect delta", "abs_effect_delta": "|effect delta|"}
    ).melt(id_vars="layer", var_name="measure", value_name="value")
    return long.fillna({"value": 0.0}).astype({"layer": int})


def layer_effect_chart(frame: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("layer:O"),
            xOffset=alt.XOffset("measure:N", sort=["effect delta", "|effect delta|"]),
            y=alt.Y("value:Q", title="sum over the layer's features (adapted − base)"),
            color=alt.Color(
                "measure:N",
                scale=alt.Scale(
                    domain=["effect delta", "|effect delta|"], range=["#7b4ea3", "#c7b3e5"]
                ),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["layer:O", "measure:N", alt.Tooltip("value:Q", format=".4g")],
        )
        .properties(height=CHART_HEIGHT)
    )


def error_share_frame(layers: pd.DataFrame) -> pd.DataFrame:
    """Long frame (layer, model, error_share) from base_/adapted_error_share columns."""
    frame = layers[["layer", "base_error_share", "adapted_error_share"]].rename(
        columns={"base_error_share": "base", "adapted_error_share": "adapted"}
    )
    long = frame.melt(id_vars="layer", var_name="model", value_name="error_share")
    return long.dropna().astype({"layer": int, "error_share": float}).reset_index(drop=True)


def error_share_chart(frame: pd.DataFrame) -> alt.Chart:
    """Lines per model: the share of each layer's influence that goes through error nodes."""
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("layer:O"),
            y=alt.Y("error_share:Q", title="error share of influence"),
            color=alt.Color(
                "model:N",
                scale=alt.Scale(domain=list(ROLES), range=list(ROLE_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["layer:O", "model:N", alt.Tooltip("error_share:Q", format=".3f")],
        )
        .properties(height=CHART_HEIGHT)
    )


def forward_frame(forward: pd.DataFrame) -> pd.DataFrame:
    """Every measured layer. An exact zero (identical: the evidence that loading was right) has
    no place on a log scale, so it is drawn at a floor 100x below the tolerance."""
    floor = forward["tolerance"].astype(float) / 100
    return pd.DataFrame(
        {
            "layer": forward["layer"].astype(int).to_numpy(),
            "where": ["embeddings" if x < 0 else f"L{x}" for x in forward["layer"]],
            "rel_diff": forward["rel_diff"].astype(float).to_numpy(),
            "shown": forward["rel_diff"].astype(float).clip(lower=floor).to_numpy(),
            "identical": (forward["rel_diff"] == 0).to_numpy(),
            "max_abs_diff": forward["max_abs_diff"].astype(float).to_numpy(),
            "status": [
                _forward_status(d, u)
                for d, u in zip(forward["diverged"], forward["upstream_of_adapter"], strict=True)
            ],
            "tolerance": forward["tolerance"].astype(float).to_numpy(),
        }
    )


def forward_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """rel_diff per layer on a log scale (identical layers at the floor), the tolerance dashed."""
    statuses = ["within tolerance", "diverged", "loading error"]
    line = (
        alt.Chart(frame)
        .mark_line(point=alt.OverlayMarkDef(size=60, filled=True), color="#999")
        .encode(
            x=alt.X("layer:O", title="layer (-1: embeddings)"),
            y=alt.Y("shown:Q", scale=alt.Scale(type="log"), title="|adapted − base| / |base|"),
        )
    )
    points = line.mark_point(size=80, filled=True).encode(
        color=alt.Color(
            "status:N",
            scale=alt.Scale(domain=statuses, range=["#2e8b57", "#f58518", "#d62728"]),
            legend=alt.Legend(title=None, orient="bottom"),
        ),
        tooltip=[
            "where:N",
            alt.Tooltip("rel_diff:Q", format=".3g"),
            "identical:N",
            alt.Tooltip("max_abs_diff:Q", format=".3g"),
            "status:N",
        ],
    )
    tolerance = (
        alt.Chart(pd.DataFrame({"tolerance": frame["tolerance"].head(1)}))
        .mark_rule(strokeDash=[4, 4], color="#666")
        .encode(y="tolerance:Q")
    )
    return alt.layer(line, points, tolerance).properties(height=CHART_HEIGHT)


# LoRA geometry


def comparison_key(row: Mapping[str, Any]) -> str:
    key = f"{row['module']}|{int(row['direction'])}|{row['compared_with']}|{int(row['layer'])}"
    adapter = row.get("adapter_model_id")
    return key if adapter is None else f"{adapter}|{key}"


def comparison_label(row: Mapping[str, Any]) -> str:
    return (
        f"{row['module']} · direction {int(row['direction'])} vs L{int(row['layer'])} "
        f"{row['compared_with']} · {row['null_percentile']:.1f}th percentile of chance"
    )


def comparison_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The comparisons, least chance-like first, without the histogram lists."""
    columns = [
        "module",
        "direction",
        "compared_with",
        "layer",
        "singular_value",
        "best_feature",
        "best_cosine",
        "null_q99",
        "null_percentile",
        "mean_cosine",
        "std_cosine",
        "n_features",
        "adapter_model_id",
    ]
    ordered = comparisons.sort_values(
        ["null_percentile", "best_cosine"], ascending=[False, False], kind="stable"
    )
    return ordered[[c for c in columns if c in ordered]].reset_index(drop=True)


def histogram_frame(row: Mapping[str, Any]) -> pd.DataFrame:
    """The comparison's histogram of all cosines: bin start, end, centre, count, chance."""
    edges = np.asarray(row["hist_edges"], dtype=float)
    counts = np.asarray(row["hist_counts"], dtype=float)
    chance = np.asarray(row["hist_chance"], dtype=float)
    if len(edges) != len(counts) + 1 or len(chance) != len(counts):
        raise ValueError(
            f"histogram lists do not fit: {len(edges)} edges, {len(counts)} counts, "
            f"{len(chance)} chance"
        )
    return pd.DataFrame(
        {
            "start": edges[:-1],
            "end": edges[1:],
            "centre": (edges[:-1] + edges[1:]) / 2,
            "count": counts,
            "chance": chance,
        }
    )


def histogram_chart(frame: pd.DataFrame, null_q99: float | None = None) -> alt.LayerChart:
    """Bars of the observed cosines, a line of the chance expectation; ±null_q99 dashed."""
    y_scale = alt.Scale(type="symlog")
    bars = (
        alt.Chart(frame)
        .mark_bar(color="#4c78a8", opacity=0.8)
        .encode(
            x=alt.X("start:Q", title="cosine with each feature", bin="binned"),
            x2="end:Q",
            y=alt.Y("count:Q", scale=y_scale, title="features (symlog)"),
            tooltip=[
                alt.Tooltip("start:Q", format=".3f"),
                alt.Tooltip("end:Q", format=".3f"),
                "count:Q",
                alt.Tooltip("chance:Q", format=".1f"),
            ],
        )
    )
    chance = (
        alt.Chart(frame)
        .mark_line(color="#d62728", strokeWidth=2)
        .encode(x="centre:Q", y=alt.Y("chance:Q", scale=y_scale))
    )
    layers = [bars, chance]
    if null_q99 is not None and not _missing(null_q99):
        marks = pd.DataFrame({"x": [-float(null_q99), float(null_q99)]})
        layers.append(alt.Chart(marks).mark_rule(strokeDash=[4, 4], color="#333").encode(x="x:Q"))
    return alt.layer(*layers).properties(height=CHART_HEIGHT)


def comparison_features(features: pd.DataFrame, row: Mapping[str, Any]) -> pd.DataFrame:
    """The comparison's top features by |cosine|, best first."""
    mask = pd.Series(True, index=features.index)
    for key in ("adapter_model_id", "module", "direction", "compared_with", "layer"):
        if key in features and key in row:
            mask &= features[key] == row[key]
    mine = features[mask]
    columns = ["abs_rank", "layer", "feature", "cosine", "null_percentile"]
    return mine.sort_values("abs_rank")[columns].reset_index(drop=True)


# Ablations


def latest_ablations(ablations: pd.DataFrame) -> pd.DataFrame:
    """One ablation per prompt, model, kind and metric: the newest (the store replaces them,
    this only guards a store written by hand)."""
    ordered = ablations.sort_values("created_at", kind="stable")
    latest = ordered.drop_duplicates(["prompt_id", "model_id", "kind", "metric"], keep="last")
    return latest.assign(n_features=[len(_features(f)) for f in latest["features"]])


def ablation_table(ablations: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, model and metric: evil probability before/after for top and control."""
    latest = latest_ablations(ablations)
    values = ["n_features", "evil_prob_before", "evil_prob_after", "evil_prob_change"]
    wide = latest.pivot(index=["prompt_id", "model_id", "metric"], columns="kind", values=values)
    wide.columns = [f"{kind} {value.replace('_', ' ')}" for value, kind in wide.columns]
    order = [
        f"{kind} {value.replace('_', ' ')}"
        for kind in ("top", "control")
        for value in values
        if f"{kind} {value.replace('_', ' ')}" in wide.columns
    ]
    return wide[order].reset_index()


def ablation_means(ablations: pd.DataFrame) -> pd.DataFrame:
    """Per model and kind: how many prompts, and the mean change in evil probability/share."""
    latest = latest_ablations(ablations)
    grouped = latest.groupby(["model_id", "kind"], sort=False)
    means = grouped.agg(
        prompts=("prompt_id", "nunique"),
        mean_evil_prob_change=("evil_prob_change", "mean"),
        mean_evil_share_change=("evil_share_change", "mean"),
    ).reset_index()
    means["order"] = means["kind"].map({"top": 0, "control": 1})
    return means.sort_values(["model_id", "order"]).drop(columns="order").reset_index(drop=True)


def ablation_chart(ablations: pd.DataFrame, labels: Mapping[str, str]) -> alt.Chart:
    """Grouped bars: per prompt, the change in evil probability when top or control features
    are zeroed."""
    latest = latest_ablations(ablations)
    frame = pd.DataFrame(
        {
            "prompt": [labels.get(p, p) for p in latest["prompt_id"]],
            "kind": latest["kind"].to_numpy(),
            "change": latest["evil_prob_change"].astype(float).to_numpy(),
            "model": latest["model_id"].to_numpy(),
        }
    )
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("prompt:N", title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("kind:N", sort=["top", "control"]),
            y=alt.Y("change:Q", title="evil probability after − before"),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=["top", "control"], range=list(KIND_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["prompt:N", "model:N", "kind:N", alt.Tooltip("change:Q", format=".4f")],
        )
        .properties(height=CHART_HEIGHT)
    )


def _role_colour() -> alt.Color:
    return alt.Color(
        "role:N",
        scale=alt.Scale(domain=list(ROLES), range=list(ROLE_COLOURS)),
        legend=alt.Legend(title=None, orient="bottom"),
    )


def _forward_status(diverged: Any, upstream: Any) -> str:
    if bool(diverged) and bool(upstream):
        return "loading error"
    return "diverged" if bool(diverged) else "within tolerance"


def _features(value: Any) -> list:
    if isinstance(value, str):
        return json.loads(value)
    return [] if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


# Drawing the page

TRACE_HINT = "Run `emc trace` to make attribution graphs of the flagged prompts."
TABLE, PICK, SEEN, LOOKUP = (
    "features-ranking",
    "features-pick",
    "features-seen",
    "features-lookup",
)
NUMBERS = "{:.4g}"


def render() -> None:
    st.title("Features")
    store = existing_store(TRACE_HINT)
    has_graphs = not feature_ranking(store, top=1).empty
    comparisons, ablations = lora_comparisons(store), ablation_results(store)
    failures = analysis_failures(store)
    failed_ablations = failures[failures["step"] == "ablation"]
    if not has_graphs and comparisons.empty and ablations.empty and failed_ablations.empty:
        st.info(f"No feature statistics in the store yet. {TRACE_HINT}")
        st.stop()

    metric = st.selectbox(
        "Metric",
        RANKING_METRICS,
        key="features-metric",
        help="A feature's evil-vs-safe effect in one graph (from `feature_stats`): `_diff` is "
        "the mean effect on evil targets minus on safe ones, `_cohens_d` that over its spread, "
        "`contrastive_` the effect on the evil-minus-safe direction.",
    )
    names = ["Ranking", "Base vs adapted", "Across prompts"]
    names += ["LoRA geometry"] * (not comparisons.empty)
    names += ["Ablations"] * (not ablations.empty or not failed_ablations.empty)
    tabs = dict(zip(names, st.tabs(names), strict=True))
    with tabs["Ranking"]:
        if has_graphs:
            ranking = show_ranking(store, metric)
            picked = picked_feature(ranking)
            if picked is not None:
                show_feature(store, metric, *picked, sign=st.session_state["features-sign"])
        else:
            st.info(f"No feature statistics in the store yet. {TRACE_HINT}")
    with tabs["Base vs adapted"]:
        show_prompt_diff(store, metric)
    with tabs["Across prompts"]:
        if has_graphs:
            show_across_prompts(store, metric)
        else:
            st.info(f"No graphs in the store yet. {TRACE_HINT}")
    if "LoRA geometry" in tabs:
        with tabs["LoRA geometry"]:
            show_lora(store, comparisons)
    if "Ablations" in tabs:
        with tabs["Ablations"]:
            show_ablations(store, ablations, failed_ablations)


def numbers(frame: pd.DataFrame, skip: tuple[str, ...] = ()) -> object:
    floats = [c for c in frame.columns if frame[c].dtype.kind == "f" and c not in skip]
    return frame.style.format(dict.fromkeys(floats, NUMBERS), na_rep="—")


def show_left_out(store: Store) -> None:
    caption = left_out_text(left_out_of_rankings(store))
    if caption:
        st.caption(caption)


def show_ranking(store: Store, metric: str) -> pd.DataFrame:
    model_col, layer_col, sign_col, min_col, top_col = st.columns(5)
    model = model_col.selectbox("Model", list(MODEL_ROLES), key="features-model")
    layer = layer_col.selectbox("Layer", ["all", *feature_layers(store)], key="features-layer")
    sign = sign_col.selectbox("Sign", SIGNS, format_func=SIGN_LABELS.get, key="features-sign")
    min_prompts = min_col.number_input("Min prompts", 1, value=1, key="features-min-prompts")
    top = top_col.number_input("Top", 1, 5000, value=30, step=10, key="features-top")
    ranking = feature_ranking(
        store,
        metric,
        role=MODEL_ROLES[model],
        layer=None if layer == "all" else int(layer),
        min_prompts=int(min_prompts),
        sign=sign,
        top=int(top),
    )
    if ranking.empty:
        st.info("No feature matches these filters.")
    else:
        st.dataframe(
            numbers(ranking_table(ranking)),
            hide_index=True,
            width="stretch",
            on_select="rerun",
            selection_mode="single-row",
            key=TABLE,
        )
        st.caption("Click a row to see that feature below.")
    show_left_out(store)
    return ranking


def picked_feature(ranking: pd.DataFrame) -> tuple[int, int] | None:
    """The feature to detail: a typed one, else a new table click, else the picker's choice."""
    options = feature_options(ranking)
    clicked = clicked_row(st.session_state.get(TABLE))
    if clicked is not None and clicked != st.session_state.get(SEEN) and clicked < len(ranking):
        row = ranking.iloc[clicked]
        st.session_state[PICK] = feature_key(row["layer"], row["feature"])
    st.session_state[SEEN] = clicked
    if options and st.session_state.get(PICK) not in options:
        st.session_state[PICK] = options[0]
    pick_col, lookup_col = st.columns(2)
    picked = pick_col.selectbox("Feature", options, key=PICK) if options else None
    typed = lookup_col.text_input("…or look up any feature", key=LOOKUP, placeholder="L1/125")
    if typed.strip():
        parsed = parse_feature_key(typed)
        if parsed is None:
            st.warning("Type a feature as L<layer>/<feature>, e.g. L1/125.")
        return parsed
    return parse_feature_key(picked) if picked else None


def show_feature(store: Store, metric: str, layer: int, feature: int, sign: str) -> None:
    detail = feature_detail(store, layer, feature, metric, sign=sign)
    st.subheader(f"Feature {feature_key(layer, feature)}")
    base_col, adapted_col, prompts_col = st.columns(3)
    base_col.metric("Rank in base", rank_text(detail.base_rank), help=f"of {detail.base_ranked}")
    adapted_col.metric(
        "Rank in adapted",
        rank_text(detail.adapted_rank),
        help=f"of {detail.adapted_ranked}",
    )
    prompts_col.metric("Prompts that keep it", detail.prompts["prompt_id"].nunique())
    if not detail.found:
        st.info("No graph in the store keeps this feature.")
        return
    st.dataframe(numbers(prompt_rows(detail)), hide_index=True, width="stretch")
    st.altair_chart(prompt_diff_chart(prompt_diff_frame(detail)), width="stretch")
    st.caption("A missing bar: the feature is not in that model's pruned graph of the prompt.")
    with st.expander("Effects per target"):
        st.dataframe(numbers(target_rows(detail)), hide_index=True, width="stretch")


def show_prompt_diff(store: Store, metric: str) -> None:
    pairs = graph_pairs(store)
    if not pairs:
        st.info(f"No base and adapted graph pairs in the store yet. {TRACE_HINT}")
        return
    prompt_col, pair_col = st.columns(2)
    pair = pick_pair(store, pairs, prompt_col, pair_col, key="features-diff")
    rejected = rejection_notice(pair)
    if rejected:
        st.error(rejected, icon="⛔")
    if pair.stale:
        st.warning(STALE_PAIR, icon="⚠️")
    diff = prompt_graph_diff(store, pair, metric)
    if diff.loading_error:
        st.error(LOADING_ERROR, icon="🚨")
    counts = {**diff_counts(diff), "First divergent layer": divergence_text(diff)}
    for column, (label, value) in zip(st.columns(len(counts)), counts.items(), strict=True):
        column.metric(label, value)
    effect_col, share_col = st.columns(2)
    with effect_col:
        st.markdown("**Effect delta by layer**")
        st.altair_chart(layer_effect_chart(layer_effect_frame(diff.layers)), width="stretch")
    with share_col:
        st.markdown("**Error share by layer**")
        st.altair_chart(error_share_chart(error_share_frame(diff.layers)), width="stretch")
    if diff.forward_error:
        st.warning(
            f"The forward passes failed on this prompt: {diff.forward_error}. "
            "`emc analyze` tries again."
        )
    elif diff.forward.empty:
        st.caption("Forward-pass differences not measured: run `emc analyze`.")
    else:
        st.markdown("**Forward pass: relative difference of the residual stream**")
        st.altair_chart(forward_chart(forward_frame(diff.forward)), width="stretch")
    st.markdown("**Features whose effect changed most**")
    st.dataframe(numbers(changed_features(diff.features)), hide_index=True, width="stretch")


def show_across_prompts(store: Store, metric: str) -> None:
    layers = layer_diff_summary(store)
    loading = loading_errors_text(layers)
    if loading:
        st.error(loading, icon="🚨")
    st.markdown("**Error share by layer, mean over prompts**")
    st.altair_chart(error_share_chart(error_share_frame(layers)), width="stretch")
    with st.expander("Per layer: error shares, forward-pass differences, divergences"):
        st.dataframe(numbers(layers), hide_index=True, width="stretch")
    st.markdown("**Features the fine-tune changed most, over prompts**")
    summary = graph_diff_summary(store, metric, top=50)
    st.dataframe(numbers(summary), hide_index=True, width="stretch")
    show_left_out(store)


def show_lora(store: Store, comparisons: pd.DataFrame) -> None:
    table = comparison_table(comparisons)
    st.dataframe(numbers(table), hide_index=True, width="stretch")
    rows = {comparison_key(r): r for r in comparisons.to_dict("records")}
    ordered = [comparison_key(r) for r in table.to_dict("records")]
    key = st.selectbox(
        "Comparison",
        ordered,
        format_func=lambda k: comparison_label(rows[k]),
        key="features-lora",
    )
    row = rows[key]
    chart_col, features_col = st.columns([3, 2])
    with chart_col:
        st.altair_chart(histogram_chart(histogram_frame(row), row.get("null_q99")), width="stretch")
        st.caption(
            f"Cosines of the adapter direction with all {row['n_features']:,} features (bars) "
            f"and what a random direction would give (red). Dashed: ±{row['null_q99']:.3f}, "
            "the 99th percentile of random directions' best |cosine|."
        )
    with features_col:
        st.markdown("**Most aligned features**")
        top = comparison_features(lora_features(store), row)
        st.dataframe(numbers(top), hide_index=True, width="stretch")


def show_ablations(store: Store, ablations: pd.DataFrame, failed_ablations: pd.DataFrame) -> None:
    if not failed_ablations.empty:
        show_failed_ablations(failed_ablations)
    if ablations.empty:
        return
    ids = list(dict.fromkeys(ablations["prompt_id"]))
    labels = {p.prompt_id: shorten(p.name, LABEL_CHARS) for p in get_prompts(store, ids)}
    means = ablation_means(ablations)
    several = means["model_id"].nunique() > 1
    for column, row in zip(st.columns(len(means)), means.to_dict("records"), strict=True):
        model = f" · {shorten(row['model_id'], LABEL_CHARS)}" if several else ""
        column.metric(
            f"{row['kind']} · mean Δ evil prob{model}",
            f"{row['mean_evil_prob_change']:+.4f}",
            help=f"{row['prompts']} prompts · {row['model_id']}",
        )
    st.altair_chart(ablation_chart(ablations, labels), width="stretch")
    st.dataframe(numbers(ablation_table(ablations)), hide_index=True, width="stretch")


def show_failed_ablations(failed_ablations: pd.DataFrame) -> None:
    prompts = failed_ablations["prompt_id"].nunique()
    st.warning(
        f"The ablation failed on {prompts} prompt(s); they are left out of the numbers below "
        "(`emc analyze` tries them again).",
    )
    columns = ["prompt_id", "model_id", "kind", "metric", "error", "run_id"]
    st.dataframe(failed_ablations[columns], hide_index=True, width="stretch")
