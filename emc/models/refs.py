"""Turn a model reference (local directory or hub id) into a local directory.

Everything downstream loads from a directory, so local organisms and hub models share one code
path. With HF_HUB_OFFLINE=1 a hub id resolves only from the local cache and never touches the
network.
"""

from __future__ import annotations

import os
from pathlib import Path

from emc.models.errors import ModelLoadError


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or Path(ref).exists()


def resolve_model_dir(ref: str, revision: str | None = None, required_file: str = "config.json"):
    """Local directory for `ref`; `required_file` must be in it (config.json for a model)."""
    if looks_like_path(ref):
        path = Path(ref).expanduser()
        if not path.is_dir():
            raise ModelLoadError(f"model directory not found: {path}")
    else:
        path = _from_hub(ref, revision)
    if not (path / required_file).is_file():
        raise ModelLoadError(f"{path} has no {required_file}: is it the right directory?")
    return path


def _from_hub(ref: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        return Path(snapshot_download(ref, revision=revision, local_files_only=offline))
    except LocalEntryNotFoundError as exc:
        if offline:
            from emc.models.fetch import offline_missing_message, storage_folder

            raise ModelLoadError(
                offline_missing_message("model or adapter", ref, revision, storage_folder(ref))
            ) from exc
        raise ModelLoadError(f"could not download '{ref}': {exc}") from exc
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise ModelLoadError(f"unknown model '{ref}': {exc}") from exc
