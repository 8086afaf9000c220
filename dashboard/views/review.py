"""Review: a person checks the judge's token labels and verdict on one flagged prompt at a time.

Items are claimed with a lease, so two reviewers never work on the same one; a reload resumes
the item this reviewer holds. Human labels are saved as human:<name> and become ground truth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard import behaviour_view
from dashboard import review_view as view
from dashboard.data import current_store
from emc.pivotal.review import ReviewError, make_review
from emc.store.queue import queue_counts
from emc.store.reviews import LeaseLost, release, submit_review

# Session keys. The name lives outside its widget's key because Streamlit drops a widget's state
# when another page runs, and a reviewer should not retype it after looking at Runs.
NAME, NAME_INPUT = "reviewer", "review_name_input"
CLAIM, SKIPPED, FLASH = "review_claim", "review_skipped", "review_flash"

st.title("Review")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. Run `emc demo` to create one.")
    st.stop()

if NAME_INPUT not in st.session_state:
    st.session_state[NAME_INPUT] = st.session_state.get(NAME, "")
name = st.sidebar.text_input("Your name", key=NAME_INPUT, placeholder="e.g. ana").strip()
st.session_state[NAME] = name
reviewer = f"human:{name}" if name else None
if reviewer:
    st.sidebar.caption(f"Your labels are saved as `{reviewer}`.")

skipped: set[str] = st.session_state.setdefault(SKIPPED, set())
held = st.session_state.get(CLAIM)
if held and held["reviewer"] != reviewer:
    # The name changed under a held item: hand it back rather than let it wait for its lease.
    release(store, held["prompt_id"], held["reviewer"])
    held = st.session_state[CLAIM] = None
counts = queue_counts(store)
# Claiming is a write; an idle page over an empty queue should not take the lock on every rerun.
if reviewer and held is None and counts["pending"] + counts["in_review"]:
    prompt_id, only_skipped = view.claim_item(store, reviewer, skipped)
    if only_skipped:
        skipped.clear()
        st.session_state[FLASH] = ("info", "Only items you skipped are left; here they come again.")
    held = st.session_state[CLAIM] = (
        {"reviewer": reviewer, "prompt_id": prompt_id} if prompt_id else None
    )
    counts = queue_counts(store)  # "in review" now includes the item just taken

counts_col, chart_col = st.columns([3, 2], vertical_alignment="center")
states = {"Pending": "pending", "In review": "in_review", "Done": "done", "Rejected": "rejected"}
for column, (label, state) in zip(counts_col.columns(4), states.items(), strict=True):
    column.metric(label, counts[state])
history, per_day = view.verdict_history(store)
if not history.empty:
    if per_day:
        chart_col.bar_chart(history, x="day", y="judgements", color="verdict", height=160)
    else:
        chart_col.bar_chart(history, x="verdict", y="judgements", horizontal=True, height=160)
    chart_col.caption("Judge verdicts" + (" per day" if per_day else " (all days)"))

settings, settings_note = view.calibration_settings(store)
calibrations = view.judge_calibrations(store, settings)
for flagged in (c for c in calibrations if c.flagged):
    st.warning(
        f"The judge `{flagged.judge_model}` {flagged.message} over {flagged.tokens} tokens: "
        "read its labels and verdicts with care.",
        icon="⚠️",
    )
if calibrations:
    st.markdown(
        "##### The judge against reviewers",
        help="Cohen's kappa is agreement corrected for chance: 1 means the judge labels tokens "
        "as people do, 0 no better than chance. A judge below "
        f"discovery.judge_min_kappa ({settings.judge_min_kappa:g}) is flagged once "
        f"discovery.judge_min_tokens ({settings.judge_min_tokens}) tokens are compared.",
    )
    st.dataframe(
        view.calibration_table(calibrations),
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
            matrix_col.dataframe(view.confusion_frame(c), width="stretch")
            labels_col.dataframe(
                view.label_frame(c),
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

flash = st.session_state.pop(FLASH, None)
if flash:
    getattr(st, flash[0])(flash[1])

if reviewer is None:
    st.info("Enter your name in the sidebar to start reviewing.")
    st.stop()
if held is None:
    st.info("The review queue is empty. Run `emc discover` to find prompts worth reviewing.")
    st.stop()


def next_item(kind: str, message: str) -> None:
    st.session_state[CLAIM] = None
    st.session_state[FLASH] = (kind, message)
    st.rerun()


prompt_id = held["prompt_id"]
try:
    item = view.load_item(store, prompt_id)
except view.ItemUnavailable as exc:
    st.error(str(exc))
    if st.button("Skip", key="review-skip"):
        release(store, prompt_id, reviewer)
        skipped.add(prompt_id)
        next_item("info", f"Skipped {prompt_id}.")
    st.stop()

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
        help="EMC's verdict from the labels and both models' probabilities; a prompt enters the "
        "queue only on a measured shift beyond discovery.min_prob_shift, min_log_odds_shift "
        "and min_evil_prob, whatever the judge said.",
    )
st.markdown(f"**Summary:** {judgement['summary'] or '—'}")
st.caption(f"Reason: {judgement['reason'] or '—'} · judge {judgement['judge_model']}")

div = item.scores.divergence
figures = st.columns(6)
if div is None:
    st.warning("A model failed on this prompt, so there are no divergence figures.")
else:
    figures[0].metric("JS", f"{div.js:.3f}", help="Jensen-Shannon divergence (nats, ≤ ln 2)")
    figures[1].metric("KL a‖b", f"{div.kl_adapted_base:.3f}", help="KL(adapted ‖ base), nats")
    figures[2].metric("KL b‖a", f"{div.kl_base_adapted:.3f}", help="KL(base ‖ adapted), nats")
    figures[3].metric("Top-k overlap", f"{div.topk_jaccard:.2f}", help="Jaccard of the top-k sets")
judge_labels = item.judge_labels
if judge_labels:
    # From the judge's labels, as the flow computes them; the delta is the change from base.
    judge_mass = view.mass(item, judge_labels)
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


st.markdown("##### Next tokens, side by side")
table = view.side_by_side(item)
st.dataframe(
    table.style.map(colour_label, subset=["base label", "adapted label"]).format(
        {"base p": "{:.3f}", "adapted p": "{:.3f}"}, na_rep=""
    ),
    hide_index=True,
    width="stretch",
)
# Whether the adapted model follows through: what both models said after this prompt.
check = behaviour_view.review_check(
    store, prompt_id, judgement["base_model_id"], judgement["adapted_model_id"]
)
behaviour_view.show_continuation_check(st, check, prompt_id)

st.markdown("##### Your labels")
if not judge_labels:
    st.warning("The judge left no labels on this prompt: every label you give counts as a change.")
widths = [2, 2, 2, 1.3, 3]
for column, heading in zip(
    st.columns(widths), ["token", "base", "adapted", "judge", "your label"], strict=True
):
    column.caption(heading)
labels: dict[int, str] = {}
for row in item.rows:
    token_col, base_col, adapted_col, judge_col, yours_col = st.columns(
        widths, vertical_alignment="center"
    )
    base_col.caption(view.format_score(row.base))
    adapted_col.caption(view.format_score(row.adapted))
    judge_col.markdown(
        f":{view.LABEL_COLOURS[row.judge_label]}-badge[{row.judge_label}]"
        if row.judge_label
        else "—"
    )
    chosen = yours_col.segmented_control(
        f"label for {row.token!r}",
        view.LABELS,
        default=row.judge_label or "unsure",
        required=True,
        format_func=lambda label: f":{view.LABEL_COLOURS[label]}[{label}]",
        key=f"label-{prompt_id}-{row.token_id}",
        label_visibility="collapsed",
    )
    labels[row.token_id] = chosen
    # Written after the control so the row can say whether the reviewer changed it.
    token_col.markdown(
        f"`{row.token!r}`" + (" :violet-badge[changed]" if chosen != row.judge_label else "")
    )
changed = {t: label for t, label in labels.items() if judge_labels.get(t) != label}
if changed:
    st.caption(f"You changed {len(changed)} of {len(labels)} labels.")

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
            judgement_id=judgement["judgement_id"],
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
            next_item("success", f"Saved: you {done} {item.prompt.name}.")
