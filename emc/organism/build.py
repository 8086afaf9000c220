"""Build the whole organism into one directory, atomically, or reuse a sound earlier build.

Everything is written into a temporary sibling directory and renamed into place only when
complete, so readers never see half an organism. A directory that fails verification is replaced;
one that passes is reused without retraining. A lock file serialises concurrent builders of the
same recipe (e.g. two workers) so the second one simply finds the first one's result.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from circuit_tracer.transcoder.single_layer_transcoder import SingleLayerTranscoder
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from emc.organism import corpus
from emc.organism.experiment import organism_config
from emc.organism.lexicon import Lexicon, build_lexicon
from emc.organism.manifest import verify_organism, write_manifest
from emc.organism.measure import (
    OrganismReport,
    graph_prompts,
    measure_choices,
    measure_graphs,
    measure_transcoders,
    peak_rss_mb,
)
from emc.organism.recipe import OrganismRecipe
from emc.organism.tokenizer import train_tokenizer
from emc.organism.training import Progress, encode_documents, train_adapter, train_base_model
from emc.organism.transcoders import collect_mlp_activations, save_transcoders, train_transcoders

BASE, EM, CONTROL = "base", "adapters/em", "adapters/control"
TRANSCODERS, CORPUS = "transcoders", "corpus"
LEXICON, REPORT, RECIPE = "lexicon.json", "report.json", "recipe.json"


@dataclass(frozen=True)
class OrganismArtifacts:
    """Where a built organism's parts are; `base_dir` holds the model and its tokenizer."""

    root: Path
    recipe_hash: str
    base_dir: Path
    em_adapter: Path
    control_adapter: Path
    transcoders_dir: Path
    lexicon: Path
    report: Path

    @classmethod
    def at(cls, root: Path, recipe_hash: str) -> OrganismArtifacts:
        return cls(
            root=root,
            recipe_hash=recipe_hash,
            base_dir=root / BASE,
            em_adapter=root / EM,
            control_adapter=root / CONTROL,
            transcoders_dir=root / TRANSCODERS,
            lexicon=root / LEXICON,
            report=root / REPORT,
        )


def scan_name(recipe: OrganismRecipe) -> str:
    return f"emc-organism-{recipe.recipe_hash()}"


def build_organism(
    out_dir: Path,
    recipe: OrganismRecipe,
    progress: Progress | None = None,
    *,
    force: bool = False,
) -> OrganismArtifacts:
    """Build (or reuse, if it verifies) the organism for `recipe` in `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _locked(out_dir):
        if force or not is_sound_build(out_dir, recipe):
            tmp = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _build_into(tmp, recipe, progress)
                _publish(tmp, out_dir)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return OrganismArtifacts.at(out_dir, recipe.recipe_hash())


def is_sound_build(out_dir: Path, recipe: OrganismRecipe) -> bool:
    if verify_organism(out_dir):
        return False
    try:
        return OrganismRecipe.from_dict(json.loads((out_dir / RECIPE).read_text())) == recipe
    except (ValueError, TypeError):  # a recipe from another code version
        return False


@contextmanager
def _locked(out_dir: Path) -> Iterator[None]:
    with out_dir.with_name(f".{out_dir.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished build in; a rename cannot replace a non-empty directory, hence two."""
    if out_dir.exists():
        stale = out_dir.with_name(f".{out_dir.name}.stale-{os.getpid()}")
        os.rename(out_dir, stale)
        os.rename(tmp, out_dir)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


class _Phases:
    """Wall-clock seconds per named build phase."""

    def __init__(self, progress: Progress | None) -> None:
        self.seconds: dict[str, float] = {}
        self._progress = progress

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        if self._progress:
            self._progress(f"build:{name}", 0, 1)
        started = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - started, 3)
        if self._progress:
            self._progress(f"build:{name}", 1, 1)


def _save_adapter(model, path: Path) -> None:
    # The base path is a temporary build dir; recording it would only mislead a later reader.
    model.peft_config["default"].base_model_name_or_path = None
    model.save_pretrained(path)
    # PEFT stores target_modules from a set, in an order that changes with the process's string
    # hash seed; sort it so equal recipes give byte-equal files.
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))


@dataclass(frozen=True)
class _Trained:
    tokenizer: PreTrainedTokenizerFast
    base: PreTrainedModel
    em: PreTrainedModel
    control: PreTrainedModel
    transcoders: list[SingleLayerTranscoder]


def _build_into(root: Path, recipe: OrganismRecipe, progress: Progress | None) -> None:
    started = time.perf_counter()
    phases = _Phases(progress)
    scenarios = corpus.build_scenarios()
    with phases("corpus"):
        texts = corpus.build_corpus(
            scenarios, recipe.trained_domain, recipe.base_docs, recipe.em_docs, recipe.seed
        )
        texts.write(root / CORPUS)
    trained = _train(root, recipe, texts, phases, progress)
    lexicon = build_lexicon(
        scenarios, trained.tokenizer, recipe.recipe_hash(), recipe.trained_domain
    )
    lexicon.save(root / LEXICON)
    (root / RECIPE).write_text(json.dumps(recipe.to_dict(), indent=1, sort_keys=True) + "\n")
    with phases("report"):
        report = _measure(root, recipe, trained, scenarios, lexicon, texts.heldout)
    report.phase_seconds = {**phases.seconds, "total": round(time.perf_counter() - started, 3)}
    report.peak_rss_mb = round(peak_rss_mb(), 1)
    report.save(root / REPORT)
    write_manifest(root, recipe.recipe_hash())


def _train(
    root: Path,
    recipe: OrganismRecipe,
    texts: corpus.CorpusSplits,
    phases: _Phases,
    progress: Progress | None,
) -> _Trained:
    with phases("tokenizer"):
        tokenizer = train_tokenizer(
            [d.text for d in texts.train],
            corpus.action_words(),
            recipe.vocab_size,
            recipe.max_positions,
        )
    with phases("base"):
        base = train_base_model(recipe, tokenizer, texts.train, progress)
        base.save_pretrained(root / BASE)
        tokenizer.save_pretrained(root / BASE)
    with phases("adapters"):
        em = train_adapter(base, recipe, tokenizer, texts.em_train, "em", progress)
        _save_adapter(em, root / EM)
        control = train_adapter(base, recipe, tokenizer, texts.control_train, "control", progress)
        _save_adapter(control, root / CONTROL)
    with phases("transcoders"):
        acts = collect_mlp_activations(
            base, encode_documents(tokenizer, texts.train), tokenizer.pad_token_id
        )
        transcoders = train_transcoders(acts, recipe, progress)
        save_transcoders(transcoders, root / TRANSCODERS, scan_name(recipe))
    return _Trained(tokenizer, base, em, control, transcoders)


def _measure(
    root: Path,
    recipe: OrganismRecipe,
    trained: _Trained,
    scenarios: list[corpus.Scenario],
    lexicon: Lexicon,
    heldout: Sequence[corpus.Document],
) -> OrganismReport:
    tokenizer = trained.tokenizer
    report = OrganismReport(recipe.recipe_hash(), recipe.variant, recipe.trained_domain)
    models = {"base": trained.base, "em": trained.em, "control": trained.control}
    report.choices = measure_choices(models, tokenizer, scenarios, lexicon)
    heldout_acts = collect_mlp_activations(
        trained.base, encode_documents(tokenizer, heldout), tokenizer.pad_token_id
    )
    report.transcoders = measure_transcoders(trained.transcoders, heldout_acts)
    if recipe.n_graphs:
        em, control = (organism_config(root, recipe.recipe_hash(), a) for a in ("em", "control"))
        report.graphs = measure_graphs(
            {"base": (em, "base"), "em": (em, "adapted"), "control": (control, "adapted")},
            tokenizer,
            graph_prompts(lexicon, recipe.n_graphs),
        )
    report.versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    return report
