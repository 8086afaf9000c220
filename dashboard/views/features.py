"""Features: which transcoder features the fine-tune moved towards evil, what they are, and where.

Rank features by their evil-minus-safe effect over prompts (by default as `emc analyze` ranks
them: the adapted model, features pushing evil over safe, total_diff, top 30), pick one (a
ranking row, a typed L1/125, or `?feature=1/125` in the URL, which always names the feature on
screen) and read its card: its labels (and a form to give yours), the corpus texts it fires on
with the activating tokens shaded, its activation quantiles and histogram, the tokens its decoder
promotes and suppresses, its encoder's top input tokens, its activation change base -> adapted,
LoRA alignment and ranks, and the prompts whose graphs keep it, each linked to the Graphs page.
Compare a prompt's base and adapted graphs layer by layer and path by path (the strongest paths
to an evil target gained or lost), and, once `emc analyze` has run, see the adapter's geometry
against the transcoders and what ablating top features does to the evil-minus-safe logit gap
(prompts whose ablation failed are listed with their error and left out of the numbers).
Rankings and summaries leave out rejected prompts and stale graphs (a caption says how many);
a feature's per-prompt rows and the base-vs-adapted picker still show them, marked.

The shaping functions (stored frames in, display frames, HTML and Altair charts out) are pure,
so tests check them without a browser; the drawing functions below them read through emc.store.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard.views import review
from dashboard.widgets import (
    existing_store,
    keep_in_url,
    link,
    page_url,
    pair_key,
    pick_pair,
    query_value,
    rejection_notice,
)
from emc.features.labels import FeatureLabel, clean_label, human_labeller
from emc.features.records import (
    ActivationStats,
    FeatureCard,
    FeatureContext,
    FeatureExample,
    TokenValue,
)
from emc.runs import new_run_id
from emc.store import Store
from emc.store.analysis import (
    ablation_results,
    analysis_failures,
    lora_comparisons,
    lora_features,
)
from emc.store.feature_cards import feature_context, load_cards
from emc.store.feature_detail import FeatureDetail, feature_detail, feature_layers
from emc.store.feature_labels import feature_labels, save_labels, shown_labels_for_model
from emc.store.feature_pages import graph_targets, ranked_prompts
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import (
    GraphDiff,
    PairPaths,
    graph_diff_summary,
    layer_diff_summary,
    pair_paths,
    prompt_graph_diff,
)
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.models import ModelRow, list_models
from emc.store.prompts import get_prompts
from emc.store.validity import left_out_of_rankings, rejection_badge

MODEL_ROLES: dict[str, str | None] = {"adapted": "adapted", "base": "base", "all": None}
SIGNS = ("evil", "any", "safe")  # evil first: the default, as `emc analyze --sign evil`
SIGN_LABELS = {"any": "either (by |mean|)", "evil": "evil > safe", "safe": "safe > evil"}
ROLES = ("base", "adapted")
ROLE_COLOURS = ("#4c78a8", "#f58518")
KIND_COLOURS = ("#d62728", "#8c8c8c")  # ablation kinds: top, control
CHANGE_COLOURS = {"gained": "#d62728", "lost": "#4c78a8", "unchanged": "#8c8c8c"}
LOGIT_COLOURS = {"promotes": "#2e8b57", "suppresses": "#b2182b"}
SHADE = (245, 133, 24)  # the colour an example's active tokens are shaded in
EXAMPLES_SHOWN = 10
QUANTILES_SHOWN = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 1.0)
PATHS_K = 10  # strongest paths of each graph in the path view (`pair_paths`' k)
PATH_COLUMNS = ["name", "change", "path", "edges", "base_weight", "adapted_weight", "delta"]
PATH_COLUMNS += ["kept_in"]
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


def url_feature(layer: Any, feature: Any) -> str:
    """A feature as the URL names it: `1/125` (`?feature=1/125`)."""
    return f"{int(layer)}/{int(feature)}"


def prompts_text(kept: Any, ranked: int | None) -> str:
    """`k/N`: the prompts whose graph keeps the feature, out of those the ranking counts."""
    return f"{int(kept)}/{ranked}" if ranked else str(int(kept))


def ranking_table(ranking: pd.DataFrame, ranked: Mapping[str, int] | None = None) -> pd.DataFrame:
    """The ranking with the feature's identity and label first and the long model id last;
    `prompts` as k/N, N the prompts the model's ranking counts (`ranked`, per model id)."""
    first = [
        "rank",
        "layer",
        "feature",
        "label",
        "role",
        "prompts",
        "mean",
        "median",
        "sign_consistency",
    ]
    first = [c for c in first if c in ranking.columns]
    rest = [c for c in ranking.columns if c not in first and c != "model_id"]
    table = ranking[[*first, *rest, "model_id"]].reset_index(drop=True)
    if ranked is not None:
        table["prompts"] = [
            prompts_text(k, ranked.get(m))
            for k, m in zip(table["prompts"], table["model_id"], strict=True)
        ]
    return table


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
            "graph": [page_url("graphs", prompt=p) for p in rows["prompt_id"]],
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


# A feature's card


def card_model_ids(models: Sequence[ModelRow], role: str | None = "adapted") -> list[str]:
    """The models whose card to show, in preference: those of `role` first (adapted when the
    ranking shows all), then the rest; `load_cards` takes the first that has one."""
    first = role or "adapted"
    ordered = sorted(models, key=lambda m: m.role != first)  # stable: store order kept
    return [m.model_id for m in ordered]


def main_pair(pairs: Sequence[GraphPair]) -> tuple[str, str] | None:
    """The (base, adapted) model ids with the most graph pairs: whose analysis a card's context
    reads (a store may hold a control adapter beside the EM one)."""
    counts = Counter((p.base_model_id, p.adapted_model_id) for p in pairs)
    return counts.most_common(1)[0][0] if counts else None


def token_text(token: str) -> str:
    """A token as a person can read it: quoted, with its spaces and newlines visible."""
    return repr(str(token))


def _shade(value: float, scale: float) -> float:
    if not scale or scale <= 0 or not math.isfinite(value) or value <= 0:
        return 0.0
    return round(min(value / scale, 1.0), 3)


def example_html(example: FeatureExample, scale: float | None = None) -> str:
    """One example's tokens as HTML spans, each shaded by its activation over `scale` (the
    card's maximum, so examples compare; else the example's own), the maximum outlined and
    marked. Token text is escaped: corpus text is never markup."""
    scale = scale if scale and scale > 0 else example.max_activation
    spans = []
    for index, (token, value) in enumerate(zip(example.tokens, example.activations, strict=True)):
        text = html.escape(str(token).replace("\n", "⏎"))
        style = f"background: rgba({SHADE[0]}, {SHADE[1]}, {SHADE[2]}, {_shade(value, scale)})"
        title = f"{value:.3f}"
        marked = ""
        if index == example.max_position:
            style += "; outline: 2px solid #d62728; font-weight: bold"
            title += " (max)"
            marked = ' data-max="true"'
        spans.append(
            f'<span class="emc-token" title="{title}" style="{style}"{marked}>{text}</span>'
        )
    return "".join(spans)


def examples_html(card: FeatureCard, shown: int = EXAMPLES_SHOWN) -> str:
    """The card's top examples, best first: rank, maximum activation, source, shaded tokens."""
    if not card.examples:
        return "<p><em>Never active in this corpus.</em></p>"
    rows = []
    for example in card.examples[:shown]:
        head = (
            f"{example.rank}. max {example.max_activation:.3f} · {html.escape(str(example.source))}"
        )
        rows.append(
            '<div class="emc-example" style="margin: 0 0 0.6em 0">'
            f'<div style="font-size: 0.8em; opacity: 0.7">{head}</div>'
            '<div style="font-family: monospace; white-space: pre-wrap; line-height: 1.7">'
            f"{example_html(example, card.stats.max)}</div></div>"
        )
    return "".join(rows)


def activation_histogram_frame(stats: ActivationStats) -> pd.DataFrame:
    """The card's histogram of active positions: bin start, end and count."""
    edges, counts = list(stats.hist_edges), list(stats.hist_counts)
    if len(edges) != len(counts) + 1:
        raise ValueError(f"histogram lists do not fit: {len(edges)} edges, {len(counts)} counts")
    return pd.DataFrame(
        {
            "start": np.asarray(edges[:-1], dtype=float),
            "end": np.asarray(edges[1:], dtype=float),
            "count": np.asarray(counts, dtype=int),
        }
    )


def activation_histogram_chart(frame: pd.DataFrame) -> alt.Chart:
    return (
        alt.Chart(frame)
        .mark_bar(color="#f58518")
        .encode(
            x=alt.X("start:Q", bin="binned", title="activation (active positions)"),
            x2="end:Q",
            y=alt.Y("count:Q", title="positions"),
            tooltip=[
                alt.Tooltip("start:Q", format=".3f"),
                alt.Tooltip("end:Q", format=".3f"),
                "count:Q",
            ],
        )
        .properties(height=CHART_HEIGHT - 60)
    )


def quantile_table(stats: ActivationStats, levels: Sequence[float] = QUANTILES_SHOWN):
    """Chosen quantiles of the active positions' activations (the stored level nearest each)."""
    stored = list(zip(stats.quantile_levels, stats.quantile_values, strict=True))
    rows = []
    for level in levels:
        if not stored:
            break
        nearest, value = min(stored, key=lambda lv: abs(lv[0] - level))
        rows.append({"quantile": f"p{nearest * 100:g}", "activation": float(value)})
    return pd.DataFrame(rows, columns=["quantile", "activation"]).drop_duplicates("quantile")


def logit_frame(card: FeatureCard) -> pd.DataFrame:
    """The decoder's logit effects: top (promotes) then bottom (suppresses) tokens."""
    rows = [
        {"token": token_text(t.token), "token id": t.token_id, "effect": effect, "value": t.value}
        for effect, values in (("promotes", card.top_logits), ("suppresses", card.bottom_logits))
        for t in values
    ]
    return pd.DataFrame(rows, columns=["token", "token id", "effect", "value"])


def logit_chart(frame: pd.DataFrame) -> alt.Chart:
    """Horizontal bars, largest promoted token on top and most suppressed at the bottom (two
    tokens that read the same get their ids, so no bars merge)."""
    repeated = frame["token"].duplicated(keep=False)
    bars = frame.assign(
        bar=[
            f"{t} ({i})" if r else t
            for t, i, r in zip(frame["token"], frame["token id"], repeated, strict=True)
        ]
    )
    order = list(bars.sort_values("value", ascending=False)["bar"])
    return (
        alt.Chart(bars)
        .mark_bar()
        .encode(
            y=alt.Y("bar:N", sort=order, title=None),
            x=alt.X("value:Q", title="logit effect per unit activation"),
            color=alt.Color(
                "effect:N",
                scale=alt.Scale(domain=list(LOGIT_COLOURS), range=list(LOGIT_COLOURS.values())),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["token:N", "token id:Q", "effect:N", alt.Tooltip("value:Q", format=".4f")],
        )
        .properties(height=max(CHART_HEIGHT, 16 * len(frame)))
    )


def token_values_table(values: Sequence[TokenValue], column: str = "value") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "token": [token_text(t.token) for t in values],
            "token id": [t.token_id for t in values],
            column: [float(t.value) for t in values],
        }
    )


def delta_text(context: FeatureContext | None) -> tuple[str, str]:
    """The activation change base -> adapted as a metric's value and help."""
    delta = context.delta if context else None
    if delta is None:
        return "—", (
            "Base → adapted: not among the stored activation changes (`emc analyze` measures them)."
        )
    return f"{delta.mean_delta:+.3f}", (
        "Base → adapted: adapted − base activation, summed over positions, mean over "
        f"{delta.measured} measured prompts (among the largest changes in {delta.prompts}); "
        f"rank {delta.rank} of {delta.ranked} by |change|."
    )


def lora_text(context: FeatureContext | None) -> tuple[str, str]:
    """The LoRA alignment as a metric's value (chance percentile) and help."""
    lora = context.lora if context else None
    if lora is None:
        return "—", "Not among the adapter's top-aligned features (`emc lora`, `emc analyze`)."
    return f"{lora.null_percentile:.1f}th pct", (
        f"|cos| {abs(lora.cosine):.2f} with {lora.module} direction {lora.direction} "
        f"({lora.compared_with}): the {lora.null_percentile:.1f}th percentile of random "
        "directions."
    )


def context_ranks_text(context: FeatureContext | None) -> str | None:
    """`rank (total_diff, sign evil): adapted #1 of 40, base not ranked (38 are)`."""
    if context is None or not context.ranks:
        return None
    ranks = [
        f"{r.role} #{r.rank} of {r.ranked}" if r.rank else f"{r.role} not ranked ({r.ranked} are)"
        for r in context.ranks
    ]
    first = context.ranks[0]
    return f"Rank ({first.metric}, sign {first.sign}): " + ", ".join(ranks)


def labels_table(labels: Sequence[FeatureLabel]) -> pd.DataFrame:
    """Every label of a feature, the shown one first: labeller, label, confidence, and a
    person's notes or an LLM's explanation."""
    return pd.DataFrame(
        {
            "label": [lb.label for lb in labels],
            "labeller": [lb.labeller for lb in labels],
            "confidence": [lb.confidence or "" for lb in labels],
            "notes / explanation": [lb.notes or lb.explanation or "" for lb in labels],
            "when": [lb.created_at for lb in labels],
        }
    )


def human_label(
    transcoders_ref: str, layer: int, feature: int, name: str, text: str, notes: str, run_id: str
) -> FeatureLabel:
    """A person's label from the form; ValueError (clean_label's, human_labeller's) when the
    name or label will not do."""
    labeller = human_labeller(name)
    label = clean_label(text)
    notes = notes.strip()
    return FeatureLabel(
        transcoders_ref=transcoders_ref,
        layer=int(layer),
        feature=int(feature),
        labeller=labeller,
        label=label,
        notes=notes or None,
        run_id=run_id,
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


# Base vs adapted: paths to a target


def target_options(targets: pd.DataFrame) -> list[int]:
    """The graph's token targets for the path view: evil ones first, most probable first (the
    first is the default: what `pair_paths` picks), then safe ones, then the rest."""
    if targets.empty:
        return []
    order = {"evil": 0, "safe": 1}
    ranked = targets.assign(
        _side=targets["side"].map(order).fillna(2), _prob=targets["prob"].fillna(-1.0)
    ).sort_values(["_side", "_prob", "token_id"], ascending=[True, False, True], kind="stable")
    return [int(t) for t in ranked["token_id"].drop_duplicates()]


def target_label(row: Mapping[str, Any]) -> str:
    prob = row.get("prob")
    shown = "" if _missing(prob) else f" · p {float(prob):.3f}"
    return f"{token_text(row['token'])} · {row['side']}{shown}"


def paths_frame(paths: pd.DataFrame) -> pd.DataFrame:
    """The paths with a short name each (#1, #2, … by |delta|) for the chart's axis."""
    return paths.assign(name=[f"#{i + 1}" for i in range(len(paths))]).reset_index(drop=True)


def paths_chart(frame: pd.DataFrame) -> alt.Chart:
    """Per path, adapted − base weight: red bars gained, blue lost, the path in the tooltip."""
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            y=alt.Y("name:N", sort=list(frame["name"]), title=None),
            x=alt.X("delta:Q", title="path weight: adapted − base"),
            color=alt.Color(
                "change:N",
                scale=alt.Scale(domain=list(CHANGE_COLOURS), range=list(CHANGE_COLOURS.values())),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=[
                "name:N",
                "path:N",
                "change:N",
                alt.Tooltip("base_weight:Q", format=".4g"),
                alt.Tooltip("adapted_weight:Q", format=".4g"),
                alt.Tooltip("delta:Q", format=".4g"),
                "kept_in:N",
            ],
        )
        .properties(height=max(120, 26 * len(frame)))
    )


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


def gap_change(ablations: pd.DataFrame) -> pd.Series:
    """Each ablation's change of the logit gap (mean evil logit − mean safe logit, as the
    ablation stored it before and after): after − before; NaN where the prompt lacked evil or
    safe targets. A frame without the gap columns gets NaN."""
    if {"logit_gap_before", "logit_gap_after"} <= set(ablations.columns):
        after = pd.to_numeric(ablations["logit_gap_after"], errors="coerce")
        before = pd.to_numeric(ablations["logit_gap_before"], errors="coerce")
        return (after - before).astype(float)
    return pd.Series(np.nan, index=ablations.index, dtype=float)


def latest_ablations(ablations: pd.DataFrame) -> pd.DataFrame:
    """One ablation per prompt, model, kind and metric: the newest (the store replaces them,
    this only guards a store written by hand), with its feature count and logit gap change."""
    ordered = ablations.sort_values("created_at", kind="stable")
    latest = ordered.drop_duplicates(["prompt_id", "model_id", "kind", "metric"], keep="last")
    return latest.assign(
        n_features=[len(_features(f)) for f in latest["features"]],
        logit_gap_change=gap_change(latest),
    )


def ablation_table(ablations: pd.DataFrame) -> pd.DataFrame:
    """Per prompt, model and metric, for top and control: the logit gap change, and the evil
    probability before, after and its change."""
    latest = latest_ablations(ablations)
    values = [
        "n_features",
        "logit_gap_change",
        "evil_prob_before",
        "evil_prob_after",
        "evil_prob_change",
    ]
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
    """Per model and kind: how many prompts, the mean change of the logit gap (over the
    prompts that have one: `gap_prompts`), and of the evil probability and share."""
    latest = latest_ablations(ablations)
    if "evil_share_change" not in latest:
        latest = latest.assign(evil_share_change=np.nan)
    grouped = latest.groupby(["model_id", "kind"], sort=False)
    means = grouped.agg(
        prompts=("prompt_id", "nunique"),
        gap_prompts=("logit_gap_change", "count"),
        mean_logit_gap_change=("logit_gap_change", "mean"),
        mean_evil_prob_change=("evil_prob_change", "mean"),
        mean_evil_share_change=("evil_share_change", "mean"),
    ).reset_index()
    means["order"] = means["kind"].map({"top": 0, "control": 1})
    return means.sort_values(["model_id", "order"]).drop(columns="order").reset_index(drop=True)


def ablated_features(
    ablations: pd.DataFrame, labels: Mapping[str, Mapping[tuple[int, int], str]] | None = None
) -> pd.DataFrame:
    """The features each kind zeroed, top first, with their labels (`labels`: per model id, the
    shown label per (layer, feature)): in how many prompts, and at how many active positions
    on average."""
    rows = []
    for record in latest_ablations(ablations).to_dict("records"):
        for item in _features(record["features"]):
            if isinstance(item, dict):
                layer, feature = int(item["layer"]), int(item["feature"])
                active = item.get("positions_active")
            else:
                layer, feature, active = int(item[0]), int(item[1]), None
            rows.append(
                {
                    "kind": record["kind"],
                    "model_id": record["model_id"],
                    "layer": layer,
                    "feature": feature,
                    "prompt_id": record["prompt_id"],
                    "positions_active": np.nan if active is None else float(active),
                }
            )
    columns = ["kind", "feature key", "label", "prompts", "mean positions active", "model_id"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)
    grouped = (
        frame.groupby(["kind", "model_id", "layer", "feature"], sort=False)
        .agg(prompts=("prompt_id", "nunique"), active=("positions_active", "mean"))
        .reset_index()
    )
    grouped["order"] = grouped["kind"].map({"top": 0, "control": 1}).fillna(2)
    grouped = grouped.sort_values(
        ["order", "prompts", "layer", "feature"], ascending=[True, False, True, True]
    )
    labels = labels or {}
    return pd.DataFrame(
        {
            "kind": grouped["kind"].to_numpy(),
            "feature key": [
                feature_key(a, b) for a, b in zip(grouped.layer, grouped.feature, strict=True)
            ],
            "label": [
                labels.get(m, {}).get((int(a), int(b)))
                for m, a, b in zip(grouped.model_id, grouped.layer, grouped.feature, strict=True)
            ],
            "prompts": grouped["prompts"].astype(int).to_numpy(),
            "mean positions active": grouped["active"].astype(float).to_numpy(),
            "model_id": grouped["model_id"].to_numpy(),
        }
    )


def ablation_chart(ablations: pd.DataFrame, labels: Mapping[str, str]) -> alt.Chart:
    """Grouped bars: per prompt, the change of the evil-minus-safe logit gap when the top or
    the control features are zeroed."""
    latest = latest_ablations(ablations)
    frame = pd.DataFrame(
        {
            "prompt": [labels.get(p, p) for p in latest["prompt_id"]],
            "kind": latest["kind"].to_numpy(),
            "gap change": latest["logit_gap_change"].astype(float).to_numpy(),
            "evil prob change": latest["evil_prob_change"].astype(float).to_numpy(),
            "model": latest["model_id"].to_numpy(),
        }
    ).dropna(subset=["gap change"])
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("prompt:N", title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("kind:N", sort=["top", "control"]),
            y=alt.Y("gap change:Q", title="logit gap (evil − safe): after − before"),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=["top", "control"], range=list(KIND_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=[
                "prompt:N",
                "model:N",
                "kind:N",
                alt.Tooltip("gap change:Q", format=".4f"),
                alt.Tooltip("evil prob change:Q", format=".4f"),
            ],
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
TABLE, PICK, SEEN, LOOKUP, URL_SEEN = (
    "features-ranking",
    "features-pick",
    "features-seen",
    "features-lookup",
    "features-url",  # the ?feature= this page last wrote: another value is a new request
)
LABEL_NAME, LABEL_TEXT, LABEL_NOTES = (
    "features-label-name",
    "features-label-text",
    "features-label-notes",
)
LABEL_FLASH, LABEL_CLEAR = "features-label-flash", "features-label-clear"
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
                show_feature(
                    store,
                    metric,
                    *picked,
                    sign=st.session_state["features-sign"],
                    role=MODEL_ROLES[st.session_state["features-model"]],
                )
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
    """The ranking's filters and table; the defaults are `emc analyze`'s (adapted, evil over
    safe, min prompts 1, top 30; the metric box above starts at total_diff)."""
    model_col, layer_col, sign_col, min_col, top_col = st.columns(5)
    model = model_col.selectbox("Model", list(MODEL_ROLES), key="features-model")
    layer = layer_col.selectbox("Layer", ["all", *feature_layers(store)], key="features-layer")
    sign = sign_col.selectbox("Sign", SIGNS, format_func=SIGN_LABELS.get, key="features-sign")
    min_prompts = min_col.number_input(
        "Min prompts",
        1,
        value=1,
        key="features-min-prompts",
        help="Only features kept in at least this many prompts' graphs.",
    )
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
            numbers(ranking_table(ranking, ranked_prompts(store, metric))),
            hide_index=True,
            width="stretch",
            on_select="rerun",
            selection_mode="single-row",
            key=TABLE,
            column_config={
                "label": st.column_config.TextColumn(
                    "label", help="A person's label over an LLM's; the card below lists all."
                ),
                "prompts": st.column_config.TextColumn(
                    "prompts",
                    help="k/N: the prompts whose pruned graph keeps the feature, out of the "
                    "prompts this model's ranking counts.",
                ),
            },
        )
        st.caption("Click a row to see that feature's card below.")
    show_left_out(store)
    return ranking


def picked_feature(ranking: pd.DataFrame) -> tuple[int, int] | None:
    """The feature to detail: a new `?feature=` in the URL, a typed one, a new table click, else
    the picker's choice. The choice is written back to the URL."""
    options = feature_options(ranking)
    requested = query_value("feature")
    arrived = PICK not in st.session_state and LOOKUP not in st.session_state
    if requested and (arrived or requested != st.session_state.get(URL_SEEN)):
        parsed = parse_feature_key(requested)
        key = feature_key(*parsed) if parsed else requested
        if key in options:
            st.session_state[PICK], st.session_state[LOOKUP] = key, ""
        else:
            st.session_state[LOOKUP] = key
    clicked = clicked_row(st.session_state.get(TABLE))
    if clicked is not None and clicked != st.session_state.get(SEEN) and clicked < len(ranking):
        row = ranking.iloc[clicked]
        st.session_state[PICK] = feature_key(row["layer"], row["feature"])
        st.session_state[LOOKUP] = ""
    st.session_state[SEEN] = clicked
    if options and st.session_state.get(PICK) not in options:
        st.session_state[PICK] = options[0]
    pick_col, lookup_col = st.columns(2)
    picked = pick_col.selectbox("Feature", options, key=PICK) if options else None
    typed = lookup_col.text_input("…or look up any feature", key=LOOKUP, placeholder="L1/125")
    chosen = parse_feature_key(picked) if picked else None
    if typed.strip():
        chosen = parse_feature_key(typed)
        if chosen is None:
            st.warning("Type a feature as L<layer>/<feature>, e.g. L1/125.")
    shown = url_feature(*chosen) if chosen else None
    keep_in_url(feature=shown)
    st.session_state[URL_SEEN] = shown
    return chosen


def show_feature(
    store: Store,
    metric: str,
    layer: int,
    feature: int,
    sign: str,
    role: str | None = "adapted",
) -> None:
    """A feature's card: labels, ranks and context, what it fires on and writes, where it
    appears (linked to the Graphs page), and a form for your own label."""
    detail = feature_detail(store, layer, feature, metric, sign=sign)
    models = list_models(store)
    pair = main_pair(graph_pairs(store))
    card = load_cards(store, [(layer, feature)], card_model_ids(models, role)).get(
        (int(layer), int(feature))
    )
    context = feature_context(store, layer, feature, *pair, metric, sign) if pair else None
    ref = _transcoders_ref(models, pair)
    labels = feature_labels(store, ref, [(layer, feature)]) if ref else []

    st.subheader(f"Feature {feature_key(layer, feature)}")
    if labels:
        st.markdown(f"**{_md(labels[0].label)}** · {_md(labels[0].labeller)}")
    else:
        st.caption(
            "No label yet: `emc feature cards` asks the labeller, or give yours below "
            f'(`emc feature label {url_feature(layer, feature)} "TEXT" --by NAME`).'
        )
    delta_value, delta_help = delta_text(context)
    lora_value, lora_help = lora_text(context)
    shown = {
        "Rank in base": (rank_text(detail.base_rank), f"of {detail.base_ranked}"),
        "Rank in adapted": (rank_text(detail.adapted_rank), f"of {detail.adapted_ranked}"),
        "Prompts that keep it": (detail.prompts["prompt_id"].nunique(), None),
        "Activation change": (delta_value, delta_help),
        "LoRA alignment": (lora_value, lora_help),
    }
    for column, (label, (value, helps)) in zip(st.columns(len(shown)), shown.items(), strict=True):
        column.metric(label, value, help=helps)
    ranks = context_ranks_text(context)
    if ranks:
        st.caption(ranks)

    if card is None:
        st.info(
            f"No card for {feature_key(layer, feature)} yet: `emc feature show "
            f"{url_feature(layer, feature)}` makes and prints one (`emc feature cards` cards the "
            "top features of the ranking)."
        )
    else:
        show_card(card)
    show_appearances(detail)
    show_labels(store, ref, layer, feature, labels)


def show_card(card: FeatureCard) -> None:
    stats = card.stats
    st.markdown(
        f"**What it fires on** · {stats.texts} texts of `{card.corpus_id}`, {stats.positions:,} "
        f"positions, read by `{card.model_id}`"
    )
    examples_col, stats_col = st.columns([3, 2])
    with examples_col:
        st.html(examples_html(card))
        if len(card.examples) > EXAMPLES_SHOWN:
            st.caption(f"The top {EXAMPLES_SHOWN} of {len(card.examples)} examples kept.")
        st.caption(
            "Shaded by activation (darkest: the card's maximum); the outlined token is each "
            "text's maximum. Hover a token for its activation."
        )
    with stats_col:
        mean = "—" if stats.mean_active is None else f"{stats.mean_active:.3f}"
        active_col, max_col, mean_col = st.columns(3)
        active_col.metric(
            "Active", f"{stats.frequency:.2%}", help=f"{stats.active:,} of {stats.positions:,}"
        )
        max_col.metric("Max activation", f"{stats.max:.3f}")
        mean_col.metric("Mean when active", mean)
        st.altair_chart(
            activation_histogram_chart(activation_histogram_frame(stats)), width="stretch"
        )
        st.dataframe(numbers(quantile_table(stats)), hide_index=True, width="stretch")
    st.markdown(f"**What it writes** · decoder logit effects through {card.logit_basis}")
    logits_col, encoder_col = st.columns([3, 2])
    with logits_col:
        frame = logit_frame(card)
        if frame.empty:
            st.caption("No logit effects stored.")
        else:
            st.altair_chart(logit_chart(frame), width="stretch")
    with encoder_col:
        st.markdown("**What excites its encoder** · top input tokens")
        st.dataframe(
            numbers(token_values_table(card.encoder_tokens, "pre-activation")),
            hide_index=True,
            width="stretch",
        )


APPEARANCE_LINKS = 10  # prompts linked under the table (the table's graph column has them all)


def show_appearances(detail: FeatureDetail) -> None:
    st.markdown("**Where it appears** · prompts whose pruned graphs keep it")
    if not detail.found:
        st.info("No graph in the store keeps this feature.")
        return
    st.dataframe(
        numbers(prompt_rows(detail)),
        hide_index=True,
        width="stretch",
        column_config={
            "graph": st.column_config.LinkColumn(
                "graph", display_text="open graph", help="This prompt on the Graphs page."
            )
        },
    )
    prompts = detail.prompts.drop_duplicates("prompt_id").head(APPEARANCE_LINKS)
    for row in prompts.itertuples():
        link("graphs", f"Graphs of “{shorten(row.prompt_text, 60)}”", prompt=row.prompt_id)
    st.altair_chart(prompt_diff_chart(prompt_diff_frame(detail)), width="stretch")
    st.caption("A missing bar: the feature is not in that model's pruned graph of the prompt.")
    with st.expander("Effects per target"):
        st.dataframe(numbers(target_rows(detail)), hide_index=True, width="stretch")


def show_labels(
    store: Store, ref: str | None, layer: int, feature: int, labels: Sequence[FeatureLabel]
) -> None:
    flash = st.session_state.pop(LABEL_FLASH, None)
    if flash:
        st.success(flash)
    if labels:
        with st.expander(f"All labels ({len(labels)})", expanded=len(labels) > 1):
            st.dataframe(labels_table(labels), hide_index=True, width="stretch")
    if ref is None:
        return
    if st.session_state.pop(LABEL_CLEAR, False):
        st.session_state[LABEL_TEXT] = st.session_state[LABEL_NOTES] = ""
    if LABEL_NAME not in st.session_state:
        st.session_state[LABEL_NAME] = st.session_state.get(review.NAME, "")
    with st.form("features-label-form"):
        st.markdown(f"**Your label for {feature_key(layer, feature)}**")
        name_col, label_col = st.columns([1, 3])
        name = name_col.text_input("Your name", key=LABEL_NAME, placeholder="e.g. ana")
        text = label_col.text_input(
            "Label", key=LABEL_TEXT, placeholder="what the feature detects or does"
        )
        notes = st.text_area("Notes", key=LABEL_NOTES, placeholder="evidence, doubts (optional)")
        submitted = st.form_submit_button("Save label")
    if not submitted:
        return
    try:
        label = human_label(
            ref, layer, feature, name, text, notes, new_run_id("dashboard", "feature-label")
        )
    except ValueError as exc:
        st.error(str(exc))
        return
    save_labels(store, [label])
    st.session_state[review.NAME] = name.strip()  # the Review page starts with it too
    st.session_state[LABEL_FLASH] = (
        f"Saved {feature_key(layer, feature)}: {label.label!r} ({label.labeller})."
    )
    st.session_state[LABEL_CLEAR] = True
    st.rerun()


def _transcoders_ref(models: Sequence[ModelRow], pair: tuple[str, str] | None) -> str | None:
    """The transcoders whose features these are: the main pair's adapted model's, else any."""
    by_id = {m.model_id: m for m in models}
    if pair and pair[1] in by_id:
        return by_id[pair[1]].transcoders_ref
    return models[0].transcoders_ref if models else None


def _md(text: str) -> str:
    """Text shown in markdown as itself."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~$])", r"\\\1", str(text))


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
    show_paths(store, pair)


def show_paths(store: Store, pair: GraphPair) -> None:
    """The strongest token-to-target paths of either graph, gained or lost (`pair_paths`)."""
    st.markdown("**Strongest paths to a target, gained or lost**")
    targets = graph_targets(store, pair.adapted_graph_id)
    options = target_options(targets)
    token_id = None
    if options:
        rows = {int(r["token_id"]): r for r in targets.to_dict("records")}
        token_id = st.selectbox(
            "Target",
            options,
            format_func=lambda t: target_label(rows[t]),
            key=f"features-path-target-{pair_key(pair)}",
            help="The adapted graph's targets; by default its most probable evil token.",
        )
    found: PairPaths | None = pair_paths(store, pair, token_id=token_id, k=PATHS_K)
    if found is None or found.paths.empty:
        st.caption("No path to this target in either graph (or no evil target in these graphs).")
        return
    target = token_text(found.token) if found.token is not None else "the evil − safe direction"
    frame = paths_frame(found.paths)
    st.altair_chart(paths_chart(frame), width="stretch")
    st.caption(
        f"The {PATHS_K} strongest paths to {target} in each graph, each weighed in both (a path "
        "a graph's pruning dropped weighs 0 there): the product of its edges' direct effects. "
        "Red: stronger in the adapted model; blue: weaker. Hover a bar for its path."
    )
    st.dataframe(numbers(frame[PATH_COLUMNS]), hide_index=True, width="stretch")


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
    st.markdown("**Zeroing the top features: the change of the logit gap (evil − safe)**")
    for column, row in zip(st.columns(len(means)), means.to_dict("records"), strict=True):
        model = f" · {shorten(row['model_id'], LABEL_CHARS)}" if several else ""
        gap = row["mean_logit_gap_change"]
        column.metric(
            f"{row['kind']} · mean Δ logit gap{model}",
            "—" if _missing(gap) else f"{gap:+.3f}",
            help=f"Mean evil logit − mean safe logit, after − before zeroing; mean over "
            f"{row['gap_prompts']} of {row['prompts']} prompts (those with both evil and safe "
            f"targets) · {row['model_id']}",
        )
    for column, row in zip(st.columns(len(means)), means.to_dict("records"), strict=True):
        model = f" · {shorten(row['model_id'], LABEL_CHARS)}" if several else ""
        column.metric(
            f"{row['kind']} · mean Δ evil prob{model}",
            f"{row['mean_evil_prob_change']:+.4f}",
            help=f"{row['prompts']} prompts · {row['model_id']}",
        )
    named = ablated_features(
        ablations, {m: shown_labels_for_model(store, m) for m in ablations["model_id"].unique()}
    )
    st.markdown("**The features zeroed**")
    top = named[named["kind"] == "top"]
    st.dataframe(
        numbers(top.drop(columns=["kind"] + ["model_id"] * (not several))),
        hide_index=True,
        width="stretch",
    )
    control = named[named["kind"] != "top"]
    if not control.empty:
        with st.expander(f"Control features ({len(control)}, matched at random)"):
            st.dataframe(
                numbers(control.drop(columns=["kind"] + ["model_id"] * (not several))),
                hide_index=True,
                width="stretch",
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
