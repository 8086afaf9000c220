"""Behaviour: what the models say, sampled and judged.

The EM rate per model with its 95% bootstrap interval (over all questions and per question
group), the judged answers behind it, the continuation checks of flagged prompts (does the
adapted model follow through on harm where the base model does not? p(harmful | prompt) of base
and adapted, and per forced token), and the features that fire differently in misaligned and
aligned answers. Made by the `evaluation` flow.

The shaping functions (frames from emc.store.behaviour and emc.behaviour.summary in, display
frames and Altair charts out) are pure, so tests check them without a browser; the drawing
functions below them read through emc.store. One prompt's continuation check, which the Review
page shows too, is drawn by `dashboard.widgets`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence

import altair as alt
import pandas as pd
import streamlit as st

from dashboard.widgets import (
    ROLES,
    behaviour_settings,
    existing_store,
    review_check,
    show_continuation_check,
)
from emc.behaviour.summary import NO_TOKEN, em_answers, em_rates, prompt_verdicts
from emc.config import BehaviourConfig
from emc.store import ModelRow, Store, list_models
from emc.store.behaviour import (
    behaviour_judges,
    continuation_checks,
    response_features,
    scored_generations,
)
from emc.store.prompts import get_prompts

EM_HINT = (
    "Run `emc eval em` to sample and judge answers to free-form questions "
    "(or `emc eval import FILE` to load an existing evaluation)."
)
CONTINUATION_HINT = (
    "Run `emc continuations` to sample and judge what the models say after each flagged prompt."
)
FEATURES_HINT = (
    "Run `emc responses analyze` (after `emc eval em`) to rank features by how differently they "
    "fire in misaligned and aligned answers."
)
EM_PURPOSES = ("em_eval", "imported")
ALL_QUESTIONS = "all"
PROMPT_ITSELF = "(the prompt itself)"
ROLE_COLOURS = ("#4c78a8", "#d62728")
PERCENT = ".1%"
CHART_HEIGHT = 260
TOP_FEATURES = 20


# Model names


def _ref_name(ref: str) -> str:
    """The last part of a path or hub id: `org/Model-7B` -> `Model-7B`."""
    return ref.rstrip("/").rsplit("/", 1)[-1] or ref


def _model_name(model: ModelRow) -> str:
    if model.role == "base":
        name = _ref_name(model.base_ref)
        return "base" if name == "base" else f"base ({name})"
    name = _ref_name(model.adapter_ref or model.base_ref)
    return "adapted" if name == "adapted" else f"adapted ({name})"


def model_names(models: Sequence[ModelRow], model_ids: Iterable[str]) -> dict[str, str]:
    """A readable name per model id: its role and base or adapter name (`adapted (em)`), with a
    fingerprint where two models would share a name; an id the store does not know, as it is."""
    known = {m.model_id: m for m in models}
    ids = list(dict.fromkeys(model_ids))
    names = {mid: _model_name(known[mid]) if mid in known else mid for mid in ids}
    shared = Counter(names.values())
    return {
        mid: f"{name} · {known[mid].fingerprint[:6]}" if shared[name] > 1 and mid in known else name
        for mid, name in names.items()
    }


def model_roles(models: Sequence[ModelRow]) -> dict[str, str]:
    return {m.model_id: m.role for m in models}


def model_order(names: Mapping[str, str], roles: Mapping[str, str]) -> list[str]:
    """Model ids, base models first, then by name."""
    rank = {"base": 0, "adapted": 1}
    return sorted(names, key=lambda mid: (rank.get(roles.get(mid, ""), 2), names[mid]))


# EM rate


def em_rate_frame(answers: pd.DataFrame) -> pd.DataFrame:
    """`em_rates` per model over all questions (`question_group` = all) and per question group
    (answers without a group count only in `all`)."""
    overall = em_rates(answers).assign(question_group=ALL_QUESTIONS)
    grouped = answers[answers["question_group"].notna()]
    if grouped.empty:
        return overall
    per_group = em_rates(grouped, by=("model_id", "question_group"))
    return pd.concat([overall, per_group], ignore_index=True)


def _sorted_by_model(frame: pd.DataFrame, order: Sequence[str], *then: str) -> pd.DataFrame:
    position = {mid: i for i, mid in enumerate(order)}
    keyed = frame.assign(_order=[position.get(m, len(position)) for m in frame["model_id"]])
    return keyed.sort_values(["_order", *then], kind="stable").drop(columns="_order")


def rate_table(rates: pd.DataFrame, names: Mapping[str, str], order: Sequence[str]) -> pd.DataFrame:
    """One row per model and question group (`all` first): the EM rate with its interval."""
    rows = rates.assign(_all=rates["question_group"] != ALL_QUESTIONS)
    rows = _sorted_by_model(rows, order, "_all", "question_group")
    return pd.DataFrame(
        {
            "model": [names.get(m, m) for m in rows["model_id"]],
            "questions": rows["question_group"].to_numpy(),
            "EM rate": rows["em_rate"].astype(float).to_numpy(),
            "low": rows["low"].astype(float).to_numpy(),
            "high": rows["high"].astype(float).to_numpy(),
            "misaligned": rows["misaligned"].astype(int).to_numpy(),
            "counted": rows["counted"].astype(int).to_numpy(),
            "left out": rows["left_out"].astype(int).to_numpy(),
            "mean aligned": rows["mean_aligned"].astype(float).to_numpy(),
            "mean coherent": rows["mean_coherent"].astype(float).to_numpy(),
            "model_id": rows["model_id"].to_numpy(),
        }
    )


def rate_chart_frame(
    rates: pd.DataFrame, names: Mapping[str, str], order: Sequence[str], grouped: bool = False
) -> pd.DataFrame:
    """The chart's rows: one per model over all questions, or one per model and group."""
    rows = rates[(rates["question_group"] != ALL_QUESTIONS) == grouped]
    rows = _sorted_by_model(rows, order, "question_group")
    frame = pd.DataFrame(
        {
            "model": [names.get(m, m) for m in rows["model_id"]],
            "em_rate": rows["em_rate"].astype(float).to_numpy(),
            "low": rows["low"].astype(float).to_numpy(),
            "high": rows["high"].astype(float).to_numpy(),
            "misaligned": rows["misaligned"].astype(int).to_numpy(),
            "counted": rows["counted"].astype(int).to_numpy(),
        }
    )
    if grouped:
        frame.insert(1, "question_group", rows["question_group"].to_numpy())
    return frame


def rate_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """Bars of the EM rate with their 95% intervals; grouped by question group where the frame
    has one."""
    models = list(dict.fromkeys(frame["model"]))
    grouped = "question_group" in frame.columns
    tooltip = [
        "model:N",
        *(["question_group:N"] if grouped else []),
        alt.Tooltip("em_rate:Q", format=PERCENT, title="EM rate"),
        alt.Tooltip("low:Q", format=PERCENT),
        alt.Tooltip("high:Q", format=PERCENT),
        "misaligned:Q",
        "counted:Q",
    ]
    x = alt.X("model:N", sort=models, title=None, axis=alt.Axis(labelAngle=0))
    base = alt.Chart(frame).encode(x=x, tooltip=tooltip)
    if grouped:
        groups = sorted(set(frame["question_group"]))
        base = base.encode(xOffset=alt.XOffset("question_group:N", sort=groups))
        bars = base.mark_bar().encode(
            y=alt.Y("em_rate:Q", title="EM rate", axis=alt.Axis(format="%")),
            color=alt.Color("question_group:N", legend=alt.Legend(title=None, orient="bottom")),
        )
    else:
        bars = base.mark_bar(color="#d62728").encode(
            y=alt.Y("em_rate:Q", title="EM rate", axis=alt.Axis(format="%"))
        )
    whiskers = base.mark_rule(color="black").encode(y="low:Q", y2="high:Q")
    return (bars + whiskers).properties(height=CHART_HEIGHT)


# Samples


def sample_table(
    answers: pd.DataFrame, names: Mapping[str, str], order: Sequence[str] = ()
) -> pd.DataFrame:
    """The judged answers behind the rates, one row each, in model order."""
    answers = _sorted_by_model(answers, order)
    return pd.DataFrame(
        {
            "model": [names.get(m, m) for m in answers["model_id"]],
            "questions": answers["question_group"].to_numpy(),
            "question": answers["question"].to_numpy(),
            "answer": answers["text"].to_numpy(),
            "aligned": answers["aligned"].astype(float).to_numpy(),
            "coherent": answers["coherent"].astype(float).to_numpy(),
            "aligned label": answers["aligned_label"].to_numpy(),
            "harm label": answers["harm_label"].to_numpy(),
            "misaligned": answers["misaligned"].astype(bool).to_numpy(),
            "counted": answers["counted"].astype(bool).to_numpy(),
            "question_id": answers["question_id"].to_numpy(),
            "model_id": answers["model_id"].to_numpy(),
            "generation_id": answers["generation_id"].to_numpy(),
        }
    )


def filter_samples(
    table: pd.DataFrame,
    model_ids: Collection[str] | None = None,
    misaligned_only: bool = False,
    search: str = "",
) -> pd.DataFrame:
    """The rows of these models (all when None), misaligned ones only if asked, whose question
    or answer contains `search` (any case)."""
    keep = pd.Series(True, index=table.index)
    if model_ids is not None:
        keep &= table["model_id"].isin(list(model_ids))
    if misaligned_only:
        keep &= table["misaligned"]
    needle = search.strip().lower()
    if needle:
        text = table["question"].fillna("") + "\n" + table["answer"].fillna("")
        keep &= text.str.lower().str.contains(needle, regex=False)
    return table[keep].reset_index(drop=True)


# Continuation checks


def check_pairs(model_ids: Iterable[str], roles: Mapping[str, str]) -> list[tuple[str, str]]:
    """The (base, adapted) pairs these checked models make: each base model with each other."""
    ids = list(dict.fromkeys(model_ids))
    bases = [m for m in ids if roles.get(m) == "base"]
    return [(b, a) for b in bases for a in ids if a not in bases]


def confirmed_share(verdicts: pd.DataFrame) -> float | None:
    """The share of checked prompts the adapted model's continuations confirm."""
    if verdicts.empty:
        return None
    return float(verdicts["confirmed"].astype(bool).mean())


def share_text(share: float | None) -> str:
    return "—" if share is None else f"{share:.0%}"


def verdict_table(verdicts: pd.DataFrame, prompt_names: Mapping[str, str]) -> pd.DataFrame:
    """Per prompt: base and adapted p(harmful | prompt) with intervals, and the verdict."""
    return pd.DataFrame(
        {
            "prompt": [prompt_names.get(p, p) for p in verdicts["prompt_id"]],
            "base p": verdicts["base_p"].astype(float).to_numpy(),
            "base low": verdicts["base_low"].astype(float).to_numpy(),
            "base high": verdicts["base_high"].astype(float).to_numpy(),
            "adapted p": verdicts["adapted_p"].astype(float).to_numpy(),
            "adapted low": verdicts["adapted_low"].astype(float).to_numpy(),
            "adapted high": verdicts["adapted_high"].astype(float).to_numpy(),
            "delta": verdicts["delta"].astype(float).to_numpy(),
            "confirmed": verdicts["confirmed"].astype(bool).to_numpy(),
            "pivotal tokens": verdicts["pivotal_tokens"].astype(int).to_numpy(),
            "prompt_id": verdicts["prompt_id"].to_numpy(),
        }
    )


def verdict_chart_frame(verdicts: pd.DataFrame, prompt_names: Mapping[str, str]) -> pd.DataFrame:
    """Long frame (prompt, model, p, low, high, confirmed): two rows per prompt."""
    parts = [
        pd.DataFrame(
            {
                "prompt": [prompt_names.get(p, p) for p in verdicts["prompt_id"]],
                "model": role,
                "p_harmful": verdicts[f"{role}_p"].astype(float).to_numpy(),
                "low": verdicts[f"{role}_low"].astype(float).to_numpy(),
                "high": verdicts[f"{role}_high"].astype(float).to_numpy(),
                "confirmed": verdicts["confirmed"].astype(bool).to_numpy(),
            }
        )
        for role in ROLES
    ]
    return pd.concat(parts, ignore_index=True)


def verdict_chart(frame: pd.DataFrame) -> alt.LayerChart:
    """Per prompt, base and adapted p(harmful | prompt) as points with their 95% intervals."""
    prompts = list(dict.fromkeys(frame["prompt"]))
    base = alt.Chart(frame).encode(
        y=alt.Y("prompt:N", sort=prompts, title=None, axis=alt.Axis(labelLimit=260)),
        yOffset=alt.YOffset("model:N", sort=list(ROLES)),
        color=alt.Color(
            "model:N",
            scale=alt.Scale(domain=list(ROLES), range=list(ROLE_COLOURS)),
            legend=alt.Legend(title=None, orient="bottom"),
        ),
        tooltip=[
            "prompt:N",
            "model:N",
            alt.Tooltip("p_harmful:Q", format=".2f", title="p(harmful | prompt)"),
            alt.Tooltip("low:Q", format=".2f"),
            alt.Tooltip("high:Q", format=".2f"),
            "confirmed:N",
        ],
    )
    x = alt.X("p_harmful:Q", title="p(harmful | prompt)", scale=alt.Scale(domain=[0, 1]))
    points = base.mark_point(filled=True, size=70).encode(x=x)
    whiskers = base.mark_rule().encode(x="low:Q", x2="high:Q")
    height = max(120, 36 * len(prompts))
    return (whiskers + points).properties(height=height)


def token_table(checks: pd.DataFrame, prompt_id: str, pair: tuple[str, str]) -> pd.DataFrame:
    """One prompt's checks per forced token (the prompt itself first, then by the adapted
    model's change in p(harmful), largest first), base and adapted side by side.

    `checks` holds one judge's rows (`continuation_checks`)."""
    rows = checks[(checks["prompt_id"] == prompt_id) & checks["model_id"].isin(list(pair))]
    tokens = rows.drop_duplicates("forced_token_id").set_index("forced_token_id")
    table = pd.DataFrame(
        {
            "forced token": [
                PROMPT_ITSELF if t == NO_TOKEN else repr(tokens.at[t, "forced_token"])
                for t in tokens.index
            ],
            "label": tokens["token_label"].to_numpy(),
        },
        index=tokens.index,
    )
    for role, model_id in zip(ROLES, pair, strict=True):
        mine = rows[rows["model_id"] == model_id].set_index("forced_token_id")
        table[f"{role} p"] = mine["p_harmful"].astype(float)
        table[f"{role} low"] = mine["ci_low"].astype(float)
        table[f"{role} high"] = mine["ci_high"].astype(float)
        table[f"{role} Δ"] = mine["delta_p"].astype(float)
        table[f"{role} pivotal"] = mine["pivotal"].astype("boolean")
        table[f"{role} n"] = mine["n"].astype("Int64")
    table["forced_token_id"] = table.index
    table["_first"] = table.index != NO_TOKEN
    table = table.sort_values(["_first", "adapted Δ"], ascending=[True, False], kind="stable")
    return table.drop(columns="_first").reset_index(drop=True)


# Response features


def feature_table(features: pd.DataFrame, top: int = TOP_FEATURES) -> pd.DataFrame:
    """The top rows of one model's and judge's response-level ranking (`response_features`)."""
    columns = ["rank", "layer", "feature", "mean_diff", "welch_t", "cohens_d",
               "mean_misaligned", "mean_aligned", "n_misaligned", "n_aligned"]  # fmt: skip
    return features.sort_values("rank").head(top)[columns].reset_index(drop=True)


# Drawing the page

NUMBERS = "{:.4g}"
VERDICT_NUMBERS = (
    "base p", "base low", "base high", "adapted p", "adapted low", "adapted high", "delta"
)  # fmt: skip


def render() -> None:
    st.title("Behaviour")
    store = existing_store(f"{EM_HINT} {CONTINUATION_HINT}")

    settings, settings_note = behaviour_settings(store)
    models = list_models(store)
    roles = model_roles(models)
    st.caption(
        f"An answer is misaligned when aligned < {settings.em_aligned_below:g} and coherent > "
        f"{settings.em_coherent_above:g} (0-100, from the judge); a prompt is confirmed when the "
        f"adapted model's p(harmful | prompt) is at least {settings.confirm_delta:g} above the "
        "base model's with their 95% intervals apart."
        + (f" ({settings_note})" if settings_note else "")
    )

    answers, judge = load_answers(store, settings)
    ids = list(answers["model_id"]) if not answers.empty else []
    names = model_names(models, [*ids, *roles])
    order = model_order({m: names[m] for m in dict.fromkeys(ids)}, roles)

    tab_names = ["EM rate", "Samples", "Continuation checks", "Response features"]
    tabs = dict(zip(tab_names, st.tabs(tab_names), strict=True))
    with tabs["EM rate"]:
        if answers.empty:
            st.info(f"No judged evaluation answers yet. {EM_HINT}")
        else:
            show_rates(answers, names, order)
    with tabs["Samples"]:
        if answers.empty:
            st.info(f"No answers to show yet. {EM_HINT}")
        else:
            show_samples(answers, names, order, judge)
    with tabs["Continuation checks"]:
        show_continuations(store, settings, names, roles)
    with tabs["Response features"]:
        show_features(store, names, roles)


def pick(label: str, options: list[str], key: str, column=st) -> str:
    """A box only where there is a choice."""
    if len(options) == 1:
        return options[0]
    return column.selectbox(label, options, key=key)


def load_answers(store: Store, settings: BehaviourConfig) -> tuple[pd.DataFrame, str | None]:
    judges = list(
        dict.fromkeys(j for purpose in EM_PURPOSES for j in behaviour_judges(store, purpose))
    )
    if not judges:
        return pd.DataFrame(), None
    judge = pick(f"Judge of the answers ({len(judges)} judges)", judges, "behaviour-judge")
    scored = pd.concat(
        [scored_generations(store, judge, purpose) for purpose in EM_PURPOSES],
        ignore_index=True,
    )
    answers = em_answers(scored, settings.em_aligned_below, settings.em_coherent_above)
    return answers, judge


def show_rates(answers: pd.DataFrame, names: dict[str, str], order: list[str]) -> None:
    rates = em_rate_frame(answers)
    overall_col, group_col = st.columns(2)
    with overall_col:
        st.markdown("**EM rate per model, all questions**")
        frame = rate_chart_frame(rates, names, order)
        st.altair_chart(rate_chart(frame), width="stretch")
    grouped = rate_chart_frame(rates, names, order, grouped=True)
    if not grouped.empty:
        with group_col:
            st.markdown("**Per question group**")
            st.altair_chart(rate_chart(grouped), width="stretch")
    st.caption(
        "Bars: the share of counted answers that are misaligned; whiskers: 95% bootstrap "
        "interval over answers. Answers without both numbers (CODE, REFUSAL, unscorable) are "
        "left out of the count."
    )
    percent = st.column_config.NumberColumn(format="percent")
    st.dataframe(
        rate_table(rates, names, order),
        hide_index=True,
        width="stretch",
        column_config={
            "EM rate": percent,
            "low": percent,
            "high": percent,
            "mean aligned": st.column_config.NumberColumn(format="%.1f"),
            "mean coherent": st.column_config.NumberColumn(format="%.1f"),
        },
    )


def show_samples(
    answers: pd.DataFrame, names: dict[str, str], order: list[str], judge: str | None
) -> None:
    table = sample_table(answers, names, order)
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
    shown = filter_samples(table, chosen, misaligned_only, search)
    st.caption(f"{len(shown)} of {len(table)} answers")
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={"answer": st.column_config.TextColumn(width="large")},
    )


def show_continuations(
    store: Store, settings: BehaviourConfig, names: dict[str, str], roles: dict[str, str]
) -> None:
    checks = continuation_checks(store)
    if checks.empty:
        st.info(f"No continuation checks yet. {CONTINUATION_HINT}")
        return
    pair_col, judge_col = st.columns(2)
    pairs = check_pairs(checks["model_id"], roles)
    if not pairs:
        st.info(
            "The continuation checks here lack a base model to compare with. " + CONTINUATION_HINT
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
        st.info("No prompt has checks of both models of this pair. " + CONTINUATION_HINT)
        return
    share = confirmed_share(verdicts)
    checked_col, confirmed_col, share_col = st.columns(3)
    checked_col.metric("Prompts checked", len(verdicts))
    confirmed_col.metric("Prompts confirmed", int(verdicts["confirmed"].sum()))
    share_col.metric(
        "Share confirmed",
        share_text(share),
        help="Prompts where the adapted model's continuations are harmful more often than the "
        f"base model's, by at least {settings.confirm_delta:g} with 95% intervals apart.",
    )
    prompt_names = {p.prompt_id: p.name for p in get_prompts(store, list(verdicts["prompt_id"]))}
    st.altair_chart(verdict_chart(verdict_chart_frame(verdicts, prompt_names)), width="stretch")
    two_places = st.column_config.NumberColumn(format="%.2f")
    st.dataframe(
        verdict_table(verdicts, prompt_names),
        hide_index=True,
        width="stretch",
        column_config=dict.fromkeys(VERDICT_NUMBERS, two_places),
    )
    st.markdown("**Per forced token**")
    prompt_id = st.selectbox(
        "Prompt",
        list(verdicts["prompt_id"]),
        format_func=lambda pid: f"{prompt_names.get(pid, pid)} · {pid}",
        key=f"behaviour-prompt-{pair[1]}-{judge}",
    )
    tokens = token_table(checks, prompt_id, pair)
    st.dataframe(
        tokens,
        hide_index=True,
        width="stretch",
        column_config={
            f"{role} {what}": two_places for role in ROLES for what in ("p", "low", "high", "Δ")
        },
    )
    st.caption(
        "p(harmful) of continuations from the prompt plus the forced token, with 95% Wilson "
        "intervals; Δ is the change from the prompt itself; a token is pivotal when "
        f"|Δ| ≥ {settings.pivotal_delta:g}."
    )
    show_continuation_check(st, review_check(store, prompt_id, *pair, judge), prompt_id)


def show_features(store: Store, names: dict[str, str], roles: dict[str, str]) -> None:
    features = response_features(store)
    if features.empty:
        st.info(f"No response-level feature ranking yet. {FEATURES_HINT}")
        return
    model_col, judge_col, top_col = st.columns(3)
    ranked = list(dict.fromkeys(features["model_id"]))
    ranked = model_order({m: names.get(m, m) for m in ranked}, roles)
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
        "Top features", 1, max(1, len(mine)), min(TOP_FEATURES, len(mine)),
        key=f"behaviour-feature-top-{model_id}-{judge}",
    )  # fmt: skip
    first = mine.iloc[0]
    st.caption(
        f"{names.get(model_id, model_id)}: {first['n_misaligned']} misaligned and "
        f"{first['n_aligned']} aligned answers, read by its transcoders; features ranked by "
        "|mean activation over misaligned minus aligned answers| (averaged over response tokens)."
    )
    table = feature_table(mine, int(top))
    floats = [c for c in table.columns if table[c].dtype.kind == "f"]
    st.dataframe(
        table.style.format(dict.fromkeys(floats, NUMBERS), na_rep="—"),
        hide_index=True,
        width="stretch",
    )
