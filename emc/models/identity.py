"""Model identity: a readable slug plus a fingerprint of exactly what was loaded."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from emc.store import ModelRow

_SMALL_FILE = 1_000_000


@dataclass(frozen=True)
class ModelIdentity:
    role: str  # base | adapted
    base_ref: str
    adapter_ref: str | None
    merged: bool
    transcoders_ref: str
    backend: str
    dtype: str
    device: str
    fingerprint: str

    @property
    def slug(self) -> str:
        name = _short_name(self.base_ref)
        if self.adapter_ref:
            name += "+" + _short_name(self.adapter_ref)
        return f"{name}@{self.backend}-{self.dtype}"

    @property
    def model_id(self) -> str:
        return f"{self.slug}:{self.fingerprint[:10]}"

    def to_row(self, first_run_id: str) -> ModelRow:
        return ModelRow(
            **asdict(self), slug=self.slug, model_id=self.model_id, first_run_id=first_run_id
        )


def fingerprint(directories: list[Path | None], settings: dict[str, object]) -> str:
    """Hash of small files' contents, large files' names and sizes, and the load settings.

    Weight files are not hashed in full (gigabytes); their size plus every config file's content
    tells apart the models a researcher could plausibly confuse.
    """
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for directory in directories:
        if directory is None:
            continue
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            digest.update(str(path.relative_to(directory)).encode())
            size = path.stat().st_size
            digest.update(path.read_bytes() if size < _SMALL_FILE else str(size).encode())
    return digest.hexdigest()


def _short_name(ref: str) -> str:
    parts = [p for p in re.split(r"[/\\]", ref.rstrip("/")) if p]
    tail = parts[-2:] if len(parts) > 1 and parts[-1] in {"base", "em", "control"} else parts[-1:]
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", "-".join(tail)) or "model"
