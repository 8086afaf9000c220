"""Sample bundles: how behaviour shards on other machines hand their samples (and the judge's
scores of them) to the one process that writes the store.

The design and the guarantees are those of graph bundles (`emc.store.bundles`, whose checks this
module shares): a bundle is a directory of Parquet files and a manifest.json with a SHA-256 per
file, written under a temporary name and renamed, so an ingest sees all of it or nothing. Its
name ends in `.samples`, so graph and sample bundles can share one spool and each ingest takes
only its own kind.

A bundle holds the samples of one context (a prompt, a prompt with a token forced, or a
question's paraphrase) drawn by one model: `generations.parquet`, one row per sample with
every provenance column the local path stores (run, model, sampling, seed, dtype); and, when
the shard judged them, `scores.parquet` (one row per sample and metric, naming the judge) with
`llm_calls.parquet` (the judge's calls, raw responses included). The manifest names the run,
the model row, the judge and the sample ids, and lists the contexts the shard could not sample
(`failures`: too long for the model, a non-finite forward pass), which the store has no table
for: the ingest reports them to the flow, and a re-run tries them again, as the local path does.

`ingest_sample_bundles`, run by one task at a time on the store's host, writes a bundle in one
transaction, keyed by sample id: a sample already stored is kept as it is, a score replaces only
a failed score of the same sample, metric and judge, and a call already recorded is kept; so
ingesting a bundle twice (a retried shard, a bundle copied in again) changes nothing. Whatever
is wrong with a bundle (its manifest, a missing or altered file, rows that disagree with the
manifest or each other, rows the store refuses) sends it to `rejected/` with
`<name>.reason.txt`; nothing of it is written and the others still load. Faults of the store
itself propagate and leave the bundle pending. Stored rows' `created_at` is the time of ingest.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import pandas as pd
from pydantic import BaseModel

from emc.behaviour.records import METRICS, Score, ScoreStatus
from emc.store.behaviour import GenerationRow
from emc.store.bundles import (
    _REFUSED_ROWS,
    BundleError,
    _read_frame,
    _read_manifest,
    _sha256,
    ingest_each,
    pending_bundles,
)
from emc.store.connection import Store
from emc.store.frames import _registered, insert_frame
from emc.store.llm_calls import LLMCallRow
from emc.store.models import ModelRow, upsert_model

SAMPLE_BUNDLE_VERSION = 1
SAMPLE_SUFFIX = ".samples"
SampleFrameName = Literal["generations", "scores", "llm_calls"]
GENERATION_COLUMNS: tuple[str, ...] = tuple(GenerationRow.model_fields)
SCORE_COLUMNS: tuple[str, ...] = (
    "generation_id", "metric", "judge_model", "run_id", "score", "label", "method",
    "number_mass", "status", "error", "llm_call_id",
)  # fmt: skip
LLM_CALL_COLUMNS: tuple[str, ...] = tuple(c for c in LLMCallRow.model_fields if c != "created_at")
_COLUMNS: dict[str, tuple[str, ...]] = {
    "generations": GENERATION_COLUMNS,
    "scores": SCORE_COLUMNS,
    "llm_calls": LLM_CALL_COLUMNS,
}
_STATUSES = get_args(ScoreStatus)


class ContextFailure(BaseModel):
    """A context a shard could not sample, with its prompt or question and the reason."""

    purpose: str
    prompt_id: str | None = None
    question_id: str | None = None
    role: str
    error: str


class SampleManifest(BaseModel):
    """A sample bundle's manifest.json. Frame names are a closed set, so no entry can name a
    path outside the bundle."""

    version: int
    kind: Literal["samples"]
    run_id: str
    model: ModelRow
    judge_model: str | None = None  # whose scores scores.parquet holds; None: not judged
    generation_ids: list[str]  # the rows of generations.parquet
    failures: list[ContextFailure] = []
    files: dict[SampleFrameName, str]  # frame -> SHA-256 of <frame>.parquet


@dataclass
class IngestedSamples:
    """What one loaded bundle brought."""

    bundle: str
    run_id: str
    model_id: str
    generation_ids: list[str]
    new: int  # samples the store did not hold yet
    judge_model: str | None
    scores: dict[str, int]  # score status -> count, as the bundle carried them
    failures: list[dict]  # ContextFailure as dicts


@dataclass
class SampleIngestReport:
    ingested: list[IngestedSamples] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (bundle name, reason)


def write_sample_bundle(
    spool_dir: str | Path,
    model: ModelRow,
    run_id: str,
    rows: Sequence[GenerationRow],
    scores: Sequence[Score] = (),
    failures: Sequence[ContextFailure] = (),
) -> Path:
    """One context's samples by `model` (with their scores, if judged), or its failure."""
    judges = sorted({s.judge_model for s in scores})
    if len(judges) > 1:
        raise ValueError(f"one judge per sample bundle, got {', '.join(judges)}")
    frames: dict[str, pd.DataFrame] = {}
    if rows:
        frames["generations"] = pd.DataFrame(
            [row.model_dump() for row in rows], columns=list(GENERATION_COLUMNS)
        )
    if scores:
        frames["scores"] = pd.DataFrame(
            [
                {
                    **s.model_dump(exclude={"llm_call"}),
                    "run_id": run_id,
                    "llm_call_id": s.llm_call.call_id if s.llm_call else None,
                }
                for s in scores
            ],
            columns=list(SCORE_COLUMNS),
        )
        calls = {s.llm_call.call_id: s.llm_call for s in scores if s.llm_call is not None}
        if calls:
            frames["llm_calls"] = pd.DataFrame(
                [
                    {**call.model_dump(include=set(LLM_CALL_COLUMNS)),
                     "request": json.dumps(call.request)}
                    for call in calls.values()
                ],
                columns=list(LLM_CALL_COLUMNS),
            )  # fmt: skip
    ids = [row.generation_id for row in rows]
    manifest = {
        "version": SAMPLE_BUNDLE_VERSION,
        "kind": "samples",
        "run_id": run_id,
        "model": model.model_dump(mode="json"),
        "judge_model": judges[0] if judges else None,
        "generation_ids": ids,
        "failures": [f.model_dump(mode="json") for f in failures],
        "files": {},
    }
    first = ids[0] if ids else "failed"
    return _write(spool_dir, f"{first}-{uuid.uuid4().hex[:8]}", manifest, frames)


def pending_sample_bundles(spool_dir: str | Path) -> list[Path]:
    """Sample bundles not yet ingested or rejected, oldest first (see `pending_bundles`)."""
    return pending_bundles(spool_dir, SAMPLE_SUFFIX)


def ingest_sample_bundles(store: Store, spool_dir: str | Path) -> SampleIngestReport:
    """Load every complete sample bundle into the store; see the module for the guarantees."""

    def load(bundle: Path) -> IngestedSamples:
        manifest, frames = read_sample_bundle(bundle)
        new = _load(store, bundle, manifest, frames)
        statuses = frames["scores"]["status"].value_counts() if "scores" in frames else {}
        return IngestedSamples(
            bundle=bundle.name,
            run_id=manifest.run_id,
            model_id=manifest.model.model_id,
            generation_ids=list(manifest.generation_ids),
            new=new,
            judge_model=manifest.judge_model,
            scores={str(k): int(v) for k, v in dict(statuses).items()},
            failures=[f.model_dump() for f in manifest.failures],
        )

    ingested, rejected = ingest_each(store, spool_dir, pending_sample_bundles(spool_dir), load)
    return SampleIngestReport(ingested, rejected)


def read_sample_bundle(bundle: Path) -> tuple[SampleManifest, dict[str, pd.DataFrame]]:
    """A sample bundle's manifest and frames, checked; BundleError says what is wrong."""
    manifest = _read_manifest(bundle, SampleManifest, SAMPLE_BUNDLE_VERSION)
    name, files = bundle.name, manifest.files
    if not manifest.generation_ids and not manifest.failures:
        raise BundleError(f"{name}: manifest.json lists no samples and no failures")
    if manifest.generation_ids and "generations" not in files:
        raise BundleError(
            f"{name}: manifest.json lists {len(manifest.generation_ids)} samples but no "
            "generations file"
        )
    if (manifest.judge_model is None) != ("scores" not in files):
        raise BundleError(
            f"{name}: manifest.json names "
            + (f"judge {manifest.judge_model} but lists no scores" if "scores" not in files
               else "no judge but lists scores")
        )  # fmt: skip
    if "llm_calls" in files and "scores" not in files:
        raise BundleError(f"{name}: manifest.json lists llm_calls but no scores")
    frames = {
        frame: _read_frame(bundle, frame, digest, _COLUMNS[frame])
        for frame, digest in files.items()
    }
    _check_rows(bundle, manifest, frames)
    return manifest, frames


def _check_rows(bundle: Path, manifest: SampleManifest, frames: dict[str, pd.DataFrame]) -> None:
    """The rows agree with the manifest and with each other: the samples listed, of the
    bundle's model and run; scores of those samples only, by the bundle's judge, on known
    metrics, each naming a call the bundle carries (or none)."""
    name = bundle.name
    listed = list(manifest.generation_ids)
    if "generations" in frames:
        generations = frames["generations"]
        found = generations["generation_id"].tolist()
        if len(set(listed)) != len(listed):
            raise BundleError(f"{name}: manifest.json lists a sample id twice")
        if sorted(map(str, found)) != sorted(listed):
            raise BundleError(
                f"{name}: generations.parquet has {len(found)} samples, not the "
                f"{len(listed)} manifest.json lists"
            )
        _all_equal(name, "generations.parquet", generations, "model_id", manifest.model.model_id)
        _all_equal(name, "generations.parquet", generations, "run_id", manifest.run_id)
    if "scores" in frames:
        scores = frames["scores"]
        where = f"{name}: scores.parquet"
        strangers = sorted(set(map(str, scores["generation_id"])) - set(listed))
        if strangers:
            raise BundleError(f"{where} scores samples the bundle does not hold: {strangers[:3]}")
        unknown = sorted(set(map(str, scores["metric"])) - set(METRICS))
        if unknown:
            raise BundleError(f"{where} has unknown metrics {unknown}")
        unknown = sorted(set(map(str, scores["status"])) - set(_STATUSES))
        if unknown:
            raise BundleError(f"{where} has unknown statuses {unknown}")
        if scores.duplicated(["generation_id", "metric"]).any():
            raise BundleError(f"{where} scores a sample twice on one metric")
        _all_equal(name, "scores.parquet", scores, "judge_model", manifest.judge_model)
        _all_equal(name, "scores.parquet", scores, "run_id", manifest.run_id)
        named = {str(c) for c in scores["llm_call_id"].dropna()}
        carried = set(map(str, frames["llm_calls"]["call_id"])) if "llm_calls" in frames else set()
        if named - carried:
            raise BundleError(
                f"{where} names calls that llm_calls.parquet does not hold: "
                f"{sorted(named - carried)[:3]}"
            )


def _all_equal(name: str, file: str, frame: pd.DataFrame, column: str, expected) -> None:
    others = sorted({str(v) for v in frame[column] if v != expected})
    if others:
        raise BundleError(
            f"{name}: {file}: {column} {others[0]} is not the manifest's {expected}"
            + (f" (and {len(others) - 1} more)" if len(others) > 1 else "")
        )


def _load(
    store: Store, bundle: Path, manifest: SampleManifest, frames: dict[str, pd.DataFrame]
) -> int:
    """Write one bundle in one transaction, so a refusal leaves nothing of it (the model row
    may stay, as on the local path, which records a model when it is loaded). Returns how many
    samples were new."""
    try:
        upsert_model(store, manifest.model)
        with store.write() as conn:
            new = 0
            if "generations" in frames:
                new = insert_frame(
                    conn, "generations", frames["generations"], ["generation_id"], update=False
                )
            if "llm_calls" in frames:
                insert_frame(conn, "llm_calls", frames["llm_calls"], ["call_id"], update=False)
            if "scores" in frames:
                _insert_scores(conn, frames["scores"])
    except _REFUSED_ROWS as exc:
        cause = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BundleError(
            f"{bundle.name}: the store refused its rows, nothing of the bundle was written "
            f"({cause})"
        ) from None
    return new


def _insert_scores(conn, frame: pd.DataFrame) -> None:
    """New scores go in; one replaces a stored score of its sample, metric and judge only when
    that one failed, so a late or repeated bundle never undoes a judgement."""
    columns = list(SCORE_COLUMNS)
    key = ("generation_id", "metric", "judge_model")
    updates = ", ".join(f"{c} = excluded.{c}" for c in columns if c not in key)
    with _registered(conn, "_bundle_scores", frame):
        conn.execute(
            f"INSERT INTO response_scores ({', '.join(columns)}) "
            f"SELECT {', '.join(columns)} FROM _bundle_scores "
            f"ON CONFLICT ({', '.join(key)}) DO UPDATE SET {updates} "
            "WHERE response_scores.status = 'failed'"
        )


def _write(spool_dir: str | Path, name: str, manifest: dict, frames: dict[str, pd.DataFrame]):
    spool = Path(spool_dir)
    spool.mkdir(parents=True, exist_ok=True)
    temporary = spool / f".{name}.tmp"
    temporary.mkdir()
    for frame_name, frame in frames.items():
        path = temporary / f"{frame_name}.parquet"
        frame.to_parquet(path, index=False)
        manifest["files"][frame_name] = _sha256(path)
    (temporary / "manifest.json").write_text(json.dumps(manifest, indent=1))
    final = spool / f"{name}{SAMPLE_SUFFIX}"
    temporary.rename(final)  # atomic on one file system: the ingest sees all of it or nothing
    return final
