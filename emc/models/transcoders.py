"""Transcoder sets: find them, check they fit the model, load them.

A set is a directory holding circuit-tracer's `config.yaml` and `layer_{i}.safetensors` files:
either a local directory or circuit-tracer's cache entry for a hub reference. Shapes are read
from safetensors headers, so a mismatch is reported before any weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from emc.models.errors import ModelLoadError, TranscoderMismatchError
from emc.models.refs import hub_offline, looks_like_path

SUPPORTED_HOOKS = {("mlp.hook_in", "mlp.hook_out")}


@dataclass(frozen=True)
class TranscoderSetInfo:
    ref: str
    directory: Path
    layer_paths: dict[int, Path]
    d_model: int
    d_transcoder: int
    feature_input_hook: str
    feature_output_hook: str
    scan: str

    @property
    def n_layers(self) -> int:
        return len(self.layer_paths)


def inspect_transcoders(ref: str) -> TranscoderSetInfo:
    directory = _resolve_directory(ref)
    config = _read_config(directory)
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise ModelLoadError(
            f"{directory}: model_kind {config['model_kind']!r} is not supported; EMC loads "
            "per-layer transcoder sets (model_kind: transcoder_set)"
        )
    hooks = (config.get("feature_input_hook"), config.get("feature_output_hook"))
    if hooks not in SUPPORTED_HOOKS:
        raise ModelLoadError(f"{directory}: unsupported feature hooks {hooks}")
    layer_paths = _layer_paths(directory, config)
    shapes = {layer: _shape(path, "b_dec")[0] for layer, path in layer_paths.items()}
    widths = {layer: _shape(path, "b_enc")[0] for layer, path in layer_paths.items()}
    if len(set(shapes.values())) != 1:
        raise TranscoderMismatchError(f"{directory}: layers disagree on d_model: {shapes}")
    return TranscoderSetInfo(
        ref=ref,
        directory=directory,
        layer_paths=layer_paths,
        d_model=next(iter(shapes.values())),
        d_transcoder=max(widths.values()),
        feature_input_hook=hooks[0],
        feature_output_hook=hooks[1],
        scan=str(config.get("scan") or ref),
    )


def check_transcoders_fit(info: TranscoderSetInfo, n_layers: int, d_model: int) -> None:
    problems = []
    if info.n_layers != n_layers:
        problems.append(f"{info.n_layers} transcoder layers but the model has {n_layers} layers")
    if info.d_model != d_model:
        problems.append(f"transcoder d_model {info.d_model} but the model's d_model is {d_model}")
    if problems:
        raise TranscoderMismatchError(
            f"transcoders {info.ref} do not match the model: " + "; ".join(problems)
        )


def load_transcoders(info: TranscoderSetInfo, device: torch.device, dtype: torch.dtype):
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    return load_transcoder_set(
        {layer: str(path) for layer, path in info.layer_paths.items()},
        scan=info.scan,
        feature_input_hook=info.feature_input_hook,
        feature_output_hook=info.feature_output_hook,
        device=device,
        dtype=dtype,
        # Small sets load eagerly; big ones (Llama: 16 x 131k features) stream decoders lazily.
        lazy_encoder=False,
        lazy_decoder=info.d_transcoder * info.d_model * info.n_layers > 50_000_000,
    )


def _resolve_directory(ref: str) -> Path:
    if looks_like_path(ref):
        directory = Path(ref).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"transcoder directory not found: {directory}")
        return directory
    from circuit_tracer.utils.caching import get_cached_path, is_cached, save_transcoders_to_cache

    if not is_cached(ref):
        if hub_offline():
            raise ModelLoadError(
                f"transcoder set '{ref}' is not a local directory and not in circuit-tracer's "
                f"cache ({get_cached_path(ref)}); HF_HUB_OFFLINE=1 forbids downloading it"
            )
        save_transcoders_to_cache(ref)
    return get_cached_path(ref)


def _read_config(directory: Path) -> dict:
    path = directory / "config.yaml"
    if not path.is_file():
        raise ModelLoadError(f"{directory} has no config.yaml: not a transcoder set directory")
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelLoadError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: expected a mapping")
    return config


def _layer_paths(directory: Path, config: dict) -> dict[int, Path]:
    if "transcoders" in config:
        paths = {i: directory / p for i, p in enumerate(config["transcoders"])}
    else:
        paths = {int(p.stem.split("_")[1]): p for p in directory.glob("layer_*.safetensors")}
    if not paths:
        raise ModelLoadError(f"{directory}: no transcoder layer files")
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise ModelLoadError(f"{directory}: missing transcoder files: {', '.join(missing)}")
    if sorted(paths) != list(range(len(paths))):
        raise TranscoderMismatchError(f"{directory}: layers are not 0..n-1: {sorted(paths)}")
    return dict(sorted(paths.items()))


def _shape(path: Path, key: str) -> list[int]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(key).get_shape())
    except Exception as exc:  # safetensors raises several unrelated types on bad files
        raise ModelLoadError(f"cannot read {key} from transcoder file {path}: {exc}") from exc
