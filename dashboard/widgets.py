"""What more than one page uses: the store, picking a graph pair, a prompt's continuation check.

- `current_store` / `existing_store`: every page reads the store through it.
- Links between pages (`link`, `page_url`, `query_value`, `keep_in_url`): every page takes its
  selection from the URL's query parameters and writes it back, so any view can be shared as a
  URL, and pages link to each other with parameters (a review item to its graphs, a graph node
  to its feature card, a feature to the prompts where it appears, a run to its Prefect run).
- Graph pairs (Graphs, Features): a prompt box and a box of the prompt's base/adapted pairs
  (`pick_pair`); rejected prompts carry a mark in the prompt box and stale pairs one in the pair
  box, and a rejected prompt's pair gets a notice (`rejection_notice`).
- Continuation checks (Review, Behaviour): `review_check` reads one prompt's check for a model
  pair, `show_continuation_check` draws it; `behaviour_settings` gives the thresholds it uses.

No SQL here: reads go through emc.store, one short-lived connection per call.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import pandas as pd
import streamlit as st

from emc.behaviour.summary import prompt_verdicts
from emc.config import (
    BehaviourConfig,
    ConfigError,
    default_config_path,
    load_config,
    resolve_data_dir,
)
from emc.pivotal.prompts import PromptRecord
from emc.store import Store
from emc.store.behaviour import continuation_checks, prompt_continuations
from emc.store.graph_pairs import GraphPair
from emc.store.prompts import get_prompts

REJECTED_MARK = "⛔ rejected"
STALE_MARK = "⚠️ stale"
ROLES = ("base", "adapted")
SAMPLES_PER_MODEL = 3


# Pages and links

_PAGES: dict[str, Any] = {}  # url path -> st.Page, filled by app.py


def register_pages(pages: Mapping[str, Any]) -> None:
    """Make the app's pages known to `link` (a page drawn alone in a test has none)."""
    _PAGES.clear()
    _PAGES.update(pages)


def page_url(page: str, **params: Any) -> str:
    """The shareable, relative URL of `page` with `params` (None values left out)."""
    query = urlencode({k: str(v) for k, v in params.items() if v is not None})
    return f"/{page}" + (f"?{query}" if query else "")


def link(page: str, label: str, **params: Any) -> None:
    """A link to another page of the app with query parameters; it opens in the same tab.

    Without the app's navigation (a page drawn alone), a plain markdown link to the same URL."""
    target = _PAGES.get(page)
    params = {k: str(v) for k, v in params.items() if v is not None}
    if target is None:
        st.markdown(f"[{label}]({page_url(page, **params)})")
    else:
        st.page_link(target, label=label, query_params=params)


def query_value(name: str) -> str | None:
    """A query parameter of the page's URL, or None."""
    value = st.query_params.get(name)
    return value if value else None


def keep_in_url(**params: Any) -> None:
    """Write the page's current selection into its URL (None removes a parameter), so the
    address bar always holds a link to what is on screen."""
    for name, value in params.items():
        if value is None:
            st.query_params.pop(name, None)
        elif st.query_params.get(name) != str(value):
            st.query_params[name] = str(value)


def current_store() -> Store:
    # A new Store per script run: connections are opened per query and never cached, so the
    # dashboard never holds the DuckDB lock while a flow wants to write.
    return Store.in_data_dir(resolve_data_dir(os.environ.get("EMC_DATA_DIR")))


def existing_store(hint: str) -> Store:
    """The store, or a note that there is none yet (with `hint`: what makes one) and a stop."""
    store = current_store()
    if not store.exists():
        st.info(f"No store yet at `{store.path}`. {hint}")
        st.stop()
    return store


# Graph pairs


def prompts_of(store: Store, pairs: Sequence[GraphPair]) -> dict[str, PromptRecord]:
    ids = list(dict.fromkeys(p.prompt_id for p in pairs))
    return {p.prompt_id: p for p in get_prompts(store, ids)}


def prompt_label(
    prompt_id: str, prompts: Mapping[str, PromptRecord], rejected: Sequence[str] = ()
) -> str:
    """The prompt's name and id, marked when a person rejected it (ids in `rejected`)."""
    prompt = prompts.get(prompt_id)
    label = f"{prompt.name} · {prompt_id}" if prompt else prompt_id
    return f"{label} · {REJECTED_MARK}" if prompt_id in rejected else label


def pair_key(pair: GraphPair) -> str:
    return f"{pair.base_graph_id}/{pair.adapted_graph_id}"


def pair_label(pair: GraphPair) -> str:
    label = f"{pair.targets} targets · {pair.base_model_id} → {pair.adapted_model_id}"
    return f"{label} · {STALE_MARK}" if pair.stale else label


def rejection_notice(pair: GraphPair) -> str | None:
    """What to say above a rejected prompt's graphs: who rejected it and why."""
    if not pair.rejected:
        return None
    return f"Rejected prompt: {pair.rejection_badge}. Its graphs count in no ranking or summary."


def pick_pair(store: Store, pairs: list[GraphPair], prompt_col, pair_col, key: str) -> GraphPair:
    """A prompt box and, for the chosen prompt, a box of its pairs (target modes, adapters).

    `key` prefixes the widget keys, so each page keeps its own choice.
    """
    prompts = prompts_of(store, pairs)
    rejected = {p.prompt_id for p in pairs if p.rejected}
    prompt_id = prompt_col.selectbox(
        "Prompt",
        list(dict.fromkeys(p.prompt_id for p in pairs)),
        format_func=lambda pid: prompt_label(pid, prompts, rejected),
        key=f"{key}-prompt",
    )
    choices = {pair_key(p): p for p in pairs if p.prompt_id == prompt_id}
    chosen = pair_col.selectbox(
        f"Graph pair ({len(choices)} for this prompt)",
        list(choices),
        format_func=lambda k: pair_label(choices[k]),
        key=f"{key}-pair-{prompt_id}",
    )
    return choices[chosen]


# Continuation checks


def behaviour_settings(store: Store) -> tuple[BehaviourConfig, str | None]:
    """The behaviour thresholds from the data directory's config, else the defaults (and why)."""
    path = default_config_path(store.path.parent)
    if not path.is_file():
        return BehaviourConfig(), None
    try:
        return load_config(path).behaviour, None
    except ConfigError as exc:
        return BehaviourConfig(), f"default thresholds: {path} is not a valid config ({exc})"


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


# Graphs/Review helpers

_WRITTEN_KEY = "url-written-{page}-{name}"


def follow_url(page: str, name: str, key: str, options: Sequence[str]) -> bool:
    """Set session state `key` (a widget's, before the widget is drawn) from the URL's `name`.

    The URL wins when it holds one of `options` that `page` did not write there itself (a link
    followed or a shared URL opened), or when `key` holds nothing yet (a visit to another page
    drops a widget's state); otherwise the widget keeps what the person chose. Returns whether the
    URL set it. Pair with `write_url`, which records what the page wrote.
    """
    value = query_value(name)
    if value is None or value not in options:
        return False
    written = st.session_state.get(_WRITTEN_KEY.format(page=page, name=name))
    if key in st.session_state and value == written:
        return False
    st.session_state[key] = value
    return True


def write_url(page: str, **params: Any) -> None:
    """`keep_in_url`, remembering what `page` wrote so `follow_url` tells it from a new link."""
    keep_in_url(**params)
    for name, value in params.items():
        st.session_state[_WRITTEN_KEY.format(page=page, name=name)] = (
            None if value is None else str(value)
        )


def pick_pair_in_url(
    store: Store, pairs: list[GraphPair], prompt_col, pair_col, key: str, page: str
) -> GraphPair:
    """`pick_pair`, preselected from the URL's `prompt` (and `pair`: `pair_key`) and written back
    to it, so the page's URL always names the pair on screen."""
    follow_url(page, "prompt", f"{key}-prompt", [p.prompt_id for p in pairs])
    prompt_id = st.session_state.get(f"{key}-prompt")
    if prompt_id is not None:
        own = [pair_key(p) for p in pairs if p.prompt_id == prompt_id]
        follow_url(page, "pair", f"{key}-pair-{prompt_id}", own)
    pair = pick_pair(store, pairs, prompt_col, pair_col, key)
    write_url(page, prompt=pair.prompt_id, pair=pair_key(pair))
    return pair
