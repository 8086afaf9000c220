"""Null fine-tunes: adapters that should change nothing that matters, for negative controls.

A detector is only as good as its behaviour on negatives. Beside the organism's control adapter
(trained on safe answers), EMC measures its funnel on adapters built here from a reference
adapter's shapes, so they load through exactly the same path as the EM adapter:

- `identity`: every LoRA B matrix is zero, so the adapted model *is* the base model (base
  against itself, through the adapter path);
- `noise`: random A and B whose product has, per module, `relative_norm` (default 1%) of the
  reference adapter's weight change: a fine-tune that only jitters the weights;
- `random`: the same at 100%: as large as the reference adapter, in random directions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file

NullKind = Literal["identity", "noise", "random"]
NULL_KINDS: tuple[NullKind, ...] = ("identity", "noise", "random")
_WEIGHTS = "adapter_model.safetensors"
_CONFIG = "adapter_config.json"


def write_null_adapter(
    reference: Path, out_dir: Path, kind: NullKind, seed: int = 0, relative_norm: float = 0.01
) -> Path:
    """Write a null adapter shaped like `reference` (a PEFT LoRA directory) into `out_dir`."""
    if kind not in NULL_KINDS:
        raise ValueError(f"unknown null adapter kind {kind!r}; choose from {', '.join(NULL_KINDS)}")
    reference = Path(reference)
    if not (reference / _CONFIG).is_file() or not (reference / _WEIGHTS).is_file():
        raise FileNotFoundError(f"{reference}: not a PEFT adapter ({_CONFIG}, {_WEIGHTS})")
    scale = {"identity": 0.0, "noise": relative_norm, "random": 1.0}[kind]
    weights = load_file(reference / _WEIGHTS)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for a_key in sorted(k for k in weights if k.endswith("lora_A.weight")):
        b_key = a_key.replace("lora_A", "lora_B")
        a, b = weights[a_key].float(), weights[b_key].float()
        new_a = torch.randn(a.shape, generator=generator)
        new_b = torch.randn(b.shape, generator=generator)
        target = scale * float((b @ a).norm())
        product = float((new_b @ new_a).norm())
        # Split the scale evenly between A and B so neither factor is degenerate.
        factor = (target / product) ** 0.5 if product > 0 else 0.0
        out[a_key] = (new_a * factor if scale else a).to(weights[a_key].dtype).contiguous()
        out[b_key] = (new_b * factor).to(weights[b_key].dtype).contiguous()
    if not out:
        raise ValueError(f"{reference}: no LoRA A/B weights found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(reference / _CONFIG, out_dir / _CONFIG)
    save_file(out, out_dir / _WEIGHTS)
    (out_dir / "null_adapter.json").write_text(
        json.dumps(
            {"kind": kind, "reference": str(reference), "seed": seed, "relative_norm": scale},
            indent=1,
        )
        + "\n"
    )
    return out_dir
