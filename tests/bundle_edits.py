"""Bundles edited as another writer might have left them: the tests of both bundle kinds (graphs,
samples) break them in the same few ways."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pandas as pd


def manifest_of(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def edit_manifest(bundle: Path, edit: Callable[[dict], object]) -> None:
    manifest = manifest_of(bundle)
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def replace_file(bundle: Path, name: str, data: bytes) -> None:
    """An EMC-written-looking bundle: the file replaced and its checksum in the manifest with it."""
    (bundle / f"{name}.parquet").write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    edit_manifest(bundle, lambda m: m["files"].__setitem__(name, digest))


def replace_frame(bundle: Path, name: str, edit: Callable[[pd.DataFrame], pd.DataFrame]) -> None:
    """As a worker of another build might write it: the rows and their checksum both changed."""
    path = bundle / f"{name}.parquet"
    edit(pd.read_parquet(path)).to_parquet(path, index=False)
    replace_file(bundle, name, path.read_bytes())
