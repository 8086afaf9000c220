"""Result bundles: how workers on other machines hand graphs to the one process that writes the
store.

DuckDB allows one writer per file and its locks are not reliable on network file systems, so a
worker that cannot reach the store's disk writes each graph as a bundle into a shared spool
directory: Parquet files for its rows, and a manifest with the summary record, the model that made
it and a checksum per file. A bundle appears atomically (written under a temporary name, then
renamed), so the ingest never sees half of one. `ingest_bundles`, run by one task at a time on
the store's host, loads every complete bundle with the same replace-by-graph-id write the local
path uses (so ingesting twice changes nothing) and moves it to `ingested/`.

Whatever is wrong with a bundle (no or unreadable manifest, a manifest of the wrong shape or from
another EMC version, a missing, altered or unreadable file, rows that disagree with the record or
that the store refuses), it goes to `rejected/` with `<name>.reason.txt` naming the file and the
cause, nothing of it is written, and the others still load. Nothing in the spool is ever deleted:
a second bundle of a name already in `ingested/` or `rejected/` is kept beside it as
`<name>.2`, `<name>.3`, ... Faults of the store itself (locked, unreadable, out of disk) are not
the bundle's: they propagate and leave the bundle pending for the next ingest.

Behaviour samples travel the same way, as sample bundles (`emc.store.sample_bundles`, which
shares this module's checks); their own suffix keeps each ingest to its own kind, so graphs and
samples can share one spool.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import duckdb
import pandas as pd
from pydantic import BaseModel, ValidationError

from emc.analysis.effects import EFFECT_COLUMNS
from emc.analysis.stats import POSITION_FREE_KEY, stat_columns
from emc.store.connection import Store
from emc.store.graphs import insert_graph, record_failed_graph
from emc.store.models import ModelRow, upsert_model
from emc.tracing.compact import EDGE_COLUMNS, NODE_COLUMNS
from emc.tracing.pipeline import TracedPrompt
from emc.tracing.quality import LAYER_COLUMNS
from emc.tracing.record import GraphKey, GraphRecord

BUNDLE_VERSION = 1
SUFFIX = ".bundle"
FrameName = Literal["nodes", "edges", "effects", "stats", "layers"]
_FRAMES: tuple[str, ...] = get_args(FrameName)
_STAT_COLUMNS = stat_columns(POSITION_FREE_KEY)
_COLUMNS: dict[str, tuple[str, ...]] = {
    "nodes": NODE_COLUMNS,
    "edges": EDGE_COLUMNS,
    "effects": EFFECT_COLUMNS,
    # As `position_free_stats` orders them: the key, its position count, then the statistics.
    "stats": (*POSITION_FREE_KEY, "n_positions", *_STAT_COLUMNS[len(POSITION_FREE_KEY) :]),
    "layers": LAYER_COLUMNS,
}
# DuckDB's verdicts on the rows themselves (a NULL where the schema forbids one, a value out of
# a column's range or of a type it cannot cast) are the bundle's fault. Its operational errors
# (lock, disk, memory) and errors in our own SQL (parser, catalog) are not, so they propagate.
_REFUSED_ROWS = (
    ValueError,
    TypeError,
    duckdb.DataError,
    duckdb.IntegrityError,
    duckdb.BinderException,
    duckdb.InvalidInputException,
    duckdb.InvalidTypeException,
)
_SHOWN = 10  # validation errors named in a reason; a foreign manifest can have dozens
M = TypeVar("M", bound=BaseModel)


class BundleError(ValueError):
    """A bundle that cannot be loaded; the message names the bundle, the file and the cause."""


class Manifest(BaseModel):
    """A bundle's manifest.json. Frame names are a closed set, so no entry can name a path
    outside the bundle."""

    version: int
    record: GraphRecord
    model: ModelRow
    files: dict[FrameName, str]  # frame -> SHA-256 of <frame>.parquet


T = TypeVar("T")


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


def pending_bundles(spool_dir: str | Path, suffix: str = SUFFIX) -> list[Path]:
    """Everything named like a bundle (of the kind `suffix` names: graphs by default) and not
    yet ingested or rejected, oldest first.

    Plain files with the suffix are included so that the ingest rejects them with a reason
    instead of leaving them unexplained in the spool; temporary names never match.
    """
    spool = Path(spool_dir)
    if not spool.is_dir():
        return []
    found = [p for p in spool.iterdir() if p.name.endswith(suffix)]
    # lstat: a dangling link is still listed (and rejected), not a crash.
    return sorted(found, key=lambda p: (p.lstat().st_mtime, p.name))


def ingest_bundles(store: Store, spool_dir: str | Path) -> IngestReport:
    """Load every complete bundle into the store; see the module for the guarantees."""

    def load(bundle: Path) -> str:
        record, model, frames = read_bundle(bundle)
        _load(store, bundle, record, model, frames)
        return record.graph_id

    ingested, rejected = ingest_each(store, spool_dir, pending_bundles(spool_dir), load)
    return IngestReport(ingested, rejected)


def ingest_each(
    store: Store, spool_dir: str | Path, bundles: list[Path], load: Callable[[Path], T]
) -> tuple[list[T], list[tuple[str, str]]]:
    """`load` each bundle in turn, then move it to `ingested/`; a bundle whose `load` raises
    BundleError goes to `rejected/` with the reason, and the rest still load. Returns what each
    `load` returned, and (bundle name, reason) per rejected bundle."""
    spool = Path(spool_dir)
    if bundles:
        # A store that cannot be opened fails here, before any bundle is blamed or moved.
        store.ensure_schema()
    ingested, rejected = [], []
    for bundle in bundles:
        try:
            loaded = load(bundle)
        except BundleError as exc:
            reason = str(exc)
            _reject(bundle, spool / "rejected", reason)
            rejected.append((bundle.name, reason))
            continue
        _move(bundle, spool / "ingested")
        ingested.append(loaded)
    return ingested, rejected


def read_bundle(bundle: Path) -> tuple[GraphRecord, ModelRow, dict[str, pd.DataFrame]]:
    """A bundle's record, model and frames, checked; BundleError says what is wrong."""
    manifest = _read_manifest(bundle)
    if manifest.record.model_id != manifest.model.model_id:
        raise BundleError(
            f"{bundle.name}: manifest.json: the record's model {manifest.record.model_id} is not "
            f"the bundle's model {manifest.model.model_id}"
        )
    record = manifest.record
    missing = [name for name in _FRAMES if name not in manifest.files]
    if record.status == "ok" and missing:
        raise BundleError(
            f"{bundle.name}: manifest.json lists no {', '.join(missing)}: a successful graph "
            f"needs {', '.join(_FRAMES)}"
        )
    frames = {name: _read_frame(bundle, name, digest) for name, digest in manifest.files.items()}
    if record.status == "ok":
        _check_counts(bundle, record, frames)
    return record, manifest.model, frames


def _read_manifest(bundle: Path, schema: type[M] = Manifest, version: int = BUNDLE_VERSION) -> M:
    """The bundle's manifest.json as `schema` (graph bundles' `Manifest` by default; sample
    bundles, `emc.store.sample_bundles`, pass theirs); BundleError says what is wrong."""
    if not bundle.is_dir():
        raise BundleError(
            f"{bundle.name}: not a directory (a bundle is a directory of manifest.json and "
            f"Parquet files)"
        )
    path = bundle / "manifest.json"
    if not path.is_file():
        empty = not any(bundle.iterdir())
        raise BundleError(f"{bundle.name}: {'empty directory, ' if empty else ''}no manifest.json")
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{bundle.name}: manifest.json cannot be read ({exc})") from None
    if not text.strip():
        raise BundleError(f"{bundle.name}: manifest.json is empty")
    try:
        raw: Any = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for binary garbage
        raise BundleError(f"{bundle.name}: manifest.json is not JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BundleError(
            f"{bundle.name}: manifest.json holds a JSON {type(raw).__name__}, not an object"
        )
    # The version first: another EMC's manifest may differ in any other field, and "written by
    # another version" is the useful reason then.
    if raw.get("version") != version:
        raise BundleError(
            f"{bundle.name}: manifest.json: bundle version {raw.get('version')!r} is not "
            f"{version} (written by another EMC version)"
        )
    try:
        return schema.model_validate(raw)
    except ValidationError as exc:
        raise BundleError(
            f"{bundle.name}: manifest.json does not match the bundle format: {_problems(exc)}"
        ) from None


def _problems(exc: ValidationError) -> str:
    """pydantic's errors on one line: `record.status: Input should be 'ok' or 'failed'; ...`."""
    lines = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()]
    shown = "; ".join(lines[:_SHOWN])
    return shown + (f"; and {len(lines) - _SHOWN} more" if len(lines) > _SHOWN else "")


def _read_frame(
    bundle: Path, name: str, digest: str, columns: Sequence[str] | None = None
) -> pd.DataFrame:
    """`<name>.parquet`, checked against its digest and `columns` (by default the graph
    frame's), in that column order."""
    path = bundle / f"{name}.parquet"
    where = f"{bundle.name}: {path.name}"
    if not path.is_file():
        raise BundleError(f"{where} is missing (manifest.json lists it)")
    try:
        actual = _sha256(path)
    except OSError as exc:
        raise BundleError(f"{where} cannot be read ({exc})") from None
    if actual != digest:
        raise BundleError(f"{where} is altered (its SHA-256 is not the one in manifest.json)")
    try:
        frame = pd.read_parquet(path)
    # The Parquet reader is parsing a file from elsewhere: whatever it raises (pyarrow has a
    # dozen error classes, not all ValueError or OSError) means the file is not usable.
    except Exception as exc:
        raise BundleError(f"{where} is not a readable Parquet file ({exc})") from None
    expected = tuple(columns) if columns is not None else _COLUMNS[name]
    absent = [c for c in expected if c not in frame.columns]
    extra = [c for c in frame.columns if c not in expected]
    if absent or extra:
        problems = [f"missing {', '.join(absent)}"] if absent else []
        problems += [f"unexpected {', '.join(map(str, extra))}"] if extra else []
        raise BundleError(f"{where} has the wrong columns: {'; '.join(problems)}")
    return frame[list(expected)]  # the order the store's writer checks


def _check_counts(bundle: Path, record: GraphRecord, frames: dict[str, pd.DataFrame]) -> None:
    """The record's counts are taken from the rows when traced, so a mismatch means rows were
    lost or added after (a truncated file rewritten with a fresh checksum, a mixed-up bundle)."""
    kinds = frames["nodes"]["kind"].value_counts()
    found = {  # record field -> (file, what is counted, count)
        "kept_edges": ("edges.parquet", "rows", len(frames["edges"])),
        "kept_features": ("nodes.parquet", "feature nodes", int(kinds.get("feature", 0))),
        "kept_errors": ("nodes.parquet", "error nodes", int(kinds.get("error", 0))),
    }
    for field_name, (file, what, count) in found.items():
        recorded = getattr(record, field_name)
        if recorded is not None and count != recorded:
            raise BundleError(
                f"{bundle.name}: {file} has {count} {what}, the record's {field_name} is {recorded}"
            )


def _load(
    store: Store,
    bundle: Path,
    record: GraphRecord,
    model: ModelRow,
    frames: dict[str, pd.DataFrame],
) -> None:
    """Write one bundle. The graph goes in one transaction, so a refusal leaves nothing of it
    (and an earlier graph with its id untouched); the model row may stay, as it does on the
    local path, which records a model when it is loaded."""
    try:
        upsert_model(store, model)
        if record.status == "ok":
            insert_graph(store, record, **frames)
        else:
            key = GraphKey(**record.model_dump(include=set(GraphKey.model_fields)))
            record_failed_graph(store, key, record.input_ids, record.run_id, record.error or "")
    except _REFUSED_ROWS as exc:
        # DuckDB's first line names the table and column; the rest quotes our SQL.
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BundleError(
            f"{bundle.name}: the store refused its rows, nothing of the graph was written ({cause})"
        ) from None


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


def _reject(bundle: Path, to_dir: Path, reason: str) -> Path:
    target = _move(bundle, to_dir)
    (to_dir / f"{target.name}.reason.txt").write_text(reason + "\n")
    return target


def _move(bundle: Path, to_dir: Path) -> Path:
    """Move out of the spool's top level, so no later ingest sees it again; a name already
    there (the same bundle copied in twice) gets a number, so nothing is overwritten."""
    to_dir.mkdir(exist_ok=True)
    target, n = to_dir / bundle.name, 1
    while target.exists() or target.is_symlink() or _reason_file(target).exists():
        n += 1
        target = to_dir / f"{bundle.name}.{n}"
    bundle.rename(target)
    return target


def _reason_file(target: Path) -> Path:
    return target.with_name(f"{target.name}.reason.txt")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
