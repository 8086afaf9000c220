"""Write a prompt's base and adapted graphs as viewer files: graphs, index and feature files.

Layout of the output directory (what the server maps to the page's `data/` and `graph_data/`):
`<slug>.json` per graph, `graph-metadata.json` (the page's list of graphs, newest export first)
and `features/<scan>/<feature>.json`. Exporting again replaces a graph's files and index entry.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from circuit_tracer.frontend.feature_models import ExamplesQuantile
from pydantic import BaseModel

from emc.features.records import FeatureCard
from emc.store import Store, list_models
from emc.store.feature_cards import load_cards
from emc.store.feature_labels import shown_labels_for_model
from emc.store.graph_pairs import graph_pairs
from emc.store.graphs import StoredGraph, list_graphs, load_graph_rows
from emc.store.models import ModelRow
from emc.store.prompts import get_prompts, stored_prompt_ids
from emc.viewer.convert import feature_examples, feature_id, merge_feature_file, viewer_graph
from emc.viewer.errors import AmbiguousPromptError, NoGraphsError, PromptNotFoundError
from emc.viewer.layout import FEATURES_DIR, INDEX_FILE, VIEWER_DIR

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class ExportedGraph(BaseModel):
    slug: str
    graph_id: str
    model_id: str
    role: str
    targets: str
    path: Path
    nodes: int
    edges: int

    @classmethod
    def written(
        cls, stored: StoredGraph, model: ModelRow, slug: str, path: Path, graph: dict[str, Any]
    ) -> ExportedGraph:
        """What was written to `path`: `graph` (a viewer or Neuronpedia graph) of `stored`."""
        return cls(
            slug=slug,
            graph_id=stored.record.graph_id,
            model_id=model.model_id,
            role=model.role,
            targets=stored.record.targets,
            path=path,
            nodes=len(graph["nodes"]),
            edges=len(graph["links"]),
        )


class ExportResult(BaseModel):
    prompt_id: str
    prompt_name: str
    out_dir: Path
    index: Path
    graphs: list[ExportedGraph]
    feature_files: int


def default_out_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / VIEWER_DIR


def resolve_prompt_id(store: Store, prompt: str) -> str:
    """The stored prompt id equal to `prompt`, or the only one starting with it."""
    if not store.exists():
        raise PromptNotFoundError(
            f"there is no store at {store.path}, so no prompt {prompt!r}: pass the data "
            "directory with -d, or make one with `emc demo`"
        )
    ids = stored_prompt_ids(store)
    if prompt in ids:
        return prompt
    matches = sorted(i for i in ids if prompt and i.startswith(prompt))
    if not matches:
        raise PromptNotFoundError(
            f"no prompt id starts with {prompt!r} in {store.path}; `emc prompt list` shows them"
        )
    if len(matches) > 1:
        shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
        raise AmbiguousPromptError(
            f"{prompt!r} matches {len(matches)} prompts ({shown}): give more of the id"
        )
    return matches[0]


def export_prompt(store: Store, prompt: str, out_dir: str | Path) -> ExportResult:
    """Write the viewer files of every base/adapted graph pair of one prompt (id or prefix)."""
    prompt_id = resolve_prompt_id(store, prompt)
    (record,) = get_prompts(store, [prompt_id])
    graphs = _paired_graphs(store, prompt_id)
    models = {m.model_id: m for m in list_models(store)}
    slugs = _slugs(prompt_id, graphs, models)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    exported, entries = [], []
    features: dict[tuple[str, int, int], list[ExamplesQuantile]] = defaultdict(list)
    for stored in graphs:
        slug, model = slugs[stored.record.graph_id], models[stored.record.model_id]
        scan = scan_name(model.transcoders_ref)
        graph = viewer_graph(
            stored,
            slug,
            f"./graph_data/{FEATURES_DIR}/{scan}",
            _provenance(stored, model),
            shown_labels_for_model(store, model.model_id),
        )
        path = out / f"{slug}.json"
        # allow_nan=False: NaN is not JSON, and the page would fail to parse the file.
        path.write_text(json.dumps(graph, separators=(",", ":"), allow_nan=False), encoding="utf-8")
        entries.append(_index_entry(graph, scan, model, record.name))
        for (layer, feature), quantile in feature_examples(stored, slug).items():
            features[(scan, layer, feature)].append(quantile)
        exported.append(ExportedGraph.written(stored, model, slug, path, graph))
    cards = _cards(store, graphs, models, [(layer, f) for _, layer, f in features])
    for (scan, layer, feature), quantiles in features.items():
        path = out / FEATURES_DIR / scan / f"{feature_id(layer, feature)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = path.read_text(encoding="utf-8") if path.is_file() else None
        card = cards.get((layer, feature))
        role = models[card.model_id].role if card is not None else "adapted"
        merged = merge_feature_file(existing, scan, layer, feature, quantiles, card, role)
        path.write_text(merged.model_dump_json(exclude_none=True), encoding="utf-8")
    index = update_index(out, entries)
    return ExportResult(
        prompt_id=prompt_id,
        prompt_name=record.name,
        out_dir=out,
        index=index,
        graphs=exported,
        feature_files=len(features),
    )


def _cards(
    store: Store,
    graphs: list[StoredGraph],
    models: dict[str, ModelRow],
    features: list[tuple[int, int]],
) -> dict[tuple[int, int], FeatureCard]:
    """The stored feature cards of the exported graphs' models, the adapted model's first."""
    ids = list(dict.fromkeys(g.record.model_id for g in graphs))
    ids.sort(key=lambda model_id: models[model_id].role != "adapted")
    return load_cards(store, features, ids)


def update_index(out_dir: Path, entries: list[dict[str, Any]]) -> Path:
    """Put `entries` first in graph-metadata.json, replacing earlier entries with their slugs."""
    path = out_dir / INDEX_FILE
    old = json.loads(path.read_text(encoding="utf-8")).get("graphs", []) if path.is_file() else []
    slugs = {e["slug"] for e in entries}
    graphs = entries + [g for g in old if g.get("slug") not in slugs]
    path.write_text(json.dumps({"graphs": graphs}, indent=2), encoding="utf-8")
    return path


def scan_name(transcoders_ref: str) -> str:
    """A file-name-safe, readable and unique name for a transcoder set (a path or a hub name)."""
    tail = _UNSAFE.sub("-", transcoders_ref.rstrip("/").split("/")[-1]).strip("-.") or "scan"
    digest = hashlib.sha256(transcoders_ref.encode()).hexdigest()[:8]
    return f"{tail[:40]}-{digest}"


def _paired_graphs(store: Store, prompt_id: str) -> list[StoredGraph]:
    """Base then adapted graph of each pair, each graph once."""
    ids: list[str] = []
    for pair in graph_pairs(store, prompt_id=prompt_id):
        ids += [i for i in (pair.base_graph_id, pair.adapted_graph_id) if i not in ids]
    if not ids:
        graphs = list_graphs(store, prompt_id=prompt_id)
        failed = [g for g in graphs if g.status == "failed"]
        found = (
            f"it has {len(graphs) - len(failed)} successful and {len(failed)} failed graph(s), "
            "but no successful base/adapted pair"
            if graphs
            else "it has no graphs"
        )
        errors = "".join(f"; {g.model_id} failed: {g.error}" for g in failed[:3])
        raise NoGraphsError(
            f"nothing to show for prompt {prompt_id}: {found}{errors}. Make them with "
            f"`emc trace {prompt_id}`"
        )
    return [graph for i in ids if (graph := load_graph_rows(store, i)) is not None]


def _slugs(
    prompt_id: str, graphs: list[StoredGraph], models: dict[str, ModelRow]
) -> dict[str, str]:
    """`<prompt>-<role>-<targets>`, plus the graph id's start where that is not unique."""
    readable = {
        g.record.graph_id: f"{prompt_id}-{models[g.record.model_id].role}-{g.record.targets}"
        for g in graphs
    }
    counts: dict[str, int] = defaultdict(int)
    for slug in readable.values():
        counts[slug] += 1
    return {
        graph_id: slug if counts[slug] == 1 else f"{slug}-{graph_id[:8]}"
        for graph_id, slug in readable.items()
    }


def _provenance(stored: StoredGraph, model: ModelRow) -> dict[str, Any]:
    record = stored.record
    return {
        "graph_id": record.graph_id,
        "prompt_id": record.prompt_id,
        "model_id": record.model_id,
        "role": model.role,
        "targets": record.targets,
        "params": record.params,
        "replacement": record.replacement,
        "completeness": record.completeness,
    }


def _index_entry(graph: dict[str, Any], scan: str, model: ModelRow, prompt_name: str) -> dict:
    """The graph's metadata for the page's list, shown as "<title_prefix> <scan> — <prompt>"."""
    emc = graph["emc"]
    return {
        **graph["metadata"],
        "scan": scan,  # display only: the page loads features from the graph file's scan
        "title_prefix": f"[{model.role}] {prompt_name} ({emc['targets']}) ·",
        **{k: emc[k] for k in ("graph_id", "prompt_id", "model_id", "role", "targets")},
    }
