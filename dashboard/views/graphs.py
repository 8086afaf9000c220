"""Graphs: a prompt's base and adapted pruned attribution graphs, side by side.

Pick a prompt and one of its base/adapted pairs (a prompt may be traced with several target modes
or adapted models). Each graph shows its quality scores, targets and a layer x position chart;
click a node (or pick it below the chart) to see its facts and strongest edges. A rejected
prompt is marked with the reviewer's reason, a stale graph (traced before a relabel) with a
warning.

Layout: x is the token position, y the layer; input tokens sit at layer -1, logits at n_layers.
Nodes sharing a (layer, position) cell are set out on a small grid inside it, most influential
first, and a position's column is as wide as its most crowded cell needs in either graph, so the
two graphs of a pair share one x axis. The shaping functions (stored rows in, frames and Altair
charts out) are pure, so tests check the layout without a browser; `load_pair` and
`standing_of` read through emc.store (no SQL here).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from dashboard.widgets import existing_store, pick_pair, prompts_of, rejection_notice
from emc.pivotal.prompts import PromptRecord
from emc.store import Store
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.graphs import StoredGraph, load_graph_rows
from emc.store.validity import graph_standing
from emc.tracing.compact import TOKEN_LAYER
from emc.tracing.record import GraphRecord

KINDS = ("feature", "error", "token", "logit")
KIND_COLOURS = ("#7b4ea3", "#8c8c8c", "#2e8b57", "#f58518")
KIND_SHAPES = ("circle", "square", "triangle-up", "diamond")
SIGNS = ("positive", "negative")
SIGN_COLOURS = ("#1f77b4", "#d62728")
MIN_SIZE, MAX_SIZE = 20.0, 320.0  # marker area, square pixels
CELL_HEIGHT = 0.7  # of a layer's band, shared by the rows of one crowded cell
LABEL_CHARS = 12  # token labels on the x axis are cut to this many characters
DEFAULT_EDGES = 300
EDGE_KEY = "Edges: blue adds to the target, red subtracts; stronger edges are darker and wider."


@dataclass(frozen=True)
class PairGraphs:
    pair: GraphPair
    base: StoredGraph
    adapted: StoredGraph


@dataclass(frozen=True)
class NodeDetails:
    facts: dict[str, Any]  # kind, layer, position, feature, activation, influence, token, ...
    incoming: pd.DataFrame  # node, from, weight: the strongest edges into the node
    outgoing: pd.DataFrame  # node, to, weight: the strongest edges out of it


def load_pair(store: Store, pair: GraphPair) -> PairGraphs | None:
    """Both graphs' rows; None when one has gone (replaced by a re-run between two reads)."""
    base = load_graph_rows(store, pair.base_graph_id)
    adapted = load_graph_rows(store, pair.adapted_graph_id)
    if base is None or adapted is None:
        return None
    return PairGraphs(pair, base, adapted)


def standing_of(store: Store, pair: GraphPair) -> dict[str, dict[str, Any]]:
    """graph id -> its standing (`emc.store.validity.graph_standing`) for both graphs."""
    frame = graph_standing(store, [pair.base_graph_id, pair.adapted_graph_id])
    return {row["graph_id"]: row for row in frame.to_dict("records")}


def stale_notice(standing: Mapping[str, Any] | None) -> str | None:
    """The warning on a stale graph: the targets it was traced for against the current labels."""
    if not standing or not standing.get("stale"):
        return None

    def ids(key: str) -> list[int]:
        values = standing.get(key)
        return [] if values is None else [int(v) for v in values]

    return (
        f"Stale: traced for evil {ids('graph_evil_ids')} / safe {ids('graph_safe_ids')}, but "
        f"the prompt is now labelled evil {ids('label_evil_ids')} / safe "
        f"{ids('label_safe_ids')}. Rankings leave it out; `emc trace` traces it again."
    )


def prompt_text(graph: StoredGraph, prompt: PromptRecord | None) -> str:
    """What the model read: its input tokens joined, or the prompt's text if they are unnamed."""
    tokens = graph.nodes[graph.nodes["kind"] == "token"].sort_values("position")["token"]
    if len(tokens) and tokens.notna().all():
        return "".join(tokens)
    if prompt is None:
        return ""
    return prompt.text + (f"\n{prompt.assistant_prefix}" if prompt.assistant_prefix else "")


def mismatch_warning(record: GraphRecord) -> str | None:
    """The warning to show when the graph's target probabilities disagree with discovery's."""
    if not record.logit_mismatch_exceeds:
        return None
    if record.logit_mismatch is None:
        return (
            "graph probabilities differ from discovery logits: the graph's targets or input "
            "ids are not the ones discovery scored"
        )
    return f"graph probabilities differ from discovery logits by {record.logit_mismatch:.3g}"


def graph_scores(record: GraphRecord) -> dict[str, float | None]:
    return {
        "Replacement": record.replacement,
        "Completeness": record.completeness,
        "Error-score ratio": record.error_score_ratio,
    }


def graph_counts(record: GraphRecord) -> str:
    def count(value: int | None) -> str:
        return "?" if value is None else f"{value:,}"

    seconds = f" · traced in {record.seconds:.1f} s" if record.seconds is not None else ""
    return (
        f"{count(record.kept_features)} of {count(record.n_features)} attributed features kept "
        f"({count(record.n_active_features)} active) · {count(record.kept_errors)} of "
        f"{count(record.n_errors)} error nodes · {count(record.n_tokens)} tokens · "
        f"{count(record.n_logits)} logits · {count(record.kept_edges)} edges{seconds}"
    )


def target_frame(graph: StoredGraph) -> pd.DataFrame:
    """The graph's targets (its logit nodes) with their probabilities and labelled role."""
    logits = graph.nodes[graph.nodes["kind"] == "logit"].sort_values("node")
    params = graph.record.params
    roles = {t: "evil" for t in params.get("evil_ids", [])}
    roles |= {t: "safe" for t in params.get("safe_ids", [])}

    def role(token_id: Any) -> str:
        if pd.isna(token_id):
            return "direction"  # a custom target: the evil-minus-safe direction
        return roles.get(int(token_id), "")

    return pd.DataFrame(
        {
            "target": logits["token"].map(repr_token).to_numpy(),
            "token id": logits["token_id"].to_numpy(),
            "role": [role(t) for t in logits["token_id"]],
            "probability": logits["prob"].astype(float).to_numpy(),
        }
    )


def position_axis(*node_frames: pd.DataFrame) -> pd.DataFrame:
    """One row per token position: where its column starts, its width, centre and label.

    A column is one unit wide, or ceil(sqrt(2n)) for a position whose most crowded cell (n > 1
    nodes at one layer, in any of the frames) needs more: a grid about twice as wide as tall.
    """
    frames = [f for f in node_frames if len(f)]
    if not frames:
        return pd.DataFrame(columns=["position", "start", "width", "centre", "label"])
    crowd = pd.concat([f.groupby(["layer", "position"]).size() for f in frames])
    most = crowd.groupby(level="position").max()
    positions = range(int(most.index.max()) + 1)
    most = most.reindex(positions, fill_value=1)
    width = np.where(most > 1, np.ceil(np.sqrt(2 * most)), 1).astype(int)
    width = pd.Series(width, index=most.index)
    start = np.concatenate([[0], np.cumsum(width.to_numpy())[:-1]])
    tokens = pd.concat([f[f["kind"] == "token"] for f in frames]).drop_duplicates("position")
    names = tokens.set_index("position")
    labels = [
        f"{p} {_axis_token(names.loc[p]) if p in names.index else ''}".rstrip() for p in positions
    ]
    return pd.DataFrame(
        {
            "position": list(positions),
            "start": start,
            "width": width.to_numpy(),
            "centre": start + width.to_numpy() / 2,
            "label": labels,
        }
    )


def layout_nodes(
    nodes: pd.DataFrame, axis: pd.DataFrame, max_influence: float | None = None
) -> pd.DataFrame:
    """Nodes with chart coordinates (x, y), marker size and a one-line description.

    `size` grows with influence (area ~ sqrt(influence / max_influence)); pass the largest
    influence of both graphs of a pair so their sizes compare. Logits are sized by probability.
    """
    frame = nodes.sort_values(
        ["layer", "position", "influence", "node"], ascending=[True, True, False, True]
    ).reset_index(drop=True)
    cell = frame.groupby(["layer", "position"])
    rank = cell.cumcount().to_numpy()
    count = cell["node"].transform("size").to_numpy()
    columns = axis.set_index("position")
    width = frame["position"].map(columns["width"]).to_numpy()
    start = frame["position"].map(columns["start"]).to_numpy()
    used = np.minimum(count, width)  # a part-filled cell spreads its nodes across the column
    rows = np.ceil(count / width)
    x = start + (rank % width + 0.5) * (width / used)
    y = frame["layer"].to_numpy() + ((rows - 1) / 2 - rank // width) * (CELL_HEIGHT / rows)
    influence = frame["influence"].astype(float).clip(lower=0).to_numpy()
    top = max_influence if max_influence is not None else influence.max(initial=0.0)
    share = np.sqrt(influence / top) if top > 0 else np.zeros_like(influence)
    # A target has no influence on itself: its marker shows its probability instead.
    logit = (frame["kind"] == "logit").to_numpy()
    share = np.where(logit, np.sqrt(frame["prob"].astype(float).fillna(0).to_numpy()), share)
    return pd.DataFrame(
        {
            "node": frame["node"].astype(int),
            "kind": frame["kind"],
            "layer": frame["layer"].astype(int),
            "position": frame["position"].astype(int),
            "feature": [None if _missing(f) else int(f) for f in frame["feature"]],
            "activation": frame["activation"].astype(float),
            "influence": influence,
            "token": [None if _missing(t) else str(t) for t in frame["token"]],
            "prob": frame["prob"].astype(float),
            "x": x,
            "y": y,
            "size": MIN_SIZE + (MAX_SIZE - MIN_SIZE) * np.clip(share, 0, 1),
            "description": [describe(row) for row in frame.to_dict("records")],
        }
    )


def edge_frame(
    edges: pd.DataFrame,
    laid: pd.DataFrame,
    limit: int,
    focus: int | None = None,
    max_weight: float | None = None,
) -> pd.DataFrame:
    """The `limit` strongest edges (by |weight|) with both ends' coordinates.

    Opacity and width grow with |weight| / max_weight (default: the strongest edge here). With a
    `focus` node, its own edges stay strong and the others fade.
    """
    strength = edges["weight"].astype(float).abs()
    kept = edges.assign(strength=strength).sort_values(
        ["strength", "target", "source"], ascending=[False, True, True], kind="stable"
    )
    kept = kept.head(max(limit, 0))
    where = laid.set_index("node")[["x", "y"]]
    source = where.reindex(kept["source"]).to_numpy()
    target = where.reindex(kept["target"]).to_numpy()
    top = max_weight if max_weight is not None else kept["strength"].max()
    share = (kept["strength"] / top).clip(upper=1).to_numpy() if top and top > 0 else 0.0
    opacity = 0.12 + 0.6 * share
    if focus is not None:
        touches = ((kept["source"] == focus) | (kept["target"] == focus)).to_numpy()
        opacity = np.where(touches, 0.95, opacity * 0.35)
    return pd.DataFrame(
        {
            "source": kept["source"].astype(int).to_numpy(),
            "target": kept["target"].astype(int).to_numpy(),
            "weight": kept["weight"].astype(float).to_numpy(),
            "x": source[:, 0] if len(kept) else [],
            "y": source[:, 1] if len(kept) else [],
            "x2": target[:, 0] if len(kept) else [],
            "y2": target[:, 1] if len(kept) else [],
            "sign": np.where(kept["weight"].to_numpy() >= 0, "positive", "negative"),
            "opacity": opacity,
            "width": 0.6 + 2.4 * share,
        }
    )


def graph_chart(
    laid: pd.DataFrame,
    edges: pd.DataFrame,
    axis: pd.DataFrame,
    n_layers: int,
    selected: int | None = None,
) -> alt.LayerChart:
    """Edges under nodes on the layer x position grid; clicking a node selects it (`node`)."""
    total = float((axis["start"] + axis["width"]).max()) if len(axis) else 1.0
    x_axis = alt.Axis(
        values=axis["centre"].tolist(),
        labelExpr=_lookup_expr(axis["centre"].tolist(), axis["label"].tolist()),
        labelAngle=-90,
        labelOverlap=True,
        labelFontSize=10,
        grid=False,
        title="token position",
    )
    y_axis = alt.Axis(
        values=list(range(TOKEN_LAYER, n_layers + 1)),
        labelExpr=(
            f"datum.value == {TOKEN_LAYER} ? 'tokens' : datum.value == {n_layers} ? 'logits' : "
            "'L' + datum.value"
        ),
        title=None,
        grid=True,
        gridOpacity=0.4,
    )
    x = alt.X("x:Q", scale=alt.Scale(domain=[0, total], nice=False, zero=False), axis=x_axis)
    y = alt.Y(
        "y:Q",
        scale=alt.Scale(domain=[TOKEN_LAYER - 0.6, n_layers + 0.6], nice=False, zero=False),
        axis=y_axis,
    )
    lines = (
        alt.Chart(edges)
        .mark_rule()
        .encode(
            x=x,
            y=y,
            x2="x2:Q",
            y2="y2:Q",
            color=alt.Color(
                "sign:N",
                scale=alt.Scale(domain=list(SIGNS), range=list(SIGN_COLOURS)),
                legend=None,  # two legends overflow a half-page chart; EDGE_KEY says it
            ),
            opacity=alt.Opacity("opacity:Q", scale=None),
            strokeWidth=alt.StrokeWidth("width:Q", scale=None),
            tooltip=[alt.Tooltip("weight:Q", format=".4f"), "source:Q", "target:Q"],
        )
    )
    pick = alt.selection_point(name="node", fields=["node"], on="click", empty=False)
    points = (
        alt.Chart(laid)
        .mark_point(filled=True, stroke="white", strokeWidth=0.5, opacity=0.9)
        .encode(
            x=x,
            y=y,
            size=alt.Size("size:Q", scale=None),
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(domain=list(KINDS), range=list(KIND_COLOURS)),
                legend=alt.Legend(title="node", orient="bottom", symbolType="circle"),
            ),
            shape=alt.Shape(
                "kind:N", scale=alt.Scale(domain=list(KINDS), range=list(KIND_SHAPES)), legend=None
            ),
            tooltip=[
                "description:N",
                alt.Tooltip("influence:Q", format=".4g"),
                alt.Tooltip("activation:Q", format=".3f"),
                "node:Q",
            ],
        )
        .add_params(pick)
    )
    logits = laid[laid["kind"] == "logit"].assign(
        text=lambda f: [
            f"{repr_token(t)} {p:.3f}" for t, p in zip(f["token"], f["prob"], strict=True)
        ]
    )
    names = (
        alt.Chart(logits)
        .mark_text(align="left", angle=325, dx=6, dy=-6, fontSize=10, color="#444")
        .encode(x=x, y=y, text="text:N")
    )
    ring = (
        alt.Chart(laid[laid["node"] == selected].assign(ring=lambda f: f["size"] * 2.5 + 120))
        .mark_point(filled=False, stroke="black", strokeWidth=2)
        .encode(x=x, y=y, size=alt.Size("ring:Q", scale=None))
    )
    height = int(min(max(70 * (n_layers + 2), 300), 900))
    return (
        alt.layer(lines, points, names, ring)
        .resolve_scale(color="independent")
        # Fit the width to the column; the height is the plot's own, axes and legends below it.
        .properties(height=height, autosize=alt.AutoSizeParams(type="fit-x", contains="padding"))
    )


def node_options(nodes: pd.DataFrame) -> list[int]:
    """Node ids for a picker: the targets first, then by influence, strongest first."""
    order = nodes.assign(is_logit=nodes["kind"] == "logit").sort_values(
        ["is_logit", "influence", "node"], ascending=[False, False, True]
    )
    return order["node"].astype(int).tolist()


def node_details(graph: StoredGraph, node: int, top: int = 8) -> NodeDetails:
    """The node's stored facts and its `top` strongest incoming and outgoing edges."""
    nodes = graph.nodes.set_index("node")
    row = nodes.loc[node]
    facts = {"node": int(node), **{k: _plain(v) for k, v in row.items() if not _missing(v)}}
    if "token" in facts:
        facts["token"] = repr_token(facts["token"])
    edges = graph.edges.assign(strength=graph.edges["weight"].abs())

    def strongest(mask: pd.Series, other: str, heading: str) -> pd.DataFrame:
        picked = edges[mask].nlargest(top, "strength")
        return pd.DataFrame(
            {
                "node": picked[other].astype(int).to_numpy(),
                heading: [describe({"node": n, **nodes.loc[n].to_dict()}) for n in picked[other]],
                "weight": picked["weight"].astype(float).to_numpy(),
            }
        )

    return NodeDetails(
        facts=facts,
        incoming=strongest(edges["target"] == node, "source", "from"),
        outgoing=strongest(edges["source"] == node, "target", "to"),
    )


def format_fact(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def describe(row: Mapping[str, Any]) -> str:
    """One line naming a node: kind, where it is and what it is."""
    kind = row["kind"]
    if kind == "feature":
        return f"feature {row['feature']} · L{row['layer']} · pos {row['position']}"
    if kind == "error":
        return f"error · L{row['layer']} · pos {row['position']}"
    if kind == "token":
        return f"token {repr_token(row['token'], row.get('token_id'))} · pos {row['position']}"
    prob = "" if _missing(row.get("prob")) else f" · p {row['prob']:.3f}"
    return f"logit {repr_token(row['token'], row.get('token_id'))}{prob}"


def repr_token(token: Any, token_id: Any = None) -> str:
    if _missing(token):
        return f"#{token_id}" if not _missing(token_id) else "?"
    return repr(str(token))


def clicked_node(state: Any) -> int | None:
    """The node a chart click selected, from the chart's widget state (None: nothing clicked)."""
    try:
        picked = state["selection"]["node"]
    except (KeyError, TypeError):
        return None
    if not picked:
        return None
    node = picked[0].get("node")
    return None if node is None else int(node)


def largest_influence(*graphs: StoredGraph) -> float:
    return max((float(g.nodes["influence"].max()) for g in graphs if len(g.nodes)), default=0.0)


def largest_weight(*graphs: StoredGraph) -> float:
    values = [float(g.edges["weight"].abs().max()) for g in graphs if len(g.edges)]
    return max(values, default=0.0)


def _axis_token(row: pd.Series) -> str:
    text = repr_token(row["token"], row.get("token_id"))
    return text if len(text) <= LABEL_CHARS else text[: LABEL_CHARS - 1] + "…"


def _lookup_expr(values: list[float], labels: list[str]) -> str:
    """A Vega expression giving each tick value's label."""
    return f"{json.dumps(labels)}[indexof({json.dumps(values)}, datum.value)]"


def _missing(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):  # a list or other container: not a missing scalar
        return False


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


# Drawing the page

TRACE_HINT = "Run `emc trace` to make attribution graphs of the flagged prompts."


def render() -> None:
    st.title("Graphs")
    store = existing_store(TRACE_HINT)
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
        value=DEFAULT_EDGES,
        step=10,
        key="graphs-edges",
        help="The strongest edges by |weight|; node details list a node's edges whether "
        "drawn or not",
    )

    graphs = load_pair(store, pair)
    if graphs is None:
        st.error("One of these graphs is no longer in the store (a trace run replaced it). Reload.")
        st.stop()
    base, adapted = graphs.base, graphs.adapted
    rejected = rejection_notice(pair)
    if rejected:
        st.error(rejected, icon="⛔")
    standing = standing_of(store, pair)
    prompt = prompts_of(store, [pair]).get(pair.prompt_id)
    st.code(prompt_text(base, prompt), language=None, wrap_lines=True)

    axis = position_axis(base.nodes, adapted.nodes)
    max_influence = largest_influence(base, adapted)
    max_weight = largest_weight(base, adapted)
    n_layers = int(max(base.nodes["layer"].max(), adapted.nodes["layer"].max()))
    # A row of columns per part, so the two charts (and the two node panels) line up.
    summaries, charts, panels = (st.columns(2, gap="large") for _ in range(3))
    for i, (title, graph, reference) in enumerate(
        [("Base", base, None), ("Adapted", adapted, base)]
    ):
        node = selected_node(graph)
        laid = layout_nodes(graph.nodes, axis, max_influence)
        with summaries[i]:
            show_summary(title, graph, reference, standing)
        with charts[i]:
            edges = edge_frame(graph.edges, laid, limit, focus=node, max_weight=max_weight)
            show_chart(graph, laid, edges, axis, n_layers, node)
        with panels[i]:
            show_node(graph, laid, node)


def selected_node(graph: StoredGraph) -> int:
    """The node to detail: a new chart click wins, else the picker's choice (targets first)."""
    graph_id = graph.record.graph_id
    pick_key, seen_key = f"graphs-node-{graph_id}", f"graphs-seen-{graph_id}"
    options = node_options(graph.nodes)
    clicked = clicked_node(st.session_state.get(f"graphs-chart-{graph_id}"))
    if clicked is not None and clicked != st.session_state.get(seen_key) and clicked in options:
        st.session_state[pick_key] = clicked
    st.session_state[seen_key] = clicked
    if st.session_state.get(pick_key) not in options:
        st.session_state[pick_key] = options[0]
    return st.session_state[pick_key]


def show_summary(
    title: str,
    graph: StoredGraph,
    reference: StoredGraph | None,
    standing: Mapping[str, Mapping[str, Any]],
) -> None:
    record = graph.record
    st.subheader(title)
    st.caption(f"`{record.model_id}` · graph `{record.graph_id}` · {record.targets} targets")
    for warning in (stale_notice(standing.get(record.graph_id)), mismatch_warning(record)):
        if warning:
            st.warning(warning, icon="⚠️")
    scores = graph_scores(record)
    before = graph_scores(reference.record) if reference else {}
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
    st.caption(graph_counts(record))
    st.dataframe(
        target_frame(graph).style.format({"probability": "{:.4f}"}),
        hide_index=True,
        width="stretch",
    )


def show_chart(
    graph: StoredGraph,
    laid: pd.DataFrame,
    edges: pd.DataFrame,
    axis: pd.DataFrame,
    n_layers: int,
    node: int,
) -> None:
    st.altair_chart(
        graph_chart(laid, edges, axis, n_layers, selected=node),
        on_select="rerun",
        selection_mode="node",
        key=f"graphs-chart-{graph.record.graph_id}",
        width="stretch",
    )
    st.caption(f"{len(edges):,} of {len(graph.edges):,} edges drawn. {EDGE_KEY}")


def show_node(graph: StoredGraph, laid: pd.DataFrame, node: int) -> None:
    described = dict(zip(laid["node"], laid["description"], strict=True))
    st.selectbox(
        "Node",
        node_options(graph.nodes),
        format_func=lambda n: described[n],
        key=f"graphs-node-{graph.record.graph_id}",
        help="Click a node in the chart, or pick one here",
    )
    details = node_details(graph, node)
    st.dataframe(
        [{"": name, "value": format_fact(value)} for name, value in details.facts.items()],
        hide_index=True,
        width="stretch",
    )
    for heading, frame in (
        ("Strongest incoming", details.incoming),
        ("Strongest outgoing", details.outgoing),
    ):
        st.markdown(f"**{heading}**")
        if frame.empty:
            st.caption("none")
        else:
            st.dataframe(
                frame.style.format({"weight": "{:+.4f}"}), hide_index=True, width="stretch"
            )
