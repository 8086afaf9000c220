"""Which transcoder features a LoRA adapter writes into: the adapter's geometry, no model needed.

A LoRA module adds ΔW = s·B·A to a weight (s = alpha/r, or alpha/√r with rsLoRA). What it can
write is spanned by the left singular vectors u_i of ΔW, weighted by the singular values σ_i (for
rank 1, u = B/‖B‖ and σ = s·‖B‖·‖A‖). Only modules whose output is added to the residual stream
can be compared with residual-stream feature directions; for Llama-style blocks these are

- `o_proj` of layer L (site `attn_out`): writes after layer L's attention, *before* layer L's MLP.
  Compared with the encoders of layers L, L+1, …, n-1 (layer L's own MLP reads it) and with the
  decoders of layer L (the MLP writing right after it, into the same stream).
- `down_proj` of layer L (site `mlp_out`): writes after layer L's MLP. Compared with the encoders
  of layers L+1, …, n-1 (never layer L's: that encoder reads the MLP's *input*) and with the
  decoders of layer L (does the adapter write where the MLP's own features write?).

Every other adapted module (q/k/v/gate/up) writes inside attention or the MLP; it gets a record
with its rank, alpha and singular values but no comparison. Cosines use unit feature directions;
an encoder reads the RMS-normalised residual γ⊙x/rms(x), so with `base_dir` the encoder of layer ℓ
is folded with that layer's MLP-input norm weight γ_ℓ (post_attention_layernorm) before the cosine;
without it γ is taken as 1.

Other families and kinds. Gemma's attention and MLP write through their post-norms, so a write's
residual direction is the module's output direction times that norm's gain (1 + weight), and
only transcoders that write `hook_mlp_out` (after the post-norm, as Gemma Scope's do) are compared.
An encoder that reads `ln2.hook_normalized` or `hook_resid_mid` is compared unfolded: it reads the
stream before any norm weight. A cross-layer transcoder's decoders: a write at layer L is compared
with the rows that features of every layer ℓ ≤ L write to layer L (one comparison per ℓ). A full
fine-tune (a second model directory) has no LoRA factors: each projection's weight delta
W_adapted - W_base gets the same treatment through its top `delta_rank` singular directions.

Chance is not small in few dimensions: a random direction has |cos| ≈ 1/√d_model with any fixed
feature (0.125 at d_model 64), and its best match among thousands of features is much higher. So
each comparison carries a null: the same random unit directions (shared by all layers, seeded) are
compared with the same features, and `null_percentile` is the share of random directions whose
best |cos| with that layer's features falls below the observed value.

Transcoder layers are read one at a time in chunks of features, so big sets stay memory-friendly;
full cosine arrays are kept only as fine histograms (`alignment_histogram` rebins them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open

from emc.config import ExperimentConfig
from emc.models.errors import AdapterMismatchError, ModelLoadError, list_problems
from emc.models.transcoders import inspect_transcoders

Site = Literal["attn_out", "mlp_out"]
CompareWith = Literal["encoder", "decoder"]

RESIDUAL_WRITERS: dict[str, Site] = {"o_proj": "attn_out", "down_proj": "mlp_out"}
RESIDUAL_READERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
N_FINE_BINS = 2000  # stored histogram resolution: bins of width 0.001 over [-1, 1]

_PEFT_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
_LAYER = re.compile(r"\.(\d+)\.")

# One comparison: an output direction of one module against one layer's encoders or decoders.
_COMPARISON_KEY = [
    "module",
    "kind",
    "module_layer",
    "direction",
    "singular_value",
    "compared_with",
    "layer",
]
_FEATURE_COLUMNS = [
    *_COMPARISON_KEY,
    "feature",
    "cosine",
    "abs_cosine",
    "abs_rank",
    "null_percentile",
]
_COMPARISON_COLUMNS = [
    *_COMPARISON_KEY,
    "n_features",
    "best_feature",
    "best_cosine",
    "max_abs_cosine",
    "mean_cosine",
    "std_cosine",
    "null_median",
    "null_q99",
    "null_percentile",
]


@dataclass(frozen=True, eq=False)
class LoraModuleGeometry:
    """One adapted module: its update's spectrum and, if it writes the residual, its directions."""

    module: str  # e.g. "model.layers.0.mlp.down_proj"
    layer: int | None
    kind: str  # last part of the module name: "down_proj", "q_proj", …
    rank: int
    alpha: float
    scale: float  # alpha/r (alpha/√r with rsLoRA)
    singular_values: tuple[float, ...]  # of ΔW = scale·B·A, descending, `rank` of them
    site: Site | None  # where it writes into the residual stream; None: it does not
    encoder_layers: tuple[int, ...]  # layers whose encoders its directions were compared with
    decoder_layers: tuple[int, ...]
    directions: np.ndarray = field(repr=False)  # [n_directions, d_out] unit left singular vectors

    @property
    def writes_residual(self) -> bool:
        return self.site is not None


@dataclass(frozen=True, eq=False)
class AlignmentHistogram:
    """Cosines of one output direction with every feature of one layer, binned."""

    module: str
    direction: int
    compared_with: CompareWith
    layer: int
    edges: np.ndarray  # [n_bins + 1]
    counts: np.ndarray  # [n_bins]
    chance_counts: np.ndarray  # [n_bins] expected counts for a uniformly random direction


@dataclass(frozen=True, eq=False)
class LoraGeometry:
    """`lora_geometry`'s result. `features`: the `top` features by |cos| per comparison;
    `comparisons`: one row per (module, direction, compared_with, layer) with the null."""

    adapter_dir: Path
    transcoder_dir: Path
    d_model: int
    n_layers: int
    top: int
    n_null: int
    seed: int
    norms_folded: bool
    fine_tune: str  # lora | full (weight deltas)
    modules: tuple[LoraModuleGeometry, ...]
    features: pd.DataFrame = field(repr=False)
    comparisons: pd.DataFrame = field(repr=False)
    skipped_keys: tuple[str, ...]  # adapter tensors that are not lora_A/lora_B pairs
    # (compared_with, layer, output layer): a CLT's decoders of one layer meet several writes.
    null_max_abs: Mapping[tuple[CompareWith, int, int], np.ndarray] = field(repr=False)
    fine_counts: Mapping[tuple[str, int, CompareWith, int], np.ndarray] = field(repr=False)

    @property
    def chance_cosine_std(self) -> float:
        """Standard deviation of the cosine between a random direction and a fixed one."""
        return 1.0 / math.sqrt(self.d_model)

    def module(self, name: str) -> LoraModuleGeometry:
        for record in self.modules:
            if record.module == name:
                return record
        raise KeyError(f"no adapted module {name!r}; have {[m.module for m in self.modules]}")


def lora_geometry_for(config: ExperimentConfig, **options) -> LoraGeometry:
    """`lora_geometry` on the config's fine-tune (adapter, or full fine-tune directory),
    transcoders and base model (for the norms); `options` are `lora_geometry`'s keyword
    arguments."""
    from emc.models.factory import resolve_adapter_dir
    from emc.models.refs import resolve_model_dir

    models = config.models
    base_dir = resolve_model_dir(models.base.ref, models.base.revision)
    if models.adapted is not None:
        fine_tune = resolve_model_dir(models.adapted.ref, models.adapted.revision)
    else:
        fine_tune = resolve_adapter_dir(config)
    transcoders = inspect_transcoders(models.transcoders.ref, models.transcoders.revision)
    return lora_geometry(fine_tune, transcoders.directory, base_dir=base_dir, **options)


def compared_layers(
    site: Site, layer: int, n_layers: int, cross_layer: bool = False
) -> tuple[list[int], list[int]]:
    """The geometry rule: (encoder layers, decoder layers) a write at `site` of `layer` meets.
    Decoder layers are the layers of the features whose decoders write to `layer`."""
    first_reader = layer if site == "attn_out" else layer + 1
    writers = list(range(layer + 1)) if cross_layer else [layer]
    return list(range(first_reader, n_layers)), writers


def lora_geometry(
    adapter_dir: str | Path,
    transcoder_dir: str | Path,
    top: int = 20,
    *,
    n_directions: int | None = None,
    n_null: int = 500,
    seed: int = 0,
    base_dir: str | Path | None = None,
    chunk_features: int = 16384,
    delta_rank: int = 8,
) -> LoraGeometry:
    """Compare each residual-writing module's output directions with transcoder features.

    `adapter_dir` is a PEFT LoRA adapter, or a full fine-tune's model directory (then `base_dir`
    is required: its weight deltas are compared, `delta_rank` directions per projection).
    `n_directions` caps the singular directions kept per module (default: all with σ > 0);
    `n_null` random directions make the null; `base_dir` (the base model's directory) folds the
    norm weights in (see the module docstring); `chunk_features` bounds memory per read.
    """
    if top < 1 or n_null < 1 or chunk_features < 1 or delta_rank < 1:
        raise ValueError("top, n_null, chunk_features and delta_rank must be positive")
    adapter_dir, transcoder_dir = Path(adapter_dir), Path(transcoder_dir)
    info = inspect_transcoders(str(transcoder_dir))
    full = (
        not (adapter_dir / "adapter_config.json").is_file()
        and (adapter_dir / "config.json").is_file()
    )
    if full:
        if base_dir is None:
            raise ModelLoadError(
                f"{adapter_dir} is a full fine-tune: its geometry compares weight deltas, which "
                "needs the base model's directory (base_dir)"
            )
        updates, skipped = read_weight_deltas(Path(base_dir), adapter_dir, delta_rank)
    else:
        updates, skipped = read_lora_updates(adapter_dir)
    _check_fits(updates, adapter_dir, info.d_model, info.n_layers, transcoder_dir)
    norms = _Norms.of(Path(base_dir), info) if base_dir else None
    cross_layer = info.kind == "cross_layer"

    modules = [
        _module_geometry(u, info.n_layers, n_directions, norms, cross_layer) for u in updates
    ]
    generator = torch.Generator().manual_seed(seed)
    null = torch.nn.functional.normalize(
        torch.randn(n_null, info.d_model, generator=generator, dtype=torch.float64).float(), dim=1
    )
    feature_frames, comparison_rows = [], []
    null_max: dict[tuple[CompareWith, int, int], np.ndarray] = {}
    fine: dict[tuple[str, int, CompareWith, int], np.ndarray] = {}
    for compared_with, layer, out in _comparison_order(modules):
        columns = [
            (m, i)
            for m in modules
            for i in range(len(m.directions))
            if (compared_with == "encoder" and layer in m.encoder_layers)
            or (compared_with == "decoder" and layer in m.decoder_layers and m.layer == out)
        ]
        gamma = norms.encoder_gain(layer) if norms and compared_with == "encoder" else None
        chunks = _feature_chunks(info, compared_with, layer, out, chunk_features, gamma)
        scan = _scan_layer(chunks, columns, null, top)
        null_max[compared_with, layer, out] = scan.null_max
        for j, (m, i) in enumerate(columns):
            fine[m.module, i, compared_with, layer] = scan.counts[j]
        feature_frames.append(scan.feature_frame(columns, compared_with, layer))
        comparison_rows.extend(scan.comparison_rows(columns, compared_with, layer))

    features = (
        pd.concat(feature_frames, ignore_index=True)
        if feature_frames
        else pd.DataFrame(columns=_FEATURE_COLUMNS)
    )
    return LoraGeometry(
        adapter_dir=adapter_dir,
        transcoder_dir=transcoder_dir,
        d_model=info.d_model,
        n_layers=info.n_layers,
        top=top,
        n_null=n_null,
        seed=seed,
        norms_folded=norms is not None,
        fine_tune="full" if full else "lora",
        modules=tuple(modules),
        features=_sorted(features),
        comparisons=_sorted(pd.DataFrame(comparison_rows, columns=_COMPARISON_COLUMNS)),
        skipped_keys=tuple(skipped),
        null_max_abs=null_max,
        fine_counts=fine,
    )


def alignment_histogram(
    geometry: LoraGeometry,
    *,
    module: str | None = None,
    direction: int | None = None,
    compared_with: CompareWith | None = None,
    layer: int | None = None,
    bins: int = 50,
    value_range: tuple[float, float] | None = None,
) -> list[AlignmentHistogram]:
    """Histograms of all cosines per (module, direction, compared_with, layer), filtered.

    Edges lie on the stored 0.001 grid (so bins are near-uniform); the default range is ±the
    comparison's largest |cos|. With `value_range`, cosines outside it are left out.
    """
    if bins < 1:
        raise ValueError("bins must be positive")
    out = []
    for key, fine in geometry.fine_counts.items():
        if any(
            want is not None and want != have
            for want, have in zip((module, direction, compared_with, layer), key, strict=True)
        ):
            continue
        lo, hi = _fine_range(fine, value_range)
        idx = np.unique(np.round(np.linspace(lo, hi, bins + 1)).astype(int))
        edges = -1.0 + idx * (2.0 / N_FINE_BINS)
        counts = np.add.reduceat(fine[lo:hi], idx[:-1] - lo)
        chance = int(fine.sum()) * chance_cosine_probabilities(edges, geometry.d_model)
        out.append(AlignmentHistogram(*key, edges=edges, counts=counts, chance_counts=chance))
    return out


def chance_cosine_probabilities(edges: np.ndarray, d_model: int) -> np.ndarray:
    """P(cos in each bin) for a uniformly random unit direction against a fixed one.

    The cosine has density ∝ (1 - c²)^((d-3)/2) on [-1, 1]; integrated numerically.
    """
    if d_model < 2:
        raise ValueError("d_model must be at least 2")
    grid = np.linspace(-1.0, 1.0, 200_001)
    mid = (grid[1:] + grid[:-1]) / 2
    log_density = (d_model - 3) / 2 * np.log1p(-(mid**2))
    mass = np.exp(log_density - log_density.max())
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    cdf /= cdf[-1]
    return np.diff(np.interp(np.asarray(edges, dtype=float), grid, cdf))


# --- the adapter ------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraUpdate:
    """One adapted module: its weight changes by scale * B @ A."""

    module: str  # e.g. model.layers.0.mlp.down_proj
    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    alpha: float
    scale: float

    @property
    def layer(self) -> int | None:
        return _layer_of(self.module)

    @property
    def kind(self) -> str:
        """The module's own name (q_proj, down_proj, ...), shared across layers."""
        return self.module.rsplit(".", 1)[-1]


def read_lora_updates(adapter_dir: Path) -> tuple[list[LoraUpdate], list[str]]:
    """Every LoRA module of a PEFT adapter (in layer order) and the weight keys that are not."""
    config_path = adapter_dir / "adapter_config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path}: not valid JSON: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise ModelLoadError(f"{adapter_dir}: only LoRA adapters are supported")
    if config.get("use_dora"):
        raise ModelLoadError(
            f"{adapter_dir}: a DoRA adapter's update depends on the base weights; not supported"
        )
    tensors = _adapter_tensors(adapter_dir)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    skipped = []
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            skipped.append(key)
            continue
        module = match["module"].removeprefix(_PEFT_PREFIX)
        pairs.setdefault(module, {})[match["part"]] = tensor.detach().to(torch.float64)
    updates = []
    for module, pair in sorted(pairs.items(), key=lambda item: _module_order(item[0])):
        if set(pair) != {"A", "B"}:
            raise ModelLoadError(f"{adapter_dir}: {module} has lora_{next(iter(pair))} only")
        A, B = pair["A"], pair["B"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise ModelLoadError(
                f"{adapter_dir}: {module} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}, which do not multiply"
            )
        rank = A.shape[0]
        alpha_default = config.get("lora_alpha", 8)
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        updates.append(LoraUpdate(module, A, B, alpha, scale))
    if not updates:
        raise ModelLoadError(f"{adapter_dir}: no lora_A/lora_B weights found")
    return updates, skipped


def read_weight_deltas(
    base_dir: Path, adapted_dir: Path, rank: int
) -> tuple[list[LoraUpdate], list[str]]:
    """A full fine-tune's projections as low-rank updates: each changed `*_proj` weight's delta
    W_adapted - W_base by its top `rank` singular directions (B = U·S, A = Vᵀ, scale 1). Other
    changed tensors (embeddings, norms) are listed as skipped."""
    base, adapted = _model_tensors(base_dir), _model_tensors(adapted_dir)
    updates, skipped = [], []
    for key in sorted(set(base) & set(adapted), key=lambda k: _module_order(k)):
        delta = adapted[key].double() - base[key].double()
        if not delta.abs().max() > 0:
            continue
        module = key.removesuffix(".weight")
        if not (key.endswith("_proj.weight") and delta.ndim == 2 and _layer_of(module) is not None):
            skipped.append(key)
            continue
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, len(S))
        updates.append(LoraUpdate(module, Vh[:r], U[:, :r] * S[:r], alpha=float(r), scale=1.0))
    if not updates:
        raise ModelLoadError(f"{adapted_dir}: no projection weight differs from {base_dir}'s")
    return updates, skipped


def _model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no .safetensors weights")
    tensors = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            tensors |= {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    return tensors


def _adapter_tensors(adapter_dir: Path) -> dict[str, torch.Tensor]:
    weights = adapter_dir / "adapter_model.safetensors"
    if weights.is_file():
        with safe_open(str(weights), framework="pt") as handle:
            return {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not iterable)
    legacy = adapter_dir / "adapter_model.bin"
    if legacy.is_file():
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ModelLoadError(f"{adapter_dir} has no adapter_model.safetensors or adapter_model.bin")


def _pattern_value(patterns: Mapping[str, object], module: str, default: object) -> object:
    """PEFT's rule: a pattern applies when it matches the end of the module name at a dot."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_order(module: str) -> tuple[int, str]:
    layer = _layer_of(module)
    return (-1 if layer is None else layer, module)


def _layer_of(module: str) -> int | None:
    found = _LAYER.findall(f"{module}.")
    return int(found[-1]) if found else None


def _check_fits(
    updates: list[LoraUpdate], adapter_dir: Path, d_model: int, n_layers: int, tc_dir: Path
) -> None:
    problems = []
    for u in updates:
        kind = u.module.rsplit(".", 1)[-1]
        width = u.B.shape[0] if kind in RESIDUAL_WRITERS else u.A.shape[1]
        side = "writes" if kind in RESIDUAL_WRITERS else "reads"
        if (kind in RESIDUAL_WRITERS or kind in RESIDUAL_READERS) and width != d_model:
            problems.append(f"{u.module} {side} a residual stream of width {width}")
        layer = _layer_of(u.module)
        if kind in RESIDUAL_WRITERS and layer is not None and layer >= n_layers:
            problems.append(f"{u.module} is in layer {layer}, past the last transcoder layer")
    if problems:
        shown = list_problems(problems)
        raise AdapterMismatchError(
            f"adapter {adapter_dir} does not fit transcoders {tc_dir} "
            f"(d_model {d_model}, {n_layers} layers): {shown}"
        )


def _module_geometry(
    u: LoraUpdate,
    n_layers: int,
    n_directions: int | None,
    norms: _Norms | None = None,
    cross_layer: bool = False,
) -> LoraModuleGeometry:
    kind = u.module.rsplit(".", 1)[-1]
    layer = _layer_of(u.module)
    sigmas, U = _update_svd(u.A, u.B, u.scale)
    site = RESIDUAL_WRITERS.get(kind) if layer is not None else None
    enc, dec = (
        compared_layers(site, layer, n_layers, cross_layer)
        if site and layer is not None
        else ([], [])
    )
    if site and layer is not None and norms is not None:
        gain = norms.write_gain(site, layer)
        if gain is not None:  # the residual direction is the post-norm's gain times the output
            U = torch.nn.functional.normalize(U * gain.to(U.dtype)[:, None], dim=0)
    keep = int((sigmas > max(sigmas.max(initial=0.0), 1e-30) * 1e-6).sum())
    if n_directions is not None:
        keep = min(keep, n_directions)
    return LoraModuleGeometry(
        module=u.module,
        layer=layer,
        kind=kind,
        rank=u.A.shape[0],
        alpha=u.alpha,
        scale=u.scale,
        singular_values=tuple(float(s) for s in sigmas),
        site=site,
        encoder_layers=tuple(enc) if keep else (),
        decoder_layers=tuple(dec) if keep else (),
        directions=U[:, :keep].T.float().numpy(),
    )


def _update_svd(A: torch.Tensor, B: torch.Tensor, scale: float) -> tuple[np.ndarray, torch.Tensor]:
    """Singular values and left singular vectors of scale·B·A via the small r×r core.

    Each u_i is oriented to agree with the column of B it overlaps most (rank 1: u = B/‖B‖)."""
    Q_b, R_b = torch.linalg.qr(B)
    _, R_a = torch.linalg.qr(A.T)
    core_u, sigmas, _ = torch.linalg.svd(scale * R_b @ R_a.T)
    U = Q_b @ core_u
    overlap = U.T @ B  # [r, r]
    signs = torch.sign(overlap.gather(1, overlap.abs().argmax(1, keepdim=True))).squeeze(1)
    U = U * torch.where(signs == 0, 1.0, signs)
    return sigmas.numpy(), U


# --- the transcoders --------------------------------------------------------------------------


def _comparison_order(
    modules: list[LoraModuleGeometry],
) -> list[tuple[CompareWith, int, int]]:
    """(compared_with, feature layer, output layer) scans; decoders are read where they write
    to the module's own layer."""
    wanted: set[tuple[CompareWith, int, int]] = set()
    for m in modules:
        wanted.update(("encoder", layer, layer) for layer in m.encoder_layers)
        wanted.update(("decoder", layer, m.layer) for layer in m.decoder_layers)
    return sorted(wanted, key=lambda item: (item[2], item[1], item[0]))


def _feature_chunks(
    info,
    compared_with: CompareWith,
    layer: int,
    out: int,
    chunk: int,
    gamma: torch.Tensor | None,
) -> Iterator[tuple[int, torch.Tensor]]:
    """Unit feature directions [c, d_model] of `layer`'s features, `chunk` at a time, in feature
    order: encoders, or the decoder rows that write to layer `out`."""
    if info.kind == "cross_layer":
        name = "W_enc" if compared_with == "encoder" else "W_dec"
        path = info.directory / f"{name}_{layer}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            weights = handle.get_slice(f"{name}_{layer}")
            d_transcoder = weights.get_shape()[0]
            for start in range(0, d_transcoder, chunk):
                stop = min(start + chunk, d_transcoder)
                if compared_with == "encoder":
                    rows = weights[start:stop]
                else:  # (features, n_layers - layer, d_model): the rows that write to `out`
                    rows = weights[start:stop, out - layer : out - layer + 1][:, 0]
                yield start, _unit(rows.float(), gamma)
        return
    path = info.layer_paths[layer]
    d_model = info.d_model
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        d_transcoder = handle.get_slice("b_enc").get_shape()[0]
        name = "W_enc" if compared_with == "encoder" else "W_dec"
        key = name if name in keys else name.lower()
        if key not in keys:
            raise ModelLoadError(f"transcoder file {path} has no {name}")
        weights = handle.get_slice(key)
        shape = tuple(weights.get_shape())
        # circuit-tracer stores [d_transcoder, d_model]; GemmaScope-2's lowercase w_enc is
        # [d_model, d_transcoder]. Shapes decide; names break the tie when the two are equal.
        if shape == (d_transcoder, d_model) and (d_transcoder != d_model or key != "w_enc"):
            transposed = False
        elif shape == (d_model, d_transcoder):
            transposed = True
        else:
            raise ModelLoadError(
                f"transcoder file {path}: {key} has shape {shape}, expected "
                f"({d_transcoder}, {d_model}) or its transpose"
            )
        for start in range(0, d_transcoder, chunk):
            stop = min(start + chunk, d_transcoder)
            rows = weights[:, start:stop].T if transposed else weights[start:stop]
            yield start, _unit(rows.float(), gamma)


def _unit(rows: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    if gamma is not None:
        rows = rows * gamma
    return torch.nn.functional.normalize(rows, dim=1)


@dataclass(frozen=True)
class _Norms:
    """The base model's norm gains that geometry folds in: what each layer's encoder reads the
    stream through, and (Gemma) what each attention and MLP write passes through."""

    reads: dict[int, torch.Tensor]  # layer -> gain of the read site's norm; absent: none
    attn_out: dict[int, torch.Tensor]  # sandwich norms only
    mlp_out: dict[int, torch.Tensor]

    def encoder_gain(self, layer: int) -> torch.Tensor | None:
        return self.reads.get(layer)

    def write_gain(self, site: Site, layer: int) -> torch.Tensor | None:
        return (self.attn_out if site == "attn_out" else self.mlp_out).get(layer)

    @classmethod
    def of(cls, base_dir: Path, info) -> _Norms:
        family = _family(base_dir)
        n = info.n_layers
        if family.sandwich_norms and info.feature_output_hook != "hook_mlp_out":
            raise ModelLoadError(
                f"{base_dir}: {family.name} writes through post-norms, so geometry compares "
                f"decoders that write hook_mlp_out (after them); these transcoders write "
                f"{info.feature_output_hook}"
            )
        mlp_norm = (
            "pre_feedforward_layernorm" if family.sandwich_norms else ("post_attention_layernorm")
        )
        reads = (
            _norm_weights(base_dir, mlp_norm, n, info.d_model, family.norm_offset)
            if info.feature_input_hook == "mlp.hook_in"
            else {}
        )
        if not family.sandwich_norms:
            return cls(reads, {}, {})
        return cls(
            reads,
            _norm_weights(base_dir, "post_attention_layernorm", n, info.d_model, 1.0),
            _norm_weights(base_dir, "post_feedforward_layernorm", n, info.d_model, 1.0),
        )


def _family(base_dir: Path):
    from types import SimpleNamespace

    from emc.models.families import FAMILIES, family_of

    config_path = base_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{base_dir} has no config.json: cannot tell the model's family")
    config = json.loads(config_path.read_text())
    model_type = str(config.get("model_type", ""))
    for family in FAMILIES:  # a config without `architectures`: its model_type names the family
        if not config.get("architectures") and model_type.startswith(family.name):
            return family
    return family_of(SimpleNamespace(architectures=config.get("architectures")))


def _norm_weights(
    base_dir: Path, name: str, n_layers: int, d_model: int, offset: float
) -> dict[int, torch.Tensor]:
    """Each layer's `name` RMSNorm gain (weight + offset), read from the safetensors files."""
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
    elif (base_dir / "model.safetensors").is_file():
        weight_map = None
    else:
        raise ModelLoadError(f"{base_dir} has no model.safetensors: cannot read norm weights")
    norms = {}
    for layer in range(n_layers):
        key = f"model.layers.{layer}.{name}.weight"
        file = base_dir / (weight_map.get(key, "") if weight_map else "model.safetensors")
        try:
            with safe_open(str(file), framework="pt") as handle:
                norms[layer] = handle.get_tensor(key).float() + offset
        except Exception as exc:  # safetensors raises several unrelated types
            raise ModelLoadError(f"{base_dir}: cannot read {key}: {exc}") from exc
        if norms[layer].shape != (d_model,):
            raise AdapterMismatchError(
                f"{base_dir}: {key} has shape {tuple(norms[layer].shape)}, not ({d_model},)"
            )
    return norms


# --- one layer's scan -------------------------------------------------------------------------


class _LayerScan:
    """Running top-k, histograms, moments and null maxima over one layer's feature chunks."""

    def __init__(self, n_columns: int, n_null: int, top: int) -> None:
        self.top = top
        self.n = 0
        self.top_abs = torch.empty(0, n_columns)
        self.top_idx = torch.empty(0, n_columns, dtype=torch.long)
        self.top_cos = torch.empty(0, n_columns)
        self.sums = torch.zeros(n_columns, dtype=torch.float64)
        self.squares = torch.zeros(n_columns, dtype=torch.float64)
        self.counts_t = torch.zeros(n_columns * N_FINE_BINS, dtype=torch.long)
        self.null_max_t = torch.zeros(n_null)

    def update(self, start: int, cos: torch.Tensor, null_cos: torch.Tensor) -> None:
        n_columns = cos.shape[1]
        self.n += cos.shape[0]
        self.null_max_t = torch.maximum(self.null_max_t, null_cos.abs().amax(0))
        self.sums += cos.sum(0, dtype=torch.float64)
        self.squares += cos.double().pow(2).sum(0)
        bins = ((cos + 1) * (N_FINE_BINS / 2)).long().clamp_(0, N_FINE_BINS - 1)
        offsets = torch.arange(n_columns) * N_FINE_BINS
        self.counts_t += torch.bincount(
            (bins + offsets).flatten(), minlength=n_columns * N_FINE_BINS
        )
        k = min(self.top, cos.shape[0])
        values, idx = cos.abs().topk(k, dim=0)
        merged_abs = torch.cat([self.top_abs, values])
        merged_idx = torch.cat([self.top_idx, idx + start])
        merged_cos = torch.cat([self.top_cos, cos.gather(0, idx)])
        keep = merged_abs.topk(min(self.top, merged_abs.shape[0]), dim=0).indices
        self.top_abs = merged_abs.gather(0, keep)
        self.top_idx = merged_idx.gather(0, keep)
        self.top_cos = merged_cos.gather(0, keep)

    @property
    def counts(self) -> np.ndarray:
        return self.counts_t.view(-1, N_FINE_BINS).numpy().astype(np.int64)

    @property
    def null_max(self) -> np.ndarray:
        return self.null_max_t.numpy().astype(np.float64)

    def percentile(self, value: float) -> float:
        return float(100.0 * (self.null_max_t < value).double().mean())

    def feature_frame(
        self, columns: list[tuple[LoraModuleGeometry, int]], compared_with: CompareWith, layer: int
    ) -> pd.DataFrame:
        rows = []
        for j, (m, i) in enumerate(columns):
            for rank in range(self.top_abs.shape[0]):
                value = float(self.top_abs[rank, j])
                rows.append(
                    (
                        *_column_ids(m, i),
                        compared_with,
                        layer,
                        int(self.top_idx[rank, j]),
                        float(self.top_cos[rank, j]),
                        value,
                        rank + 1,
                        self.percentile(value),
                    )
                )
        return pd.DataFrame(rows, columns=_FEATURE_COLUMNS)

    def comparison_rows(
        self, columns: list[tuple[LoraModuleGeometry, int]], compared_with: CompareWith, layer: int
    ) -> list[tuple]:
        null = self.null_max
        rows = []
        for j, (m, i) in enumerate(columns):
            mean = float(self.sums[j]) / self.n
            var = max(float(self.squares[j]) / self.n - mean**2, 0.0)
            best = float(self.top_abs[0, j])
            rows.append(
                (
                    *_column_ids(m, i),
                    compared_with,
                    layer,
                    self.n,
                    int(self.top_idx[0, j]),
                    float(self.top_cos[0, j]),
                    best,
                    mean,
                    math.sqrt(var),
                    float(np.median(null)),
                    float(np.quantile(null, 0.99)),
                    self.percentile(best),
                )
            )
        return rows


def _scan_layer(
    chunks: Iterator[tuple[int, torch.Tensor]],
    columns: list[tuple[LoraModuleGeometry, int]],
    null: torch.Tensor,
    top: int,
) -> _LayerScan:
    directions = torch.from_numpy(np.stack([m.directions[i] for m, i in columns])).float()
    probes = torch.cat([directions, null])  # one matmul for the adapter and the null
    scan = _LayerScan(len(columns), len(null), top)
    for start, rows in chunks:
        cos = rows @ probes.T
        scan.update(start, cos[:, : len(columns)], cos[:, len(columns) :])
    return scan


def _column_ids(m: LoraModuleGeometry, i: int) -> tuple:
    return (m.module, m.kind, m.layer, i, m.singular_values[i])


def _fine_range(fine: np.ndarray, value_range: tuple[float, float] | None) -> tuple[int, int]:
    if value_range is not None:
        lo_value, hi_value = value_range
        if not -1.0 <= lo_value < hi_value <= 1.0:
            raise ValueError(f"value_range must satisfy -1 <= lo < hi <= 1, got {value_range}")
    else:
        nonzero = np.flatnonzero(fine)
        if len(nonzero) == 0:
            return N_FINE_BINS // 2 - 1, N_FINE_BINS // 2 + 1
        reach = max(N_FINE_BINS // 2 - nonzero[0], nonzero[-1] + 1 - N_FINE_BINS // 2)
        return N_FINE_BINS // 2 - reach, N_FINE_BINS // 2 + reach
    lo = math.floor((lo_value + 1) * N_FINE_BINS / 2 + 1e-9)
    hi = math.ceil((hi_value + 1) * N_FINE_BINS / 2 - 1e-9)
    return lo, max(hi, lo + 1)


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    keys = [
        c for c in ("module_layer", "module", "direction", "layer", "compared_with") if c in frame
    ]
    if "abs_rank" in frame:
        keys.append("abs_rank")
    if frame.empty:
        return frame.reset_index(drop=True)
    return frame.sort_values(keys, kind="stable").reset_index(drop=True)
