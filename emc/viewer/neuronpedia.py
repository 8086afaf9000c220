"""Stored graphs -> Neuronpedia's attribution-graph JSON, checked against EMC's schema of it.

Neuronpedia's circuit viewer loads (and its upload accepts) one JSON file per graph in the format
circuit-tracer's frontend reads, with a few rules of its own; `neuronpedia_schema.json` beside
this module states them, and names the Neuronpedia schema version and the files they were read
from. Nodes and links are those of the viewer export (`emc.viewer.convert`: every stored pruned
node and edge, influence as the pruning score, every logit a target). What differs:

- A feature node's `clerp` (its description) is its label where the caller has one
  (`labels`, (layer, feature) -> text), else a summary of its feature card (the decoder's top
  logit tokens), else "L<layer> feature <index>".
- `metadata.schema_version` is 1 (feature ids are Cantor pairs of layer and index, which is how
  the viewer decodes them), `slug` and `scan` hold only letters, digits, "_" and "-" (all that the
  upload accepts; `scan` is read as Neuronpedia's model id), `node_threshold` is left out when the
  graph has none, and the graph's params fill `generation_settings` / `pruning_settings`.
- EMC's provenance (graph, prompt, model, role, run, precision, targets, scores, and the model,
  adapter and transcoder references: hub names as they are, local paths by their last part
  only, since an uploaded graph is public) is in `metadata.info.emc`, and a sentence of it in
  `metadata.info.description`; nothing is added outside what Neuronpedia's schema allows.

`validate_neuronpedia` checks a graph against the schema and what JSON Schema cannot say (link
ends name nodes, node ids are unique, numbers are finite); `export_neuronpedia` writes a
prompt's base and adapted graphs only once every one of them passes.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

from circuit_tracer.frontend.utils import process_token
from pydantic import BaseModel

import emc
from emc.store import list_models
from emc.store.feature_labels import shown_labels_for_model
from emc.store.prompts import get_prompts
from emc.viewer.convert import node_threshold, prompt_tokens, viewer_links, viewer_nodes
from emc.viewer.errors import ExportDirError, GraphSchemaError
from emc.viewer.export import ExportedGraph, _cards, _paired_graphs, _slugs, resolve_prompt_id
from emc.viewer.layout import INDEX_FILE, NEURONPEDIA_DIR

if TYPE_CHECKING:
    from emc.features.records import Feature, FeatureCard
    from emc.store import Store
    from emc.store.graphs import StoredGraph
    from emc.store.models import ModelRow

SCHEMA_FILE = "neuronpedia_schema.json"
SCHEMA_VERSION = 1  # Neuronpedia's metadata.schema_version: Cantor-paired feature ids
VALIDATOR_URL = "https://www.neuronpedia.org/graph/validator"
SHOWN_PROBLEMS = 5
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_CARD_TOKENS = 3
_LOCAL_PATH = re.compile(r"^(/|~|\.|\\|[A-Za-z]:)")  # absolute, home, relative, Windows


class NeuronpediaExportResult(BaseModel):
    prompt_id: str
    prompt_name: str
    out_dir: Path
    scan: str
    graphs: list[ExportedGraph]


def neuronpedia_schema() -> dict[str, Any]:
    """EMC's JSON Schema (draft 2020-12) of the Neuronpedia graph files it writes."""
    return json.loads(_schema_text())


@cache
def _schema_text() -> str:
    try:
        return (files("emc.viewer") / SCHEMA_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GraphSchemaError(
            f"emc/viewer/{SCHEMA_FILE} is missing from the installed EMC package, so Neuronpedia "
            "files cannot be checked: reinstall EMC (the file must ship as package data)"
        ) from None


def upload_safe(text: str, fallback: str) -> str:
    """`text` with every run of characters other than letters, digits, "_" and "-" as "-"."""
    return _UNSAFE.sub("-", text).strip("-") or fallback


def default_scan(model: ModelRow) -> str:
    """The base model's short name (the last part of its reference), lower case and upload-safe:
    the same for a base model and an adapter on it."""
    name = model.base_ref.rstrip("/").split("/")[-1].lower()
    return upload_safe(name, "emc-model")


def feature_clerp(
    layer: int,
    feature: int,
    labels: Mapping[Feature, str] | None = None,
    cards: Mapping[Feature, FeatureCard] | None = None,
) -> str:
    """A feature node's description: its label, else its card's top logit tokens, else its name."""
    key = (int(layer), int(feature))
    label = (labels or {}).get(key)
    if isinstance(label, str) and label.strip():
        return label.strip()
    name = f"L{key[0]} feature {key[1]}"
    card = (cards or {}).get(key)
    if card is not None and card.top_logits:
        tokens = ", ".join(
            json.dumps(process_token(t.token), ensure_ascii=False)
            for t in card.top_logits[:_CARD_TOKENS]
        )
        return f"{name} (top logits: {tokens})"
    return name


def neuronpedia_graph(
    stored: StoredGraph,
    model: ModelRow,
    slug: str,
    scan: str | None = None,
    labels: Mapping[Feature, str] | None = None,
    cards: Mapping[Feature, FeatureCard] | None = None,
) -> dict[str, Any]:
    """One stored graph as a Neuronpedia graph file (a JSON-ready dict); reads nothing else.

    `model` is the graph's model row (role, precision, references); `scan` defaults to
    `default_scan(model)`; `labels` and `cards`, keyed by (layer, feature), describe feature
    nodes (a label wins over a card).
    """
    record = stored.record
    nodes = viewer_nodes(stored)
    written = []
    for row, node in zip(stored.nodes.itertuples(index=False), nodes, strict=True):
        data = node.model_dump(mode="json")
        if row.kind == "feature":
            data["clerp"] = feature_clerp(int(row.layer), int(row.feature), labels, cards)
        written.append(data)
    tokens = prompt_tokens(stored)
    metadata: dict[str, Any] = {
        "slug": slug,
        "scan": default_scan(model) if scan is None else scan,
        "prompt_tokens": tokens,
        "prompt": "".join(tokens),
        "schema_version": SCHEMA_VERSION,
        "info": _info(stored, model),
    }
    threshold = node_threshold(stored)
    if threshold is not None:
        metadata["node_threshold"] = threshold
    metadata.update(_settings(record.params))
    return {
        "metadata": metadata,
        "qParams": {
            "pinnedIds": [],
            "supernodes": [],
            "linkType": "both",
            "clickedId": "",
            "sg_pos": "",
        },
        "nodes": written,
        "links": viewer_links(stored, nodes),
    }


def neuronpedia_problems(graph: Any) -> list[str]:
    """Where `graph` breaks the schema ("$.path: what"), then the checks JSON Schema cannot
    express; empty when it is a valid Neuronpedia graph file."""
    validator = _validator()
    errors = sorted(validator.iter_errors(graph), key=lambda e: (e.json_path, e.message))
    problems = [f"{e.json_path}: {_short(e.message)}" for e in errors]
    return problems or _integrity_problems(graph)


def validate_neuronpedia(graph: Any) -> None:
    """Raise GraphSchemaError naming the first problems when `graph` is not a valid file."""
    problems = neuronpedia_problems(graph)
    if not problems:
        return
    metadata = graph.get("metadata") if isinstance(graph, Mapping) else None
    slug = metadata.get("slug") if isinstance(metadata, Mapping) else None
    more = len(problems) - SHOWN_PROBLEMS
    listed = "; ".join(problems[:SHOWN_PROBLEMS]) + (f"; and {more} more" if more > 0 else "")
    raise GraphSchemaError(
        f"graph {slug!r} does not match Neuronpedia's graph schema (emc/viewer/{SCHEMA_FILE}): "
        f"{listed}"
    )


def default_neuronpedia_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / NEURONPEDIA_DIR


def export_neuronpedia(
    store: Store,
    prompt: str,
    out_dir: str | Path,
    labels: Mapping[Feature, str] | None = None,
    scan: str | None = None,
) -> NeuronpediaExportResult:
    """Write `<slug>.json` in Neuronpedia's format for every graph of the prompt's base/adapted
    pairs (id or unique prefix). Every file is checked first: one invalid graph writes none.
    Features are described by `labels`, by default the store's shown labels."""
    if scan is not None and (scan == "" or _UNSAFE.search(scan)):
        raise GraphSchemaError(
            f"scan {scan!r} is not a Neuronpedia model id: use only letters, digits, '_' and '-'"
        )
    out = Path(out_dir)
    if (out / INDEX_FILE).is_file():
        raise ExportDirError(
            f"{out} holds viewer files ({INDEX_FILE}); Neuronpedia files have the same names "
            "and would replace them: choose another --out"
        )
    prompt_id = resolve_prompt_id(store, prompt)
    (record,) = get_prompts(store, [prompt_id])
    graphs = _paired_graphs(store, prompt_id)
    models = {m.model_id: m for m in list_models(store)}
    slugs = _slugs(prompt_id, graphs, models)
    features = {
        (int(layer), int(feature))
        for stored in graphs
        for layer, feature in stored.nodes.loc[
            stored.nodes["kind"] == "feature", ["layer", "feature"]
        ].itertuples(index=False)
    }
    cards = _cards(store, graphs, models, sorted(features))
    made = []
    for stored in graphs:
        model = models[stored.record.model_id]
        slug = upload_safe(slugs[stored.record.graph_id], "graph")
        named = labels if labels is not None else shown_labels_for_model(store, model.model_id)
        graph = neuronpedia_graph(stored, model, slug, scan, named, cards)
        try:
            validate_neuronpedia(graph)
        except GraphSchemaError as exc:
            raise GraphSchemaError(
                f"{exc}. Nothing was written to {out}: this is a bug in EMC's export, please "
                f"report it with the prompt id {prompt_id}"
            ) from None
        made.append((stored, model, slug, graph))
    out.mkdir(parents=True, exist_ok=True)
    exported = []
    for stored, model, slug, graph in made:
        path = out / f"{slug}.json"
        path.write_text(json.dumps(graph, separators=(",", ":"), allow_nan=False), "utf-8")
        exported.append(ExportedGraph.written(stored, model, slug, path, graph))
    return NeuronpediaExportResult(
        prompt_id=prompt_id,
        prompt_name=record.name,
        out_dir=out,
        scan=made[0][3]["metadata"]["scan"],
        graphs=exported,
    )


@cache
def _validator():
    try:
        from jsonschema import Draft202012Validator
    except ImportError:
        raise GraphSchemaError(
            "the jsonschema package is not installed, so Neuronpedia files cannot be checked: "
            "`pip install jsonschema`"
        ) from None
    return Draft202012Validator(json.loads(_schema_text()))


def _integrity_problems(graph: Mapping[str, Any]) -> list[str]:
    problems = []
    nodes, links = graph["nodes"], graph["links"]
    counts = Counter(node["node_id"] for node in nodes)
    problems += [
        f"$.nodes: node id {node_id!r} appears {n} times" for node_id, n in counts.items() if n > 1
    ]
    for i, node in enumerate(nodes):
        for key in ("token_prob", "influence", "activation"):
            if not _finite(node.get(key)):
                problems.append(f"$.nodes[{i}].{key}: {node[key]!r} is not a finite number")
    for i, link in enumerate(links):
        problems += [
            f"$.links[{i}].{end}: {link[end]!r} is not a node id"
            for end in ("source", "target")
            if link[end] not in counts
        ]
        if not _finite(link["weight"]):
            problems.append(f"$.links[{i}].weight: {link['weight']!r} is not a finite number")
    if not _finite(graph["metadata"].get("node_threshold")):
        problems.append("$.metadata.node_threshold: not a finite number")
    return problems


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or math.isfinite(value)


def _short(message: str, limit: int = 200) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _info(stored: StoredGraph, model: ModelRow) -> dict[str, Any]:
    record = stored.record
    description = (
        f"EMC attribution graph of prompt {record.prompt_id} on the {model.role} model "
        f"{model.model_id} ({record.targets} targets, {model.dtype}, run {record.run_id})."
    )
    return {
        "description": description,
        "generator": {"name": "emc", "version": emc.__version__},
        "emc": {
            "graph_id": record.graph_id,
            "prompt_id": record.prompt_id,
            "model_id": model.model_id,
            "role": model.role,
            "run_id": record.run_id,
            "precision": model.dtype,
            "backend": model.backend,
            "targets": record.targets,
            "base_ref": _public_ref(model.base_ref),
            "adapter_ref": _public_ref(model.adapter_ref),
            "transcoders_ref": _public_ref(model.transcoders_ref),
            "params": record.params,
            "created_at": record.created_at.isoformat() if record.created_at else None,
            "replacement": record.replacement,
            "completeness": record.completeness,
        },
    }


def _public_ref(ref: str | None) -> str | None:
    """A hub name as it is; of a local path only its last part (an uploaded graph is public, and
    a path can name the user and their folders)."""
    if ref is None or not _LOCAL_PATH.match(ref):
        return ref
    return ref.replace("\\", "/").rstrip("/").split("/")[-1] or ref


def _settings(params: Mapping[str, Any]) -> dict[str, Any]:
    """The graph's params under the names Neuronpedia shows (those present, of its types)."""
    kinds = {
        "generation_settings": {
            "max_n_logits": int,
            "desired_logit_prob": float,
            "max_feature_nodes": int,
        },
        "pruning_settings": {"node_threshold": float, "edge_threshold": float},
    }
    settings = {}
    for group, fields in kinds.items():
        values = {
            name: kind(params[name])
            for name, kind in fields.items()
            if isinstance(params.get(name), int | float) and not isinstance(params[name], bool)
        }
        if values:
            settings[group] = values
    return settings
