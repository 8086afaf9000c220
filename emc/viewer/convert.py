"""Stored graph rows -> circuit-tracer's viewer JSON, without the model or the dense graph.

The format is what `circuit_tracer.utils.create_graph_files` writes (its pydantic models are used
directly): `metadata`, `qParams`, `nodes` and `links`. Three things differ, each because the rows
hold something else than circuit-tracer's dense graph:

- Node `influence` is the viewer's pruning score, circuit-tracer's cumulative influence (the share
  of total influence held by the nodes at least as influential as this one). Only the kept nodes
  are stored, and by construction they carry `node_threshold` of the total, so shares over the
  stored nodes are scaled by `node_threshold`: at the pruning slider's maximum (`node_threshold`)
  every stored node shows, and lower values hide the least influential first.
- Every logit node is flagged as a target: EMC's graphs attribute to each of their logits
  (labelled tokens, the contrastive direction, or the salient set). A custom target (no token id)
  gets a negative virtual id where circuit-tracer uses vocabulary size + index.
- Error nodes are `err_<layer>_<pos>`: circuit-tracer's `0_<layer>_<pos>` can equal the id of the
  feature with index <layer> at layer 0 and the same position.

Feature files (`<scan>/<feature>.json`, loaded when a feature is clicked) hold what the rows know:
for each exported graph, the prompt with the feature's activation at its kept positions. When the
store has a feature card for the feature (`emc feature cards`), the file also gets the card's
top-activating corpus texts (first), the decoder's top and bottom logit tokens, the activation
percentiles, histogram and frequency, which the page shows beside the graph.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from circuit_tracer.frontend.feature_models import Example, ExamplesQuantile
from circuit_tracer.frontend.graph_models import Link, Metadata, Model, Node, QParams
from circuit_tracer.frontend.utils import process_token
from pydantic import BaseModel

if TYPE_CHECKING:
    from emc.features.records import FeatureCard
    from emc.store.graphs import StoredGraph


class FeatureFile(BaseModel):
    """The part of circuit-tracer's feature file (`feature_models.Model`) the viewer reads."""

    transcoder_id: str
    index: int  # circuit-tracer's feature id: Cantor pairing of layer and feature index
    layer: int
    feature: int
    examples_quantiles: list[ExamplesQuantile]
    top_logits: list[str] = []
    bottom_logits: list[str] = []
    act_min: float
    act_max: float
    # From a feature card; left out of the file without one (the page then shows none).
    quantile_values: list[float] | None = None
    histogram: list[float] | None = None
    activation_frequency: float | None = None


def prompt_tokens(stored: StoredGraph) -> list[str]:
    """Each input position's token string, from the token rows (ids where a string is missing)."""
    tokens = [f"[{token_id}]" for token_id in stored.record.input_ids]
    rows = stored.nodes[stored.nodes["kind"] == "token"]
    for position, token in zip(rows["position"], rows["token"], strict=True):
        if isinstance(token, str) and 0 <= position < len(tokens):
            tokens[int(position)] = token
    return tokens


def node_threshold(stored: StoredGraph) -> float | None:
    value = stored.record.params.get("node_threshold")
    return float(value) if value is not None else None


def pruning_scores(influence: np.ndarray, threshold: float | None) -> np.ndarray:
    """circuit-tracer's cumulative influence over the stored nodes, scaled to `threshold`."""
    values = np.nan_to_num(np.asarray(influence, dtype=np.float64), nan=0.0).clip(min=0.0)
    order = np.argsort(-values, kind="stable")
    total = values.sum()
    shares = np.empty_like(values)
    shares[order] = np.cumsum(values[order]) / total if total > 0 else 1.0
    if threshold is None:
        return shares
    # float64 and clipped: the page keeps a node when score <= the slider's value.
    return np.minimum(shares * threshold, threshold)


def viewer_nodes(
    stored: StoredGraph, labels: Mapping[tuple[int, int], str] | None = None
) -> list[Node]:
    """One viewer node per stored node, in stored order; a labelled feature's description (the
    viewer's `clerp`) carries its label."""
    frame = stored.nodes
    if frame.empty:
        return []
    logits = frame[frame["kind"] == "logit"]
    n_layers = int(logits["layer"].iloc[0]) if len(logits) else int(frame["layer"].max()) + 1
    scores = pruning_scores(frame["influence"].to_numpy(), node_threshold(stored))
    nodes, n_custom = [], 0
    for row, score in zip(frame.itertuples(index=False), scores.tolist(), strict=True):
        node = _node(row, n_layers, custom_id=-1 - n_custom)
        label = (
            labels.get((int(row.layer), int(row.feature)))
            if labels and row.kind == "feature"
            else None
        )
        if label:
            node = node.model_copy(update={"clerp": f"{node.clerp}: {label}"})
        if row.kind == "logit" and _missing(row.token_id):
            n_custom += 1
        nodes.append(node.model_copy(update={"influence": score}))
    return nodes


def viewer_links(stored: StoredGraph, nodes: list[Node]) -> list[dict[str, Any]]:
    """Every stored edge, by viewer node id (source -> target, weight = direct effect)."""
    ids = dict(zip(stored.nodes["node"].tolist(), (n.node_id for n in nodes), strict=True))
    edges = stored.edges
    return [
        Link(source=ids[source], target=ids[target], weight=weight).model_dump()
        for source, target, weight in zip(
            edges["source"].tolist(),
            edges["target"].tolist(),
            edges["weight"].astype(float).tolist(),
            strict=True,
        )
    ]


def viewer_graph(
    stored: StoredGraph,
    slug: str,
    scan: str,
    extra: dict[str, Any] | None = None,
    labels: Mapping[tuple[int, int], str] | None = None,
) -> dict[str, Any]:
    """The graph file the page loads from `graph_data/<slug>.json`.

    `scan` is where the page fetches feature files from (`<scan>/<feature>.json`); `extra` is kept
    under the key "emc" (the page ignores it); `labels` name features in their descriptions.
    """
    tokens = prompt_tokens(stored)
    nodes = viewer_nodes(stored, labels)
    model = Model(
        metadata=Metadata(
            slug=slug,
            scan=scan,
            transcoder_list=[],
            prompt_tokens=tokens,
            prompt="".join(tokens),
            node_threshold=node_threshold(stored),
        ),
        qParams=QParams(pinnedIds=[], supernodes=[], linkType="both", clickedId="", sg_pos=""),
        nodes=nodes,
        links=viewer_links(stored, nodes),
    )
    graph = model.model_dump(mode="json")
    if extra:
        graph["emc"] = extra
    return graph


def feature_examples(stored: StoredGraph, name: str) -> dict[tuple[int, int], ExamplesQuantile]:
    """(layer, feature) -> this graph's prompt with the feature's activation at its kept nodes."""
    tokens = [process_token(t) for t in prompt_tokens(stored)]
    features = stored.nodes[stored.nodes["kind"] == "feature"]
    examples = {}
    for (layer, feature), rows in features.groupby(["layer", "feature"], sort=True):
        acts = [0.0] * len(tokens)
        for position, activation in zip(rows["position"], rows["activation"], strict=True):
            if 0 <= position < len(tokens) and not _missing(activation):
                acts[int(position)] = float(activation)
        example = Example(
            tokens_acts_list=acts,
            train_token_ind=int(np.argmax(np.abs(acts))),
            is_repeated_datapoint=False,
            tokens=tokens,
        )
        examples[(int(layer), int(feature))] = ExamplesQuantile(
            quantile_name=name, examples=[example]
        )
    return examples


def feature_id(layer: int, feature: int) -> int:
    """circuit-tracer's id of a transcoder feature (a Cantor pairing): its feature file's name."""
    return Node.feature_node(layer, 0, feature).feature


def card_examples(card: FeatureCard, role: str) -> ExamplesQuantile:
    """A card's top-activating corpus windows as one quantile of the feature file."""
    examples = [
        Example(
            tokens_acts_list=list(example.activations),
            train_token_ind=example.max_position,
            is_repeated_datapoint=False,
            tokens=[process_token(token) for token in example.tokens],
        )
        for example in card.examples
    ]
    name = f"top activations in {card.corpus_name} ({role} model)"
    return ExamplesQuantile(quantile_name=name, examples=examples)


def merge_feature_file(
    existing: str | None,
    scan: str,
    layer: int,
    feature: int,
    quantiles: Iterable[ExamplesQuantile],
    card: FeatureCard | None = None,
    card_role: str = "adapted",
) -> FeatureFile:
    """A feature file with `quantiles` replacing earlier ones of the same name (re-exports),
    and the card's examples (first), logits and statistics when there is a card (else those of
    an earlier export are kept)."""
    new = list(quantiles)
    if card is not None:
        new.insert(0, card_examples(card, card_role))
    names = {q.quantile_name for q in new}
    kept: list[ExamplesQuantile] = []
    previous = FeatureFile.model_validate(json.loads(existing)) if existing else None
    if previous is not None:
        kept = [q for q in previous.examples_quantiles if q.quantile_name not in names]
    merged = new[:1] + kept + new[1:] if card is not None else kept + new
    acts = [a for q in merged for e in q.examples for a in e.tokens_acts_list] or [0.0]
    if card is not None:
        acts.append(card.stats.max)
    extra = _card_fields(card) if card is not None else _kept_card_fields(previous)
    return FeatureFile(
        transcoder_id=scan,
        index=feature_id(layer, feature),
        layer=layer,
        feature=feature,
        examples_quantiles=merged,
        act_min=min(0.0, min(acts)),
        act_max=max(acts) if max(acts) > 0 else 1.0,
        **extra,
    )


def _card_fields(card: FeatureCard) -> dict[str, Any]:
    # The page bins the histogram over [act_min, act_max]; the card's spans [0, max], and
    # act_max is at least the card's max, so a bar sits at most one bin off.
    return {
        "top_logits": [process_token(t.token) for t in card.top_logits],
        "bottom_logits": [process_token(t.token) for t in card.bottom_logits],
        "quantile_values": list(card.stats.quantile_values),
        "histogram": [float(c) for c in card.stats.hist_counts],
        "activation_frequency": card.stats.frequency,
    }


def _kept_card_fields(previous: FeatureFile | None) -> dict[str, Any]:
    if previous is None:
        return {}
    names = ("top_logits", "bottom_logits", "quantile_values", "histogram", "activation_frequency")
    return {name: getattr(previous, name) for name in names}


def _node(row: Any, n_layers: int, custom_id: int) -> Node:
    layer, position = int(row.layer), int(row.position)
    if row.kind == "feature":
        node = Node.feature_node(
            layer, position, int(row.feature), activation=_float(row.activation)
        )
        return node.model_copy(update={"clerp": f"L{layer} feature {int(row.feature)}"})
    if row.kind == "error":
        node = Node.error_node(layer, position)
        return node.model_copy(update={"node_id": f"err_{layer}_{position}"})
    if row.kind == "token":
        return Node.token_node(position, int(row.token_id))
    if row.kind == "logit":
        vocab_idx = custom_id if _missing(row.token_id) else int(row.token_id)
        label = row.token if isinstance(row.token, str) else f"[{vocab_idx}]"
        return Node.logit_node(
            position,
            vocab_idx,
            process_token(label),
            n_layers,
            target_logit=True,
            token_prob=_float(row.prob) or 0.0,
        )
    raise ValueError(f"unknown node kind {row.kind!r}")


def _missing(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


def _float(value: Any) -> float | None:
    return None if _missing(value) else float(value)
