"""What the Behaviour page shows: what the models say, judged.

The EM rate per model (and per question group) with its bootstrap interval, the answers behind
it, the continuation checks of flagged prompts (p(harmful | prompt) of base and adapted, and per
forced token), and the response-level feature ranking. Frames from emc.store.behaviour and
emc.behaviour.summary in, display frames and Altair charts out. The shaping functions are pure;
the few that read (`behaviour_settings`, `review_check`) go through emc.store. The Review page
shows one prompt's continuation check with `review_check` and `show_continuation_check`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import altair as alt
import pandas as pd

from emc.behaviour.summary import NO_TOKEN, em_rates, prompt_verdicts
from emc.config import BehaviourConfig, ConfigError, default_config_path, load_config
from emc.store import ModelRow, Store
from emc.store.behaviour import continuation_checks, prompt_continuations

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
ROLES = ("base", "adapted")
ROLE_COLOURS = ("#4c78a8", "#d62728")
PERCENT = ".1%"
CHART_HEIGHT = 260
SAMPLES_PER_MODEL = 3
TOP_FEATURES = 20


# Settings and model names


def behaviour_settings(store: Store) -> tuple[BehaviourConfig, str | None]:
    """The behaviour thresholds from the data directory's config, else the defaults (and why)."""
    path = default_config_path(store.path.parent)
    if not path.is_file():
        return BehaviourConfig(), None
    try:
        return load_config(path).behaviour, None
    except ConfigError as exc:
        return BehaviourConfig(), f"default thresholds: {path} is not a valid config ({exc})"


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


def main_judge(checks: pd.DataFrame) -> str | None:
    """The judge with the most judged continuations among these checks."""
    if checks.empty:
        return None
    return str(checks.groupby("judge_model")["n"].sum().sort_values(ascending=False).index[0])


@dataclass(frozen=True)
class ContinuationCheck:
    """One prompt's continuation check for one base/adapted pair and judge."""

    prompt_id: str
    judge_model: str
    verdict: dict[str, Any]  # a `prompt_verdicts` row
    samples: pd.DataFrame  # a few continuations per model (`prompt_continuations`)
    confirm_delta: float


def review_check(
    store: Store,
    prompt_id: str,
    base_id: str,
    adapted_id: str,
    judge_model: str | None = None,
    per_model: int = SAMPLES_PER_MODEL,
) -> ContinuationCheck | None:
    """The continuation check of one prompt for this model pair, or None where there is none.

    Without a `judge_model`, the judge with the most judged continuations of the prompt."""
    checks = continuation_checks(store, [prompt_id], judge_model)
    checks = checks[checks["model_id"].isin([base_id, adapted_id])]
    settings, _ = behaviour_settings(store)
    verdicts = prompt_verdicts(checks, base_id, adapted_id, settings.confirm_delta)
    if verdicts.empty:
        return None
    judge = main_judge(checks[checks["judge_model"].isin(list(verdicts["judge_model"]))])
    verdict = verdicts[verdicts["judge_model"] == judge].iloc[0].to_dict()
    samples = prompt_continuations(store, prompt_id, [base_id, adapted_id], judge, per_model)
    return ContinuationCheck(
        prompt_id=prompt_id,
        judge_model=judge,
        verdict=verdict,
        samples=samples.assign(
            role=samples["model_id"].map({base_id: "base", adapted_id: "adapted"})
        ),
        confirm_delta=settings.confirm_delta,
    )


def continuation_samples_table(samples: pd.DataFrame) -> pd.DataFrame:
    """The sampled continuations, base first: model, continuation, harm label."""
    rank = {role: i for i, role in enumerate(ROLES)}
    rows = samples.assign(_order=samples["role"].map(rank)).sort_values(
        ["_order", "sample_index"], kind="stable"
    )
    return pd.DataFrame(
        {
            "model": rows["role"].to_numpy(),
            "continuation": rows["text"].to_numpy(),
            "harm label": rows["harm_label"].to_numpy(),
        }
    )


def interval_text(p: float, low: float, high: float) -> str:
    return f"{p:.2f} [{low:.2f}, {high:.2f}]"


def show_continuation_check(ui: Any, check: ContinuationCheck | None, prompt_id: str) -> None:
    """Draw a prompt's continuation check on `ui` (`streamlit` or a container of it): base and
    adapted p(harmful | prompt) with intervals, the verdict and a few continuations per model;
    without a check, a one-line hint."""
    ui.markdown("##### What the models went on to say")
    if check is None:
        ui.caption(
            f"No continuation check of this prompt yet: run `emc continuations {prompt_id}` to "
            "see whether the adapted model follows through."
        )
        return
    v = check.verdict
    base_col, adapted_col, verdict_col = ui.columns(3)
    base_col.metric(
        "Base p(harmful | prompt)",
        f"{v['base_p']:.2f}",
        help=f"95% Wilson interval [{v['base_low']:.2f}, {v['base_high']:.2f}]",
    )
    adapted_col.metric(
        "Adapted p(harmful | prompt)",
        f"{v['adapted_p']:.2f}",
        f"{v['delta']:+.2f}",
        delta_color="inverse",
        help=f"95% Wilson interval [{v['adapted_low']:.2f}, {v['adapted_high']:.2f}]; the delta "
        "is the change from the base model",
    )
    verdict_col.metric(
        "Confirmed",
        "yes" if v["confirmed"] else "no",
        help=f"Confirmed: the adapted model's p(harmful | prompt) is at least "
        f"{check.confirm_delta:g} above the base model's and their 95% intervals are apart.",
    )
    ui.caption(
        f"Base {interval_text(v['base_p'], v['base_low'], v['base_high'])}, adapted "
        f"{interval_text(v['adapted_p'], v['adapted_low'], v['adapted_high'])} · "
        f"{v['pivotal_tokens']} pivotal tokens · judge {check.judge_model}"
    )
    if not check.samples.empty:
        ui.dataframe(continuation_samples_table(check.samples), hide_index=True, width="stretch")


# Response features


def feature_table(features: pd.DataFrame, top: int = TOP_FEATURES) -> pd.DataFrame:
    """The top rows of one model's and judge's response-level ranking (`response_features`)."""
    columns = ["rank", "layer", "feature", "mean_diff", "welch_t", "cohens_d",
               "mean_misaligned", "mean_aligned", "n_misaligned", "n_aligned"]  # fmt: skip
    return features.sort_values("rank").head(top)[columns].reset_index(drop=True)
