"""Interventions: where the harmful shift lives, and which interventions remove it.

The causal checks of `emc patch` and `emc intervene` for one base/adapted model pair: the
activation-patching decomposition of the shift, the top-k features restored and injected against
matched random features, the adapter scaled and removed part by part, the mean-difference
directions against random ones, what the models say under each (rollouts), and edits of your
own features. Checks that failed are listed and left out of the numbers.

Every share is a fraction of the shift in the evil-minus-safe logit gap from base to adapted
(1 = all of it). An intervention on the adapted model *removes* part of it (1 - share); one on
the base model *reproduces* part of it (share). The shaping functions (frames from
emc.store.interventions in, display frames and Altair charts out) are pure, so tests check them
without a browser; the drawing functions below them read through emc.store.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store
from emc.analysis.rollout_report import rollout_effects
from emc.store import Store
from emc.store.features import feature_ranking
from emc.store.interventions import (
    causal_failures,
    causal_model_pairs,
    custom_edits,
    decomposition_summary,
    explained_per_prompt,
    intervention_summary,
    prompt_rollouts,
    rollout_summary,
)
from emc.store.prompts import get_prompts

RUN_HINT = "Run `emc patch` and `emc intervene` (the `interventions` flow)."
CHART_HEIGHT = 260
PERCENT = ".1%"
SHARE_AXIS = alt.Axis(format="%")
# Direct shares drawn per layer: the MLP's write split into features and error node (the whole
# MLP is their sum, so it is left out of the chart), attention beside them.
DIRECT_COMPONENTS = {
    "embed": "embeddings",
    "attn": "attention",
    "mlp_features": "MLP features",
    "mlp_error": "MLP error",
}
DIRECT_COLOURS = ("#bab0ac", "#4c78a8", "#59a14f", "#e15759")
TOTAL_COMPONENTS = {"embed": "embeddings", "attn": "attention", "mlp": "MLP"}
PATCHES = ("into base (sufficient)", "out of adapted (necessary)")
PATCH_COLOURS = ("#4c78a8", "#f58518")
FEATURE_MODES = {
    "restore": "share removed",
    "inject": "share reproduced",
}
DIRECTION_MODES = {
    "subtract": "Subtract from adapted: share removed",
    "add": "Add to base: share reproduced",
    "ablate": "Ablate in adapted: share removed",
}
CHOSEN, CONTROL = "top-k features", "matched control"
SERIES_COLOURS = ("#d62728", "#8c8c8c")
REMOVALS = {
    "without_layer": "per layer",
    "without_kind": "per module kind",
    "without_module": "per module",
}
_MODULE = re.compile(r"layers\.(\d+)\.(.+)$")


# The model pair


def pair_label(pair: tuple[str, str]) -> str:
    return f"{pair[0]} → {pair[1]}"


# Where the shift lives


def mean_of(frame: pd.DataFrame, column: str) -> float | None:
    values = frame[column].dropna() if column in frame else pd.Series(dtype=float)
    return float(values.mean()) if len(values) else None


def share_text(value: float | None) -> str:
    return "—" if value is None or pd.isna(value) else f"{value:{PERCENT}}"


def headline(explained: pd.DataFrame) -> dict[str, str]:
    """The decomposition's headline numbers (means over prompts of `explained_per_prompt`)."""
    return {
        "Prompts decomposed": str(len(explained)),
        "Explained (direct)": share_text(mean_of(explained, "explained")),
        "Unexplained": share_text(mean_of(explained, "unexplained")),
        "MLP features": share_text(mean_of(explained, "mlp_features")),
        "MLP error": share_text(mean_of(explained, "mlp_error")),
        "Attention": share_text(mean_of(explained, "attn")),
    }


def layer_label(layer: Any) -> str:
    return "embeddings" if int(layer) < 0 else f"L{int(layer)}"


def direct_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Long frame (layer, component, share, into base, out of adapted) from
    `decomposition_summary`; the embeddings only where they carry any share (a LoRA never
    touches them)."""
    rows = summary[summary["component"].isin(list(DIRECT_COMPONENTS))]
    embed = rows["component"] == "embed"
    rows = rows[~embed | (rows["direct"].abs() > 1e-12)]
    return pd.DataFrame(
        {
            "layer": [layer_label(x) for x in rows["layer"]],
            "order": rows["layer"].astype(int).to_numpy(),
            "component": [DIRECT_COMPONENTS[c] for c in rows["component"]],
            "share": rows["direct"].astype(float).to_numpy(),
            "into_base": rows["direct_into_base"].astype(float).to_numpy(),
            "out_of_adapted": rows["direct_from_adapted"].astype(float).to_numpy(),
        }
    )


def direct_chart(frame: pd.DataFrame) -> alt.Chart:
    """Grouped bars: per layer, the direct share of attention, MLP features and MLP error."""
    layers = list(dict.fromkeys(frame.sort_values("order")["layer"]))
    components = [c for c in DIRECT_COMPONENTS.values() if c in set(frame["component"])]
    colours = [DIRECT_COLOURS[list(DIRECT_COMPONENTS.values()).index(c)] for c in components]
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("layer:N", sort=layers, title=None, axis=alt.Axis(labelAngle=0)),
            xOffset=alt.XOffset("component:N", sort=components),
            y=alt.Y("share:Q", title="direct share of the shift", axis=SHARE_AXIS),
            color=alt.Color(
                "component:N",
                scale=alt.Scale(domain=components, range=colours),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=[
                "layer:N",
                "component:N",
                alt.Tooltip("share:Q", format=PERCENT, title="mean of both ways"),
                alt.Tooltip("into_base:Q", format=PERCENT, title="into base"),
                alt.Tooltip("out_of_adapted:Q", format=PERCENT, title="out of adapted"),
            ],
        )
        .properties(height=CHART_HEIGHT)
    )


def total_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """Long frame (site, patched, share): total-effect patching of each embedding, attention and
    MLP output, into the base model and out of the adapted model."""
    rows = summary[summary["component"].isin(list(TOTAL_COMPONENTS))]
    rows = rows.dropna(subset=["total_into_base", "total_from_adapted"], how="all")
    untouched = (rows["component"] == "embed") & (
        rows[["total_into_base", "total_from_adapted"]].abs().max(axis=1) < 1e-12
    )
    rows = rows[~untouched]
    sites = [
        layer_label(x) if c == "embed" else f"{layer_label(x)} {TOTAL_COMPONENTS[c]}"
        for c, x in zip(rows["component"], rows["layer"], strict=True)
    ]
    parts = []
    for patched, column in zip(PATCHES, ("total_into_base", "total_from_adapted"), strict=True):
        parts.append(
            pd.DataFrame(
                {
                    "site": sites,
                    "patched": patched,
                    "share": rows[column].astype(float).to_numpy(),
                }
            )
        )
    return pd.concat(parts, ignore_index=True)


def total_chart(frame: pd.DataFrame) -> alt.Chart:
    sites = list(dict.fromkeys(frame["site"]))
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("site:N", sort=sites, title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("patched:N", sort=list(PATCHES)),
            y=alt.Y("share:Q", title="total share of the shift", axis=SHARE_AXIS),
            color=alt.Color(
                "patched:N",
                scale=alt.Scale(domain=list(PATCHES), range=list(PATCH_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=["site:N", "patched:N", alt.Tooltip("share:Q", format=PERCENT)],
        )
        .properties(height=CHART_HEIGHT)
    )


def prompt_table(explained: pd.DataFrame, names: Mapping[str, str]) -> pd.DataFrame:
    """`explained_per_prompt`, with each prompt's name first."""
    first = ["prompt", "shift", "explained", "unexplained", "mlp_features", "mlp_error", "attn"]
    table = explained.assign(prompt=[names.get(p, p) for p in explained["prompt_id"]])
    rest = [c for c in table.columns if c not in first and c != "prompt_id"]
    return table[[*first, *rest, "prompt_id"]].reset_index(drop=True)


# Interventions: features, adapter, directions


def with_effect(summary: pd.DataFrame) -> pd.DataFrame:
    """`intervention_summary` plus `effect` and `control_effect`: the share removed for an
    intervention on the adapted model, the share reproduced for one on the base model."""
    adapted = summary["model_role"] == "adapted"
    return summary.assign(
        effect=summary["share"].where(~adapted, summary["removed"]).astype(float),
        control_effect=summary["control_share"]
        .where(~adapted, summary["control_removed"])
        .astype(float),
    )


def dose_label(target: str, n_targets: Any) -> str:
    """`top 5` -> `5`; `all` -> `all (256)`."""
    if target.startswith("top "):
        return target.removeprefix("top ")
    return target if pd.isna(n_targets) else f"{target} ({int(n_targets)})"


def dose_frame(features: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Long frame (k, order, features, share) for one mode: per dose, the share removed by
    restoring the top-k features in the adapted model (`restore`) or reproduced by injecting them
    into the base model (`inject`), the matched random features beside them (none for `all`)."""
    rows = with_effect(features)
    rows = rows[rows["kind"] == mode]
    doses = [dose_label(t, n) for t, n in zip(rows["target"], rows["n_targets"], strict=True)]
    parts = [
        pd.DataFrame(
            {
                "k": doses,
                "order": rows["n_targets"].astype(float).to_numpy(),
                "features": which,
                "share": rows[column].astype(float).to_numpy(),
                "prompts": rows["prompts"].astype(int).to_numpy(),
            }
        )
        for which, column in ((CHOSEN, "effect"), (CONTROL, "control_effect"))
    ]
    frame = pd.concat(parts, ignore_index=True).dropna(subset=["share"])
    return frame.sort_values(["order", "features"]).reset_index(drop=True)


def dose_chart(frame: pd.DataFrame, title: str) -> alt.Chart:
    """Share against k: the top-k features and, dashed, as many matched random ones."""
    doses = list(dict.fromkeys(frame.sort_values("order")["k"]))
    return (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X(
                "k:N",
                sort=doses,
                title="k (top-k attributed features)",
                axis=alt.Axis(labelAngle=0),
            ),
            y=alt.Y("share:Q", title=title, axis=SHARE_AXIS),
            color=alt.Color(
                "features:N",
                scale=alt.Scale(domain=[CHOSEN, CONTROL], range=list(SERIES_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            strokeDash=alt.StrokeDash(
                "features:N",
                scale=alt.Scale(domain=[CHOSEN, CONTROL], range=[[1, 0], [5, 4]]),
                legend=None,
            ),
            tooltip=["k:N", "features:N", alt.Tooltip("share:Q", format=PERCENT), "prompts:Q"],
        )
        .properties(height=CHART_HEIGHT)
    )


def scale_frame(adapter: pd.DataFrame) -> pd.DataFrame:
    """(scale, share): the adapter's delta scaled by k on every module, on the base model."""
    rows = adapter[adapter["kind"] == "scale"].sort_values("strength")
    return pd.DataFrame(
        {
            "scale": rows["strength"].astype(float).to_numpy(),
            "share": rows["share"].astype(float).to_numpy(),
            "prompts": rows["prompts"].astype(int).to_numpy(),
        }
    )


def scale_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """Share against k, with the line a linear response would follow (share = k) dashed."""
    line = (
        alt.Chart(frame)
        .mark_line(point=True, color="#d62728")
        .encode(
            x=alt.X("scale:Q", title="k (adapter scale)"),
            y=alt.Y("share:Q", title="share of the shift", axis=SHARE_AXIS),
            tooltip=["scale:Q", alt.Tooltip("share:Q", format=PERCENT), "prompts:Q"],
        )
    )
    linear = (
        alt.Chart(frame)
        .mark_line(strokeDash=[4, 4], color="#8c8c8c")
        .encode(x="scale:Q", y=alt.Y("scale:Q", title="share of the shift"))
    )
    return (linear + line).properties(height=CHART_HEIGHT)


def module_label(target: str) -> str:
    """`model.layers.0.mlp.down_proj` -> `L0 mlp.down_proj`; other targets as they are."""
    match = _MODULE.search(target)
    return f"L{match[1]} {match[2]}" if match else target


def removal_frame(adapter: pd.DataFrame, kind: str) -> pd.DataFrame:
    """(target, removed, alone): the share removed by switching off the adapter on one layer,
    module kind or module, with what that part alone reproduces where it was measured."""
    rows = adapter[adapter["kind"] == kind]
    alone_kind = {"without_layer": "only_layer", "without_kind": "only_kind"}.get(kind)
    alone = adapter[adapter["kind"] == alone_kind].set_index("target")["share"]
    return pd.DataFrame(
        {
            "target": [module_label(t) for t in rows["target"]],
            "removed": rows["removed"].astype(float).to_numpy(),
            "alone": [float(alone[t]) if t in alone.index else None for t in rows["target"]],
            "modules": rows["n_targets"].to_numpy(),
            "prompts": rows["prompts"].astype(int).to_numpy(),
        }
    )


def removal_chart(frame: pd.DataFrame, horizontal: bool = False) -> alt.Chart:
    """Bars of the share removed, one per layer, module kind or module."""
    order = list(frame["target"])
    target = alt.X(
        "target:N", sort=order, title=None, axis=alt.Axis(labelAngle=-45, labelOverlap=False)
    )
    removed = alt.Y("removed:Q", title="share removed", axis=SHARE_AXIS)
    if horizontal:
        target = alt.Y("target:N", sort=order, title=None, axis=alt.Axis(labelOverlap=False))
        removed = alt.X("removed:Q", title="share removed", axis=SHARE_AXIS)
    tooltip = [
        "target:N",
        alt.Tooltip("removed:Q", format=PERCENT),
        alt.Tooltip("alone:Q", format=PERCENT, title="reproduced alone"),
        "modules:Q",
        "prompts:Q",
    ]
    height = max(CHART_HEIGHT, 24 * len(frame)) if horizontal else CHART_HEIGHT
    encoding = {"x": removed, "y": target} if horizontal else {"x": target, "y": removed}
    return (
        alt.Chart(frame)
        .mark_bar(color="#d62728")
        .encode(**encoding, tooltip=tooltip)
        .properties(height=height)
    )


def direction_frame(directions: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Long frame (target, direction, share) for one mode: per layer (one layer's direction out
    of every layer, and every layer at once),
    the share the mean-difference direction removes or reproduces, and a random direction of
    the same norm."""
    rows = with_effect(directions)
    rows = rows[rows["kind"] == mode]
    rows = rows.iloc[sorted(range(len(rows)), key=lambda i: _scope_order(rows["target"].iloc[i]))]
    parts = [
        pd.DataFrame(
            {
                "target": rows["target"].to_numpy(),
                "direction": which,
                "share": rows[column].astype(float).to_numpy(),
                "prompts": rows["prompts"].astype(int).to_numpy(),
            }
        )
        for which, column in (("mean difference", "effect"), ("random", "control_effect"))
    ]
    return pd.concat(parts, ignore_index=True).dropna(subset=["share"])


def _scope_order(target: str) -> tuple[int, int, int]:
    """Prompt directions before response ones; within each, every layer's own direction at its
    layer, then one layer's direction out of every layer (rank 1), then all layers at once."""
    source = 1 if target.startswith("responses: ") else 0
    scope = target.removeprefix("responses: ")
    layer = int(m.group(1)) if (m := re.match(r"layer (\d+)", scope)) else 0
    rank = 2 if scope == "every layer" else 1 if scope.endswith("every layer") else 0
    return source, rank, layer


def direction_chart(frame: pd.DataFrame) -> alt.Chart:
    targets = list(dict.fromkeys(frame["target"]))
    series = ["mean difference", "random"]
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X("target:N", sort=targets, title=None, axis=alt.Axis(labelAngle=-30)),
            xOffset=alt.XOffset("direction:N", sort=series),
            y=alt.Y("share:Q", title="share of the shift", axis=SHARE_AXIS),
            color=alt.Color(
                "direction:N",
                scale=alt.Scale(domain=series, range=list(SERIES_COLOURS)),
                legend=alt.Legend(title=None, orient="bottom"),
            ),
            tooltip=[
                "target:N",
                "direction:N",
                alt.Tooltip("share:Q", format=PERCENT),
                "prompts:Q",
            ],
        )
        .properties(height=CHART_HEIGHT)
    )


def intervention_table(summary: pd.DataFrame, columns: Iterable[str] = ()) -> pd.DataFrame:
    """An `intervention_summary` for display: what was done, then what it did, then the rest."""
    first = ["kind", "target", "strength", "model_role", "prompts", "share", "control_share"]
    first += ["removed", "control_removed", "n_targets", *columns]
    shown = [c for c in first if c in summary.columns]
    return summary[shown].reset_index(drop=True)


NOT_SHARES = frozenset({"shift", "mean_shift", "strength", "n_targets", "modules", "layer"})


def styled(frame: pd.DataFrame) -> Any:
    """Shares as percentages, other numbers to four significant digits, missing as a dash."""
    floats = [c for c in frame.columns if frame[c].dtype.kind == "f"]
    formats = {c: "{:.4g}" if c in NOT_SHARES else "{:.1%}" for c in floats}
    return frame.style.format(formats, na_rep="—")


# Rollouts: what the models say under each intervention


def rollout_frame(summary: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (controls included) with p(harmful), its pooled 95% Wilson interval,
    coherence, and a label to read: `rollout_summary` in, chart-ready out."""
    from emc.behaviour.stats import wilson

    rows = summary.copy()
    where = rows["positions"].map({"prompt": " · prompt", "all": " · every position"}).fillna("")
    rows["setting"] = (
        rows["family"].where(rows["family"] != "none", "as is")
        + ": "
        + rows["kind"].where(rows["kind"] != "none", "")
        + " "
        + rows["target"].where(rows["target"] != "as is", "")
        + where
        + " ("
        + rows["model_role"]
        + ")"
    ).str.replace(r"\s+", " ", regex=True)
    rows["control"] = rows["target"].str.startswith("random")
    intervals = [wilson(int(k), int(n)) for k, n in zip(rows["n_harmful"], rows["n"], strict=True)]
    rows["ci_low"] = [i.low for i in intervals]
    rows["ci_high"] = [i.high for i in intervals]
    columns = ["setting", "family", "model_role", "control", "prompts", "n", "p_harmful",
               "ci_low", "ci_high", "mean_coherent"]  # fmt: skip
    return rows[columns].reset_index(drop=True)


def rollout_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """p(harmful) per setting with its interval; controls grey, coherence in the tooltip."""
    order = list(frame["setting"])
    base = alt.Chart(frame).encode(
        y=alt.Y("setting:N", sort=order, title=None, axis=alt.Axis(labelLimit=360)),
    )
    points = base.mark_point(filled=True, size=60).encode(
        x=alt.X("p_harmful:Q", title="p(harmful) of sampled continuations",
                scale=alt.Scale(domain=[0, 1])),
        color=alt.Color(
            "control:N",
            scale=alt.Scale(domain=[False, True], range=list(SERIES_COLOURS)),
            legend=alt.Legend(title="random control", orient="bottom"),
        ),
        tooltip=[
            "setting:N",
            alt.Tooltip("p_harmful:Q", format=".2f"),
            alt.Tooltip("ci_low:Q", format=".2f"),
            alt.Tooltip("ci_high:Q", format=".2f"),
            alt.Tooltip("mean_coherent:Q", format=".0f", title="coherence"),
            "prompts:Q",
            "n:Q",
        ],
    )  # fmt: skip
    bars = base.mark_rule().encode(x="ci_low:Q", x2="ci_high:Q")
    return (bars + points).properties(height=max(CHART_HEIGHT, 18 * len(frame)))


def rollout_effect_table(effects: Iterable[Any]) -> pd.DataFrame:
    """`emc.analysis.rollout_report.rollout_effects` for display: cut or reproduced, against the
    control, and the coherence change (the goal's three conditions)."""
    rows = [
        {
            "setting": e.label,
            "p_harmful": e.p_harmful,
            "cut / reproduced": e.effect,
            "control": e.control_effect,
            "coherence": e.coherence,
            "coherence change": e.coherence_change,
            "narrow": e.narrow,
            "meets goal": e.meets_goal,
        }
        for e in effects
    ]
    return pd.DataFrame(rows)


# Your own edits (`emc intervene --features`)

EDIT_MODES = {
    "restore": "restore (adapted model, base activations)",
    "inject": "inject (base model, adapted activations)",
    "zero": "zero (adapted model)",
    "scale": "scale (adapted model, x strength)",
}


def edit_command(
    data_dir: str, features: str, mode: str, strength: float, positions: str,
    prompt_ids: Iterable[str] = (),
) -> list[str]:  # fmt: skip
    """The `emc intervene --features` command the page runs (and shows, to run by hand)."""
    command = ["emc", "intervene", *prompt_ids, "--features", features.replace(" ", ""),
               "--mode", mode, "--positions", positions, "-d", data_dir]  # fmt: skip
    if mode == "scale":
        command[-2:-2] = ["--strength", f"{strength:g}"]
    return command


def before_after(details: str | Mapping[str, Any] | None) -> pd.DataFrame:
    """An edit's top next tokens before and after it, side by side (rank, token, p)."""
    import json

    data = json.loads(details) if isinstance(details, str) else dict(details or {})
    before, after = data.get("top_before") or [], data.get("top_after") or []
    rows = []
    for rank in range(max(len(before), len(after))):
        row: dict[str, Any] = {"rank": rank + 1}
        if rank < len(before):
            row["before"], row["p before"] = before[rank]
        if rank < len(after):
            row["after"], row["p after"] = after[rank]
        rows.append(row)
    return pd.DataFrame(rows, columns=["rank", "before", "p before", "after", "p after"])


# Drawing the page


def render() -> None:
    st.title("Interventions")
    store = existing_store(RUN_HINT)
    pairs = causal_model_pairs(store)
    if not pairs:
        st.info(f"No causal checks in the store yet. {RUN_HINT}")
        st.stop()

    pair = st.selectbox(
        f"Model pair ({len(pairs)} with causal checks)",
        pairs,
        format_func=pair_label,
        key="interventions-pair",
    )
    explained = explained_per_prompt(store, *pair)
    interventions = intervention_summary(store, None, *pair)
    show_failures(causal_failures(store, *pair))
    st.caption(
        "Shares are of the shift in the evil-minus-safe logit gap from base to adapted (1 = all "
        "of it). An intervention on the adapted model *removes* part of it, one on the base "
        "model *reproduces* part of it; each is beside a matched random control where there is "
        "one."
    )

    names = ["Where the shift lives", "Dose-response", "Adapter", "Directions", "Rollouts",
             "Your edits"]  # fmt: skip
    tabs = dict(zip(names, st.tabs(names), strict=True))
    with tabs["Where the shift lives"]:
        show_decomposition(store, pair, explained)
    with tabs["Dose-response"]:
        show_features(family(interventions, "features"))
    with tabs["Adapter"]:
        show_adapter(family(interventions, "adapter"))
    with tabs["Directions"]:
        show_directions(family(interventions, "direction"))
    with tabs["Rollouts"]:
        show_rollouts(store, pair, explained)
    with tabs["Your edits"]:
        show_your_edits(store, pair)


def family(interventions: pd.DataFrame, name: str) -> pd.DataFrame:
    return interventions[interventions["family"] == name].reset_index(drop=True)


def show_failures(failures: pd.DataFrame) -> None:
    if failures.empty:
        return
    st.warning(
        f"{len(failures)} check(s) failed and are not in the numbers below; the next "
        "`emc patch` / `emc intervene` tries them again."
    )
    with st.expander("Failed checks"):
        st.dataframe(
            failures[["prompt_id", "part", "error", "run_id", "failed_at"]],
            hide_index=True,
            width="stretch",
        )


def show_decomposition(store: Store, pair: tuple[str, str], explained: pd.DataFrame) -> None:
    if explained.empty:
        st.info("No decomposition for this pair yet. Run `emc patch`.")
        return
    numbers = headline(explained)
    for column, (label, value) in zip(st.columns(len(numbers)), numbers.items(), strict=True):
        column.metric(label, value)
    st.caption(
        "Direct: each component's own write to the final residual stream swapped between the "
        "models (both ways, averaged); embeddings, attention and MLPs add up to the shift except "
        "for the final norm's part (unexplained). The MLP's write splits into transcoder "
        "features and the error node."
    )
    summary = decomposition_summary(store, *pair)
    direct_col, total_col = st.columns(2)
    with direct_col:
        st.markdown("**Direct share by layer and component**")
        st.altair_chart(direct_chart(direct_frame(summary)), width="stretch")
    with total_col:
        st.markdown("**Total effect: patched into base, patched out of adapted**")
        st.altair_chart(total_chart(total_frame(summary)), width="stretch")
        st.caption(
            "Total: the output swapped at every position, everything downstream recomputed: "
            "sufficient (into base) or necessary (out of adapted); these overlap."
        )
    st.markdown("**Per prompt**")
    names = {p.prompt_id: p.name for p in get_prompts(store, list(explained["prompt_id"]))}
    st.dataframe(styled(prompt_table(explained, names)), hide_index=True, width="stretch")
    with st.expander("Per component and layer, mean over prompts"):
        st.dataframe(styled(summary), hide_index=True, width="stretch")


def show_features(features: pd.DataFrame) -> None:
    if features.empty:
        st.info("No feature interventions for this pair yet. Run `emc intervene --kind features`.")
        return
    restore_col, inject_col = st.columns(2)
    for column, mode, heading in (
        (restore_col, "restore", "Restored in the adapted model"),
        (inject_col, "inject", "Injected into the base model"),
    ):
        with column:
            st.markdown(f"**{heading}**")
            frame = dose_frame(features, mode)
            st.altair_chart(dose_chart(frame, FEATURE_MODES[mode]), width="stretch")
    st.caption(
        "Restore: the adapted model's top-k features set to their base activations (share "
        "removed). Inject: the base model's set to their adapted activations (share reproduced). "
        "Dashed: as many random active features from the same layers."
    )
    st.dataframe(styled(intervention_table(features)), hide_index=True, width="stretch")


def show_adapter(adapter: pd.DataFrame) -> None:
    if adapter.empty:
        st.info("No adapter interventions for this pair yet. Run `emc intervene --kind adapter`.")
        return
    scale_col, layer_col, kind_col = st.columns(3)
    with scale_col:
        st.markdown("**Adapter scaled by k, on the base model**")
        st.altair_chart(scale_chart(scale_frame(adapter)), width="stretch")
        st.caption("Dashed: a response linear in k.")
    for column, kind in ((layer_col, "without_layer"), (kind_col, "without_kind")):
        with column:
            st.markdown(f"**Adapter removed {REMOVALS[kind]}**")
            st.altair_chart(removal_chart(removal_frame(adapter, kind)), width="stretch")
    st.markdown(f"**Adapter removed {REMOVALS['without_module']}**")
    modules = removal_frame(adapter, "without_module")
    st.altair_chart(removal_chart(modules, horizontal=True), width="stretch")
    with st.expander("Every adapter setting"):
        st.dataframe(styled(intervention_table(adapter)), hide_index=True, width="stretch")


def show_directions(directions: pd.DataFrame) -> None:
    if directions.empty:
        st.info(
            "No direction interventions for this pair yet. Run `emc intervene --kind directions`."
        )
        return
    modes = [m for m in DIRECTION_MODES if m in set(directions["kind"])]
    for column, mode in zip(st.columns(len(modes)), modes, strict=True):
        with column:
            st.markdown(f"**{DIRECTION_MODES[mode]}**")
            frame = direction_frame(directions, mode)
            st.altair_chart(direction_chart(frame), width="stretch")
    st.caption(
        "Each layer's mean adapted-minus-base residual at the last position (each prompt left out "
        "of its own direction), subtracted from or projected out of the adapted model, or added "
        "to the base model; grey: a random direction of the same norm."
    )
    st.dataframe(styled(intervention_table(directions)), hide_index=True, width="stretch")


def show_rollouts(store: Store, pair: tuple[str, str], explained: pd.DataFrame) -> None:
    summary = rollout_summary(store, *pair)
    if summary.empty:
        st.info("No rollouts for this pair yet. Run `emc intervene --kind rollouts`.")
        return
    st.markdown(
        f"**What the models say: p(harmful) of sampled continuations** (judge "
        f"`{summary['judge_model'].iloc[0]}`, pooled over prompts, 95% Wilson intervals)"
    )
    st.altair_chart(rollout_chart(rollout_frame(summary)), width="stretch")
    st.caption(
        "Cut: the share of the adapted model's harmful rate an intervention on it removes; "
        "reproduced: the share of the base-to-adapted difference one on the base model makes. "
        "Coherence (0-100, the judge's) shows whether the harm went because the model broke. "
        "The goal: a narrow intervention (at most 20 features, or one direction) cuts at least "
        "80% while its control cuts under 10% and coherence drops by at most 10%."
    )
    effects = rollout_effect_table(rollout_effects(summary.to_dict(orient="records")))
    st.dataframe(styled(effects), hide_index=True, width="stretch")
    prompt_ids = sorted(explained["prompt_id"]) if not explained.empty else []
    names = {p.prompt_id: p.name for p in get_prompts(store, prompt_ids)}
    if prompt_ids:
        chosen = st.selectbox(
            "Sampled answers of one prompt", prompt_ids, format_func=lambda i: names.get(i, i),
            key="rollouts-prompt",
        )  # fmt: skip
        answers = prompt_rollouts(store, chosen, *pair)
        shown = answers[["family", "kind", "target", "model_role", "positions", "p_harmful",
                         "mean_coherent", "examples"]]  # fmt: skip
        st.dataframe(shown, hide_index=True, width="stretch")


def show_your_edits(store: Store, pair: tuple[str, str]) -> None:
    st.markdown(
        "**Test your own features**: name them as `LAYER/FEATURE,...` (e.g. from the Features "
        "page); EMC edits them on every traced prompt, measures the next-token share against "
        "as many matched random features, and samples what the model then says."
    )
    ranking = feature_ranking(store, model_id=pair[1], top=5)
    default = ",".join(f"{r.layer}/{r.feature}" for r in ranking.itertuples())
    with st.form("your-edit"):
        features = st.text_input("Features", value=default, key="edit-features")
        mode_col, strength_col, positions_col = st.columns(3)
        mode = mode_col.selectbox(
            "Edit", list(EDIT_MODES), format_func=EDIT_MODES.get, key="edit-mode"
        )
        strength = strength_col.number_input(
            "Strength (scale)", value=0.0, step=0.5, key="edit-strength"
        )
        positions = positions_col.radio(
            "Positions (restore, inject)", ["all", "prompt"], horizontal=True,
            key="edit-positions",
        )  # fmt: skip
        submitted = st.form_submit_button("Run this edit")
    command = edit_command(str(store.path.parent), features, mode, strength, positions)
    st.caption("The same from a terminal: `" + " ".join(command) + "`")
    if submitted:
        with st.spinner("Measuring the edit on every traced prompt..."):
            done = subprocess.run(
                [sys.executable, "-m", "emc", *command[1:]], capture_output=True, text=True
            )
        if done.returncode == 0:
            st.success("Measured. The results are below.")
        else:
            st.error(f"`emc intervene` failed (exit {done.returncode}).")
        with st.expander("Output", expanded=done.returncode != 0):
            st.code((done.stdout + done.stderr)[-6000:] or "(no output)")
    edits = custom_edits(store, *pair)
    if edits.empty:
        st.info("No edits of your own for this pair yet.")
        return
    chosen = st.selectbox("Edit", list(dict.fromkeys(edits["target"])), key="edit-chosen")
    rows = edits[edits["target"] == chosen].reset_index(drop=True)
    names = {p.prompt_id: p.name for p in get_prompts(store, list(rows["prompt_id"]))}
    shown = rows.assign(prompt=rows["prompt_id"].map(lambda i: names.get(i, i)))
    st.dataframe(
        styled(shown[["prompt", "kind", "model_role", "share", "control_share", "removed",
                      "control_removed"]]),
        hide_index=True, width="stretch",
    )  # fmt: skip
    prompt = st.selectbox(
        "Top next tokens before and after, on prompt", list(shown["prompt"]), key="edit-prompt"
    )
    details = shown.loc[shown["prompt"] == prompt, "details"].iloc[0]
    st.dataframe(before_after(details), hide_index=True, width="stretch")
    summary = rollout_summary(store, *pair)
    mine = summary[
        (summary["family"] == "none") | summary["target"].isin([chosen, f"random ({chosen})"])
    ]
    effects = rollout_effects(mine.to_dict(orient="records"))
    if effects:
        st.markdown("**What the model then says**")
        st.dataframe(styled(rollout_effect_table(effects)), hide_index=True, width="stretch")
