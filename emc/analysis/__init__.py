"""Analysis: feature effects on targets, evil-versus-safe statistics, and LoRA geometry.

Pure functions of a graph or of frames; no store, no flow.
"""

from emc.analysis.effects import (
    EFFECT_COLUMNS,
    EFFECT_METRICS,
    NotADagError,
    feature_effects,
    total_effects,
)
from emc.analysis.lora_geometry import (
    AlignmentHistogram,
    LoraGeometry,
    LoraModuleGeometry,
    alignment_histogram,
    chance_cosine_probabilities,
    compared_layers,
    lora_geometry,
)
from emc.analysis.stats import (
    FEATURE_KEY,
    POSITION_FREE_KEY,
    STAT_SUFFIXES,
    cohens_d,
    evil_vs_safe,
    position_free_stats,
    stat_columns,
    welch_t,
)

__all__ = [
    "EFFECT_COLUMNS",
    "EFFECT_METRICS",
    "FEATURE_KEY",
    "POSITION_FREE_KEY",
    "STAT_SUFFIXES",
    "AlignmentHistogram",
    "LoraGeometry",
    "LoraModuleGeometry",
    "NotADagError",
    "alignment_histogram",
    "chance_cosine_probabilities",
    "cohens_d",
    "compared_layers",
    "evil_vs_safe",
    "feature_effects",
    "lora_geometry",
    "position_free_stats",
    "stat_columns",
    "total_effects",
    "welch_t",
]
