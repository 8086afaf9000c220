"""Analysis: feature effects on targets, evil-versus-safe statistics, LoRA geometry, forward-pass
differences between base and adapted, and feature ablations.

Pure functions of a graph, of frames or of a loaded model; no store, no flow.
"""

from emc.analysis.ablation import (
    AblatedFeature,
    Ablation,
    TargetChange,
    ablate_features,
    control_features,
)
from emc.analysis.effects import (
    EFFECT_COLUMNS,
    EFFECT_METRICS,
    NotADagError,
    feature_effects,
    total_effects,
)
from emc.analysis.forward_diff import (
    DELTA_COLUMNS,
    ForwardDiff,
    LayerDiff,
    activation_deltas,
    adapter_layers,
    compare_forward,
    default_tolerance,
    feature_activations,
    residual_states,
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
    "DELTA_COLUMNS",
    "EFFECT_COLUMNS",
    "EFFECT_METRICS",
    "FEATURE_KEY",
    "POSITION_FREE_KEY",
    "STAT_SUFFIXES",
    "AblatedFeature",
    "Ablation",
    "AlignmentHistogram",
    "ForwardDiff",
    "LayerDiff",
    "LoraGeometry",
    "LoraModuleGeometry",
    "NotADagError",
    "TargetChange",
    "ablate_features",
    "activation_deltas",
    "adapter_layers",
    "alignment_histogram",
    "chance_cosine_probabilities",
    "cohens_d",
    "compare_forward",
    "compared_layers",
    "control_features",
    "default_tolerance",
    "evil_vs_safe",
    "feature_activations",
    "feature_effects",
    "lora_geometry",
    "position_free_stats",
    "residual_states",
    "stat_columns",
    "total_effects",
    "welch_t",
]
