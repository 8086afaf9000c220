"""Fill the hub caches a config needs, and say exactly what is missing when offline.

`emc models fetch CONFIG` runs where a network is available:

1. **List** every file the config's hub references need, with its size, before anything large
   is downloaded (`list_files`). Models (`base`, `adapted`) get their config, tokenizer and
   safetensors weights (never `.bin`/`.pth`/`original/` duplicates; `.bin` only when a repo has
   no safetensors); adapters their `adapter_config.json` and weights. Transcoders are listed from
   their `config.yaml` (downloaded for the listing: it names the layer files), in circuit-tracer's
   hub layout: `transcoders:` as `hf://` URIs, else `layer_*.safetensors` (per-layer sets) or
   `*.safetensors` (cross-layer transcoders) next to it.
2. **Download** what is not in the cache yet (`fetch_listing`): models into the Hugging Face
   cache (HF_HOME / HF_HUB_CACHE) by commit, transcoders through circuit-tracer's
   `save_transcoders_to_cache` into its cache (CIRCUIT_TRACER_CACHE_DIR). Files already there are
   not downloaded again.
3. **Verify and record**: every downloaded file is checked against the hub's checksum (sha256 for
   LFS files, the git blob id for small ones) and its sha256 is written to the manifest.

Local-directory references are skipped: there is nothing to fetch.

The manifest is `<data_dir>/models/fetched.json`:

    {"version": 1,
     "entries": [{"role": "base", "kind": "model", "ref": "owner/name",
                  "revision": "main", "commit": "<40 hex>", "hub_ref": "owner/name",
                  "cache": "<where it lives>", "fetched_at": "<ISO time>",
                  "files": [{"repo": "owner/name", "commit": "<40 hex>", "path": "config.json",
                             "size": 123, "sha256": "<64 hex>", "checked": "downloaded"}],
                  "cached_files": []}]}

`checked` says where a file's sha256 comes from: `downloaded` (hashed as it arrived and matched
the hub), `cache` (hashed from the cache, fetched earlier by someone else) or `hub` (the hub's own
LFS sha256: the file is no longer on disk, e.g. a transcoder source file circuit-tracer converted
and deleted). For transcoders, `cached_files` holds the converted files in circuit-tracer's cache
with their sha256. One entry per (role, ref, revision): a new fetch replaces it.

Offline (HF_HUB_OFFLINE=1), `missing_files` lists what a config needs and the caches lack,
without the network, and `missing_message` turns that into the one error every command prints.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from emc.config import ExperimentConfig, ModelRef, TranscoderRef, config_refs
from emc.models.errors import ModelLoadError
from emc.models.refs import hub_offline, looks_like_path

Kind = Literal["model", "adapter", "transcoders"]
MANIFEST_VERSION = 1
COMMIT = re.compile(r"^[0-9a-f]{40}$")

# Model files a load reads: config, generation config, tokenizer, weights (+ shard index).
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
)
MODEL_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
MODEL_LEGACY_WEIGHTS = ("pytorch_model*.bin", "pytorch_model.bin.index.json")
ADAPTER_FILES = ("adapter_config.json",)
ADAPTER_WEIGHTS = ("adapter_model.safetensors",)
ADAPTER_LEGACY_WEIGHTS = ("adapter_model.bin",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
# circuit-tracer's shorthands (caching.save_transcoders_to_cache).
TRANSCODER_ALIASES = {
    "gemma": "mwhanna/gemma-scope-transcoders",
    "llama": "mntss/transcoder-Llama-3.2-1B",
}


class FetchError(RuntimeError):
    """A listing or download that failed; the message says which file and why."""


@dataclass(frozen=True)
class HubFile:
    """One file on the hub, and whether the cache already holds it."""

    repo: str
    revision: str | None  # as requested (None: main)
    commit: str  # the revision resolved to a commit
    path: str
    size: int
    sha256: str | None  # the hub's LFS sha256 (None for small, non-LFS files)
    blob_id: str | None  # git blob id
    present: bool = False


@dataclass(frozen=True)
class RefListing:
    """What one config reference needs from the hub."""

    role: str
    kind: Kind
    ref: str
    revision: str | None
    commit: str | None  # models and adapters: the repo's commit; transcoders: config.yaml's
    hub_ref: str  # transcoders: circuit-tracer's reference (with @revision); else ref
    files: tuple[HubFile, ...]
    cache: Path  # where the fetched files end up
    cached: bool = False  # transcoders: already complete in circuit-tracer's cache
    note: str = ""

    @property
    def to_download(self) -> tuple[HubFile, ...]:
        if self.kind == "transcoders" and self.cached:
            return ()
        return tuple(f for f in self.files if not f.present)

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def download_bytes(self) -> int:
        return sum(f.size for f in self.to_download)


@dataclass(frozen=True)
class SkippedRef:
    """A reference with nothing to fetch (a local directory)."""

    role: str
    ref: str
    reason: str


@dataclass(frozen=True)
class Missing:
    """A reference the caches lack (offline), or lack part of."""

    role: str
    ref: str
    revision: str | None
    where: Path
    cache: str  # "the Hugging Face cache" or "circuit-tracer's cache"
    files: tuple[str, ...] = ()  # empty: the whole reference is absent

    def describe(self) -> str:
        at = f" (revision {self.revision})" if self.revision else ""
        if not self.files:
            return f"{role_name(self.role)} '{self.ref}'{at}: not in {self.cache} ({self.where})"
        return (
            f"{role_name(self.role)} '{self.ref}'{at}: {', '.join(self.files)} missing from "
            f"{self.cache} ({self.where})"
        )


@dataclass
class ManifestEntry:
    role: str
    kind: str
    ref: str
    revision: str | None
    commit: str | None
    hub_ref: str
    cache: str
    fetched_at: str
    files: list[dict] = field(default_factory=list)
    cached_files: list[dict] = field(default_factory=list)
    cache_dtype: str | None = None  # transcoders: the precision circuit-tracer's copy is saved at


Progress = Callable[[int], None]  # bytes done so far in the current reference


def role_name(role: str) -> str:
    return {
        "base": "base model",
        "adapted": "adapted model",
        "adapter": "adapter",
        "transcoders": "transcoders",
    }.get(role, role)


def kind_of(role: str) -> Kind:
    return "transcoders" if role == "transcoders" else "adapter" if role == "adapter" else "model"


def transcoder_hub_ref(ref: str, revision: str | None) -> str:
    """circuit-tracer's reference for a config's transcoders (as emc/models/transcoders.py forms
    it): `owner/repo[/subfolder]`, with `@revision` when the config gives one."""
    return f"{ref}@{revision}" if revision else ref


def manifest_path(data_dir: Path) -> Path:
    return Path(data_dir) / "models" / "fetched.json"


def fetch_hint(config_path: str | Path | None = None) -> str:
    """The sentence that says how to get missing files."""
    target = str(config_path) if config_path else "CONFIG"
    return (
        f"`emc models fetch {target}` fetches it where the network is available (it lists the "
        "sizes first and records checksums; --dry-run only lists), then copy the Hugging Face "
        "cache (HF_HOME) and circuit-tracer's cache (CIRCUIT_TRACER_CACHE_DIR) here; or point "
        "the config at a local directory"
    )


def offline_missing_message(
    what: str,
    ref: str,
    revision: str | None,
    where: str | Path,
    cache: str = "the Hugging Face cache",
    config_path: str | Path | None = None,
) -> str:
    """The error for one hub reference a load needs and the cache lacks under HF_HUB_OFFLINE=1.

    For transcoders: `offline_missing_message("transcoder set", ref, revision,
    get_cached_path(hub_ref), cache="circuit-tracer's cache")`.
    """
    at = f" at revision {revision}" if revision else ""
    return (
        f"{what} '{ref}'{at} is not a local directory and is not in {cache} ({where}); "
        f"HF_HUB_OFFLINE=1 forbids downloading it: {fetch_hint(config_path)}"
    )


def missing_message(missing: list[Missing], config_path: str | Path | None = None) -> str:
    """One message naming every missing reference and the command that fetches them."""
    lines = [
        f"{len(missing)} model file set(s) this config needs are not in the local caches, and "
        "HF_HUB_OFFLINE=1 forbids downloading:"
    ]
    lines += [f"  - {item.describe()}" for item in missing]
    lines.append(fetch_hint(config_path).replace("fetches it", "fetches them", 1))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Offline: what is missing


def ensure_fetched(
    config: ExperimentConfig,
    data_dir: Path | None = None,
    config_path: str | Path | None = None,
) -> None:
    """Under HF_HUB_OFFLINE=1, raise ModelLoadError naming every hub file set the config needs
    and the caches lack, with the command that fetches them; online, or with nothing missing,
    return. Costs a few stat calls: cheap enough to run before every load."""
    if not hub_offline():
        return
    missing = missing_files(config, data_dir)
    if missing:
        raise ModelLoadError(missing_message(missing, config_path))


def hub_references(config: ExperimentConfig) -> list[tuple[str, ModelRef | TranscoderRef]]:
    """The config's references that name the hub (not a local directory)."""
    return [(role, ref) for role, ref in config_refs(config) if not looks_like_path(ref.ref)]


def missing_files(config: ExperimentConfig, data_dir: Path | None = None) -> list[Missing]:
    """Every hub reference the config needs that the local caches lack, without the network.

    A model must have its config.json, a tokenizer and its weights (every shard its index
    names); an adapter its adapter_config.json and weights; a transcoder set its config.yaml and
    every layer file. When the manifest in `data_dir` recorded a fetch of the same commit, the
    files it recorded are what must be there, named one by one.
    """
    recorded = {(e.role, e.ref, e.revision): e for e in read_manifest(data_dir)} if data_dir else {}
    missing = []
    for role, ref in hub_references(config):
        entry = recorded.get((role, ref.ref, ref.revision))
        if role == "transcoders":
            item = _missing_transcoders(ref, entry, _model_layers(config.models.base))
        else:
            item = _missing_model(role, ref, entry)
        if item is not None:
            missing.append(item)
    return missing


def _missing_model(role: str, ref: ModelRef, entry: ManifestEntry | None) -> Missing | None:
    storage = storage_folder(ref.ref)
    commit = _cached_commit(ref.ref, ref.revision)
    absent = Missing(role, ref.ref, ref.revision, storage, "the Hugging Face cache")
    if commit is None:
        return absent
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        return absent
    if entry is not None and entry.commit == commit:
        # A recorded fetch of this commit: exactly the files it recorded.
        need = [
            f["path"]
            for f in entry.files
            if f.get("repo", ref.ref) == ref.ref and not (snapshot / f["path"]).is_file()
        ]
        return replace(absent, where=snapshot, files=tuple(need)) if need else None
    need: list[str] = []
    if kind_of(role) == "adapter":
        if not (snapshot / "adapter_config.json").is_file():
            need.append("adapter_config.json")
        if not any((snapshot / n).is_file() for n in (*ADAPTER_WEIGHTS, *ADAPTER_LEGACY_WEIGHTS)):
            need.append("adapter_model.safetensors")
    else:
        if not (snapshot / "config.json").is_file():
            need.append("config.json")
        if not any((snapshot / n).is_file() for n in TOKENIZER_FILES):
            need.append("a tokenizer (tokenizer.json)")
        need += _missing_weights(snapshot)
    return replace(absent, where=snapshot, files=tuple(need)) if need else None


def _missing_weights(snapshot: Path) -> list[str]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = snapshot / index_name
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError):
                return [f"{index_name} (unreadable)"]
            return [s for s in shards if not (snapshot / s).is_file()]
    if any(snapshot.glob("*.safetensors")) or any(snapshot.glob("pytorch_model*.bin")):
        return []
    return ["weights (*.safetensors)"]


def _model_layers(base: ModelRef) -> int | None:
    """The base model's layer count from its config.json, when it is on this machine: a
    transcoder set has one layer file per model layer."""
    directory = (
        Path(base.ref).expanduser()
        if looks_like_path(base.ref)
        else cached_snapshot(base.ref, base.revision)
    )
    try:
        raw = json.loads((directory / "config.json").read_text()) if directory else {}
    except (OSError, ValueError):
        return None
    raw = raw.get("text_config") or raw
    layers = raw.get("num_hidden_layers") or raw.get("n_layer")
    return layers if isinstance(layers, int) and layers > 0 else None


def _missing_transcoders(
    ref: TranscoderRef, entry: ManifestEntry | None, model_layers: int | None
) -> Missing | None:
    import yaml
    from circuit_tracer.utils.caching import get_cached_path, is_cached

    hub_ref = transcoder_hub_ref(ref.ref, ref.revision)
    where = get_cached_path(hub_ref)
    absent = Missing("transcoders", ref.ref, ref.revision, where, "circuit-tracer's cache")
    if not is_cached(hub_ref):
        return absent
    try:
        kind = (yaml.safe_load((where / "config.yaml").read_text()) or {}).get("model_kind")
    except (OSError, yaml.YAMLError, AttributeError):
        return replace(absent, files=("config.yaml (unreadable)",))
    recorded = [f["path"] for f in entry.cached_files] if entry is not None else []
    if kind == "cross_layer_transcoder":
        pattern, names = re.compile(r"^W_(enc|dec)_(\d+)\.safetensors$"), ("W_enc", "W_dec")
    else:
        pattern, names = re.compile(r"^(layer)_(\d+)\.safetensors$"), ("layer",)
    layers = {int(m.group(2)) for p in where.iterdir() if (m := pattern.match(p.name))}
    layers |= {int(m.group(2)) for p in recorded if (m := pattern.match(p))}
    count = max(max(layers, default=0) + 1, model_layers or 0)
    expected = [f"{n}_{i}.safetensors" for i in range(count) for n in names]
    need = [n for n in dict.fromkeys([*expected, *recorded]) if not (where / n).is_file()]
    return replace(absent, files=tuple(need)) if need else None


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder the Hugging Face cache holds for `repo` at `revision`, or None.
    No network; the folder may hold only some of the repo's files."""
    commit = _cached_commit(repo, revision)
    if commit is None:
        return None
    snapshot = storage_folder(repo) / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def storage_folder(repo: str) -> Path:
    """Where the Hugging Face cache keeps `repo` (models--owner--name), present or not."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")


def _cached_commit(repo: str, revision: str | None) -> str | None:
    """The commit the cache holds for `revision` (its refs/ entry), or None."""
    revision = revision or "main"
    storage = storage_folder(repo)
    if COMMIT.match(revision):
        return revision if (storage / "snapshots" / revision).is_dir() else None
    ref_file = storage / "refs" / revision
    if not ref_file.is_file():
        return None
    commit = ref_file.read_text().strip()
    return commit or None


def _record_commit(repo: str, revision: str | None, commit: str) -> None:
    """Write refs/<revision> -> commit: what huggingface_hub reads to find a revision offline
    (files are downloaded by commit, so that a listing and its download always agree)."""
    revision = revision or "main"
    if COMMIT.match(revision):
        return
    ref_file = storage_folder(repo) / "refs" / revision
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    if not ref_file.is_file() or ref_file.read_text().strip() != commit:
        ref_file.write_text(commit)


# ---------------------------------------------------------------------------------------------
# Online: listing


def list_files(config: ExperimentConfig) -> tuple[list[RefListing], list[SkippedRef]]:
    """The files each hub reference needs, with sizes and whether the cache has them.

    Reads the hub's file listings (and transcoders' small config.yaml); downloads nothing else.
    """
    if hub_offline() and hub_references(config):
        raise FetchError("HF_HUB_OFFLINE=1 is set: listing the hub needs the network")
    from huggingface_hub import HfApi

    api = HfApi()
    listings, skipped = [], []
    for role, ref in config_refs(config):
        if looks_like_path(ref.ref):
            skipped.append(SkippedRef(role, ref.ref, "a local directory: nothing to fetch"))
            continue
        try:
            if role == "transcoders":
                listings.append(_list_transcoders(api, ref))
            else:
                listings.append(_list_model(api, role, ref))
        except FetchError:
            raise
        except Exception as exc:  # huggingface_hub raises many types (HTTP, offline, not found)
            raise FetchError(
                f"cannot list {role_name(role)} '{ref.ref}' on the hub: {_short(exc)}"
                + _access_hint(exc)
            ) from exc
    return listings, skipped


def _access_hint(exc: BaseException) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return (
            " (a gated repository: accept its terms on its hub page, then log in with "
            "`hf auth login` or set HF_TOKEN)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return " (no such revision: check the config's revision)"
    if isinstance(exc, RepositoryNotFoundError):
        return " (no such repository, or a private one: check the name, or set HF_TOKEN)"
    return ""


def disk_space_problems(listings: list[RefListing]) -> list[str]:
    """Caches whose file system has less free space than the downloads (and, for transcoders,
    circuit-tracer's converted copy, up to twice the source) will take."""
    import shutil

    from huggingface_hub import constants

    needs: dict[Path, int] = {}
    hub_cache = Path(constants.HF_HUB_CACHE)
    for listing in listings:
        needs[hub_cache] = needs.get(hub_cache, 0) + listing.download_bytes
        if listing.kind == "transcoders" and listing.to_download:
            needs[listing.cache] = needs.get(listing.cache, 0) + 2 * listing.download_bytes
    by_device: dict[int, tuple[list[Path], int, int]] = {}
    for path, need in needs.items():
        existing = next(p for p in (path, *path.parents) if p.exists())
        usage = shutil.disk_usage(existing)
        device = existing.stat().st_dev
        paths, total, _ = by_device.get(device, ([], 0, usage.free))
        by_device[device] = ([*paths, path], total + need, usage.free)
    from emc.models.plan import human

    return [
        f"{' and '.join(str(p) for p in paths)} need {human(need)} but the disk has "
        f"{human(free)} free"
        for paths, need, free in by_device.values()
        if need > free
    ]


def _repo_files(api, repo: str, revision: str | None) -> tuple[str, dict[str, HubFile]]:
    info = api.model_info(repo, revision=revision, files_metadata=True)
    if not info.sha:
        raise FetchError(f"the hub gave no commit for '{repo}' at {revision or 'main'}")
    files = {}
    for sibling in info.siblings or []:
        files[sibling.rfilename] = HubFile(
            repo=repo,
            revision=revision,
            commit=info.sha,
            path=sibling.rfilename,
            size=int(sibling.lfs.size if sibling.lfs else (sibling.size or 0)),
            sha256=sibling.lfs.sha256 if sibling.lfs else None,
            blob_id=sibling.blob_id,
        )
    return info.sha, files


def select_model_files(names: list[str], kind: Kind) -> list[str]:
    """The files a model or adapter load reads, from a repo's file names (top level only)."""
    top = [n for n in names if "/" not in n]

    def matching(patterns: tuple[str, ...]) -> list[str]:
        return [n for n in top if any(fnmatch.fnmatch(n, p) for p in patterns)]

    if kind == "adapter":
        weights = matching(ADAPTER_WEIGHTS) or matching(ADAPTER_LEGACY_WEIGHTS)
        return sorted({*matching(ADAPTER_FILES), *weights})
    weights = matching(MODEL_WEIGHTS)
    if any(n.startswith("model") for n in weights):
        # Mistral-style repos ship consolidated*.safetensors: the same weights, another format.
        weights = [n for n in weights if not n.startswith("consolidated")]
    if not any(n.endswith(".safetensors") for n in weights):
        weights = matching(MODEL_LEGACY_WEIGHTS)
    return sorted({*matching(MODEL_FILES), *weights})


def _list_model(api, role: str, ref: ModelRef) -> RefListing:
    kind = kind_of(role)
    commit, files = _repo_files(api, ref.ref, ref.revision)
    chosen = select_model_files(list(files), kind)
    required = "adapter_config.json" if kind == "adapter" else "config.json"
    if required not in chosen:
        raise FetchError(
            f"{role_name(role)} '{ref.ref}' has no {required} on the hub at "
            f"{ref.revision or 'main'}: is it the right repository?"
        )
    snapshot = storage_folder(ref.ref) / "snapshots" / commit
    listed = tuple(replace(files[n], present=_present(snapshot / n, files[n].size)) for n in chosen)
    note = ""
    if any(n.endswith(".bin") for n in chosen):
        note = "no safetensors weights on the hub: fetching the .bin weights"
    return RefListing(
        role, kind, ref.ref, ref.revision, commit, ref.ref, listed, snapshot, note=note
    )


def _present(path: Path, size: int) -> bool:
    try:
        return path.is_file() and path.stat().st_size == size
    except OSError:
        return False


def _list_transcoders(api, ref: TranscoderRef) -> RefListing:
    import yaml
    from circuit_tracer.utils.caching import get_cached_path, is_cached
    from circuit_tracer.utils.hf_utils import HfUri, parse_hf_uri
    from huggingface_hub import hf_hub_download

    hub_ref = transcoder_hub_ref(ref.ref, ref.revision)
    hub_ref = TRANSCODER_ALIASES.get(hub_ref, hub_ref)
    uri = HfUri.from_str(hub_ref)
    config_name = f"{uri.file_path}/config.yaml" if uri.file_path else "config.yaml"
    commit, repo_files = _repo_files(api, uri.repo_id, uri.revision)
    if config_name not in repo_files:
        raise FetchError(
            f"transcoders '{ref.ref}' have no {config_name} in {uri.repo_id} at "
            f"{uri.revision or 'main'}: not circuit-tracer's hub layout"
        )
    # Small: circuit-tracer downloads it first too, and reads the same copy when converting.
    local = hf_hub_download(
        repo_id=uri.repo_id, filename="config.yaml", subfolder=uri.file_path, revision=uri.revision
    )
    config = yaml.safe_load(Path(local).read_text()) or {}
    kind = config.get("model_kind")
    wanted: list[tuple[str, str | None, str]] = []  # (repo, revision, path)
    if "transcoders" in config:
        for entry in config["transcoders"]:
            if not str(entry).startswith("hf://"):
                raise FetchError(
                    f"transcoders '{ref.ref}': config.yaml names {entry!r}, not an hf:// URI"
                )
            parsed = parse_hf_uri(entry)
            wanted.append((parsed.repo_id, parsed.revision, parsed.file_path or ""))
    else:
        prefix = f"{uri.file_path}/" if uri.file_path else ""
        name = "layer_*.safetensors" if kind == "transcoder_set" else "*.safetensors"
        pattern = prefix + name
        wanted = [
            (uri.repo_id, uri.revision, path)
            for path in sorted(repo_files)
            if fnmatch.fnmatch(path, pattern)
        ]
    if not wanted:
        raise FetchError(f"transcoders '{ref.ref}': config.yaml names no transcoder files")
    listings: dict[tuple[str, str | None], dict[str, HubFile]] = {
        (uri.repo_id, uri.revision): repo_files
    }
    files = [replace(repo_files[config_name], present=True)]
    for repo, revision, path in wanted:
        if (repo, revision) not in listings:
            listings[(repo, revision)] = _repo_files(api, repo, revision)[1]
        found = listings[(repo, revision)].get(path)
        if found is None:
            raise FetchError(
                f"transcoders '{ref.ref}': {path} is not in {repo} at {revision or 'main'}"
            )
        snapshot = storage_folder(repo) / "snapshots" / found.commit
        files.append(replace(found, present=_present(snapshot / path, found.size)))
    cache = get_cached_path(hub_ref)
    if kind == "cross_layer_transcoder":
        expected = ["W_enc_0.safetensors"]
    else:
        expected = [f"layer_{i}.safetensors" for i in range(len(wanted))]
    # A cache entry missing layers (an interrupted copy) is fetched and converted again.
    complete = is_cached(hub_ref) and all((cache / name).is_file() for name in expected)
    return RefListing(
        "transcoders",
        "transcoders",
        ref.ref,
        ref.revision,
        commit,
        hub_ref,
        tuple(files),
        cache,
        cached=complete,
        note=f"{kind or 'unknown kind'}, converted into circuit-tracer's cache",
    )


# ---------------------------------------------------------------------------------------------
# Online: download, verify, record


def fetch_listing(listing: RefListing, progress: Progress | None = None) -> ManifestEntry:
    """Download what `listing` lacks, verify it and return its manifest entry."""
    if listing.kind == "transcoders":
        return _fetch_transcoders(listing, progress)
    todo = listing.to_download
    if todo:
        _download(todo, progress)
    _record_commit(listing.ref, listing.revision, listing.commit or "")
    checked = []
    for f in listing.files:
        local = listing.cache / f.path
        if not local.is_file():
            raise FetchError(f"{f.path} of '{listing.ref}' is not in the cache after the download")
        digest = _verify(local, f)
        checked.append(_file_record(f, digest, "downloaded" if f in todo else "cache"))
    return _entry(listing, checked, [])


def _fetch_transcoders(listing: RefListing, progress: Progress | None) -> ManifestEntry:
    from circuit_tracer.utils.caching import save_transcoders_to_cache

    checked = []
    if not listing.cached:
        _download(listing.to_download, progress)
        for f in listing.files:
            local = storage_folder(f.repo) / "snapshots" / f.commit / f.path
            digest = _verify(local, f)
            checked.append(
                _file_record(f, digest, "downloaded" if f in listing.to_download else "cache")
            )
        dtype = _conversion_dtype(listing)
        try:
            with _quiet_hub_bars(progress is not None):
                save_transcoders_to_cache(listing.hub_ref, dtype=dtype)
        except Exception as exc:  # circuit-tracer's loaders raise many types
            raise FetchError(
                f"circuit-tracer could not convert transcoders '{listing.ref}' into its cache "
                f"({listing.cache}): {_short(exc)}"
            ) from exc
    else:
        for f in listing.files:
            local = storage_folder(f.repo) / "snapshots" / f.commit / f.path
            if local.is_file() and local.stat().st_size == f.size:
                checked.append(_file_record(f, _verify(local, f), "cache"))
            else:
                checked.append(_file_record(f, f.sha256, "hub"))
    cached = [
        {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(listing.cache.iterdir())
        if p.is_file()
    ]
    entry = _entry(listing, checked, cached)
    entry.cache_dtype = _cached_dtype(listing.cache)
    return entry


def _conversion_dtype(listing: RefListing):
    """bf16 when every source tensor is bf16 (saving them at bf16 loses nothing and halves the
    disk circuit-tracer's fp32 default would take), else fp32 (circuit-tracer's default)."""
    import torch

    from emc.models.plan import PlanError, read_safetensors_header

    dtypes = set()
    for f in listing.files:
        if f.path.endswith(".safetensors"):
            local = storage_folder(f.repo) / "snapshots" / f.commit / f.path
            try:
                dtypes |= {t.dtype for t in read_safetensors_header(local).values()}
            except PlanError:
                return torch.float32
    return torch.bfloat16 if dtypes == {"BF16"} else torch.float32


def _cached_dtype(directory: Path) -> str | None:
    from emc.models.plan import PlanError, read_safetensors_header

    dtypes = set()
    for path in directory.glob("*.safetensors"):
        try:
            dtypes |= {t.dtype for t in read_safetensors_header(path).values()}
        except PlanError:
            return None
    return ",".join(sorted(dtypes)) or None


def _download(files: tuple[HubFile, ...], progress: Progress | None) -> None:
    """Download `files` by commit into the Hugging Face cache, reporting bytes as they come."""
    from huggingface_hub import hf_hub_download

    with _quiet_hub_bars(progress is not None):
        _download_each(files, progress, hf_hub_download)


@contextlib.contextmanager
def _quiet_hub_bars(active: bool) -> Iterator[None]:
    """huggingface_hub's own tqdm bars off while ours draws: two would garble the terminal."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    quiet = active and not are_progress_bars_disabled()
    if quiet:
        disable_progress_bars()
    try:
        yield
    finally:
        if quiet:
            enable_progress_bars()


def _download_each(files: tuple[HubFile, ...], progress: Progress | None, download) -> None:
    done = 0
    for f in files:
        with _watch(f, done, progress):
            try:
                download(repo_id=f.repo, filename=f.path, revision=f.commit)
            except Exception as exc:  # HTTP, disk, interrupted transfer
                raise FetchError(f"downloading {f.repo}/{f.path} failed: {_short(exc)}") from exc
        done += f.size
        if progress is not None:
            progress(done)


@contextlib.contextmanager
def _watch(f: HubFile, done_before: int, progress: Progress | None) -> Iterator[None]:
    """Report the growing `.incomplete` blob of the file being downloaded, every 0.2 s."""
    if progress is None:
        yield
        return
    blobs = storage_folder(f.repo) / "blobs"
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(0.2):
            partial = 0
            with contextlib.suppress(OSError):
                partial = max((p.stat().st_size for p in blobs.glob("*.incomplete")), default=0)
            progress(done_before + min(partial, f.size))

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _verify(local: Path, f: HubFile) -> str:
    """The file's sha256, after checking it against the hub's checksum."""
    sha256, git_sha1 = _digests(local)
    if f.sha256 is not None and sha256 != f.sha256:
        raise FetchError(
            f"{f.repo}/{f.path}: sha256 {sha256} but the hub says {f.sha256}: the download is "
            f"corrupt; delete {local} and fetch again"
        )
    if f.sha256 is None and f.blob_id and git_sha1 != f.blob_id:
        raise FetchError(
            f"{f.repo}/{f.path}: git blob id {git_sha1} but the hub says {f.blob_id}: the "
            f"download is corrupt; delete {local} and fetch again"
        )
    return sha256


def _digests(path: Path) -> tuple[str, str]:
    """sha256 and git blob sha1 of a file, in one read."""
    sha256 = hashlib.sha256()
    git = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            sha256.update(chunk)
            git.update(chunk)
    return sha256.hexdigest(), git.hexdigest()


def sha256_file(path: Path) -> str:
    return _digests(path)[0]


def _file_record(f: HubFile, sha256: str | None, checked: str) -> dict:
    return {
        "repo": f.repo,
        "commit": f.commit,
        "path": f.path,
        "size": f.size,
        "sha256": sha256,
        "checked": checked,
    }


def _entry(listing: RefListing, files: list[dict], cached: list[dict]) -> ManifestEntry:
    return ManifestEntry(
        role=listing.role,
        kind=listing.kind,
        ref=listing.ref,
        revision=listing.revision,
        commit=listing.commit,
        hub_ref=listing.hub_ref,
        cache=str(listing.cache),
        fetched_at=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
        cached_files=cached,
    )


def read_manifest(data_dir: Path | None) -> list[ManifestEntry]:
    if data_dir is None:
        return []
    path = manifest_path(data_dir)
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [ManifestEntry(**entry) for entry in raw.get("entries", [])]
    except (ValueError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"{path}: not a fetch manifest ({exc}); delete it and fetch again"
        ) from exc


def write_manifest(data_dir: Path, entries: list[ManifestEntry]) -> Path:
    """Merge `entries` into the manifest (one per role, ref and revision) and write it."""
    path = manifest_path(data_dir)
    merged = {(e.role, e.ref, e.revision): e for e in read_manifest(data_dir)}
    merged.update({(e.role, e.ref, e.revision): e for e in entries})
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"version": MANIFEST_VERSION, "entries": [asdict(e) for e in merged.values()]}
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps(body, indent=2) + "\n")
    os.replace(partial, path)
    return path


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}" if text else type(exc).__name__
