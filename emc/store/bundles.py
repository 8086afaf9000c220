"""Result bundles: how workers on other machines hand graphs to the one process that writes the
store.

DuckDB allows one writer per file and its locks are not reliable on network file systems, so a
worker that cannot reach the store's disk writes each graph as a bundle into a shared spool
directory: Parquet files for its rows, and a manifest with the summary record, the model that made
it and a checksum per file. A bundle appears atomically (written under a temporary name, then
renamed), so the ingest never sees half of one. `ingest_bundles`, run by one task at a time on
the store's host, loads every complete bundle with the same replace-by-graph-id write the local
path uses (so ingesting twice changes nothing) and moves it to `ingested/`; a bundle that fails
its checks goes to `rejected/` with the reason, and the others still load.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from emc.store.connection import Store
from emc.store.graphs import insert_graph, record_failed_graph
from emc.store.models import ModelRow, upsert_model
from emc.tracing.pipeline import TracedPrompt
from emc.tracing.record import GraphKey, GraphRecord

BUNDLE_VERSION = 1
SUFFIX = ".bundle"
_FRAMES = ("nodes", "edges", "effects", "stats", "layers")


class BundleError(ValueError):
    """A bundle that cannot be loaded: incomplete, altered, or from another EMC version."""


@dataclass
class IngestReport:
    ingested: list[str] = field(default_factory=list)  # graph ids
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (bundle name, reason)


def write_traced_bundle(spool_dir: str | Path, traced: TracedPrompt, model: ModelRow) -> Path:
    """A successful graph and its rows, as one bundle."""
    frames = {
        "nodes": traced.compact.nodes,
        "edges": traced.compact.edges,
        "effects": traced.effects,
        "stats": traced.stats,
        "layers": traced.layers,
    }
    return _write(spool_dir, traced.record, model, frames)


def write_failed_bundle(
    spool_dir: str | Path,
    key: GraphKey,
    input_ids: Sequence[int],
    run_id: str,
    error: str,
    model: ModelRow,
) -> Path:
    """A graph's failure, so that the store records it as the local path would."""
    return _write(spool_dir, GraphRecord.failed(key, list(input_ids), run_id, error), model, {})


def pending_bundles(spool_dir: str | Path) -> list[Path]:
    """Complete bundles not yet ingested, oldest first."""
    spool = Path(spool_dir)
    if not spool.is_dir():
        return []
    found = [p for p in spool.iterdir() if p.is_dir() and p.name.endswith(SUFFIX)]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name))


def ingest_bundles(store: Store, spool_dir: str | Path) -> IngestReport:
    """Load every complete bundle into the store; see the module for the guarantees."""
    spool = Path(spool_dir)
    report = IngestReport()
    for bundle in pending_bundles(spool):
        try:
            record, model, frames = read_bundle(bundle)
        except BundleError as exc:
            _move(bundle, spool / "rejected")
            (spool / "rejected" / f"{bundle.name}.reason.txt").write_text(str(exc))
            report.rejected.append((bundle.name, str(exc)))
            continue
        upsert_model(store, model)
        if record.status == "ok":
            insert_graph(store, record, **frames)
        else:
            key = GraphKey(**record.model_dump(include=set(GraphKey.model_fields)))
            record_failed_graph(store, key, record.input_ids, record.run_id, record.error or "")
        _move(bundle, spool / "ingested")
        report.ingested.append(record.graph_id)
    return report


def read_bundle(bundle: Path) -> tuple[GraphRecord, ModelRow, dict[str, pd.DataFrame]]:
    try:
        manifest = json.loads((bundle / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{bundle.name}: unreadable manifest ({exc})") from None
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(
            f"{bundle.name}: bundle version {manifest.get('version')} is not {BUNDLE_VERSION}"
        )
    frames = {}
    for name, digest in manifest["files"].items():
        path = bundle / f"{name}.parquet"
        if not path.is_file() or _sha256(path) != digest:
            raise BundleError(f"{bundle.name}: {path.name} is missing or altered")
        frames[name] = pd.read_parquet(path)
    record = GraphRecord.model_validate(manifest["record"])
    if record.status == "ok" and set(frames) != set(_FRAMES):
        raise BundleError(f"{bundle.name}: a successful graph needs {', '.join(_FRAMES)}")
    return record, ModelRow.model_validate(manifest["model"]), frames


def _write(
    spool_dir: str | Path, record: GraphRecord, model: ModelRow, frames: dict[str, pd.DataFrame]
) -> Path:
    spool = Path(spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    name = f"{record.graph_id}-{uuid.uuid4().hex[:8]}"
    temporary = spool / f".{name}.tmp"
    temporary.mkdir()
    files = {}
    for frame_name, frame in frames.items():
        path = temporary / f"{frame_name}.parquet"
        frame.to_parquet(path, index=False)
        files[frame_name] = _sha256(path)
    manifest = {
        "version": BUNDLE_VERSION,
        "record": record.model_dump(mode="json"),
        "model": model.model_dump(mode="json"),
        "files": files,
    }
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1))
    final = spool / f"{name}{SUFFIX}"
    temporary.rename(final)  # atomic on one file system: the ingest sees all of it or nothing
    return final


def _move(bundle: Path, to_dir: Path) -> None:
    to_dir.mkdir(exist_ok=True)
    target = to_dir / bundle.name
    if target.exists():
        shutil.rmtree(target)
    bundle.rename(target)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
