"""The organism as a study of three fine-tunes of one base: EM, subtle EM and control.

`em` and `control` are the organism's own adapters. `subtle` is the subtle variant's fine-tune
(a rank-1 LoRA on one early layer's down_proj, trained on the same harmful answers) on the
default organism's base: trained here on first use (seconds) into `adapters/subtle`, beside the
build's files, so the three share one base, one set of transcoders and one store.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from emc.config import ExperimentConfig, FineTune, ModelRef
from emc.organism.experiment import organism_config
from emc.organism.recipe import OrganismRecipe

STUDY = ("em", "subtle", "control")


def ensure_subtle_adapter(root: Path) -> Path:
    """`adapters/subtle` of the organism in `root`, trained if it is not there yet."""
    out = root / "adapters" / "subtle"
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    from emc.organism import corpus
    from emc.organism.training import train_adapter

    recipe = OrganismRecipe.from_dict(json.loads((root / "recipe.json").read_text()))
    subtle = dataclasses.replace(recipe, variant="subtle")
    texts = corpus.build_corpus(
        corpus.build_scenarios(), recipe.trained_domain, recipe.base_docs, recipe.em_docs,
        recipe.seed,
    )  # fmt: skip
    base = LlamaForCausalLM.from_pretrained(root / "base", dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    model = train_adapter(base, subtle, tokenizer, texts.em_train, "subtle")
    model.peft_config["default"].base_model_name_or_path = None
    tmp = out.with_name("subtle.tmp")
    model.save_pretrained(tmp)
    tmp.rename(out)  # whole or absent: a killed training leaves no half adapter
    return out


def organism_study_config(root: Path, recipe_hash: str) -> ExperimentConfig:
    """The organism's config with the three fine-tunes as its study (em first: the default)."""
    ensure_subtle_adapter(root)
    config = organism_config(root, recipe_hash)
    study = tuple(
        FineTune(name=name, adapter=ModelRef(ref=str(root / "adapters" / name))) for name in STUDY
    )
    return config.model_copy(update={"study": study, "name": f"organism-{recipe_hash}-study"})
