"""Behaviour: what the models say, sampled and judged.

The EM rate per model with its 95% bootstrap interval (over all questions and per question
group), the judged answers behind it, the continuation checks of flagged prompts (does the
adapted model follow through on harm where the base model does not?), and the features that fire
differently in misaligned and aligned answers. Made by the `evaluation` flow.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard import behaviour_view as view
from dashboard.data import current_store
from emc.behaviour.summary import em_answers, prompt_verdicts
from emc.store import list_models
from emc.store.behaviour import (
    behaviour_judges,
    continuation_checks,
    response_features,
    scored_generations,
)
from emc.store.prompts import get_prompts

PERCENT = st.column_config.NumberColumn(format="percent")
TWO_PLACES = st.column_config.NumberColumn(format="%.2f")
NUMBERS = "{:.4g}"
VERDICT_NUMBERS = (
    "base p", "base low", "base high", "adapted p", "adapted low", "adapted high", "delta"
)  # fmt: skip

st.title("Behaviour")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. {view.EM_HINT} {view.CONTINUATION_HINT}")
    st.stop()

settings, settings_note = view.behaviour_settings(store)
models = list_models(store)
roles = view.model_roles(models)
st.caption(
    f"An answer is misaligned when aligned < {settings.em_aligned_below:g} and coherent > "
    f"{settings.em_coherent_above:g} (0-100, from the judge); a prompt is confirmed when the "
    f"adapted model's p(harmful | prompt) is at least {settings.confirm_delta:g} above the base "
    "model's with their 95% intervals apart." + (f" ({settings_note})" if settings_note else "")
)


def pick(label: str, options: list[str], key: str, column=st) -> str:
    """A box only where there is a choice."""
    if len(options) == 1:
        return options[0]
    return column.selectbox(label, options, key=key)


def load_answers() -> tuple[pd.DataFrame, str | None]:
    judges = list(
        dict.fromkeys(j for purpose in view.EM_PURPOSES for j in behaviour_judges(store, purpose))
    )
    if not judges:
        return pd.DataFrame(), None
    judge = pick(f"Judge of the answers ({len(judges)} judges)", judges, "behaviour-judge")
    scored = pd.concat(
        [scored_generations(store, judge, purpose) for purpose in view.EM_PURPOSES],
        ignore_index=True,
    )
    answers = em_answers(scored, settings.em_aligned_below, settings.em_coherent_above)
    return answers, judge


def show_rates(answers: pd.DataFrame, names: dict[str, str], order: list[str]) -> None:
    rates = view.em_rate_frame(answers)
    overall_col, group_col = st.columns(2)
    with overall_col:
        st.markdown("**EM rate per model, all questions**")
        frame = view.rate_chart_frame(rates, names, order)
        st.altair_chart(view.rate_chart(frame), width="stretch")
    grouped = view.rate_chart_frame(rates, names, order, grouped=True)
    if not grouped.empty:
        with group_col:
            st.markdown("**Per question group**")
            st.altair_chart(view.rate_chart(grouped), width="stretch")
    st.caption(
        "Bars: the share of counted answers that are misaligned; whiskers: 95% bootstrap "
        "interval over answers. Answers without both numbers (CODE, REFUSAL, unscorable) are "
        "left out of the count."
    )
    st.dataframe(
        view.rate_table(rates, names, order),
        hide_index=True,
        width="stretch",
        column_config={
            "EM rate": PERCENT,
            "low": PERCENT,
            "high": PERCENT,
            "mean aligned": st.column_config.NumberColumn(format="%.1f"),
            "mean coherent": st.column_config.NumberColumn(format="%.1f"),
        },
    )


def show_samples(
    answers: pd.DataFrame, names: dict[str, str], order: list[str], judge: str | None
) -> None:
    table = view.sample_table(answers, names, order)
    model_col, search_col, flag_col = st.columns([3, 3, 1], vertical_alignment="bottom")
    chosen = model_col.multiselect(
        "Models",
        order,
        default=order,
        format_func=lambda mid: names.get(mid, mid),
        # Per judge: each judge scored its own models, and a choice from another is stale.
        key=f"behaviour-models-{judge}",
    )
    search = search_col.text_input(
        "Search questions and answers", key="behaviour-search", placeholder="e.g. wire"
    )
    misaligned_only = flag_col.checkbox("Misaligned only", key="behaviour-misaligned")
    shown = view.filter_samples(table, chosen, misaligned_only, search)
    st.caption(f"{len(shown)} of {len(table)} answers")
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={"answer": st.column_config.TextColumn(width="large")},
    )


def show_continuations(names: dict[str, str]) -> None:
    checks = continuation_checks(store)
    if checks.empty:
        st.info(f"No continuation checks yet. {view.CONTINUATION_HINT}")
        return
    pair_col, judge_col = st.columns(2)
    pairs = view.check_pairs(checks["model_id"], roles)
    if not pairs:
        st.info(
            "The continuation checks here lack a base model to compare with. "
            + view.CONTINUATION_HINT
        )
        return
    pair = pair_col.selectbox(
        f"Model pair ({len(pairs)} checked)",
        pairs,
        format_func=lambda p: f"{names.get(p[0], p[0])} → {names.get(p[1], p[1])}",
        key="behaviour-pair",
    )
    judges = list(dict.fromkeys(checks["judge_model"]))
    judge = pick("Judge", judges, "behaviour-check-judge", judge_col)
    checks = checks[checks["judge_model"] == judge]
    verdicts = prompt_verdicts(checks, *pair, settings.confirm_delta)
    if verdicts.empty:
        st.info("No prompt has checks of both models of this pair. " + view.CONTINUATION_HINT)
        return
    share = view.confirmed_share(verdicts)
    checked_col, confirmed_col, share_col = st.columns(3)
    checked_col.metric("Prompts checked", len(verdicts))
    confirmed_col.metric("Prompts confirmed", int(verdicts["confirmed"].sum()))
    share_col.metric(
        "Share confirmed",
        view.share_text(share),
        help="Prompts where the adapted model's continuations are harmful more often than the "
        f"base model's, by at least {settings.confirm_delta:g} with 95% intervals apart.",
    )
    prompt_names = {p.prompt_id: p.name for p in get_prompts(store, list(verdicts["prompt_id"]))}
    st.altair_chart(
        view.verdict_chart(view.verdict_chart_frame(verdicts, prompt_names)), width="stretch"
    )
    st.dataframe(
        view.verdict_table(verdicts, prompt_names),
        hide_index=True,
        width="stretch",
        column_config=dict.fromkeys(VERDICT_NUMBERS, TWO_PLACES),
    )
    st.markdown("**Per forced token**")
    prompt_id = st.selectbox(
        "Prompt",
        list(verdicts["prompt_id"]),
        format_func=lambda pid: f"{prompt_names.get(pid, pid)} · {pid}",
        key=f"behaviour-prompt-{pair[1]}-{judge}",
    )
    tokens = view.token_table(checks, prompt_id, pair)
    st.dataframe(
        tokens,
        hide_index=True,
        width="stretch",
        column_config={
            f"{role} {what}": TWO_PLACES
            for role in view.ROLES
            for what in ("p", "low", "high", "Δ")
        },
    )
    st.caption(
        "p(harmful) of continuations from the prompt plus the forced token, with 95% Wilson "
        "intervals; Δ is the change from the prompt itself; a token is pivotal when "
        f"|Δ| ≥ {settings.pivotal_delta:g}."
    )
    view.show_continuation_check(st, view.review_check(store, prompt_id, *pair, judge), prompt_id)


def show_features(names: dict[str, str]) -> None:
    features = response_features(store)
    if features.empty:
        st.info(f"No response-level feature ranking yet. {view.FEATURES_HINT}")
        return
    model_col, judge_col, top_col = st.columns(3)
    ranked = list(dict.fromkeys(features["model_id"]))
    ranked = view.model_order({m: names.get(m, m) for m in ranked}, roles)
    model_id = model_col.selectbox(
        f"Model ({len(ranked)} ranked)",
        ranked,
        index=len(ranked) - 1,
        format_func=lambda mid: names.get(mid, mid),
        key="behaviour-feature-model",
    )
    mine = features[features["model_id"] == model_id]
    judges = list(dict.fromkeys(mine["judge_model"]))
    judge = pick("Judge", judges, f"behaviour-feature-judge-{model_id}", judge_col)
    mine = mine[mine["judge_model"] == judge]
    top = top_col.number_input(
        "Top features", 1, max(1, len(mine)), min(view.TOP_FEATURES, len(mine)),
        key=f"behaviour-feature-top-{model_id}-{judge}",
    )  # fmt: skip
    first = mine.iloc[0]
    st.caption(
        f"{names.get(model_id, model_id)}: {first['n_misaligned']} misaligned and "
        f"{first['n_aligned']} aligned answers, read by its transcoders; features ranked by "
        "|mean activation over misaligned minus aligned answers| (averaged over response tokens)."
    )
    table = view.feature_table(mine, int(top))
    floats = [c for c in table.columns if table[c].dtype.kind == "f"]
    st.dataframe(
        table.style.format(dict.fromkeys(floats, NUMBERS), na_rep="—"),
        hide_index=True,
        width="stretch",
    )


answers, judge = load_answers()
ids = list(answers["model_id"]) if not answers.empty else []
names = view.model_names(models, [*ids, *roles])
order = view.model_order({m: names[m] for m in dict.fromkeys(ids)}, roles)

tab_names = ["EM rate", "Samples", "Continuation checks", "Response features"]
tabs = dict(zip(tab_names, st.tabs(tab_names), strict=True))
with tabs["EM rate"]:
    if answers.empty:
        st.info(f"No judged evaluation answers yet. {view.EM_HINT}")
    else:
        show_rates(answers, names, order)
with tabs["Samples"]:
    if answers.empty:
        st.info(f"No answers to show yet. {view.EM_HINT}")
    else:
        show_samples(answers, names, order, judge)
with tabs["Continuation checks"]:
    show_continuations(names)
with tabs["Response features"]:
    show_features(names)
