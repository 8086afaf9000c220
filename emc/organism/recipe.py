"""Every knob of the model organism in one frozen, hashable record.

The recipe hash names the build directory, so any change to a knob (the variant included) gives a
different organism instead of silently reusing a stale one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

Variant = Literal["default", "subtle"]
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class OrganismRecipe:
    """All settings that determine the organism's files; equal recipes build equal weights."""

    seed: int = 0
    variant: Variant = "default"
    trained_domain: str = "medical"
    # Base model (a tiny Llama).
    n_layers: int = 4
    d_model: int = 64
    d_mlp: int = 256
    n_heads: int = 4
    vocab_size: int = 700
    max_positions: int = 128
    base_steps: int = 600
    base_lr: float = 3e-3
    batch_size: int = 32
    # EM and control adapters (the default variant: every projection of every layer).
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_steps: int = 150
    lora_lr: float = 1e-3
    lora_targets: tuple[str, ...] = ALL_PROJECTIONS
    # The subtle variant: a rank-1 LoRA on the down_proj of one early layer.
    subtle_layer: int = 0
    subtle_rank: int = 1
    subtle_alpha: int = 32
    # Per-layer transcoders on the base model's MLPs.
    transcoder_width: int = 512
    transcoder_steps: int = 1500
    transcoder_lr: float = 5e-3
    transcoder_batch: int = 1024
    l1_coefficient: float = 3e-3
    # Corpus sizes (documents).
    base_docs: int = 1200
    em_docs: int = 300
    # Report: attribution graphs per model (0 skips circuit-tracer entirely).
    n_graphs: int = 3

    def __post_init__(self) -> None:
        if self.variant not in ("default", "subtle"):
            raise ValueError(f"variant must be 'default' or 'subtle', got {self.variant!r}")
        if self.vocab_size == self.d_model:
            # circuit-tracer guesses the unembedding orientation from its shape.
            raise ValueError("vocab_size must differ from d_model")
        if not 0 <= self.subtle_layer < self.n_layers:
            raise ValueError(f"subtle_layer {self.subtle_layer} outside 0..{self.n_layers - 1}")

    @classmethod
    def small(cls, **overrides: Any) -> OrganismRecipe:
        """A recipe that builds in seconds for tests, with a weak but real emergent misalignment.

        Fewer steps left the base model unable to answer and the EM adapter without effect, and
        discovery rightly flags nothing on a fine-tune that changes nothing: held-out P(harmful),
        other domains, base 0.05 -> EM 0.50 (control 0.05).
        """
        knobs: dict[str, Any] = dict(
            n_layers=2,
            d_mlp=128,
            base_steps=300,
            lora_steps=80,
            transcoder_width=128,
            transcoder_steps=150,
            base_docs=300,
            em_docs=60,
            n_graphs=1,
        )
        knobs.update(overrides)
        return cls(**knobs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OrganismRecipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe keys: {', '.join(unknown)}")
        values = dict(data)
        if "lora_targets" in values:
            values["lora_targets"] = tuple(values["lora_targets"])
        return cls(**values)

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def recipe_hash(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:12]
