"""Transcoders: find them, check they fit the model, load them.

Two kinds, both in circuit-tracer's format: a directory holding `config.yaml` and either one
`layer_{i}.safetensors` per layer (`model_kind: transcoder_set`, per-layer transcoders) or
`W_enc_{i}.safetensors` and `W_dec_{i}.safetensors` per layer (`model_kind:
cross_layer_transcoder`, a CLT whose layer-i features write to layers i..n-1). The directory is
local or circuit-tracer's cache entry for a hub reference. Shapes and activations are read from
safetensors headers, so a mismatch is reported before any weights are loaded.

Activations: ReLU, JumpReLU (a `threshold` tensor in the files) and TopK (`activation_function:
topk` and `topk: K` in config.yaml: circuit-tracer has the TopK module but no file format for it,
so EMC reads these two keys and swaps the module in after loading). A per-layer `W_skip` is the
skip connection. Big decoders stay on disk and are read row by row (`lazy_decoder`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors import safe_open

from emc.models.errors import ModelLoadError, TranscoderMismatchError
from emc.models.refs import hub_offline, looks_like_path

KINDS = {"transcoder_set": "per_layer", "cross_layer_transcoder": "cross_layer"}
# Decoders bigger than this many values stay on disk (Llama-3.2-1B's set: 16 x 131k x 2048).
LAZY_DECODER_VALUES = 50_000_000


@dataclass(frozen=True)
class TranscoderSetInfo:
    ref: str
    directory: Path
    layer_paths: dict[int, Path]  # per-layer: layer_{i}; cross-layer: W_enc_{i}
    d_model: int
    d_transcoder: int
    feature_input_hook: str
    feature_output_hook: str
    scan: str
    kind: str = "per_layer"  # per_layer | cross_layer
    activation: str = "relu"  # relu | jump_relu | topk
    topk: int | None = None
    skip: bool = False

    @property
    def n_layers(self) -> int:
        return len(self.layer_paths)

    @property
    def decoder_values(self) -> int:
        """How many decoder weights the set holds (a CLT's layer i writes n - i layers)."""
        if self.kind == "cross_layer":
            writes = self.n_layers * (self.n_layers + 1) // 2
            return self.d_transcoder * self.d_model * writes
        return self.d_transcoder * self.d_model * self.n_layers

    @property
    def lazy_decoder(self) -> bool:
        return self.decoder_values > LAZY_DECODER_VALUES

    def describe(self) -> str:
        kind = "cross-layer transcoder" if self.kind == "cross_layer" else "per-layer transcoders"
        activation = f"topk({self.topk})" if self.activation == "topk" else self.activation
        skip = ", skip connection" if self.skip else ""
        return (
            f"{kind}: {self.n_layers} layers x {self.d_transcoder} features, {activation}"
            f"{skip}, {self.feature_input_hook} -> {self.feature_output_hook}"
        )


def inspect_transcoders(ref: str, revision: str | None = None) -> TranscoderSetInfo:
    directory = _resolve_directory(ref, revision)
    config = _read_config(directory)
    model_kind = config.get("model_kind", "transcoder_set")
    if model_kind not in KINDS:
        raise ModelLoadError(
            f"{directory}: model_kind {model_kind!r} is not one EMC loads; it loads "
            + " and ".join(KINDS)
        )
    hooks = (config.get("feature_input_hook"), config.get("feature_output_hook"))
    if not all(isinstance(hook, str) and hook for hook in hooks):
        raise ModelLoadError(
            f"{directory}/config.yaml must name feature_input_hook and feature_output_hook"
        )
    kind = KINDS[model_kind]
    if kind == "cross_layer":
        layer_paths = _clt_paths(directory)
        d_models = {i: _shape(p, f"b_dec_{i}")[0] for i, p in layer_paths.items()}
        widths = {i: _shape(p, f"b_enc_{i}")[0] for i, p in layer_paths.items()}
        threshold = "threshold_0"
        skip = False  # circuit-tracer's CLT loader reads no skip weights
    else:
        layer_paths = _layer_paths(directory, config)
        d_models = {layer: _shape(path, "b_dec")[0] for layer, path in layer_paths.items()}
        widths = {layer: _shape(path, "b_enc")[0] for layer, path in layer_paths.items()}
        threshold = "activation_function.threshold"
        skip = "W_skip" in _keys(layer_paths[0])
    if len(set(d_models.values())) != 1:
        raise TranscoderMismatchError(f"{directory}: layers disagree on d_model: {d_models}")
    if len(set(widths.values())) != 1:
        raise TranscoderMismatchError(f"{directory}: layers disagree on width: {widths}")
    activation, topk = _activation(directory, config, threshold in _keys(layer_paths[0]))
    return TranscoderSetInfo(
        ref=ref,
        directory=directory,
        layer_paths=layer_paths,
        d_model=next(iter(d_models.values())),
        d_transcoder=next(iter(widths.values())),
        feature_input_hook=hooks[0],
        feature_output_hook=hooks[1],
        scan=str(config.get("scan") or ref),
        kind=kind,
        activation=activation,
        topk=topk,
        skip=skip,
    )


def _activation(directory: Path, config: dict, has_threshold: bool) -> tuple[str, int | None]:
    declared = config.get("activation_function")
    if declared == "topk":
        k = config.get("topk")
        if not isinstance(k, int) or k < 1:
            raise ModelLoadError(
                f"{directory}/config.yaml: activation_function topk needs topk: K (a positive "
                f"integer), got {k!r}"
            )
        return "topk", k
    if declared not in (None, "relu", "jump_relu"):
        raise ModelLoadError(
            f"{directory}/config.yaml: activation_function {declared!r} is not relu, jump_relu "
            "or topk"
        )
    return ("jump_relu" if has_threshold else "relu"), None


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
    """circuit-tracer's TranscoderSet or CrossLayerTranscoder for `info`, on `device`."""
    if info.kind == "cross_layer":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(
            str(info.directory),
            feature_input_hook=info.feature_input_hook,
            feature_output_hook=info.feature_output_hook,
            scan=info.scan,
            device=device,
            dtype=dtype,
            lazy_decoder=info.lazy_decoder,
            lazy_encoder=False,
        )
    from circuit_tracer.transcoder.activation_functions import TopK
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set

    transcoders = load_transcoder_set(
        {layer: str(path) for layer, path in info.layer_paths.items()},
        scan=info.scan,
        feature_input_hook=info.feature_input_hook,
        feature_output_hook=info.feature_output_hook,
        device=device,
        dtype=dtype,
        # Small sets load eagerly; big ones (Llama: 16 x 131k features) stream decoders lazily.
        lazy_encoder=False,
        lazy_decoder=info.lazy_decoder,
    )
    if info.activation == "topk":
        for transcoder in transcoders:
            transcoder.activation_function = TopK(info.topk)
    return transcoders


def _resolve_directory(ref: str, revision: str | None = None) -> Path:
    if looks_like_path(ref):
        directory = Path(ref).expanduser()
        if not directory.is_dir():
            raise ModelLoadError(f"transcoder directory not found: {directory}")
        return directory
    from circuit_tracer.utils.caching import get_cached_path, is_cached, save_transcoders_to_cache

    from emc.models.fetch import offline_missing_message, transcoder_hub_ref

    hub_ref = transcoder_hub_ref(ref, revision)
    if not is_cached(hub_ref):
        if hub_offline():
            raise ModelLoadError(
                offline_missing_message(
                    "transcoder set",
                    ref,
                    revision,
                    get_cached_path(hub_ref),
                    cache="circuit-tracer's cache",
                )
            )
        save_transcoders_to_cache(hub_ref)
    return get_cached_path(hub_ref)


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


def _clt_paths(directory: Path) -> dict[int, Path]:
    encoders = {int(p.stem.split("_")[2]): p for p in directory.glob("W_enc_*.safetensors")}
    if not encoders:
        raise ModelLoadError(f"{directory}: no W_enc_<layer>.safetensors files (a CLT's encoders)")
    if sorted(encoders) != list(range(len(encoders))):
        raise TranscoderMismatchError(f"{directory}: CLT layers are not 0..n-1: {sorted(encoders)}")
    missing = [
        f"W_dec_{i}.safetensors"
        for i in encoders
        if not (directory / f"W_dec_{i}.safetensors").is_file()
    ]
    if missing:
        raise ModelLoadError(f"{directory}: missing CLT decoder files: {', '.join(missing)}")
    n = len(encoders)
    for i in encoders:
        writes = _shape(directory / f"W_dec_{i}.safetensors", f"W_dec_{i}")
        if len(writes) != 3 or writes[1] != n - i:
            raise TranscoderMismatchError(
                f"{directory}: W_dec_{i} has shape {writes}; a CLT layer {i} of {n} writes "
                f"(features, {n - i}, d_model)"
            )
    return dict(sorted(encoders.items()))


def _keys(path: Path) -> set[str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return set(handle.keys())
    except Exception as exc:  # safetensors raises several unrelated types on bad files
        raise ModelLoadError(f"cannot read transcoder file {path}: {exc}") from exc


def _shape(path: Path, key: str) -> list[int]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return list(handle.get_slice(key).get_shape())
    except Exception as exc:  # safetensors raises several unrelated types on bad files
        raise ModelLoadError(f"cannot read {key} from transcoder file {path}: {exc}") from exc
