"""Graphs: a prompt's base and adapted pruned attribution graphs, side by side.

Pick a prompt and one of its base/adapted pairs (a prompt may be traced with several target modes
or adapted models). Each graph shows its quality scores, targets and a layer x position chart;
click a node (or pick it below the chart) to see its facts and strongest edges. A rejected
prompt is marked with the reviewer's reason, a stale graph (traced before a relabel) with a
warning.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import streamlit as st

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from dashboard import graphs_view as view
from dashboard.data import current_store
from dashboard.pickers import pick_pair
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import StoredGraph

TRACE_HINT = "Run `emc trace` to make attribution graphs of the flagged prompts."

st.title("Graphs")
store = current_store()
if not store.exists():
    st.info(f"No store yet at `{store.path}`. {TRACE_HINT}")
    st.stop()
pairs = graph_pairs(store)
if not pairs:
    st.info(f"No base and adapted graph pairs in the store yet. {TRACE_HINT}")
    st.stop()

prompt_col, pair_col, edges_col = st.columns([3, 4, 2], vertical_alignment="bottom")
pair = pick_pair(store, pairs, prompt_col, pair_col, key="graphs")
limit = edges_col.slider(
    "Edges drawn per graph",
    min_value=10,
    max_value=2000,
    value=view.DEFAULT_EDGES,
    step=10,
    key="graphs-edges",
    help="The strongest edges by |weight|; node details list a node's edges whether drawn or not",
)

graphs = view.load_pair(store, pair)
if graphs is None:
    st.error("One of these graphs is no longer in the store (a trace run replaced it). Reload.")
    st.stop()
base, adapted = graphs.base, graphs.adapted
rejected = view.rejection_notice(pair)
if rejected:
    st.error(rejected, icon="⛔")
standing = view.standing_of(store, pair)
prompt = view.prompts_of(store, [pair]).get(pair.prompt_id)
st.code(view.prompt_text(base, prompt), language=None, wrap_lines=True)

axis = view.position_axis(base.nodes, adapted.nodes)
max_influence = view.largest_influence(base, adapted)
max_weight = view.largest_weight(base, adapted)
n_layers = int(max(base.nodes["layer"].max(), adapted.nodes["layer"].max()))


def selected_node(graph: StoredGraph) -> int:
    """The node to detail: a new chart click wins, else the picker's choice (targets first)."""
    graph_id = graph.record.graph_id
    pick_key, seen_key = f"graphs-node-{graph_id}", f"graphs-seen-{graph_id}"
    options = view.node_options(graph.nodes)
    clicked = view.clicked_node(st.session_state.get(f"graphs-chart-{graph_id}"))
    if clicked is not None and clicked != st.session_state.get(seen_key) and clicked in options:
        st.session_state[pick_key] = clicked
    st.session_state[seen_key] = clicked
    if st.session_state.get(pick_key) not in options:
        st.session_state[pick_key] = options[0]
    return st.session_state[pick_key]


def show_summary(title: str, graph: StoredGraph, reference: StoredGraph | None) -> None:
    record = graph.record
    st.subheader(title)
    st.caption(f"`{record.model_id}` · graph `{record.graph_id}` · {record.targets} targets")
    for warning in (view.stale_notice(standing.get(record.graph_id)),
                    view.mismatch_warning(record)):  # fmt: skip
        if warning:
            st.warning(warning, icon="⚠️")
    scores = view.graph_scores(record)
    before = view.graph_scores(reference.record) if reference else {}
    for column, (label, value) in zip(st.columns(len(scores)), scores.items(), strict=True):
        old = before.get(label)
        delta = None if value is None or old is None else f"{value - old:+.3f}"
        column.metric(
            label,
            "—" if value is None else f"{value:.3f}",
            delta,
            delta_color="off" if label == "Error-score ratio" else "normal",
            help="Change from the base graph" if delta else None,
        )
    st.caption(view.graph_counts(record))
    st.dataframe(
        view.target_frame(graph).style.format({"probability": "{:.4f}"}),
        hide_index=True,
        width="stretch",
    )


def show_chart(graph: StoredGraph, laid: pd.DataFrame, node: int) -> None:
    edges = view.edge_frame(graph.edges, laid, limit, focus=node, max_weight=max_weight)
    st.altair_chart(
        view.graph_chart(laid, edges, axis, n_layers, selected=node),
        on_select="rerun",
        selection_mode="node",
        key=f"graphs-chart-{graph.record.graph_id}",
        width="stretch",
    )
    st.caption(f"{len(edges):,} of {len(graph.edges):,} edges drawn. {view.EDGE_KEY}")


def show_node(graph: StoredGraph, laid: pd.DataFrame, node: int) -> None:
    described = dict(zip(laid["node"], laid["description"], strict=True))
    st.selectbox(
        "Node",
        view.node_options(graph.nodes),
        format_func=lambda n: described[n],
        key=f"graphs-node-{graph.record.graph_id}",
        help="Click a node in the chart, or pick one here",
    )
    details = view.node_details(graph, node)
    st.dataframe(
        [{"": name, "value": view.format_fact(value)} for name, value in details.facts.items()],
        hide_index=True,
        width="stretch",
    )
    for heading, frame in (("Strongest incoming", details.incoming),
                           ("Strongest outgoing", details.outgoing)):  # fmt: skip
        st.markdown(f"**{heading}**")
        if frame.empty:
            st.caption("none")
        else:
            st.dataframe(
                frame.style.format({"weight": "{:+.4f}"}), hide_index=True, width="stretch"
            )


# A row of columns per part, so the two charts (and the two node panels) line up.
summaries, charts, panels = (st.columns(2, gap="large") for _ in range(3))
for i, (title, graph, reference) in enumerate([("Base", base, None), ("Adapted", adapted, base)]):
    node = selected_node(graph)
    laid = view.layout_nodes(graph.nodes, axis, max_influence)
    with summaries[i]:
        show_summary(title, graph, reference)
    with charts[i]:
        show_chart(graph, laid, node)
    with panels[i]:
        show_node(graph, laid, node)
