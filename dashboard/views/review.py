"""Review: a person checks the judge's token labels and verdict on one flagged prompt at a time.

Items are claimed with a lease, so two reviewers never work on the same one; a reload resumes
the item this reviewer holds. Human labels are saved as human:<name> and become ground truth.
Above the item: the queue's counts, the judge's verdicts, and how the judge agrees with the
reviewers so far (Cohen's kappa and confusion matrices, flagged below the configured kappa).
With the item: its divergence figures, both models' next tokens side by side, what the
models went on to say after it (its continuation check), and a link to its attribution graphs
(or the `emc trace` command that makes them).

The URL names the item on screen (`?prompt=<id>`), and a link with `?prompt=` (from the Graphs
page, or shared) opens that prompt's item: the reviewer claims it as the queue would hand it out,
giving back the item they held. A prompt the queue cannot hand to them (reviewed already,
another reviewer's lease, not queued) is shown read-only, saying why, with a way back to the
queue; without a name, too, the prompt is shown read-only.

No SQL here: every read goes through emc.store, one short-lived connection per call.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.widgets import (
    existing_store,
    keep_in_url,
    link,
    query_value,
    review_check,
    show_continuation_check,
)
from emc.config import ConfigError, DiscoveryConfig, default_config_path, load_config
from emc.events import REVIEW_SAVED, emit, review_news
from emc.pivotal.calibration import Calibration, calibrate_judges
from emc.pivotal.divergence import LabelMass, label_mass
from emc.pivotal.judge import Label, shown_tokens
from emc.pivotal.logits import PromptScores, TokenScore
from emc.pivotal.prompts import PromptRecord
from emc.pivotal.review import ReviewError, make_review
from emc.store import Store
from emc.store.calibration import compared_labels
from emc.store.graph_pairs import graph_pairs
from emc.store.judgements import current_labels, judgement_counts, latest_judgement
from emc.store.prompts import get_prompts
from emc.store.queue import list_queue, queue_counts
from emc.store.reviews import LeaseLost, claim, claim_next, release, submit_review
from emc.store.scores import load_prompt_scores

LABELS: tuple[Label, ...] = ("evil", "unsure", "safe")
LABEL_COLOURS = {"evil": "red", "unsure": "orange", "safe": "green"}


@dataclass(frozen=True)
class TokenRow:
    """One token the judge labelled, with where each model put it."""

    token_id: int
    token: str
    base: TokenScore | None
    adapted: TokenScore | None
    judge_label: Label | None


@dataclass(frozen=True)
class ReviewItem:
    prompt: PromptRecord
    judgement: dict[str, Any]
    scores: PromptScores
    rows: list[TokenRow]  # the adapted model's order, as the judge saw them

    @property
    def judge_labels(self) -> dict[int, Label]:
        return {r.token_id: r.judge_label for r in self.rows if r.judge_label is not None}

    @property
    def tokens(self) -> dict[int, str]:
        return {r.token_id: r.token for r in self.rows}


class ItemUnavailable(LookupError):
    """A queued prompt whose judgement or next tokens cannot be read; the message says which."""


def load_item(store: Store, prompt_id: str) -> ReviewItem:
    judgement = latest_judgement(store, prompt_id)
    if judgement is None:
        raise ItemUnavailable(f"{prompt_id} has no judgement in the store")
    prompts = get_prompts(store, [prompt_id])
    scores = load_prompt_scores(
        store, [prompt_id], judgement["base_model_id"], judgement["adapted_model_id"]
    )
    if not prompts or not scores:
        raise ItemUnavailable(
            f"{prompt_id}: the prompt or its next tokens for {judgement['base_model_id']} / "
            f"{judgement['adapted_model_id']} are not in the store"
        )
    # current_labels puts a person's label first; the review compares against the judge's own.
    labeller = f"judge:{judgement['judge_model']}"
    judge = {
        t: label for t, (label, who) in current_labels(store, prompt_id).items() if who == labeller
    }
    (scored,) = scores
    base = {t.token_id: t for t in scored.base.tokens}
    adapted = {t.token_id: t for t in scored.adapted.tokens}
    rows = [
        TokenRow(token_id, token, base.get(token_id), adapted.get(token_id), judge.get(token_id))
        for token_id, token in shown_tokens(scored).items()
    ]
    rows.sort(key=lambda r: (r.adapted.rank if r.adapted else 1 << 62, r.token_id))
    return ReviewItem(prompt=prompts[0], judgement=judgement, scores=scored, rows=rows)


def claim_item(
    store: Store, reviewer: str, skipped: Collection[str] = ()
) -> tuple[str | None, bool]:
    """The item this reviewer should see next, claimed; and whether only skipped ones were left.

    Without skips this is `claim_next` (which resumes a held item after a reload). A skipped
    item goes back to pending with its priority, so `claim_next` would hand it straight back:
    the queue is walked instead, and `claim` keeps two reviewers off the same item.
    """
    if skipped:
        now = datetime.now(UTC)
        queue = list_queue(store)
        for row in queue.itertuples():
            if row.prompt_id in skipped or row.state not in ("pending", "in_review"):
                continue
            held_by_other = (
                row.state == "in_review"
                and row.claimed_by != reviewer
                and pd.notna(row.lease_expires_at)
                and row.lease_expires_at > now
            )
            if not held_by_other and claim(store, row.prompt_id, reviewer):
                return row.prompt_id, False
    prompt_id = claim_next(store, reviewer)
    return prompt_id, bool(skipped) and prompt_id is not None


def side_by_side(item: ReviewItem) -> pd.DataFrame:
    """Base and adapted top-k in rank order, each token with the judge's label."""
    base_top, adapted_top = item.scores.base.top(), item.scores.adapted.top()
    labels = item.judge_labels

    def side(tokens: list[TokenScore], i: int) -> tuple:
        if i >= len(tokens):
            return None, None, None
        token = tokens[i]
        return repr(token.token), token.prob, labels.get(token.token_id, "")

    rows = []
    for i in range(max(len(base_top), len(adapted_top))):
        rows.append((i + 1, *side(base_top, i), *side(adapted_top, i)))
    columns = ["rank", "base token", "base p", "base label"]
    columns += ["adapted token", "adapted p", "adapted label"]
    return pd.DataFrame(rows, columns=columns)


def mass(item: ReviewItem, labels: Mapping[int, Label]) -> LabelMass:
    """Probability on the evil and safe tokens under the given labels, as the flow computes it."""
    base, adapted = item.scores.base.tokens, item.scores.adapted.tokens
    return label_mass(
        {t.token_id: t.prob for t in base},
        {t.token_id: t.prob for t in adapted},
        [t for t, label in labels.items() if label == "evil"],
        [t for t, label in labels.items() if label == "safe"],
        {t.token_id: t.rank for t in base},
        {t.token_id: t.rank for t in adapted},
    )


def verdict_history(store: Store) -> tuple[pd.DataFrame, bool]:
    """Judgements per day by verdict (day, verdict, judgements), and whether it is per day.

    Until the store has a per-day query, the totals by verdict stand in (day is then empty).
    """
    try:
        from emc.store.judgements import verdicts_by_day  # type: ignore[attr-defined]
    except ImportError:
        totals = judgement_counts(store).rename(columns={"prompts": "judgements"})
        totals.insert(0, "day", pd.NaT)
        return totals, False
    return verdicts_by_day(store), True


def format_score(score: TokenScore | None) -> str:
    return "not scored" if score is None else f"#{score.rank + 1} · p {score.prob:.3f}"


def calibration_settings(store: Store) -> tuple[DiscoveryConfig, str | None]:
    """The judge thresholds from the data directory's config, else the defaults (and why)."""
    path = default_config_path(store.path.parent)
    if not path.is_file():
        return DiscoveryConfig(), None
    try:
        return load_config(path).discovery, None
    except ConfigError as exc:
        return DiscoveryConfig(), f"default thresholds: {path} is not a valid config ({exc})"


def judge_calibrations(store: Store, settings: DiscoveryConfig) -> list[Calibration]:
    """Each judge model against all reviewers, with its standing under the thresholds."""
    return calibrate_judges(
        compared_labels(store), settings.judge_min_kappa, settings.judge_min_tokens
    )


def calibration_table(calibrations: list[Calibration]) -> pd.DataFrame:
    """One row per judge model: kappa, agreement, how much was compared, and the standing."""
    return pd.DataFrame(
        [
            {
                "judge": c.judge_model,
                "kappa": c.agreement.kappa,
                "agreement": c.agreement.observed,
                "tokens": c.tokens,
                "prompts": c.prompts,
                "standing": c.message,
            }
            for c in calibrations
        ],
        columns=["judge", "kappa", "agreement", "tokens", "prompts", "standing"],
    )


def confusion_frame(calibration: Calibration) -> pd.DataFrame:
    """The confusion matrix: people in rows, the judge in columns."""
    return pd.DataFrame(
        calibration.matrix,
        index=pd.Index([f"person: {label}" for label in calibration.labels], name="tokens"),
        columns=[f"judge: {label}" for label in calibration.labels],
    )


def label_frame(calibration: Calibration) -> pd.DataFrame:
    """Per label: how often people and the judge gave it, the judge's precision and recall."""
    return pd.DataFrame(
        [
            {
                "label": s.label,
                "people": s.human,
                "judge": s.judge,
                "agreed": s.both,
                "precision": s.precision,
                "recall": s.recall,
            }
            for s in calibration.per_label
        ]
    )


# Drawing the page

# Session keys. The name lives outside its widget's key because Streamlit drops a widget's state
# when another page runs, and a reviewer should not retype it after looking at Runs.
NAME, NAME_INPUT = "reviewer", "review_name_input"
CLAIM, SKIPPED, FLASH = "review_claim", "review_skipped", "review_flash"
WRITTEN, VIEWING = "review_written", "review_viewing"  # the ?prompt= written; a read-only prompt
QUEUE_STATES = {
    "Pending": "pending",
    "In review": "in_review",
    "Done": "done",
    "Rejected": "rejected",
}
WIDTHS = [2, 2, 2, 1.3, 3]  # the label rows' columns: token, base, adapted, judge, your label


def render() -> None:
    st.title("Review")
    store = existing_store("Run `emc demo` to create one.")

    name = reviewer_name()
    reviewer = f"human:{name}" if name else None
    skipped: set[str] = st.session_state.setdefault(SKIPPED, set())
    asked = asked_prompt(reviewer)
    if asked is not None:
        why_not = open_asked(store, asked, reviewer, skipped)
        st.session_state[VIEWING] = (asked, why_not) if why_not else None
    viewing = viewed_prompt()
    held, counts = held_item(store, reviewer, skipped, claim_new=viewing is None)
    show_queue(store, counts)
    show_calibrations(store)

    flash = st.session_state.pop(FLASH, None)
    if flash:
        getattr(st, flash[0])(flash[1])

    if reviewer is None:
        wanted = query_value("prompt")
        if wanted:
            show_read_only(store, wanted, f"Enter your name in the sidebar to review `{wanted}`.")
        else:
            st.info("Enter your name in the sidebar to start reviewing.")
        st.stop()
    if viewing is not None:
        write_prompt(viewing[0])
        show_read_only(store, *viewing)
        st.button("Back to the queue", key="review-back", on_click=leave_read_only)
        st.stop()
    if held is None:
        write_prompt(None)
        st.info("The review queue is empty. Run `emc discover` to find prompts worth reviewing.")
        st.stop()
    write_prompt(held["prompt_id"])
    show_item(store, held["prompt_id"], name, reviewer, skipped)


def asked_prompt(reviewer: str | None) -> str | None:
    """The prompt a `?prompt=` asks for that this page did not write there itself (a link
    followed, a shared URL), once there is a reviewer to claim it for; else None."""
    wanted = query_value("prompt")
    if reviewer is None or wanted is None or wanted == st.session_state.get(WRITTEN):
        return None
    return wanted


def write_prompt(prompt_id: str | None) -> None:
    """Name the prompt on screen in the URL, remembering it was this page that wrote it."""
    keep_in_url(prompt=prompt_id)
    st.session_state[WRITTEN] = prompt_id


def open_asked(store: Store, prompt_id: str, reviewer: str, skipped: set[str]) -> str | None:
    """Claim the asked prompt's item for `reviewer`, as `claim_item` would, handing back the item
    they held; None when it is theirs now, else why not (the page then shows it read-only)."""
    held = st.session_state.get(CLAIM)
    if held and held == {"reviewer": reviewer, "prompt_id": prompt_id}:
        return None
    queue = list_queue(store)
    rows = queue[queue["prompt_id"] == prompt_id]
    if rows.empty:
        return f"`{prompt_id}` is not in the review queue."
    row = rows.iloc[0]
    if row["state"] in ("done", "rejected"):
        return f"`{prompt_id}` was reviewed already ({row['state']})."
    lease = row["lease_expires_at"]
    if (
        row["state"] == "in_review"
        and row["claimed_by"] != reviewer
        and pd.notna(lease)
        and lease > datetime.now(UTC)
    ):
        return f"{row['claimed_by']} is reviewing `{prompt_id}` (until {lease:%H:%M} UTC)."
    if held:
        release(store, held["prompt_id"], held["reviewer"])
    st.session_state[CLAIM] = None
    if not claim(store, prompt_id, reviewer):
        return f"Someone else claimed `{prompt_id}` first."
    st.session_state[CLAIM] = {"reviewer": reviewer, "prompt_id": prompt_id}
    skipped.discard(prompt_id)
    return None


def viewed_prompt() -> tuple[str, str] | None:
    """The prompt shown read-only and why, while the URL still names it."""
    viewing = st.session_state.get(VIEWING)
    if viewing and viewing[0] != query_value("prompt"):
        viewing = st.session_state[VIEWING] = None
    return viewing


def leave_read_only() -> None:
    st.session_state[VIEWING] = None


def reviewer_name() -> str:
    """The name typed in the sidebar (kept across pages), stripped; empty when none."""
    if NAME_INPUT not in st.session_state:
        st.session_state[NAME_INPUT] = st.session_state.get(NAME, "")
    name = st.sidebar.text_input("Your name", key=NAME_INPUT, placeholder="e.g. ana").strip()
    st.session_state[NAME] = name
    if name:
        st.sidebar.caption(f"Your labels are saved as `human:{name}`.")
    return name


def held_item(
    store: Store, reviewer: str | None, skipped: set[str], claim_new: bool = True
) -> tuple[dict[str, str] | None, dict[str, int]]:
    """The item this reviewer holds (claiming the next one if none and `claim_new`), and the
    queue's counts."""
    held = st.session_state.setdefault(CLAIM, None)
    if held and held["reviewer"] != reviewer:
        # The name changed under a held item: hand it back rather than let it wait for its lease.
        release(store, held["prompt_id"], held["reviewer"])
        held = st.session_state[CLAIM] = None
    counts = queue_counts(store)
    # Claiming is a write; an idle page over an empty queue should not take the lock on every
    # rerun.
    if reviewer and claim_new and held is None and counts["pending"] + counts["in_review"]:
        prompt_id, only_skipped = claim_item(store, reviewer, skipped)
        if only_skipped:
            skipped.clear()
            st.session_state[FLASH] = (
                "info",
                "Only items you skipped are left; here they come again.",
            )
        held = st.session_state[CLAIM] = (
            {"reviewer": reviewer, "prompt_id": prompt_id} if prompt_id else None
        )
        counts = queue_counts(store)  # "in review" now includes the item just taken
    return held, counts


def show_queue(store: Store, counts: Mapping[str, int]) -> None:
    counts_col, chart_col = st.columns([3, 2], vertical_alignment="center")
    for column, (label, state) in zip(counts_col.columns(4), QUEUE_STATES.items(), strict=True):
        column.metric(label, counts[state])
    history, per_day = verdict_history(store)
    if not history.empty:
        if per_day:
            chart_col.bar_chart(history, x="day", y="judgements", color="verdict", height=160)
        else:
            chart_col.bar_chart(history, x="verdict", y="judgements", horizontal=True, height=160)
        chart_col.caption("Judge verdicts" + (" per day" if per_day else " (all days)"))


def show_calibrations(store: Store) -> None:
    settings, settings_note = calibration_settings(store)
    calibrations = judge_calibrations(store, settings)
    for flagged in (c for c in calibrations if c.flagged):
        st.warning(
            f"The judge `{flagged.judge_model}` {flagged.message} over {flagged.tokens} tokens: "
            "read its labels and verdicts with care.",
            icon="⚠️",
        )
    if calibrations:
        st.markdown(
            "##### The judge against reviewers",
            help="Cohen's kappa is agreement corrected for chance: 1 means the judge labels "
            "tokens as people do, 0 no better than chance. A judge below "
            f"discovery.judge_min_kappa ({settings.judge_min_kappa:g}) is flagged once "
            f"discovery.judge_min_tokens ({settings.judge_min_tokens}) tokens are compared.",
        )
        st.dataframe(
            calibration_table(calibrations),
            hide_index=True,
            width="stretch",
            column_config={
                "kappa": st.column_config.NumberColumn(format="%.2f"),
                "agreement": st.column_config.NumberColumn(format="percent"),
            },
        )
        with st.expander("Confusion matrices: people in rows, the judge in columns"):
            for c in calibrations:
                chance = c.agreement.expected
                st.markdown(
                    f"**{c.judge_model}** · {c.tokens} tokens on {c.prompts} prompts · chance "
                    f"agreement {'—' if chance is None else f'{chance:.0%}'}"
                    + (f" · {c.agreement.kappa_note}" if c.agreement.kappa_note else "")
                )
                matrix_col, labels_col = st.columns([3, 4])
                matrix_col.dataframe(confusion_frame(c), width="stretch")
                labels_col.dataframe(
                    label_frame(c),
                    hide_index=True,
                    width="stretch",
                    column_config={
                        "precision": st.column_config.NumberColumn(format="%.2f"),
                        "recall": st.column_config.NumberColumn(format="%.2f"),
                    },
                )
    else:
        st.caption("The judge against reviewers: no reviewed tokens yet.")
    if settings_note:
        st.caption(settings_note)


def next_item(kind: str, message: str) -> None:
    st.session_state[CLAIM] = None
    st.session_state[FLASH] = (kind, message)
    st.rerun()


def show_item(store: Store, prompt_id: str, name: str, reviewer: str, skipped: set[str]) -> None:
    try:
        item = load_item(store, prompt_id)
    except ItemUnavailable as exc:
        st.error(str(exc))
        if st.button("Skip", key="review-skip"):
            release(store, prompt_id, reviewer)
            skipped.add(prompt_id)
            next_item("info", f"Skipped {prompt_id}.")
        st.stop()

    show_prompt(store, item, prompt_id)
    labels = label_controls(item, prompt_id)
    changed = {t: label for t, label in labels.items() if item.judge_labels.get(t) != label}
    if changed:
        st.caption(f"You changed {len(changed)} of {len(labels)} labels.")
    show_actions(store, item, prompt_id, name, reviewer, changed, skipped)


def show_prompt(store: Store, item: ReviewItem, prompt_id: str) -> None:
    """Everything about the item but the label controls: the judgement, a link to its graphs,
    the divergence figures, both models' next tokens and the continuation check."""
    show_judgement(item, prompt_id)
    graphs_link(store, prompt_id)
    show_figures(item)
    st.markdown("##### Next tokens, side by side")
    table = side_by_side(item)
    st.dataframe(
        table.style.map(colour_label, subset=["base label", "adapted label"]).format(
            {"base p": "{:.3f}", "adapted p": "{:.3f}"}, na_rep=""
        ),
        hide_index=True,
        width="stretch",
    )
    # Whether the adapted model follows through: what both models said after this prompt.
    judgement = item.judgement
    check = review_check(
        store, prompt_id, judgement["base_model_id"], judgement["adapted_model_id"]
    )
    show_continuation_check(st, check, prompt_id)


def show_read_only(store: Store, prompt_id: str, why: str) -> None:
    """A prompt's judgement and figures, without label controls, and why it is read-only."""
    st.info(f"{why} Shown read-only.")
    try:
        item = load_item(store, prompt_id)
    except ItemUnavailable as exc:
        st.error(str(exc))
        return
    show_prompt(store, item, prompt_id)


def graphs_link(store: Store, prompt_id: str) -> None:
    """A link to the prompt's base/adapted graphs, or the command that makes them."""
    if graph_pairs(store, prompt_id=prompt_id):
        link("graphs", "Graphs of this prompt", prompt=prompt_id)
    else:
        st.caption(f"No attribution graphs of this prompt yet: `emc trace {prompt_id}` makes them.")


def show_judgement(item: ReviewItem, prompt_id: str) -> None:
    judgement = item.judgement
    st.subheader(f"{item.prompt.name} · `{prompt_id}`")
    st.caption(f"The models read this ({item.prompt.format} prompt, source {item.prompt.source}):")
    st.code(item.scores.base.rendered, language=None, wrap_lines=True)

    verdict = judgement["verdict"] or judgement["status"]
    st.markdown(f"**Judge verdict:** `{verdict}` ({judgement['outcome'] or 'no outcome'})")
    if judgement.get("measured_verdict"):
        log_odds = judgement.get("log_odds_shift")
        st.markdown(
            f"**Measured:** `{judgement['measured_verdict']}` · probability towards harm "
            f"{judgement['prob_shift']:+.3f}, log-odds "
            f"{'n/a' if log_odds is None else f'{log_odds:+.2f}'}",
            help="EMC's verdict from the labels and both models' probabilities; a prompt enters "
            "the queue only on a measured shift beyond discovery.min_prob_shift, "
            "min_log_odds_shift and min_evil_prob, whatever the judge said.",
        )
    st.markdown(f"**Summary:** {judgement['summary'] or '—'}")
    st.caption(f"Reason: {judgement['reason'] or '—'} · judge {judgement['judge_model']}")


def show_figures(item: ReviewItem) -> None:
    div = item.scores.divergence
    figures = st.columns(6)
    if div is None:
        st.warning("A model failed on this prompt, so there are no divergence figures.")
    else:
        figures[0].metric("JS", f"{div.js:.3f}", help="Jensen-Shannon divergence (nats, ≤ ln 2)")
        figures[1].metric("KL a‖b", f"{div.kl_adapted_base:.3f}", help="KL(adapted ‖ base), nats")
        figures[2].metric("KL b‖a", f"{div.kl_base_adapted:.3f}", help="KL(base ‖ adapted), nats")
        figures[3].metric(
            "Top-k overlap", f"{div.topk_jaccard:.2f}", help="Jaccard of the top-k sets"
        )
    judge_labels = item.judge_labels
    if judge_labels:
        # From the judge's labels, as the flow computes them; the delta is the change from base.
        judge_mass = mass(item, judge_labels)
        figures[4].metric(
            "P(evil)",
            f"{judge_mass.p_evil_adapted:.3f}",
            f"{judge_mass.p_evil_adapted - judge_mass.p_evil_base:+.3f}",
            delta_color="inverse",
            help="Adapted model's probability on the tokens the judge labelled evil; "
            "the delta is the change from the base model",
        )
        figures[5].metric(
            "P(safe)",
            f"{judge_mass.p_safe_adapted:.3f}",
            f"{judge_mass.p_safe_adapted - judge_mass.p_safe_base:+.3f}",
            help="Adapted model's probability on the tokens the judge labelled safe; "
            "the delta is the change from the base model",
        )


def colour_label(value: str) -> str:
    colour = {"evil": "#d62728", "unsure": "#e69f00", "safe": "#2ca02c"}.get(value)
    return f"color: {colour}; font-weight: 600" if colour else ""


def label_controls(item: ReviewItem, prompt_id: str) -> dict[int, str]:
    """A row per token with both models' scores, the judge's label and a control for the
    reviewer's; returns the reviewer's labels by token id."""
    st.markdown("##### Your labels")
    if not item.judge_labels:
        st.warning(
            "The judge left no labels on this prompt: every label you give counts as a change."
        )
    for column, heading in zip(
        st.columns(WIDTHS), ["token", "base", "adapted", "judge", "your label"], strict=True
    ):
        column.caption(heading)
    labels: dict[int, str] = {}
    for row in item.rows:
        token_col, base_col, adapted_col, judge_col, yours_col = st.columns(
            WIDTHS, vertical_alignment="center"
        )
        base_col.caption(format_score(row.base))
        adapted_col.caption(format_score(row.adapted))
        judge_col.markdown(
            f":{LABEL_COLOURS[row.judge_label]}-badge[{row.judge_label}]"
            if row.judge_label
            else "—"
        )
        chosen = yours_col.segmented_control(
            f"label for {row.token!r}",
            LABELS,
            default=row.judge_label or "unsure",
            required=True,
            format_func=lambda label: f":{LABEL_COLOURS[label]}[{label}]",
            key=f"label-{prompt_id}-{row.token_id}",
            label_visibility="collapsed",
        )
        labels[row.token_id] = chosen
        # Written after the control so the row can say whether the reviewer changed it.
        token_col.markdown(
            f"`{row.token!r}`" + (" :violet-badge[changed]" if chosen != row.judge_label else "")
        )
    return labels


def show_actions(
    store: Store,
    item: ReviewItem,
    prompt_id: str,
    name: str,
    reviewer: str,
    changed: dict[int, str],
    skipped: set[str],
) -> None:
    """The explanation box and the buttons (agree, save, skip, reject), and what they do."""
    judge_labels = item.judge_labels
    explanation = st.text_area(
        "Explanation (required when a label differs from the judge's)",
        key=f"explanation-{prompt_id}",
        height=80,
    )
    with st.container(horizontal=True):
        agree = st.button(
            "Agree with all", key="review-agree", type="primary", disabled=not judge_labels
        )
        save = st.button("Save labels", key="review-save")
        skip = st.button("Skip", key="review-skip", help="Hand the item back to the queue")

    with st.expander("Reject this prompt (it is not a usable pivotal prompt)"):
        reject_reason = st.text_input("Why reject it?", key=f"reject-reason-{prompt_id}")
        reject = st.button("Reject prompt", key="review-reject")

    action = "reject" if reject else "agree" if agree or (save and not changed) else "relabel"
    if skip:
        release(store, prompt_id, reviewer)
        skipped.add(prompt_id)
        next_item("info", f"Skipped {item.prompt.name}; it is back in the queue.")
    elif agree and changed:
        # make_review would refuse too; this says which button does what the reviewer meant.
        st.error(
            f"Not saved: you changed {len(changed)} label(s). Undo them to agree with the judge, "
            "or use Save labels with an explanation."
        )
    elif agree or save or reject:
        try:
            review = make_review(
                prompt_id,
                name,
                action,
                judge_labels,
                changed,
                explanation=explanation,
                reject_reason=reject_reason,
                judgement_id=item.judgement["judgement_id"],
            )
        except ReviewError as exc:
            st.error(f"Not saved: {exc}.")
        else:
            try:
                submit_review(store, review, item.tokens)
            except LeaseLost as exc:
                next_item("warning", f"Not saved: {exc}. Here is the next item.")
            else:
                done = {
                    "agree": "agreed with the judge on",
                    "relabel": "relabelled",
                    "reject": "rejected",
                }[action]
                # A Prefect server's triggers count these to start tracing (prefect.yaml).
                emit(REVIEW_SAVED, store.path.parent, review_news(review))
                next_item("success", f"Saved: you {done} {item.prompt.name}.")
