"""Paths to a target: the beam search against brute force, the diff on a known change, and on a
fine-tune that changed nothing (no path may be reported as gained or lost)."""

from __future__ import annotations

import itertools
import random
from types import SimpleNamespace

import pandas as pd
import pytest

from emc.analysis.paths import most_probable_evil, path_diff, path_weight, top_paths
from emc.store.graphs import StoredGraph

LOGIT = 99


def _graph(edges: dict[tuple[int, int], float], features: dict[int, tuple[int, int, int]]):
    """Tokens 0-2 at positions 0-2, features {node: (layer, position, index)}, error node 50,
    and one evil logit node 99 ('hide', id 7)."""
    rows = [
        {"node": n, "kind": "token", "layer": -1, "position": n, "feature": None,
         "token_id": 100 + n, "token": f"t{n}", "prob": None}
        for n in range(3)
    ]  # fmt: skip
    rows += [
        {"node": n, "kind": "feature", "layer": layer, "position": pos, "feature": index,
         "token_id": None, "token": None, "prob": None}
        for n, (layer, pos, index) in features.items()
    ]  # fmt: skip
    rows.append({"node": 50, "kind": "error", "layer": 0, "position": 2, "feature": None,
                 "token_id": None, "token": None, "prob": None})  # fmt: skip
    rows.append({"node": LOGIT, "kind": "logit", "layer": 3, "position": 2, "feature": None,
                 "token_id": 7, "token": " hide", "prob": 0.4})  # fmt: skip
    nodes = pd.DataFrame(rows)
    edge_rows = pd.DataFrame(
        [{"source": s, "target": t, "weight": w} for (s, t), w in edges.items()]
    )
    record = SimpleNamespace(params={"evil_ids": [7], "safe_ids": [8]})
    return StoredGraph(record=record, nodes=nodes, edges=edge_rows)


FEATURES = {10: (0, 1, 5), 11: (0, 2, 6), 20: (1, 2, 40), 21: (2, 2, 41)}
BASE_EDGES = {
    (0, 10): 1.0, (1, 10): 0.5, (1, 11): 2.0, (10, 20): 0.8, (11, 20): -0.5, (50, 20): 0.3,
    (20, 21): 1.5, (20, LOGIT): 1.0, (21, LOGIT): 0.7, (2, LOGIT): 0.1, (11, LOGIT): 0.2,
}  # fmt: skip


def _brute_force(graph: StoredGraph, max_edges: int) -> list[tuple[tuple, float]]:
    edges = {(int(s), int(t)): float(w) for s, t, w in graph.edges.itertuples(index=False)}
    kinds = dict(zip(graph.nodes["node"], graph.nodes["kind"], strict=True))
    found = []
    for length in range(1, max_edges + 1):
        for chain in itertools.permutations(list(kinds), length + 1):
            if chain[-1] != LOGIT or kinds[chain[0]] not in ("token", "error"):
                continue
            if any(kinds[n] not in ("feature",) for n in chain[1:-1]):
                continue
            if all((a, b) in edges for a, b in itertools.pairwise(chain)):
                weight = 1.0
                for a, b in itertools.pairwise(chain):
                    weight *= edges[(a, b)]
                found.append((chain, weight))
    return sorted(found, key=lambda p: -abs(p[1]))


def test_top_paths_equal_brute_force_on_a_small_graph():
    graph = _graph(BASE_EDGES, FEATURES)
    expected = _brute_force(graph, 4)
    found = top_paths(graph, LOGIT, k=100)
    assert [round(p.weight, 9) for p in found] == [round(w, 9) for _, w in expected]
    # The strongest: t1 -> L0/6 -> L1/40 -> L2/41 -> logit = 2.0 * -0.5 * 1.5 * 0.7
    assert found[0].weight == pytest.approx(-1.05)
    assert [key[0] for key in found[0].nodes] == ["token", "feature", "feature", "feature", "logit"]


def test_top_paths_match_brute_force_on_random_graphs():
    rng = random.Random(3)
    for _ in range(20):
        edges = {
            (s, t): rng.uniform(-2, 2)
            for s in [0, 1, 2, 50, 10, 11, 20, 21]
            for t in [10, 11, 20, 21, LOGIT]
            if rng.random() < 0.6 and _order(s) < _order(t)
        }
        graph = _graph(edges, FEATURES)
        expected = [round(w, 9) for _, w in _brute_force(graph, 3)][:5]
        assert [round(p.weight, 9) for p in top_paths(graph, LOGIT, k=5, max_edges=3)] == expected


def _order(node: int) -> int:
    return {0: 0, 1: 0, 2: 0, 50: 1, 10: 1, 11: 1, 20: 2, 21: 3, LOGIT: 4}[node]


def test_path_diff_reports_the_changed_chain_and_nothing_for_an_unchanged_model():
    base = _graph(BASE_EDGES, FEATURES)
    same = path_diff(base, _graph(dict(BASE_EDGES), FEATURES), 7, k=20)
    assert (
        len(same) > 0 and (same["delta"].abs() < 1e-12).all() and set(same["kept_in"]) == {"both"}
    )
    # The fine-tune strengthens L0/5 -> L1/40 and adds L1/40's new route via a new feature.
    changed = {**BASE_EDGES, (10, 20): 3.0}
    features = {**FEATURES, 22: (1, 2, 77)}
    changed[(1, 22)] = 2.0
    changed[(22, LOGIT)] = 2.5
    diff = path_diff(base, _graph(changed, features), 7, k=5, labels={(1, 77): "hide advice"})
    gained = diff[diff["change"] == "gained"]
    top = diff.iloc[0]
    assert top["change"] == "gained"
    assert top["path"] == "'t1'@1 → L1/77@2 (hide advice) → logit ' hide'"
    assert top["base_weight"] == 0 and top["adapted_weight"] == pytest.approx(5.0)
    assert top["kept_in"] == "adapted"
    strengthened = gained[gained["path"] == "'t0'@0 → L0/5@1 → L1/40@2 → logit ' hide'"]
    assert strengthened["delta"].iloc[0] == pytest.approx(3.0 - 0.8)
    assert path_weight(base, top_paths(base, LOGIT, 1)[0].nodes) == pytest.approx(-1.05)


def test_the_most_probable_evil_target_is_found():
    assert most_probable_evil(_graph(BASE_EDGES, FEATURES)) == 7


@pytest.fixture(scope="module")
def traced(tmp_path_factory, small_organism):
    from tests.graph_store import build_traced_store

    return build_traced_store(small_organism, tmp_path_factory.mktemp("paths-store"), n_prompts=1)


def test_on_real_graphs_path_weights_are_edge_products_and_a_graph_against_itself_is_unchanged(
    traced,
):
    from emc.store.graph_diff import pair_paths
    from emc.store.graph_pairs import graph_pairs
    from emc.store.graphs import load_graph_rows

    pair = graph_pairs(traced.store)[0]
    adapted = load_graph_rows(traced.store, pair.adapted_graph_id)
    evil = most_probable_evil(adapted)
    assert evil is not None
    found = pair_paths(traced.store, pair, k=10)
    assert found.token_id == evil and len(found.paths) > 0
    assert set(found.paths["change"]) <= {"gained", "lost", "unchanged"}
    target = int(adapted.nodes.loc[adapted.nodes["token_id"] == evil, "node"].iloc[0])
    for path in top_paths(adapted, target, k=10):
        assert path_weight(adapted, path.nodes) == pytest.approx(path.weight, rel=1e-6)
        assert path.nodes[0][0] in ("token", "error") and path.nodes[-1][0] == "logit"
    itself = path_diff(adapted, adapted, evil, k=10)
    assert set(itself["change"]) == {"unchanged"} and (itself["delta"] == 0).all()
