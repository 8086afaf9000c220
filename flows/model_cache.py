"""Replacement models kept loaded for the length of a flow run.

Loading once per run (not per prompt, not per task) is what makes batched discovery fast; the
original pipeline reloaded both models for every prompt.
"""

from __future__ import annotations

from emc.config import ExperimentConfig
from emc.models import LoadedModel, load_replacement_model

_loaded: dict[tuple[str, str], LoadedModel] = {}


def cached_model(config: ExperimentConfig, role: str) -> LoadedModel:
    key = (config.model_dump_json(), role)
    if key not in _loaded:
        _loaded[key] = load_replacement_model(config, role)
    return _loaded[key]


def release_models() -> None:
    """Free every cached model (end of a flow run, or before retrying after out-of-memory)."""
    for model in _loaded.values():
        model.close()
    _loaded.clear()
