"""A store with behaviour data the flows made on the small organism, for tests that read it.

One discovery round (flagged prompts with labels), then the evaluation flow: continuation checks
on the flagged prompts, the EM evaluation of base and EM adapter, response features, and the EM
evaluation of the control adapter. Sample counts are small so that it takes seconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from emc.config import dump_config
from emc.models import describe_model
from emc.store import Store

CONTINUATION_SAMPLES = 8
EVAL_SAMPLES = 3
N_QUESTIONS = 8
ROLLOUT_SAMPLES = 6  # per setting, in the interventions flow's tests


@dataclass(frozen=True)
class BehaviourStore:
    data_dir: Path
    store: Store
    base_id: str
    adapted_id: str
    control_id: str
    summary: dict  # the evaluation flow's summary (base and EM adapter)
    control_summary: dict


def write_config(
    small_organism, data_dir: Path, continuation_samples: int = CONTINUATION_SAMPLES
) -> Path:
    """The small organism's config with short, few samples (the organism answers in ~8 tokens)."""
    config = yaml.safe_load(dump_config(small_organism.config))
    config["behaviour"] = {
        "continuation_samples": continuation_samples,
        "eval_samples": EVAL_SAMPLES,
        "max_tokens": 12,
    }
    path = data_dir / "experiment.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def build_behaviour_store(small_organism, data_dir: Path) -> BehaviourStore:
    from flows.discovery import discovery_flow
    from flows.evaluation import evaluation_flow, with_adapter

    write_config(small_organism, data_dir)
    discovery_flow(data_dir=str(data_dir), iterations=1, prompts_per_iteration=4)
    summary = evaluation_flow(
        data_dir=str(data_dir), parts=["continuations", "em", "features"], limit=N_QUESTIONS
    )
    control = evaluation_flow(
        data_dir=str(data_dir), parts=["em"], adapter="control", limit=N_QUESTIONS
    )
    config = small_organism.config
    return BehaviourStore(
        data_dir=data_dir,
        store=Store.in_data_dir(data_dir),
        base_id=describe_model(config, "base").model_id,
        adapted_id=describe_model(config, "adapted").model_id,
        control_id=describe_model(with_adapter(config, "control"), "adapted").model_id,
        summary=summary,
        control_summary=control,
    )
