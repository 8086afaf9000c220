"""Runs: every flow and CLI run, its status, code version, what it did and how runs relate.

- Each run's `summary` (what its flow or command stored) as one readable line, per run name
  (`summary_line`); the raw JSON stays in an expander.
- Parent and child runs: the pipeline runs the other flows as subflows, each with its own row;
  `runs.parent_run_id` ties them to the pipeline's. A run lists the runs it ran, and links to the
  run that ran it (`?run=<run_id>` selects a run).
- The Prefect run: a link into the Prefect UI when the environment names a server, else the flow
  run id and how to open the UI on the data directory's Prefect home.

No SQL here: reads go through emc.store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store, keep_in_url, link, query_value
from emc.store import RunRecord, Store, get_run, list_runs
from emc.store.runs import child_runs, run_parents

STATUSES = ["completed", "failed", "running"]
SELECTED = "runs-selected"
URL_SEEN = "runs-url-seen"  # the ?run= this page last wrote or followed
# Set by `configure_prefect` to the URL of the temporary per-process Prefect API a command starts
# (flows/slots.py LOCAL_API_ENV): that server is gone once the command ends, so never linked to.
LOCAL_API_ENV = "EMC_LOCAL_PREFECT_API"
PREFECT_UI_PORT = 4200
COLUMNS = [
    "run",
    "kind",
    "name",
    "status",
    "started",
    "seconds",
    "code",
    "summary",
    "error",
    "parent",
]


# Summary lines: one sentence per run, from what its flow or command stored in `summary`.


def summary_line(name: str, summary: Mapping[str, Any] | None) -> str:
    """A run's summary in one line: the run name's own wording, else its top-level scalars."""
    if not summary:
        return ""
    describe = SUMMARY_LINES.get(name)
    if describe is not None:
        try:
            line = describe(summary)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError):
            line = ""  # a summary of another shape (older EMC, a run still going): generic
        if line:
            return line
    return generic_line(summary)


def generic_line(summary: Mapping[str, Any]) -> str:
    """The summary's top-level scalar fields, `name value`, in stored order (run_id left out)."""
    parts = [
        f"{key} {_scalar(value)}"
        for key, value in summary.items()
        if key != "run_id" and (value is None or isinstance(value, str | int | float | bool))
    ]
    if parts:
        return ", ".join(parts)
    return f"{len(summary)} fields (see the raw JSON)"


def _scalar(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _counts(counts: Mapping[str, Any]) -> str:
    """`{"a": 3, "b": 1}` as "a 3, b 1"."""
    return ", ".join(f"{key} {value}" for key, value in counts.items())


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def discovery_line(s: Mapping[str, Any]) -> str:
    rounds = s.get("rounds")
    if rounds is None:  # still running: the progress stored after each round
        line = f"{s['rounds_generated']} rounds generated so far"
    else:
        total = {key: sum(r.get(key, 0) for r in rounds) for key in
                 ("added", "scored", "failed", "judged", "flagged")}  # fmt: skip
        line = (
            f"{_plural(len(rounds), 'round')}: {total['added']} prompts added, "
            f"{total['scored']} scored, {total['judged']} judged, {total['flagged']} flagged"
        )
        if total["failed"]:
            line += f" ({total['failed']} failed to score)"
        if s.get("verdicts"):
            line += f"; verdicts: {_counts(s['verdicts'])}"
        if s.get("queue"):
            line += f"; review queue: {_counts(s['queue'])}"
    if s.get("resumed_from"):
        line += f"; resumed from {s['resumed_from']}"
    return line


def tracing_line(s: Mapping[str, Any]) -> str:
    line = (
        f"{_plural(s['prompts'], 'prompt')}: {s['made']} graphs made, {s['failed']} failed; "
        f"all their graphs: {s['graphs_ok']} ok, {s['graphs_failed']} failed, "
        f"{s['mismatches']} with logits that differ from discovery"
    )
    if s.get("mean_replacement") is not None:
        line += f"; mean replacement score {s['mean_replacement']:.3f}"
    return line


def analysis_line(s: Mapping[str, Any]) -> str:
    line = (
        f"{_plural(s['prompts'], 'prompt')} with graph pairs: {s['measured']} measured, "
        f"{len(s['failed'])} failed"
    )
    if s.get("first_divergent_layer") is not None:
        line += f"; first divergent layer {s['first_divergent_layer']}"
    if s.get("ablation_top_change") is not None:
        line += (
            f"; zeroing the top features changes p(evil) by {s['ablation_top_change']:+.4f} "
            f"on {_plural(s['ablated_prompts'], 'prompt')}"
        )
        if s.get("ablation_control_change") is not None:
            line += f" (random control {s['ablation_control_change']:+.4f})"
    return line


def interventions_line(s: Mapping[str, Any]) -> str:
    done = f", {s['parts_done']} parts done" if "parts_done" in s else ""
    line = (
        f"{_plural(s['prompts'], 'prompt')}: {s['measured']} measured now{done}, "
        f"{len(s['failed'])} failed"
    )
    if s.get("explained") is not None:
        line += f"; the direct writes explain {s['explained']:.1%} of the shift"
    best = s.get("best_narrow")
    if best:
        line += (
            f"; best narrow intervention: {best['family']} {best['kind']} {best['target']} "
            f"removes {best['removed']:.1%}"
        )
        if best.get("control_removed") is not None:
            line += f" (control {best['control_removed']:.1%})"
    return line


def evaluation_line(s: Mapping[str, Any]) -> str:
    roles = {model_id: role for role, model_id in (s.get("models") or {}).items()}
    parts = []
    if "continuations" in s:
        c = s["continuations"]
        parts.append(
            f"continuation checks: {c['confirmed']} of {c['checked']} prompts confirmed "
            f"({c['samples_per_context']} samples per context)"
        )
    if "em" in s:
        rates = [r for r in s["em"]["rates"] if r["question_group"] == "all"]
        shown = ", ".join(
            f"{roles.get(r['model_id'], r['model_id'])} {r['em_rate']:.3f}" for r in rates
        )
        parts.append(f"EM rate (all questions): {shown or 'none counted'}")
    if "features" in s:
        parts.append(
            "response features: "
            + ", ".join(f"{role} {ranked['status']}" for role, ranked in s["features"].items())
        )
    if "generate" in s:
        g = s["generate"]
        parts.append(f"{g['new_samples']} new samples from {_plural(g['prompts'], 'prompt')}")
    line = "; ".join(parts)
    return f"{line} (judge {s['judge']})" if line and s.get("judge") else line


def feature_cards_line(s: Mapping[str, Any]) -> str:
    if not s["features"]:
        return "no features to card (no ranking yet)"
    line = (
        f"{_plural(len(s['features']), 'feature')} ({s['carded']} carded now, "
        f"{s['skipped']} before) over {s['corpus_id']} ({s['texts']} texts)"
    )
    if s.get("labeller"):
        line += f"; labels by {s['labeller']}: {s['labelled']} new"
        if s.get("label_failures"):
            line += f", {len(s['label_failures'])} failed"
    return line


def pipeline_line(s: Mapping[str, Any]) -> str:
    if s.get("stages"):
        line = "stages: " + ", ".join(s["stages"])
    elif s.get("discovery_run"):
        line = f"discovery done ({s['discovery_run']})"
    else:
        return ""
    if s.get("resumed_from"):
        line += f"; resumed from {s['resumed_from']}"
    return line


def model_check_line(s: Mapping[str, Any]) -> str:
    line = f"{_plural(s['probes'], 'probe')}, {s['failed']} failed"
    if s.get("failures"):
        line += f"; first failure: {s['failures'][0]}"
    return line


def organism_line(s: Mapping[str, Any]) -> str:
    return f"organism {s['recipe_hash']} " + ("reused" if s["reused"] else "built")


def prompt_import_line(s: Mapping[str, Any]) -> str:
    return f"{s['read']} prompts read, {s['added']} added, {s['problems']} problems"


def feature_label_line(s: Mapping[str, Any]) -> str:
    return f"feature {s['feature']} labelled by {s['labeller']}"


def import_line(s: Mapping[str, Any]) -> str:
    counts = ", ".join(
        f"{kind} {read} read, {new} new" for kind, (read, new, _skipped) in s["counts"].items()
    )
    return (
        f"imported from {s['root']}: {counts or 'nothing'}; {s['skipped']} skipped, "
        f"{s['warnings']} warnings"
    )


def eval_import_line(s: Mapping[str, Any]) -> str:
    return (
        f"{s['rows']} answers read, {s['new']} new, {s['rejected_count']} rejected "
        f"(judge {s['judge_model']})"
    )


# Run name -> its line (flows/*.py and the emc commands that record a run of their own).
SUMMARY_LINES: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "discovery": discovery_line,
    "tracing": tracing_line,
    "analysis": analysis_line,
    "interventions": interventions_line,
    "evaluation": evaluation_line,
    "feature-cards": feature_cards_line,
    "pipeline": pipeline_line,
    "model-check": model_check_line,
    "organism-build": organism_line,
    "prompt-import": prompt_import_line,
    "feature-label": feature_label_line,
    "import": import_line,
    "eval-import": eval_import_line,
}


# The table


def family_order(records: Sequence[RunRecord], parents: Mapping[str, str]) -> list[RunRecord]:
    """Newest first, each run's children right after it in the order they started (a child
    whose parent is not listed stands on its own)."""
    listed = {r.run_id for r in records}
    children: dict[str, list[RunRecord]] = {}
    for record in records:
        parent = parents.get(record.run_id)
        if parent in listed:
            children.setdefault(parent, []).append(record)
    ordered: list[RunRecord] = []

    def add(record: RunRecord) -> None:
        ordered.append(record)
        for child in sorted(children.get(record.run_id, []), key=lambda r: r.started_at):
            add(child)

    for record in records:
        if parents.get(record.run_id) not in listed:
            add(record)
    return ordered


def run_frame(
    records: Sequence[RunRecord], parents: Mapping[str, str] | None = None
) -> pd.DataFrame:
    """One row per run: id, kind, name, status, start, seconds taken, code version, summary
    line, error and parent run; children follow their parent (`family_order`)."""
    parents = parents or {}
    return pd.DataFrame(
        [
            {
                "run": r.run_id,
                "kind": r.kind,
                "name": r.name,
                "status": r.status,
                "started": r.started_at,
                "seconds": (
                    (r.finished_at - r.started_at).total_seconds() if r.finished_at else None
                ),
                "code": (r.code_revision or "?")[:8] + ("+dirty" if r.code_dirty else ""),
                "summary": summary_line(r.name, r.summary),
                "error": r.error or "",
                "parent": parents.get(r.run_id, ""),
            }
            for r in family_order(records, parents)
        ],
        columns=COLUMNS,
    )


# Prefect


def prefect_ui_url(environ: Mapping[str, str] | None = None) -> str | None:
    """The Prefect UI's base URL when the environment names a server: PREFECT_UI_URL, else
    PREFECT_API_URL without its /api (Prefect's own rule), unless that is a command's temporary
    API. None in ephemeral mode."""
    environ = os.environ if environ is None else environ
    ui = environ.get("PREFECT_UI_URL", "").strip()
    if ui:
        return ui.rstrip("/")
    api = environ.get("PREFECT_API_URL", "").strip().rstrip("/")
    if not api or api == environ.get(LOCAL_API_ENV, "").rstrip("/"):
        return None
    return api.removesuffix("/api")


def prefect_run_url(ui: str, flow_run_id: str) -> str:
    return f"{ui}/runs/flow-run/{flow_run_id}"


def prefect_hint(data_dir: Path, flow_run_id: str) -> str:
    """How to see a flow run in the Prefect UI when no server is configured, in one sentence."""
    return (
        f"Prefect flow run `{flow_run_id}`: its flows ran on a temporary Prefect server that "
        "stopped with them; to open it in the Prefect UI, run "
        f"`PREFECT_HOME={data_dir / 'prefect'} prefect server start` and go to "
        f"http://127.0.0.1:{PREFECT_UI_PORT}/runs/flow-run/{flow_run_id}."
    )


# The page


def render() -> None:
    st.title("Runs")
    store = existing_store("Run `emc demo` to create one.")

    records = list_runs(store, limit=500)
    parents = run_parents(store)
    frame = run_frame(records, parents)
    counts = frame["status"].value_counts()
    left, middle, right = st.columns(3)
    left.metric("Completed", int(counts.get("completed", 0)))
    middle.metric("Failed", int(counts.get("failed", 0)))
    right.metric("Running", int(counts.get("running", 0)))

    status_filter = st.multiselect("Status", STATUSES, default=STATUSES)
    shown = frame[frame["status"].isin(status_filter)]
    st.dataframe(shown, width="stretch", hide_index=True)

    options = shown["run"].tolist()
    # A run named by a link followed or a shared URL opened (not by this page's own writing)
    # is selected, and offered even where the filter or the list's length hides it.
    requested = query_value("run")
    followed = requested if requested != st.session_state.get(URL_SEEN) else None
    if followed and followed not in options and get_run(store, followed) is not None:
        options.insert(0, followed)
    if not options:
        return
    if followed in options:
        st.session_state[SELECTED] = followed
    if st.session_state.get(SELECTED) not in options:
        st.session_state[SELECTED] = options[0]
    chosen = st.selectbox("Run details", options, key=SELECTED)
    keep_in_url(run=chosen)
    st.session_state[URL_SEEN] = chosen
    by_id = {r.run_id: r for r in records}
    record = by_id.get(chosen) or get_run(store, chosen)
    if record is not None:
        show_run(store, record, parents.get(record.run_id))


def show_run(store: Store, record: RunRecord, parent_id: str | None) -> None:
    st.subheader(record.run_id)
    line = summary_line(record.name, record.summary)
    if line:
        st.markdown(f"**{record.name}** · {line}")
    if record.error:
        st.error(record.error)
    if parent_id:
        link("runs", f"⬆️ Ran by {parent_id}", run=parent_id)
    show_children(child_runs(store, record.run_id))
    show_prefect(store, record)
    with st.expander("Raw JSON: summary, environment and parameters"):
        details, parameters = st.columns(2)
        details.json(
            {
                "summary": record.summary,
                "code_revision": record.code_revision,
                "code_dirty": record.code_dirty,
                "flow_run_id": record.flow_run_id,
                "host": record.host,
                "packages": record.package_versions,
            }
        )
        parameters.json(record.params)


def show_children(children: Sequence[RunRecord]) -> None:
    """The runs this one ran (a pipeline's stages), each a link to its own details."""
    if not children:
        return
    st.markdown(f"##### Runs it ran ({len(children)})")
    for child in children:
        name_col, line_col = st.columns([1, 3])
        with name_col:
            link("runs", f"↳ {child.name} · {child.status}", run=child.run_id)
        line_col.caption(summary_line(child.name, child.summary) or child.run_id)


def show_prefect(store: Store, record: RunRecord) -> None:
    if not record.flow_run_id:
        if record.kind == "cli":
            st.caption("A CLI command: no Prefect flow run.")
        return
    ui = prefect_ui_url()
    if ui is not None:
        url = prefect_run_url(ui, record.flow_run_id)
        st.markdown(f"[Open flow run `{record.flow_run_id}` in the Prefect UI]({url})")
    else:
        st.caption(prefect_hint(store.path.parent, record.flow_run_id))
