"""Where a result came from: code version, package versions, host."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path

import emc

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "circuit-tracer",
    "nnsight",
    "transformer-lens",
    "peft",
    "prefect",
    "duckdb",
    "streamlit",
    "openai",
)


@dataclass(frozen=True)
class CodeVersion:
    revision: str | None  # None when EMC is not running from a git checkout
    dirty: bool | None


@cache
def code_version() -> CodeVersion:
    root = Path(emc.__file__).resolve().parent.parent
    try:
        revision = _git(root, "rev-parse", "HEAD")
        # Untracked build outputs (data dir, venv) are ignored by .gitignore, so they do not count.
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return CodeVersion(None, None)
    return CodeVersion(revision, dirty)


@cache
def package_versions() -> dict[str, str]:
    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def host_name() -> str:
    return platform.node()


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()
