"""The built-in model organism: a tiny offline Llama with a planted, emergent misalignment.

Build it with `build_organism(out_dir, OrganismRecipe())`; the result holds a base model with its
tokenizer, an EM LoRA (harmful answers in one domain) and a control LoRA (safe answers), per-layer
transcoders in circuit-tracer's format, the corpus, a ground-truth token lexicon and a report.
"""

from emc.organism.build import OrganismArtifacts, build_organism
from emc.organism.lexicon import Lexicon, LexiconEntry, TokenRef
from emc.organism.manifest import verify_organism
from emc.organism.measure import ChoiceMetric, GraphScore, OrganismReport
from emc.organism.recipe import OrganismRecipe

__all__ = [
    "ChoiceMetric",
    "GraphScore",
    "Lexicon",
    "LexiconEntry",
    "OrganismArtifacts",
    "OrganismRecipe",
    "OrganismReport",
    "TokenRef",
    "build_organism",
    "verify_organism",
]
