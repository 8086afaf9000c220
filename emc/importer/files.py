"""The layout of the original pipeline's results directory, and its model-name convention.

    results/pivotal_tokens/
      prompts/{generator}/{id}.json
      runs|graph_runs/{model}/logits/{id}.json
      runs|graph_runs/{model}/verdicts/{judge}/{id}.json
      labeled_logits/{model}/{id}.json
      bad_prompts/{id}.json
      manual_labeling_queue/{id}.json
      human_disagreements|human_agreements|human_explanations/*.json

`{model}` is the model name with "/" replaced by "_". Files are listed here by where they sit;
what is inside them is the readers' business.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

Kind = Literal[
    "prompts",
    "logits",
    "verdicts",
    "labeled_logits",
    "bad_prompts",
    "manual_labeling_queue",
    "human_disagreements",
    "human_agreements",
    "human_explanations",
]
NOTE_KINDS: tuple[Kind, ...] = ("human_disagreements", "human_agreements", "human_explanations")
_FLAT_KINDS: tuple[Kind, ...] = ("bad_prompts", "manual_labeling_queue", *NOTE_KINDS)
_TOP_LEVEL = {"prompts", "runs", "graph_runs", "labeled_logits", *_FLAT_KINDS}


class LegacyFile(BaseModel):
    """One JSON file of the original results, with what its location says about it."""

    model_config = ConfigDict(frozen=True)

    kind: Kind
    path: Path
    rel: str  # relative to pivotal_tokens/, "/"-separated: stable wherever the copy lives
    model_dir: str | None = None  # runs, graph_runs, labeled_logits: the tested model
    graph: bool = False  # under graph_runs/: logits taken from the graph's replacement model
    judge_dir: str | None = None  # verdicts: the judge model
    generator_dir: str | None = None  # prompts: the generator (or "human")


class Ignored(BaseModel):
    path: str
    reason: str


def find_results_root(path: Path) -> Path:
    """`results/` or `results/pivotal_tokens/` -> the pivotal_tokens directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    if (path / "pivotal_tokens").is_dir():
        return path / "pivotal_tokens"
    if any((path / name).is_dir() for name in _TOP_LEVEL):
        return path
    raise FileNotFoundError(
        f"{path} holds no results of the original pipeline: expected pivotal_tokens/ or its "
        f"folders ({', '.join(sorted(_TOP_LEVEL))})"
    )


def sanitise_model_name(name: str) -> str:
    """The original's directory name for a model; a directory name maps to itself."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip())


def legacy_model_id(name: str, graph: bool) -> str:
    """EMC model id for a model as the original pipeline ran it.

    graph_runs/ logits came from the replacement model that builds the graphs (bf16), runs/ from
    the plain HF model (fp16); the original found they differ (19.125 vs 19.875), so the two are
    kept apart instead of one overwriting the other.
    """
    return f"legacy:{'graph:' if graph else ''}{sanitise_model_name(name)}"


def list_files(root: Path) -> tuple[list[LegacyFile], list[Ignored]]:
    """Every JSON file of a known kind, sorted by path; anything else is listed as ignored."""
    files: list[LegacyFile] = []
    ignored: list[Ignored] = []
    for entry in sorted(root.iterdir()):
        if entry.name not in _TOP_LEVEL or not entry.is_dir():
            ignored.append(_ignored(root, entry, "not a kind of file the import reads"))
        elif entry.name == "prompts":
            files += _nested(root, entry, "prompts", "generator_dir", ignored)
        elif entry.name == "labeled_logits":
            files += _nested(root, entry, "labeled_logits", "model_dir", ignored)
        elif entry.name in ("runs", "graph_runs"):
            files += _runs(root, entry, ignored)
        else:
            files += _json_in(root, entry, entry.name, {}, ignored)
    return files, ignored


def _nested(root, directory, kind, field, ignored) -> list[LegacyFile]:
    files = []
    for sub in sorted(directory.iterdir()):
        if sub.is_dir():
            files += _json_in(root, sub, kind, {field: sub.name}, ignored)
        else:
            ignored.append(_ignored(root, sub, f"expected {kind}/<folder>/<id>.json"))
    return files


def _runs(root: Path, directory: Path, ignored: list[Ignored]) -> list[LegacyFile]:
    graph = directory.name == "graph_runs"
    files = []
    for model in sorted(p for p in directory.iterdir() if p.is_dir()):
        common = {"model_dir": model.name, "graph": graph}
        for sub in sorted(model.iterdir()):
            if sub.name == "logits" and sub.is_dir():
                files += _json_in(root, sub, "logits", common, ignored)
            elif sub.name == "verdicts" and sub.is_dir():
                for judge in sorted(p for p in sub.iterdir() if p.is_dir()):
                    files += _json_in(
                        root, judge, "verdicts", {**common, "judge_dir": judge.name}, ignored
                    )
            else:
                ignored.append(_ignored(root, sub, "only logits/ and verdicts/ are imported"))
    return files


def _json_in(root, directory, kind, fields, ignored) -> list[LegacyFile]:
    files = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix == ".json":
            files.append(LegacyFile(kind=kind, path=path, rel=_rel(root, path), **fields))
        else:
            ignored.append(_ignored(root, path, f"not a JSON file of {kind}/"))
    return files


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _ignored(root: Path, path: Path, reason: str) -> Ignored:
    return Ignored(path=_rel(root, path), reason=reason)
