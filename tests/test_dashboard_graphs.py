"""The Graphs page over real base/adapted graphs of the small organism, and its layout functions."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import widgets
from dashboard.views import graphs as view
from emc.pivotal.review import make_review
from emc.store import STORE_FILE_NAME, Store
from emc.store.graph_pairs import GraphPair, graph_pairs
from emc.store.graphs import StoredGraph, load_graph_rows
from emc.store.reviews import write_reviews
from emc.tracing.compact import TOKEN_LAYER
from tests.apptest_pages import page_test
from tests.graph_store import TracedStore, build_traced_store, copy_store


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism) -> TracedStore:
    """Labelled-target graphs of base and adapted on two prompts, made once for this module."""
    return build_traced_store(small_organism, tmp_path_factory.mktemp("graphs-template"))


@pytest.fixture(scope="module")
def pair(traced) -> GraphPair:
    return graph_pairs(traced.store)[0]


@pytest.fixture(scope="module")
def base(traced, pair) -> StoredGraph:
    return load_graph_rows(traced.store, pair.base_graph_id)


@pytest.fixture(scope="module")
def adapted(traced, pair) -> StoredGraph:
    return load_graph_rows(traced.store, pair.adapted_graph_id)


@pytest.fixture
def reading(traced, monkeypatch) -> Store:
    """The page reads the shared store (reading never writes to it)."""
    monkeypatch.setenv("EMC_DATA_DIR", str(traced.data_dir))
    return traced.store


@pytest.fixture
def copied(traced, tmp_path, monkeypatch) -> Store:
    """A private copy of the store, for tests that change rows; the page reads the copy."""
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "data"))
    return copy_store(traced.data_dir, tmp_path / "data")


def open_page() -> AppTest:
    page = page_test("graphs").run()
    assert not page.exception
    return page


def texts(elements) -> str:
    return " | ".join(e.value for e in elements)


def metrics(page: AppTest) -> list[tuple[str, str]]:
    return [(m.label, m.value) for m in page.metric]


def facts_shown(page: AppTest) -> dict[str, str]:
    """The base graph's node facts table, as name -> value."""
    table = page.dataframe[2].value
    return dict(zip(table.iloc[:, 0], table["value"], strict=True))


def laid_out(*graphs: StoredGraph) -> tuple[pd.DataFrame, pd.DataFrame]:
    axis = view.position_axis(*(g.nodes for g in graphs))
    return axis, view.layout_nodes(graphs[0].nodes, axis, view.largest_influence(*graphs))


# The page


def test_without_store_the_page_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path / "nothing"))
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not (tmp_path / "nothing" / STORE_FILE_NAME).exists()  # reading never creates a store


def test_a_store_without_graphs_says_to_run_emc_trace(tmp_path, monkeypatch):
    monkeypatch.setenv("EMC_DATA_DIR", str(tmp_path))
    Store.in_data_dir(tmp_path).ensure_schema()
    page = open_page()
    assert "emc trace" in page.info[0].value
    assert not page.selectbox and not page.metric


def test_the_page_lists_the_prompts_and_shows_both_graphs_numbers(traced, reading):
    pairs = graph_pairs(traced.store)
    page = open_page()
    assert len(page.selectbox(key="graphs-prompt").options) == len(traced.prompt_ids) == 2
    assert not page.warning

    for prompt_id in traced.prompt_ids:
        page.selectbox(key="graphs-prompt").select(prompt_id).run()
        assert not page.exception
        (pair,) = [p for p in pairs if p.prompt_id == prompt_id]
        assert page.selectbox(key=f"graphs-pair-{prompt_id}").options == [widgets.pair_label(pair)]
        base = load_graph_rows(traced.store, pair.base_graph_id).record
        adapted = load_graph_rows(traced.store, pair.adapted_graph_id).record
        expected = [
            (label, f"{value:.3f}")
            for record in (base, adapted)
            for label, value in view.graph_scores(record).items()
        ]
        assert metrics(page) == expected
        captions = texts(page.caption)
        for record in (base, adapted):
            assert record.graph_id in captions and record.model_id in captions
            assert view.graph_counts(record) in captions
        # Both graphs' targets with their probabilities, and a chart each.
        base_targets, adapted_targets = page.dataframe[0].value, page.dataframe[1].value
        assert list(base_targets["role"]) == ["evil", "safe"]
        assert len(adapted_targets) == adapted.n_logits
        assert len(page.get("vega_lite_chart")) == 2


def test_a_prompt_traced_two_ways_offers_both_pairs(copied, pair):
    # A second pair of the same prompt, as a `--targets contrastive` run would add.
    with copied.write() as conn:
        for table in ("graphs", "graph_nodes", "graph_edges"):
            columns = [row[0] for row in conn.execute(f"DESCRIBE {table}").fetchall()]
            chosen = ", ".join(
                "graph_id || '-c'" if c == "graph_id" else "'contrastive'" if c == "targets" else c
                for c in columns
            )
            conn.execute(
                f"INSERT INTO {table} SELECT {chosen} FROM {table} "
                "WHERE list_contains(?, graph_id)",
                [[pair.base_graph_id, pair.adapted_graph_id]],
            )
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    choice = page.selectbox(key=f"graphs-pair-{pair.prompt_id}")
    assert len(choice.options) == 2
    assert {o.split(" ")[0] for o in choice.options} == {"labelled", "contrastive"}

    choice.select(f"{pair.base_graph_id}-c/{pair.adapted_graph_id}-c").run()
    assert not page.exception
    assert f"{pair.adapted_graph_id}-c" in texts(page.caption)


def test_a_logit_mismatch_shows_a_warning_on_that_graph(copied, pair):
    with copied.write() as conn:
        conn.execute(
            "UPDATE graphs SET logit_mismatch = 0.25, logit_mismatch_exceeds = true "
            "WHERE graph_id = ?",
            [pair.adapted_graph_id],
        )
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    (warning,) = page.warning
    assert warning.value == "graph probabilities differ from discovery logits by 0.25"


def test_a_rejected_prompt_and_a_relabelled_prompts_stale_graphs_are_marked(
    copied, traced, pair, base
):
    other = next(p for p in traced.prompt_ids if p != pair.prompt_id)
    evil, safe = sorted(base.record.params["evil_ids"]), base.record.params["safe_ids"]
    labels = {t: "evil" for t in evil} | {t: "safe" for t in safe}
    relabel = make_review(pair.prompt_id, "ana", "relabel", labels, {evil[0]: "safe"}, "not here")
    reject = make_review(other, "bo", "reject", {}, reject_reason="two questions in one")
    write_reviews(copied, [(relabel, {}), (reject, {})], run_id=None)

    page = open_page()
    options = page.selectbox(key="graphs-prompt").options
    assert [o for o in options if widgets.REJECTED_MARK in o] == [
        o for o in options if other in o
    ], options
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    assert not page.exception and not page.error
    (stale_pair,) = graph_pairs(copied, prompt_id=pair.prompt_id)
    assert stale_pair.stale
    (option,) = page.selectbox(key=f"graphs-pair-{pair.prompt_id}").options
    assert option == widgets.pair_label(stale_pair) and option.endswith(widgets.STALE_MARK)
    warnings = [w.value for w in page.warning]
    assert len(warnings) == 2, warnings  # one on each graph of the pair
    assert all(w.startswith("Stale: traced for evil ") for w in warnings)
    assert all(f"now labelled evil {evil[1:]}" in w for w in warnings)

    page.selectbox(key="graphs-prompt").select(other).run()
    assert not page.exception and not page.warning
    (error,) = page.error
    assert "rejected by human:bo: two questions in one" in error.value


def test_picking_a_node_shows_its_facts_and_strongest_edges(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    picker = page.selectbox(key=f"graphs-node-{pair.base_graph_id}")
    # Targets come first, so the page opens on a logit.
    assert picker.value == int(base.nodes.loc[base.nodes["kind"] == "logit", "node"].min())

    feature = base.nodes[base.nodes["kind"] == "feature"].nlargest(1, "influence").iloc[0]
    picker.select(int(feature["node"])).run()
    assert not page.exception
    facts = facts_shown(page)
    assert facts["kind"] == "feature" and facts["feature"] == str(feature["feature"])
    assert facts["layer"] == str(feature["layer"]) and facts["position"] == str(feature["position"])
    incoming = page.dataframe[3].value
    stored = base.edges[base.edges["target"] == feature["node"]]
    strongest = stored.loc[stored["weight"].abs().nlargest(len(incoming)).index, "source"]
    assert list(incoming["node"]) == list(strongest)


def test_a_click_on_the_chart_selects_the_node(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    error = int(base.nodes.loc[base.nodes["kind"] == "error", "node"].iloc[0])
    # What the chart's widget holds after a click on that node.
    page.session_state[f"graphs-chart-{pair.base_graph_id}"] = {
        "selection": {"node": [{"node": error}]}
    }
    page.run()
    assert not page.exception
    assert page.selectbox(key=f"graphs-node-{pair.base_graph_id}").value == error
    assert facts_shown(page)["kind"] == "error"


def test_the_edge_slider_caps_the_edges_drawn(reading, pair, base):
    page = open_page()
    page.selectbox(key="graphs-prompt").select(pair.prompt_id).run()
    page.slider(key="graphs-edges").set_value(50).run()
    assert f"50 of {len(base.edges):,} edges drawn" in texts(page.caption)
    spec = json.loads(page.get("vega_lite_chart")[0].proto.spec)
    assert spec["params"][0]["name"] == "node"


# Layout and chart data


def test_layout_puts_nodes_in_their_layer_band_and_position_column(base, adapted):
    axis, laid = laid_out(base, adapted)
    assert sorted(laid["node"]) == sorted(base.nodes["node"])
    stored = base.nodes.set_index("node")
    rows = laid.set_index("node")
    assert (rows["layer"] == stored["layer"].reindex(rows.index)).all()
    assert (rows["position"] == stored["position"].reindex(rows.index)).all()
    columns = axis.set_index("position")
    start = rows["position"].map(columns["start"])
    assert (rows["x"] > start).all()
    assert (rows["x"] < start + rows["position"].map(columns["width"])).all()
    assert ((rows["y"] - rows["layer"]).abs() < 0.5).all()
    # Tokens at the bottom, logits at the top, one token per position, labelled on the axis.
    assert (rows.loc[rows["kind"] == "token", "layer"] == TOKEN_LAYER).all()
    assert (rows.loc[rows["kind"] == "logit", "layer"] == rows["layer"].max()).all()
    assert list(axis["position"]) == list(range(len(base.record.input_ids)))
    tokens = stored[stored["kind"] == "token"].set_index("position")["token"]
    for position, label in zip(axis["position"], axis["label"], strict=True):
        assert label.startswith(f"{position} ")
        assert repr(tokens[position])[:4] in label
    # No two nodes on the same spot, and positions read left to right.
    assert not laid.duplicated(["x", "y"]).any()
    by_position = laid.groupby("position")["x"]
    assert (by_position.max().iloc[:-1].to_numpy() < by_position.min().iloc[1:].to_numpy()).all()


def test_a_crowded_position_gets_a_wider_column(base):
    axis = view.position_axis(base.nodes)
    crowd = base.nodes.groupby(["layer", "position"]).size().groupby(level="position").max()
    widths = axis.set_index("position")["width"]
    assert (widths[crowd[crowd == 1].index] == 1).all()
    assert (widths[crowd[crowd > 1].index] > 1).all()
    assert (axis["start"].diff().dropna() == axis["width"].iloc[:-1].to_numpy()).all()


def test_node_sizes_grow_with_influence(base, adapted):
    _, laid = laid_out(base, adapted)
    nodes = laid[laid["kind"] != "logit"].sort_values(["influence", "size"])
    assert nodes["size"].is_monotonic_increasing
    assert nodes["size"].iloc[-1] > nodes["size"].iloc[0]
    assert laid["size"].between(view.MIN_SIZE, view.MAX_SIZE).all()
    # A shared, larger maximum shrinks this graph's markers: sizes compare across the pair.
    axis = view.position_axis(base.nodes)
    shared = view.layout_nodes(base.nodes, axis, 10 * float(base.nodes["influence"].max()))
    own = view.layout_nodes(base.nodes, axis)
    features = own["kind"] == "feature"
    assert (shared.loc[features, "size"] < own.loc[features, "size"]).all()
    logits = laid[laid["kind"] == "logit"].sort_values("prob")
    assert logits["size"].is_monotonic_increasing


@pytest.mark.parametrize("limit", [0, 10, 100, 100_000])
def test_edge_frame_keeps_at_most_the_strongest_edges(base, limit):
    _, laid = laid_out(base)
    edges = view.edge_frame(base.edges, laid, limit)
    assert len(edges) == min(limit, len(base.edges))
    strength = base.edges["weight"].abs()
    if 0 < len(edges) < len(base.edges):
        assert edges["weight"].abs().min() >= strength.nlargest(len(edges) + 1).iloc[-1]
    # Each drawn edge runs between its stored ends.
    where = laid.set_index("node")
    assert np.allclose(edges["x"], where.loc[edges["source"], "x"])
    assert np.allclose(edges["y2"], where.loc[edges["target"], "y"])
    assert (edges["sign"] == np.where(edges["weight"] >= 0, "positive", "negative")).all()
    assert edges["opacity"].between(0, 1).all()


def test_a_focused_nodes_edges_stand_out(base):
    _, laid = laid_out(base)
    node = int(base.nodes.loc[base.nodes["kind"] == "logit", "node"].iloc[0])
    edges = view.edge_frame(base.edges, laid, 200, focus=node)
    touching = (edges["source"] == node) | (edges["target"] == node)
    assert touching.any() and (~touching).any()
    assert edges.loc[touching, "opacity"].min() > edges.loc[~touching, "opacity"].max()


def test_the_chart_draws_edges_under_clickable_nodes(base):
    axis, laid = laid_out(base)
    edges = view.edge_frame(base.edges, laid, 40)
    node = int(laid["node"].iloc[0])
    spec = view.graph_chart(laid, edges, axis, int(laid["layer"].max()), selected=node).to_dict()
    marks = [layer["mark"]["type"] for layer in spec["layer"]]
    assert marks == ["rule", "point", "text", "point"]
    assert [p["name"] for p in spec["params"]] == ["node"]
    datasets = {len(values) for values in spec["datasets"].values()}
    assert {len(edges), len(laid), 1} <= datasets  # edges, nodes, the selected node's ring


def test_mismatch_warning_only_when_the_graph_exceeds_the_tolerance(base):
    record = base.record
    assert view.mismatch_warning(record.model_copy(update={"logit_mismatch_exceeds": None})) is None
    assert (
        view.mismatch_warning(record.model_copy(update={"logit_mismatch_exceeds": False})) is None
    )
    shown = view.mismatch_warning(
        record.model_copy(update={"logit_mismatch_exceeds": True, "logit_mismatch": 0.0312})
    )
    assert shown == "graph probabilities differ from discovery logits by 0.0312"
    ids_differ = record.model_copy(update={"logit_mismatch_exceeds": True, "logit_mismatch": None})
    assert "not the ones discovery scored" in view.mismatch_warning(ids_differ)
