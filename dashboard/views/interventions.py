"""Interventions: where the harmful shift lives, and which interventions remove it.

The causal checks of `emc patch` and `emc intervene` for one base/adapted model pair: the
activation-patching decomposition of the shift, the top-k features restored and injected against
matched random features, the adapter scaled and removed part by part, and the mean-difference
directions against random ones. Every share is of the shift in the evil-minus-safe logit gap.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard import interventions_view as view
from dashboard.data import current_store
from emc.analysis.rollout_report import rollout_effects
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

st.title("Interventions")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. {view.RUN_HINT}")
    st.stop()

pairs = causal_model_pairs(store)
if not pairs:
    st.info(f"No causal checks in the store yet. {view.RUN_HINT}")
    st.stop()

pair = st.selectbox(
    f"Model pair ({len(pairs)} with causal checks)",
    pairs,
    format_func=view.pair_label,
    key="interventions-pair",
)
explained = explained_per_prompt(store, *pair)
interventions = intervention_summary(store, None, *pair)
failures = causal_failures(store, *pair)
if not failures.empty:
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
st.caption(
    "Shares are of the shift in the evil-minus-safe logit gap from base to adapted (1 = all of "
    "it). An intervention on the adapted model *removes* part of it, one on the base model "
    "*reproduces* part of it; each is beside a matched random control where there is one."
)


def family(name: str) -> pd.DataFrame:
    return interventions[interventions["family"] == name].reset_index(drop=True)


def show_decomposition() -> None:
    if explained.empty:
        st.info("No decomposition for this pair yet. Run `emc patch`.")
        return
    numbers = view.headline(explained)
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
        st.altair_chart(view.direct_chart(view.direct_frame(summary)), width="stretch")
    with total_col:
        st.markdown("**Total effect: patched into base, patched out of adapted**")
        st.altair_chart(view.total_chart(view.total_frame(summary)), width="stretch")
        st.caption(
            "Total: the output swapped at every position, everything downstream recomputed: "
            "sufficient (into base) or necessary (out of adapted); these overlap."
        )
    st.markdown("**Per prompt**")
    names = {p.prompt_id: p.name for p in get_prompts(store, list(explained["prompt_id"]))}
    st.dataframe(view.styled(view.prompt_table(explained, names)), hide_index=True, width="stretch")
    with st.expander("Per component and layer, mean over prompts"):
        st.dataframe(view.styled(summary), hide_index=True, width="stretch")


def show_features() -> None:
    features = family("features")
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
            frame = view.dose_frame(features, mode)
            st.altair_chart(view.dose_chart(frame, view.FEATURE_MODES[mode]), width="stretch")
    st.caption(
        "Restore: the adapted model's top-k features set to their base activations (share "
        "removed). Inject: the base model's set to their adapted activations (share reproduced). "
        "Dashed: as many random active features from the same layers."
    )
    st.dataframe(view.styled(view.intervention_table(features)), hide_index=True, width="stretch")


def show_adapter() -> None:
    adapter = family("adapter")
    if adapter.empty:
        st.info("No adapter interventions for this pair yet. Run `emc intervene --kind adapter`.")
        return
    scale_col, layer_col, kind_col = st.columns(3)
    with scale_col:
        st.markdown("**Adapter scaled by k, on the base model**")
        st.altair_chart(view.scale_chart(view.scale_frame(adapter)), width="stretch")
        st.caption("Dashed: a response linear in k.")
    for column, kind in ((layer_col, "without_layer"), (kind_col, "without_kind")):
        with column:
            st.markdown(f"**Adapter removed {view.REMOVALS[kind]}**")
            st.altair_chart(view.removal_chart(view.removal_frame(adapter, kind)), width="stretch")
    st.markdown(f"**Adapter removed {view.REMOVALS['without_module']}**")
    modules = view.removal_frame(adapter, "without_module")
    st.altair_chart(view.removal_chart(modules, horizontal=True), width="stretch")
    with st.expander("Every adapter setting"):
        st.dataframe(
            view.styled(view.intervention_table(adapter)), hide_index=True, width="stretch"
        )


def show_directions() -> None:
    directions = family("direction")
    if directions.empty:
        st.info(
            "No direction interventions for this pair yet. Run `emc intervene --kind directions`."
        )
        return
    modes = [m for m in view.DIRECTION_MODES if m in set(directions["kind"])]
    for column, mode in zip(st.columns(len(modes)), modes, strict=True):
        with column:
            st.markdown(f"**{view.DIRECTION_MODES[mode]}**")
            frame = view.direction_frame(directions, mode)
            st.altair_chart(view.direction_chart(frame), width="stretch")
    st.caption(
        "Each layer's mean adapted-minus-base residual at the last position (each prompt left out "
        "of its own direction), subtracted from or projected out of the adapted model, or added "
        "to the base model; grey: a random direction of the same norm."
    )
    st.dataframe(view.styled(view.intervention_table(directions)), hide_index=True, width="stretch")


def show_rollouts() -> None:
    summary = rollout_summary(store, *pair)
    if summary.empty:
        st.info("No rollouts for this pair yet. Run `emc intervene --kind rollouts`.")
        return
    st.markdown(
        f"**What the models say: p(harmful) of sampled continuations** (judge "
        f"`{summary['judge_model'].iloc[0]}`, pooled over prompts, 95% Wilson intervals)"
    )
    st.altair_chart(view.rollout_chart(view.rollout_frame(summary)), width="stretch")
    st.caption(
        "Cut: the share of the adapted model's harmful rate an intervention on it removes; "
        "reproduced: the share of the base-to-adapted difference one on the base model makes. "
        "Coherence (0-100, the judge's) shows whether the harm went because the model broke. "
        "The goal: a narrow intervention (at most 20 features, or one direction) cuts at least "
        "80% while its control cuts under 10% and coherence drops by at most 10%."
    )
    effects = view.rollout_effect_table(rollout_effects(summary.to_dict(orient="records")))
    st.dataframe(view.styled(effects), hide_index=True, width="stretch")
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


def show_your_edits() -> None:
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
            "Edit", list(view.EDIT_MODES), format_func=view.EDIT_MODES.get, key="edit-mode"
        )
        strength = strength_col.number_input(
            "Strength (scale)", value=0.0, step=0.5, key="edit-strength"
        )
        positions = positions_col.radio(
            "Positions (restore, inject)", ["all", "prompt"], horizontal=True,
            key="edit-positions",
        )  # fmt: skip
        submitted = st.form_submit_button("Run this edit")
    command = view.edit_command(str(store.path.parent), features, mode, strength, positions)
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
        view.styled(shown[["prompt", "kind", "model_role", "share", "control_share", "removed",
                           "control_removed"]]),
        hide_index=True, width="stretch",
    )  # fmt: skip
    prompt = st.selectbox(
        "Top next tokens before and after, on prompt", list(shown["prompt"]), key="edit-prompt"
    )
    details = shown.loc[shown["prompt"] == prompt, "details"].iloc[0]
    st.dataframe(view.before_after(details), hide_index=True, width="stretch")
    summary = rollout_summary(store, *pair)
    mine = summary[
        (summary["family"] == "none") | summary["target"].isin([chosen, f"random ({chosen})"])
    ]
    effects = rollout_effects(mine.to_dict(orient="records"))
    if effects:
        st.markdown("**What the model then says**")
        st.dataframe(view.styled(view.rollout_effect_table(effects)), hide_index=True,
                     width="stretch")  # fmt: skip


names = ["Where the shift lives", "Dose-response", "Adapter", "Directions", "Rollouts",
         "Your edits"]  # fmt: skip
tabs = dict(zip(names, st.tabs(names), strict=True))
with tabs["Where the shift lives"]:
    show_decomposition()
with tabs["Dose-response"]:
    show_features()
with tabs["Adapter"]:
    show_adapter()
with tabs["Directions"]:
    show_directions()
with tabs["Rollouts"]:
    show_rollouts()
with tabs["Your edits"]:
    show_your_edits()
