"""A store holding real base/adapted graph pairs of the small organism, for read-side tests.

Built with the library (not the tracing flow) so that viewer and dashboard tests do not depend on
Prefect; the flow's own tests cover the flow.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from emc.config import TracingConfig
from emc.models import load_replacement_model
from emc.organism.lexicon import Lexicon
from emc.pivotal.logits import score_prompts
from emc.pivotal.offline import scenario_prompt
from emc.store import STORE_FILE_NAME, Store, upsert_model
from emc.store.graphs import insert_traced
from emc.store.prompts import insert_prompts
from emc.store.scores import insert_prompt_scores
from emc.tracing import graph_key, plan_targets, release_memory, trace_prompt

RUN_ID = "test-tracing"


@dataclass(frozen=True)
class TracedStore:
    store: Store
    data_dir: Path
    prompt_ids: list[str]
    base_model_id: str
    adapted_model_id: str


def build_traced_store(small_organism, data_dir: Path, n_prompts: int = 2) -> TracedStore:
    """Labelled-target graphs for base and adapted on `n_prompts` held-out scenarios."""
    config = small_organism.config
    lexicon = Lexicon.load(small_organism.artifacts.lexicon)
    entries = [e for e in lexicon.entries if e.split == "heldout"][:n_prompts]
    prompts = [scenario_prompt(e, "test") for e in entries]
    store = Store.in_data_dir(data_dir)
    insert_prompts(store, prompts, RUN_ID)
    tracing = TracingConfig(targets="labelled", max_feature_nodes=256)
    models = {role: load_replacement_model(config, role) for role in ("base", "adapted")}
    try:
        for loaded in models.values():
            upsert_model(store, loaded.identity.to_row(first_run_id=RUN_ID))
        scores = score_prompts(models["base"], models["adapted"], prompts, k=config.top_k)
        insert_prompt_scores(store, scores, config.top_k, RUN_ID)
        for entry, prompt, prompt_scores in zip(entries, prompts, scores, strict=True):
            labels = {t: "evil" for t in entry.harmful_ids} | {t: "safe" for t in entry.safe_ids}
            plan = plan_targets(labels, tracing)
            ids = torch.tensor(prompt_scores.base.input_ids)
            for role, loaded in models.items():
                key = graph_key(prompt.prompt_id, loaded.identity.model_id, plan, tracing)
                traced = trace_prompt(
                    loaded, key, plan, ids, tracing, RUN_ID, getattr(prompt_scores, role)
                )
                insert_traced(store, traced)
                release_memory()
    finally:
        ids_by_role = {role: m.identity.model_id for role, m in models.items()}
        for loaded in models.values():
            loaded.close()
    return TracedStore(
        store, Path(data_dir), [p.prompt_id for p in prompts], ids_by_role["base"],
        ids_by_role["adapted"],
    )  # fmt: skip


def copy_store(source_dir: Path, data_dir: Path) -> Store:
    """A private copy of the store in `source_dir` (for tests that change rows)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    for path in Path(source_dir).glob(f"{STORE_FILE_NAME}*"):
        shutil.copy(path, data_dir / path.name)
    return Store.in_data_dir(data_dir)


def seed_organism(small_organism, data_dir: Path) -> Path:
    """Copy the session's small organism build into `data_dir`, where `emc organism build
    --small` (and the pipeline's organism stage) verify it and reuse it instead of training it
    again. Tests of the build itself build for real; this is for tests about what comes after."""
    root = small_organism.artifacts.root
    target = Path(data_dir) / "organism" / root.name
    shutil.copytree(root, target)
    return target
