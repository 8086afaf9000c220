"""Features: which transcoder features the fine-tune moved towards evil, and where.

Rank features by their evil-minus-safe effect over prompts, look one up across prompts and
targets, compare a prompt's base and adapted graphs layer by layer, and, once `emc analyze` has
run, see the adapter's geometry against the transcoders and what ablating top features does
(prompts whose ablation failed are listed with their error and left out of the numbers).
Rankings and summaries leave out rejected prompts and stale graphs (a caption says how many);
a feature's per-prompt rows and the base-vs-adapted picker still show them, marked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard import features_view as view
from dashboard import graphs_view
from dashboard.data import current_store
from dashboard.pickers import pick_pair
from emc.store.analysis import (
    ablation_results,
    analysis_failures,
    lora_comparisons,
    lora_features,
)
from emc.store.feature_detail import feature_detail, feature_layers
from emc.store.features import RANKING_METRICS, feature_ranking
from emc.store.graph_diff import graph_diff_summary, layer_diff_summary, prompt_graph_diff
from emc.store.graph_pairs import graph_pairs
from emc.store.prompts import get_prompts
from emc.store.validity import left_out_of_rankings

TRACE_HINT = "Run `emc trace` to make attribution graphs of the flagged prompts."
TABLE, PICK, SEEN, LOOKUP = (
    "features-ranking",
    "features-pick",
    "features-seen",
    "features-lookup",
)
NUMBERS = "{:.4g}"

st.title("Features")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. {TRACE_HINT}")
    st.stop()
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
    help="A feature's evil-vs-safe effect in one graph (from `feature_stats`): `_diff` is the "
    "mean effect on evil targets minus on safe ones, `_cohens_d` that over its spread, "
    "`contrastive_` the effect on the evil-minus-safe direction.",
)


def numbers(frame: pd.DataFrame, skip: tuple[str, ...] = ()) -> object:
    floats = [c for c in frame.columns if frame[c].dtype.kind == "f" and c not in skip]
    return frame.style.format(dict.fromkeys(floats, NUMBERS), na_rep="—")


def show_left_out() -> None:
    caption = view.left_out_text(left_out_of_rankings(store))
    if caption:
        st.caption(caption)


def show_ranking() -> pd.DataFrame:
    model_col, layer_col, sign_col, min_col, top_col = st.columns(5)
    model = model_col.selectbox("Model", list(view.MODEL_ROLES), key="features-model")
    layer = layer_col.selectbox("Layer", ["all", *feature_layers(store)], key="features-layer")
    sign = sign_col.selectbox(
        "Sign", view.SIGNS, format_func=view.SIGN_LABELS.get, key="features-sign"
    )
    min_prompts = min_col.number_input("Min prompts", 1, value=1, key="features-min-prompts")
    top = top_col.number_input("Top", 1, 5000, value=30, step=10, key="features-top")
    ranking = feature_ranking(
        store,
        metric,
        role=view.MODEL_ROLES[model],
        layer=None if layer == "all" else int(layer),
        min_prompts=int(min_prompts),
        sign=sign,
        top=int(top),
    )
    if ranking.empty:
        st.info("No feature matches these filters.")
    else:
        st.dataframe(
            numbers(view.ranking_table(ranking)),
            hide_index=True,
            width="stretch",
            on_select="rerun",
            selection_mode="single-row",
            key=TABLE,
        )
        st.caption("Click a row to see that feature below.")
    show_left_out()
    return ranking


def picked_feature(ranking: pd.DataFrame) -> tuple[int, int] | None:
    """The feature to detail: a typed one, else a new table click, else the picker's choice."""
    options = view.feature_options(ranking)
    clicked = view.clicked_row(st.session_state.get(TABLE))
    if clicked is not None and clicked != st.session_state.get(SEEN) and clicked < len(ranking):
        row = ranking.iloc[clicked]
        st.session_state[PICK] = view.feature_key(row["layer"], row["feature"])
    st.session_state[SEEN] = clicked
    if options and st.session_state.get(PICK) not in options:
        st.session_state[PICK] = options[0]
    pick_col, lookup_col = st.columns(2)
    picked = pick_col.selectbox("Feature", options, key=PICK) if options else None
    typed = lookup_col.text_input("…or look up any feature", key=LOOKUP, placeholder="L1/125")
    if typed.strip():
        parsed = view.parse_feature_key(typed)
        if parsed is None:
            st.warning("Type a feature as L<layer>/<feature>, e.g. L1/125.")
        return parsed
    return view.parse_feature_key(picked) if picked else None


def show_feature(layer: int, feature: int, sign: str) -> None:
    detail = feature_detail(store, layer, feature, metric, sign=sign)
    st.subheader(f"Feature {view.feature_key(layer, feature)}")
    base_col, adapted_col, prompts_col = st.columns(3)
    base_col.metric(
        "Rank in base", view.rank_text(detail.base_rank), help=f"of {detail.base_ranked}"
    )
    adapted_col.metric(
        "Rank in adapted",
        view.rank_text(detail.adapted_rank),
        help=f"of {detail.adapted_ranked}",
    )
    prompts_col.metric("Prompts that keep it", detail.prompts["prompt_id"].nunique())
    if not detail.found:
        st.info("No graph in the store keeps this feature.")
        return
    st.dataframe(numbers(view.prompt_rows(detail)), hide_index=True, width="stretch")
    st.altair_chart(view.prompt_diff_chart(view.prompt_diff_frame(detail)), width="stretch")
    st.caption("A missing bar: the feature is not in that model's pruned graph of the prompt.")
    with st.expander("Effects per target"):
        st.dataframe(numbers(view.target_rows(detail)), hide_index=True, width="stretch")


def show_prompt_diff() -> None:
    pairs = graph_pairs(store)
    if not pairs:
        st.info(f"No base and adapted graph pairs in the store yet. {TRACE_HINT}")
        return
    prompt_col, pair_col = st.columns(2)
    pair = pick_pair(store, pairs, prompt_col, pair_col, key="features-diff")
    rejected = graphs_view.rejection_notice(pair)
    if rejected:
        st.error(rejected, icon="⛔")
    if pair.stale:
        st.warning(view.STALE_PAIR, icon="⚠️")
    diff = prompt_graph_diff(store, pair, metric)
    if diff.loading_error:
        st.error(view.LOADING_ERROR, icon="🚨")
    counts = {**view.diff_counts(diff), "First divergent layer": view.divergence_text(diff)}
    for column, (label, value) in zip(st.columns(len(counts)), counts.items(), strict=True):
        column.metric(label, value)
    effect_col, share_col = st.columns(2)
    with effect_col:
        st.markdown("**Effect delta by layer**")
        st.altair_chart(
            view.layer_effect_chart(view.layer_effect_frame(diff.layers)), width="stretch"
        )
    with share_col:
        st.markdown("**Error share by layer**")
        st.altair_chart(
            view.error_share_chart(view.error_share_frame(diff.layers)), width="stretch"
        )
    if diff.forward_error:
        st.warning(
            f"The forward passes failed on this prompt: {diff.forward_error}. "
            "`emc analyze` tries again."
        )
    elif diff.forward.empty:
        st.caption("Forward-pass differences not measured: run `emc analyze`.")
    else:
        st.markdown("**Forward pass: relative difference of the residual stream**")
        st.altair_chart(view.forward_chart(view.forward_frame(diff.forward)), width="stretch")
    st.markdown("**Features whose effect changed most**")
    st.dataframe(numbers(view.changed_features(diff.features)), hide_index=True, width="stretch")


def show_across_prompts() -> None:
    layers = layer_diff_summary(store)
    loading = view.loading_errors_text(layers)
    if loading:
        st.error(loading, icon="🚨")
    st.markdown("**Error share by layer, mean over prompts**")
    st.altair_chart(view.error_share_chart(view.error_share_frame(layers)), width="stretch")
    with st.expander("Per layer: error shares, forward-pass differences, divergences"):
        st.dataframe(numbers(layers), hide_index=True, width="stretch")
    st.markdown("**Features the fine-tune changed most, over prompts**")
    summary = graph_diff_summary(store, metric, top=50)
    st.dataframe(numbers(summary), hide_index=True, width="stretch")
    show_left_out()


def show_lora() -> None:
    table = view.comparison_table(comparisons)
    st.dataframe(numbers(table), hide_index=True, width="stretch")
    rows = {view.comparison_key(r): r for r in comparisons.to_dict("records")}
    ordered = [view.comparison_key(r) for r in table.to_dict("records")]
    key = st.selectbox(
        "Comparison",
        ordered,
        format_func=lambda k: view.comparison_label(rows[k]),
        key="features-lora",
    )
    row = rows[key]
    chart_col, features_col = st.columns([3, 2])
    with chart_col:
        st.altair_chart(
            view.histogram_chart(view.histogram_frame(row), row.get("null_q99")), width="stretch"
        )
        st.caption(
            f"Cosines of the adapter direction with all {row['n_features']:,} features (bars) "
            f"and what a random direction would give (red). Dashed: ±{row['null_q99']:.3f}, "
            "the 99th percentile of random directions' best |cosine|."
        )
    with features_col:
        st.markdown("**Most aligned features**")
        top = view.comparison_features(lora_features(store), row)
        st.dataframe(numbers(top), hide_index=True, width="stretch")


def show_ablations() -> None:
    if not failed_ablations.empty:
        show_failed_ablations()
    if ablations.empty:
        return
    ids = list(dict.fromkeys(ablations["prompt_id"]))
    labels = {p.prompt_id: view.shorten(p.name, view.LABEL_CHARS) for p in get_prompts(store, ids)}
    means = view.ablation_means(ablations)
    several = means["model_id"].nunique() > 1
    for column, row in zip(st.columns(len(means)), means.to_dict("records"), strict=True):
        model = f" · {view.shorten(row['model_id'], view.LABEL_CHARS)}" if several else ""
        column.metric(
            f"{row['kind']} · mean Δ evil prob{model}",
            f"{row['mean_evil_prob_change']:+.4f}",
            help=f"{row['prompts']} prompts · {row['model_id']}",
        )
    st.altair_chart(view.ablation_chart(ablations, labels), width="stretch")
    st.dataframe(numbers(view.ablation_table(ablations)), hide_index=True, width="stretch")


def show_failed_ablations() -> None:
    prompts = failed_ablations["prompt_id"].nunique()
    st.warning(
        f"The ablation failed on {prompts} prompt(s); they are left out of the numbers below "
        "(`emc analyze` tries them again).",
    )
    columns = ["prompt_id", "model_id", "kind", "metric", "error", "run_id"]
    st.dataframe(failed_ablations[columns], hide_index=True, width="stretch")


names = ["Ranking", "Base vs adapted", "Across prompts"]
names += ["LoRA geometry"] * (not comparisons.empty)
names += ["Ablations"] * (not ablations.empty or not failed_ablations.empty)
tabs = dict(zip(names, st.tabs(names), strict=True))
with tabs["Ranking"]:
    if has_graphs:
        ranking = show_ranking()
        picked = picked_feature(ranking)
        if picked is not None:
            show_feature(*picked, sign=st.session_state["features-sign"])
    else:
        st.info(f"No feature statistics in the store yet. {TRACE_HINT}")
with tabs["Base vs adapted"]:
    show_prompt_diff()
with tabs["Across prompts"]:
    if has_graphs:
        show_across_prompts()
    else:
        st.info(f"No graphs in the store yet. {TRACE_HINT}")
if "LoRA geometry" in tabs:
    with tabs["LoRA geometry"]:
        show_lora()
if "Ablations" in tabs:
    with tabs["Ablations"]:
        show_ablations()
