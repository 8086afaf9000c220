"""Which corpus a card run scans, from what a person asked for (`--corpus`) and the experiment.

`None` (the default) is the organism's own corpus when the config's models are the organism's,
else the store's prompts and generations (a real model has no corpus EMC knows of). `organism`
and `store` ask for one of those by name; anything else is a file path.
"""

from __future__ import annotations

from emc.config import ExperimentConfig
from emc.features.corpus import (
    Corpus,
    CorpusError,
    organism_corpus,
    organism_root_of,
    read_corpus_file,
    store_corpus,
)
from emc.store import Store
from emc.store.behaviour import generations
from emc.store.prompts import get_prompts

NAMED = ("organism", "store")


def load_corpus(spec: str | None, config: ExperimentConfig, store: Store, tokenizer) -> Corpus:
    """The corpus `spec` names (see the module); CorpusError says why one cannot be had."""
    if spec is None or spec == "organism":
        root = organism_root_of(config.ground_truth)
        found = organism_corpus(root) if root is not None else None
        if found is not None:
            return found
        if spec == "organism":
            raise CorpusError(
                "the experiment is not the organism's (no corpus/ beside its ground truth): "
                "pass a file (--corpus FILE) or --corpus store"
            )
        return _store(store, tokenizer)
    if spec == "store":
        return _store(store, tokenizer)
    return read_corpus_file(spec)


def _store(store: Store, tokenizer) -> Corpus:
    prompts = get_prompts(store) if store.exists() else []
    rows = generations(store) if store.exists() else None
    answers = (
        []
        if rows is None or rows.empty
        else [
            (gid, context + text)
            for gid, context, text in zip(
                rows["generation_id"], rows["context"], rows["text"], strict=True
            )
        ]
    )
    corpus = store_corpus(prompts, answers, tokenizer)
    if not corpus.texts:
        raise CorpusError(
            f"the store {store.path} holds no prompts or generations to scan: pass a corpus file "
            "(--corpus FILE)"
        )
    return corpus
