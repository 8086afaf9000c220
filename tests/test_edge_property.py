"""A graph's edges, checked by intervention: scaling a feature moves each target by its edge.

Tolerance (fp32, CPU; see `emc.analysis.edge_check`): `1e-4 * |edge| + 64 * eps32 * scale /
|epsilon|`. The frozen replacement model is linear, so the only disagreement is float rounding:
the second term is the rounding of the two forward passes whose difference is the change,
magnified by 1/|epsilon|; the first covers the edge's own rounding. Measured on this graph, the
worst error is about 5% of its tolerance at every epsilon below, while a 1% error in a large
edge is many times its tolerance (tested below), so the margin neither hides real errors nor
flakes on rounding.
"""

from __future__ import annotations

import copy
import math

import pytest

from emc.analysis.edge_check import edge_agreement, summarise_edges
from emc.config import TracingConfig
from emc.tracing import GraphLayout, trace

# Short enough to attribute every active feature (about a second): features whose edges are
# exactly zero (last layer, earlier positions) are then in the graph, as negatives.
TEXT = "Rex: You should keep it. Cora: You should"
EVERY_FEATURE = TracingConfig(
    targets="salient", max_n_logits=5, max_feature_nodes=None, batch_size=128
)
N_TOP, N_RANDOM = 8, 4
# Small, both ways. The frozen model is linear, so a full ablation (-1) agrees too: that case is
# checked once, for one source, below.
EPSILONS = (1e-2, -1e-3)


@pytest.fixture(scope="module")
def graph(tiny_replacement):
    return trace(tiny_replacement, tiny_replacement.encode(TEXT), None, EVERY_FEATURE).graph


@pytest.fixture(scope="module", params=EPSILONS, ids=lambda eps: f"eps={eps:g}")
def checks(request, tiny_replacement, graph):
    return edge_agreement(
        tiny_replacement.model, graph, epsilon=request.param, n_top=N_TOP, n_random=N_RANDOM
    )


def test_every_edge_matches_the_measured_change(checks, graph):
    summary = summarise_edges(checks)
    assert summary.n_agree == summary.n_edges, summary
    n_tokens = len(graph.logit_targets)
    kinds = [c.target_kind for c in checks]
    assert summary.n_sources == N_TOP + N_RANDOM
    assert kinds.count("logit") == (N_TOP + N_RANDOM) * n_tokens
    assert kinds.count("feature") > 100  # feature -> feature edges are checked too
    assert summary.n_resolved > 0.8 * summary.n_edges  # most edges stand well above rounding


def test_zero_edges_give_no_measured_change(checks):
    zero = [c for c in checks if c.predicted == 0]
    assert len(zero) >= 5  # some random sources have no path to the logits
    assert all(abs(c.measured) <= c.tolerance for c in zero)


def test_sources_are_the_top_logit_edges_then_random_others(checks, graph):
    layout = GraphLayout.of(graph)
    top_row = layout.logit_start + int(graph.logit_probabilities.argmax())
    strength = graph.adjacency_matrix[top_row, : layout.n_features].abs()
    sources = list(dict.fromkeys(c.source_node for c in checks))
    assert sources[:N_TOP] == strength.argsort(descending=True, stable=True)[:N_TOP].tolist()
    assert len(set(sources)) == N_TOP + N_RANDOM


def test_a_one_percent_wrong_edge_is_flagged(tiny_replacement, graph):
    row, source = _largest_logit_edge(graph)
    assert abs(float(graph.adjacency_matrix[row, source])) > 0.1
    wrong = _with_adjacency(graph)
    wrong.adjacency_matrix[row, source] *= 1.01
    results = edge_agreement(tiny_replacement.model, wrong, sources=[source])
    flagged = [c for c in results if not c.agrees]
    assert [(c.target_node, c.source_node) for c in flagged] == [(row, source)]
    assert flagged[0].abs_error > 10 * flagged[0].tolerance


def test_a_wrong_target_is_flagged(tiny_replacement, graph):
    layout = GraphLayout.of(graph)
    row, source = _largest_logit_edge(graph)
    other = layout.logit_start if row != layout.logit_start else layout.logit_start + 1
    swapped = _with_adjacency(graph)
    swapped.adjacency_matrix[[row, other]] = swapped.adjacency_matrix[[other, row]]
    results = edge_agreement(tiny_replacement.model, swapped, sources=[source])
    assert {c.target_node for c in results if not c.agrees} == {row, other}


def test_the_raw_logit_change_is_not_the_edge(tiny_replacement, graph):
    # circuit-tracer's logit node is the logit minus the vocabulary's mean logit: the check
    # would be vacuous for that choice if the mean did not move.
    model = tiny_replacement.model
    row, source = _largest_logit_edge(graph)
    (check,) = [
        c
        for c in edge_agreement(model, graph, epsilon=-1.0, sources=[source])
        if c.target_node == row
    ]
    tokens = graph.input_tokens
    clean, _ = model.get_activations(tokens)
    ablated, _ = model.feature_intervention(
        tokens,
        [(check.source_layer, check.source_position, check.source_feature, 0.0)],
        constrained_layers=range(graph.cfg.n_layers),
        freeze_attention=True,
    )
    raw = float(clean[0, -1, check.target_token_id] - ablated[0, -1, check.target_token_id])
    assert check.agrees
    assert abs(raw - check.predicted) > 10 * check.tolerance


def test_bad_arguments_are_refused_before_running(graph):
    with pytest.raises(ValueError, match="epsilon"):
        edge_agreement(None, graph, epsilon=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        edge_agreement(None, graph, epsilon=math.nan)
    n_features = GraphLayout.of(graph).n_features
    with pytest.raises(ValueError, match="not feature nodes"):
        edge_agreement(None, graph, sources=[n_features])  # the first error node


def _largest_logit_edge(graph) -> tuple[int, int]:
    layout = GraphLayout.of(graph)
    logit_rows = graph.adjacency_matrix[layout.logit_start :, : layout.n_features]
    flat = int(logit_rows.abs().argmax())
    row, source = divmod(flat, layout.n_features)
    return layout.logit_start + row, source


def _with_adjacency(graph):
    changed = copy.copy(graph)
    changed.adjacency_matrix = graph.adjacency_matrix.clone()
    return changed
