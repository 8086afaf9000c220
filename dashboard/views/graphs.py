"""Graphs: a prompt's base and adapted pruned attribution graphs, side by side.

Pick a prompt and one of its base/adapted pairs (a prompt may be traced with several target modes
or adapted models). Each graph shows its quality scores, targets and a layer x position chart;
click a node (or pick it below the chart) to see its facts, its effect on the evil and the safe
targets (`feature_effects`), its strongest edges and, for a feature, its label and a link to its
feature card. A rejected prompt is marked with the reviewer's reason, a stale graph (traced
before a relabel) with a warning.

One node is selected in both graphs at once: a node is the same node in the base and the adapted
graph when its kind, layer, position and feature (or token) agree (`emc.analysis.paths`); a graph
whose pruning did not keep it says so. The page opens on the most probable evil target, and its
URL names what is on screen (`?prompt=<id>&pair=<base>/<adapted>&node=<kind>/<layer>/<position>/
<feature or token id>`), so a view can be shared, and other pages link here with `?prompt=`.

Layout: x is the token position, y the layer; input tokens sit at layer -1, logits at n_layers.
Nodes sharing a (layer, position) cell are set out on a small grid inside it, most influential
first, and a position's column is as wide as its most crowded cell needs in either graph, so the
two graphs of a pair share one x axis. The targets' labels stack one per line in the logits'
band, left of the logits' column, each joined to its marker by a thin leader, so no two overlap
(`target_labels`). The shaping functions (stored rows in, frames and Altair charts out) are
pure, so tests check the layout without a browser; `load_pair` and `standing_of` read through
emc.store (no SQL here).
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

from dashboard.widgets import (
    existing_store,
    follow_url,
    link,
    pair_key,
    pick_pair_in_url,
    prompts_of,
    rejection_notice,
    write_url,
)
from emc.analysis.paths import most_probable_evil, node_keys
from emc.pivotal.prompts import PromptRecord
from emc.store import Store
from emc.store.feature_labels import shown_labels_for_model
from emc.store.graph_nodes_view import node_effects
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
Y_MARGIN = 0.6  # layer units of plot above the logits and below the tokens
LABEL_FONT = 10  # target labels' font size, pixels
LABEL_LINE = 14  # pixels from one target label's line to the next: the font and a gap
ROLE_COLOURS = {"evil": "#d62728", "safe": "#2ca02c", "direction": "#7b4ea3", "": "#444444"}
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


def target_roles(graph: StoredGraph) -> dict[int, str]:
    """Token id -> evil | safe, from the labels the graph was traced for (`params`)."""
    params = graph.record.params
    roles = {int(t): "evil" for t in params.get("evil_ids", [])}
    return roles | {int(t): "safe" for t in params.get("safe_ids", [])}


def target_frame(graph: StoredGraph) -> pd.DataFrame:
    """The graph's targets (its logit nodes) with their probabilities and labelled role."""
    logits = graph.nodes[graph.nodes["kind"] == "logit"].sort_values("node")
    roles = target_roles(graph)

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
    nodes: pd.DataFrame,
    axis: pd.DataFrame,
    max_influence: float | None = None,
    labels: Mapping[tuple[int, int], str] | None = None,
) -> pd.DataFrame:
    """Nodes with chart coordinates (x, y), marker size, a one-line description and, for a
    feature with one in `labels` ((layer, feature) -> label), its label.

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
            "token_id": [None if _missing(t) else int(t) for t in frame["token_id"]],
            "prob": frame["prob"].astype(float),
            "x": x,
            "y": y,
            "size": MIN_SIZE + (MAX_SIZE - MIN_SIZE) * np.clip(share, 0, 1),
            "description": [describe(row) for row in frame.to_dict("records")],
            "label": [feature_label(row, labels or {}) for row in frame.to_dict("records")],
        }
    )


def feature_label(row: Mapping[str, Any], labels: Mapping[tuple[int, int], str]) -> str | None:
    """A feature node's shown label (None for other nodes and unlabelled features)."""
    if row["kind"] != "feature" or _missing(row.get("feature")):
        return None
    return labels.get((int(row["layer"]), int(row["feature"])))


def chart_height(n_layers: int) -> int:
    """The plot's height in pixels: about 70 per layer band, within 300 to 900."""
    return int(min(max(70 * (n_layers + 2), 300), 900))


def pixels_per_layer(n_layers: int) -> float:
    """Pixels per layer unit on the y axis, whose domain runs Y_MARGIN past tokens and logits."""
    return chart_height(n_layers) / (n_layers - TOKEN_LAYER + 2 * Y_MARGIN)


def target_labels(
    laid: pd.DataFrame,
    axis: pd.DataFrame,
    n_layers: int,
    roles: Mapping[int, str] | None = None,
) -> pd.DataFrame:
    """The targets' (logit nodes') labels, placed so that no two overlap.

    Only logits sit in the top band (layer n_layers), at the last position, so the band left of
    their column is free: the labels stack there one per line, LABEL_LINE pixels apart (the
    chart's height is fixed, so pixels per layer are known whatever its width), right-aligned at
    the column's start (`x`, `y`), each joined by a leader to its marker (`node_x`, `node_y`).
    Lines run from the plot's top down to the band's lower edge; where there are more targets
    than lines, the most probable are labelled (the targets table lists them all). Labels take
    the lines in their markers' order, top row first and left to right, so leaders do not cross.
    Columns: node, text, role (evil | safe | direction | ''), colour, x, y, node_x, node_y.
    """
    columns = ["node", "text", "role", "colour", "x", "y", "node_x", "node_y"]
    logits = laid[laid["kind"] == "logit"]
    if logits.empty:
        return pd.DataFrame(columns=columns)
    step = LABEL_LINE / pixels_per_layer(n_layers)  # one line, in layer units
    first = n_layers + Y_MARGIN - step / 2  # the top line's centre
    last = n_layers - 0.5 + step / 2  # the lowest centre still inside the band
    lines = max(int(np.floor((first - last) / step + 1e-9)) + 1, 1)
    chosen = logits.sort_values(["prob", "node"], ascending=[False, True]).head(lines)
    chosen = chosen.sort_values(["y", "x", "node"], ascending=[False, True, True])
    starts = axis.set_index("position")["start"]
    anchor = float(starts.reindex(chosen["position"].unique()).min())
    roles = roles or {}
    role = ["direction" if _missing(t) else roles.get(int(t), "") for t in chosen["token_id"]]
    return pd.DataFrame(
        {
            "node": chosen["node"].astype(int).to_numpy(),
            "text": [
                f"{repr_token(t)} {p:.3f}"
                for t, p in zip(chosen["token"], chosen["prob"], strict=True)
            ],
            "role": role,
            "colour": [ROLE_COLOURS.get(r, ROLE_COLOURS[""]) for r in role],
            "x": anchor,
            "y": first - step * np.arange(len(chosen)),
            "node_x": chosen["x"].to_numpy(),
            "node_y": chosen["y"].to_numpy(),
        },
        columns=columns,
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
    roles: Mapping[int, str] | None = None,
) -> alt.LayerChart:
    """Edges under nodes on the layer x position grid; clicking a node selects it (`node`).

    The targets are labelled by `target_labels` (coloured by `roles`: token id -> evil | safe),
    the selected node ringed; a feature's tooltip carries its label."""
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
        scale=alt.Scale(
            domain=[TOKEN_LAYER - Y_MARGIN, n_layers + Y_MARGIN], nice=False, zero=False
        ),
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
                "label:N",
                alt.Tooltip("influence:Q", format=".4g"),
                alt.Tooltip("activation:Q", format=".3f"),
                "node:Q",
            ],
        )
        .add_params(pick)
    )
    labels = target_labels(laid, axis, n_layers, roles)
    leaders = (
        alt.Chart(labels)
        .mark_rule(color="#999999", strokeWidth=0.6, strokeDash=[2, 2])
        .encode(x=x, y=y, x2="node_x:Q", y2="node_y:Q")
    )
    names = (
        alt.Chart(labels)
        .mark_text(align="right", baseline="middle", dx=-4, fontSize=LABEL_FONT)
        .encode(
            x=x,
            y=y,
            text="text:N",
            color=alt.Color("colour:N", scale=None),
            tooltip=["text:N", "role:N"],
        )
    )
    ring = (
        alt.Chart(laid[laid["node"] == selected].assign(ring=lambda f: f["size"] * 2.5 + 120))
        .mark_point(filled=False, stroke="black", strokeWidth=2)
        .encode(x=x, y=y, size=alt.Size("ring:Q", scale=None))
    )
    return (
        alt.layer(lines, points, leaders, names, ring)
        .resolve_scale(color="independent")
        # Fit the width to the column; the height is the plot's own, axes and legends below it,
        # so `pixels_per_layer` holds whatever the width (`target_labels` relies on it).
        .properties(
            height=chart_height(n_layers),
            autosize=alt.AutoSizeParams(type="fit-x", contains="padding"),
        )
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


# One node in both graphs, and its effect on the targets

SIDE_ORDER = ("evil", "safe", "other", "direction")


def node_identity(key: tuple[str, int, int, int]) -> str:
    """A node's identity across the two graphs of a pair, for URLs: kind/layer/position/index
    (index: the feature, or the token id of a token or logit; -1 where there is none)."""
    kind, layer, position, index = key
    return f"{kind}/{layer}/{position}/{index}"


def node_identities(graph: StoredGraph) -> dict[int, str]:
    """Node id -> its identity (`node_identity` of `emc.analysis.paths.node_keys`)."""
    return {node: node_identity(key) for node, key in node_keys(graph).items()}


def default_identity(base: StoredGraph, adapted: StoredGraph) -> str | None:
    """The node the page opens on: the most probable evil target (the adapted graph's, else the
    base graph's), else the adapted graph's first node option (targets first)."""
    for graph in (adapted, base):
        token = most_probable_evil(graph)
        if token is not None:
            logits = graph.nodes[
                (graph.nodes["kind"] == "logit") & (graph.nodes["token_id"] == token)
            ]
            return node_identities(graph)[int(logits["node"].iloc[0])]
    for graph in (adapted, base):
        options = node_options(graph.nodes)
        if options:
            return node_identities(graph)[options[0]]
    return None


def node_with(identities: Mapping[int, str], identity: str | None) -> int | None:
    """The node of the graph (given by its `node_identities`) with that identity, if it has it."""
    return next((node for node, ident in identities.items() if ident == identity), None)


def effect_table(effects: pd.DataFrame) -> pd.DataFrame:
    """A node's `node_effects` for people: evil targets first, then safe, then the others."""
    rank = {side: i for i, side in enumerate(SIDE_ORDER)}
    rows = effects.assign(_order=effects["side"].map(rank).fillna(len(rank))).sort_values(
        ["_order", "target"], kind="stable"
    )
    return pd.DataFrame(
        {
            "target": [repr_token(label) for label in rows["label"]],
            "token id": rows["token_id"].to_numpy(),
            "role": rows["side"].to_numpy(),
            "probability": rows["prob"].astype(float).to_numpy(),
            "direct": rows["direct"].astype(float).to_numpy(),
            "total": rows["total"].astype(float).to_numpy(),
        }
    )


def effects_by_side(effects: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per side with targets here (evil, safe, ...): how many, and the summed direct and total
    effects on them."""
    sums = {}
    for side in SIDE_ORDER:
        rows = effects[effects["side"] == side]
        if len(rows):
            sums[side] = {
                "targets": len(rows),
                "direct": float(rows["direct"].sum()),
                "total": float(rows["total"].sum()),
            }
    return sums


def effects_caption(sums: Mapping[str, Mapping[str, float]]) -> str:
    """`On evil targets (1): total +0.12, direct +0.34 · on safe targets (1): ...`."""
    parts = [
        f"on {side} targets ({int(v['targets'])}): total {v['total']:+.4g}, "
        f"direct {v['direct']:+.4g}"
        for side, v in sums.items()
    ]
    text = " · ".join(parts)
    return text[:1].upper() + text[1:]


# Drawing the page

TRACE_HINT = "Run `emc trace` to make attribution graphs of the flagged prompts."


PAGE = "graphs"  # the page's URL path, for links and the URL it writes
FOCUS, FOCUS_PAIR = "graphs-focus", "graphs-focus-pair"  # the node selected in both graphs


def render() -> None:
    st.title("Graphs")
    store = existing_store(TRACE_HINT)
    pairs = graph_pairs(store)
    if not pairs:
        st.info(f"No base and adapted graph pairs in the store yet. {TRACE_HINT}")
        st.stop()

    prompt_col, pair_col, edges_col = st.columns([3, 4, 2], vertical_alignment="bottom")
    pair = pick_pair_in_url(store, pairs, prompt_col, pair_col, key="graphs", page=PAGE)
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
    link("review", "Review item of this prompt", prompt=pair.prompt_id)

    axis = position_axis(base.nodes, adapted.nodes)
    max_influence = largest_influence(base, adapted)
    max_weight = largest_weight(base, adapted)
    n_layers = int(max(base.nodes["layer"].max(), adapted.nodes["layer"].max()))
    identities = [node_identities(base), node_identities(adapted)]
    focus = focused_identity(pair, [base, adapted], identities)
    write_url(PAGE, node=focus)
    # A row of columns per part, so the two charts (and the two node panels) line up.
    summaries, charts, panels = (st.columns(2, gap="large") for _ in range(3))
    sides = [("Base", base, None), ("Adapted", adapted, base)]
    for i, (title, graph, reference) in enumerate(sides):
        node = node_with(identities[i], focus)
        labels = shown_labels_for_model(store, graph.record.model_id)
        laid = layout_nodes(graph.nodes, axis, max_influence, labels)
        with summaries[i]:
            show_summary(title, graph, reference, standing)
        with charts[i]:
            edges = edge_frame(graph.edges, laid, limit, focus=node, max_weight=max_weight)
            show_chart(graph, laid, edges, axis, n_layers, node)
        with panels[i]:
            other_title, other, _ = sides[1 - i]
            other_node = node_with(identities[1 - i], focus)
            absent = None
            if node is None:
                what = "this node" if other_node is None else describe_node(other, other_node)
                absent = (
                    f"The {title.lower()} graph does not have {what}, which the "
                    f"{other_title.lower()} graph has: its pruning did not keep it."
                )
            show_node(store, pair, graph, laid, node, identities[i], absent)


def focused_identity(
    pair: GraphPair, graphs: list[StoredGraph], identities: list[dict[int, str]]
) -> str | None:
    """The identity of the node selected in both graphs, and each graph's picker set to it.

    A new click on either chart wins, then a `?node=` the page did not write (a link followed),
    then the last choice on this pair (a picker's arrives through `pick_node`), else the
    default: the most probable evil target.
    """
    known = sorted({ident for ids in identities for ident in ids.values()})
    if follow_url(PAGE, "node", FOCUS, known):
        st.session_state[FOCUS_PAIR] = pair_key(pair)
    for graph, ids in zip(graphs, identities, strict=True):
        graph_id = graph.record.graph_id
        seen_key = f"graphs-seen-{graph_id}"
        clicked = clicked_node(st.session_state.get(f"graphs-chart-{graph_id}"))
        if clicked is not None and clicked != st.session_state.get(seen_key) and clicked in ids:
            st.session_state[FOCUS], st.session_state[FOCUS_PAIR] = ids[clicked], pair_key(pair)
        st.session_state[seen_key] = clicked
    kept = st.session_state.get(FOCUS_PAIR) == pair_key(pair)
    if not kept or st.session_state.get(FOCUS) not in known:
        st.session_state[FOCUS] = default_identity(*graphs)
        st.session_state[FOCUS_PAIR] = pair_key(pair)
    focus = st.session_state[FOCUS]
    for graph, ids in zip(graphs, identities, strict=True):
        st.session_state[f"graphs-node-{graph.record.graph_id}"] = node_with(ids, focus)
    return focus


def pick_node(graph_id: str, pair_id: str, identities: Mapping[int, str]) -> None:
    """A node picked in one graph's box: select the same node in both graphs."""
    node = st.session_state.get(f"graphs-node-{graph_id}")
    if node is not None:
        st.session_state[FOCUS], st.session_state[FOCUS_PAIR] = identities[node], pair_id


def describe_node(graph: StoredGraph, node: int) -> str:
    row = graph.nodes.set_index("node").loc[node].to_dict()
    return describe({"node": node, **row})


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
    node: int | None,
) -> None:
    st.altair_chart(
        graph_chart(laid, edges, axis, n_layers, selected=node, roles=target_roles(graph)),
        on_select="rerun",
        selection_mode="node",
        key=f"graphs-chart-{graph.record.graph_id}",
        width="stretch",
    )
    st.caption(f"{len(edges):,} of {len(graph.edges):,} edges drawn. {EDGE_KEY}")


def show_node(
    store: Store,
    pair: GraphPair,
    graph: StoredGraph,
    laid: pd.DataFrame,
    node: int | None,
    identities: Mapping[int, str],
    absent: str | None = None,
) -> None:
    """The node picker and the selected node's facts, effect on the targets, feature card link
    and strongest edges; where this graph lacks the node selected in the other, `absent`."""
    graph_id = graph.record.graph_id
    described = dict(zip(laid["node"], laid["description"], strict=True))
    labelled = {
        n: label
        for n, label in zip(laid["node"], laid["label"], strict=True)
        if isinstance(label, str) and label  # unlabelled nodes hold None or NaN
    }

    def name(n: int) -> str:
        return f"{described[n]} · {labelled[n]}" if n in labelled else described[n]

    st.selectbox(
        "Node",
        node_options(graph.nodes),
        index=None,
        format_func=name,
        key=f"graphs-node-{graph_id}",
        placeholder="Not in this graph: pick one of its nodes",
        on_change=pick_node,
        args=(graph_id, pair_key(pair), dict(identities)),
        help="Click a node in either chart, or pick one here: the same node is selected in "
        "both graphs",
    )
    if node is None:
        st.info(absent or "No node selected.")
        return
    details = node_details(graph, node)
    facts = dict(details.facts)
    if node in labelled:
        facts["label"] = labelled[node]
    st.dataframe(
        [{"": fact, "value": format_fact(value)} for fact, value in facts.items()],
        hide_index=True,
        width="stretch",
    )
    if facts["kind"] == "feature":
        show_effects(store, graph_id, node)
        layer, feature = int(facts["layer"]), int(facts["feature"])
        link(
            "features",
            f"Feature card L{layer}/{feature}",
            feature=f"{layer}/{feature}",
            prompt=pair.prompt_id,
        )
    else:
        st.caption("Effects on the targets are stored for feature nodes only.")
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


def show_effects(store: Store, graph_id: str, node: int) -> None:
    """The feature node's direct and total effect on each target, evil targets first."""
    effects = node_effects(store, graph_id, node)
    st.markdown(
        "**Effect on the targets**",
        help="Direct: the edge weight into the target's logit; total: along every path of the "
        "pruned graph (signed, row-normalised units). Roles are the labels the graph was traced "
        "for.",
    )
    if effects.empty:
        st.caption("No stored effects for this node.")
        return
    st.caption(effects_caption(effects_by_side(effects)))
    st.dataframe(
        effect_table(effects).style.format(
            {"probability": "{:.4f}", "direct": "{:+.4g}", "total": "{:+.4g}"}
        ),
        hide_index=True,
        width="stretch",
    )
