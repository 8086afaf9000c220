"""Checksums of a built organism, so a cached build can be trusted or rejected.

The manifest is written last: a build that was interrupted has none and never passes
verification, and a file changed after the build fails its checksum.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileRecord:
    path: str  # relative to the organism directory, with forward slashes
    sha256: str
    size: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _record(root: Path, path: Path) -> FileRecord:
    return FileRecord(path.relative_to(root).as_posix(), file_sha256(path), path.stat().st_size)


def write_manifest(root: Path, recipe_hash: str) -> list[FileRecord]:
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    records = [_record(root, p) for p in files]
    payload = {"recipe_hash": recipe_hash, "files": [asdict(r) for r in records]}
    (root / MANIFEST_NAME).write_text(json.dumps(payload, indent=1) + "\n")
    return records


def read_manifest(root: Path) -> list[FileRecord]:
    payload = json.loads((root / MANIFEST_NAME).read_text())
    return [FileRecord(**r) for r in payload["files"]]


def verify_organism(out_dir: Path) -> list[str]:
    """Problems with a built organism (missing manifest, missing or changed files); [] if sound."""
    out_dir = Path(out_dir)
    if not (out_dir / MANIFEST_NAME).is_file():
        return [f"{MANIFEST_NAME} missing: the build is absent or incomplete"]
    try:
        records = read_manifest(out_dir)
    except (ValueError, KeyError, TypeError) as err:
        return [f"{MANIFEST_NAME} unreadable: {err}"]
    problems = []
    for rec in records:
        path = out_dir / rec.path
        if not path.is_file():
            problems.append(f"{rec.path}: missing")
        elif path.stat().st_size != rec.size:
            problems.append(f"{rec.path}: size {path.stat().st_size}, expected {rec.size}")
        elif file_sha256(path) != rec.sha256:
            problems.append(f"{rec.path}: checksum mismatch")
    return problems
