"""The raw graph, kept on request as a gzip-compressed, checksummed side file.

Rows in the store are what analysis reads; the raw `.pt` (the dense adjacency) is only for
re-pruning at other thresholds or circuit-tracer's viewer. A missing or damaged side file is a
SideFileError that callers can report, never a crash in the middle of an analysis.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from circuit_tracer.graph import Graph
from pydantic import BaseModel

GRAPHS_DIR = "graphs"
SUFFIX = ".pt.gz"
# Level 1: the adjacency's zero blocks compress as well as at level 9, and the float noise of the
# rest barely compresses at any level, so higher levels only cost time.
_LEVEL = 1
_CHUNK = 1 << 20


class SideFileError(RuntimeError):
    """A side file that is missing, damaged, or not a graph; the message says which."""


class SideFile(BaseModel):
    path: str  # relative to the data directory
    sha256: str  # of the compressed bytes on disk
    bytes: int  # compressed
    raw_bytes: int  # the uncompressed `.pt`


def side_file_path(graph_id: str) -> str:
    return f"{GRAPHS_DIR}/{graph_id}{SUFFIX}"


def write_side_file(graph: Graph, data_dir: str | Path, graph_id: str) -> SideFile:
    """Write `<data_dir>/graphs/<graph_id>.pt.gz` atomically (a reader never sees half a file)."""
    relative = side_file_path(graph_id)
    final = Path(data_dir) / relative
    final.parent.mkdir(parents=True, exist_ok=True)
    raw = final.with_name(f".{final.name}.{os.getpid()}.pt")
    packed = final.with_name(f".{final.name}.{os.getpid()}.tmp")
    try:
        graph.to_pt(str(raw))
        raw_bytes = raw.stat().st_size
        with open(raw, "rb") as src, gzip.open(packed, "wb", compresslevel=_LEVEL) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        digest = _sha256(packed)
        os.replace(packed, final)
    finally:
        raw.unlink(missing_ok=True)
        packed.unlink(missing_ok=True)
    return SideFile(path=relative, sha256=digest, bytes=final.stat().st_size, raw_bytes=raw_bytes)


def load_side_file(path: str | Path, sha256: str) -> Graph:
    """The graph in a side file, after checking its checksum; SideFileError if anything is off."""
    path = Path(path)
    if not path.is_file():
        raise SideFileError(f"graph side file {path} is missing")
    actual = _sha256(path)
    if actual != sha256:
        raise SideFileError(
            f"graph side file {path} is damaged: sha256 {actual[:12]}..., expected {sha256[:12]}..."
        )
    with tempfile.NamedTemporaryFile(suffix=".pt") as raw:
        try:
            with gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, raw, _CHUNK)
            raw.flush()
            # The checksum above vouches that this is the file EMC wrote; from_pt unpickles.
            return Graph.from_pt(raw.name)
        except Exception as exc:  # gzip, zlib, pickle and torch each raise their own kinds
            raise SideFileError(f"graph side file {path} cannot be read: {exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
