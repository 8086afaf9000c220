"""`import_results`: read every file, map what can be mapped, write it, report the rest.

One bad file never stops an import: it is skipped with its reason and everything else goes in.
Writes are insert-or-ignore under ids derived from the files, so a second import of the same
directory changes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from emc.importer.files import (
    NOTE_KINDS,
    LegacyFile,
    find_results_root,
    legacy_model_id,
    list_files,
)
from emc.importer.judgements import ImportedJudgement, latest_judgement, to_judgement
from emc.importer.prompts import PromptIndex
from emc.importer.readers import (
    LegacyLabeled,
    LegacyLogits,
    LegacyNote,
    LegacyRead,
    read_bad_prompt,
    read_labeled,
    read_logits,
    read_note,
    read_prompt,
    read_queue_entry,
    read_verdict,
)
from emc.importer.report import ImportReport
from emc.importer.reviews import LabeledImport, from_bad_prompt, from_labeled, from_queue_entry
from emc.importer.tokens import TokenIds, legacy_next_tokens
from emc.pivotal.logits import NextTokens
from emc.pivotal.review import Review
from emc.store import Store
from emc.store.imports import (
    import_judgements,
    import_next_tokens,
    import_queue_items,
    import_reviews,
    import_token_labels,
    stored_label_keys,
    stored_review_ids,
)
from emc.store.prompts import insert_prompts

READERS: dict[str, Callable[[LegacyFile], LegacyRead]] = {
    "prompts": read_prompt,
    "logits": read_logits,
    "verdicts": read_verdict,
    "labeled_logits": read_labeled,
    "bad_prompts": read_bad_prompt,
    "manual_labeling_queue": read_queue_entry,
    **{kind: read_note for kind in NOTE_KINDS},
}
Mapped = TypeVar("Mapped")


def import_results(store: Store, path: str | Path, run_id: str) -> ImportReport:
    """Import an original results directory (`results/` or `results/pivotal_tokens/`)."""
    root = find_results_root(Path(path))
    report = ImportReport(root=str(root))
    files, ignored = list_files(root)
    for item in ignored:
        report.warn(item.path, item.reason)
    reads = _read_all(files, report)
    index = PromptIndex(reads["prompts"])
    token_ids = TokenIds()
    for read in [*reads["logits"], *reads["labeled_logits"]]:
        token_ids.learn(read.data.prompt_id, read.data.top_k)

    next_tokens = _each(reads["logits"], "logits", report, _logits(index, token_ids, report))
    judgements = _each(
        reads["verdicts"],
        "verdicts",
        report,
        lambda read: to_judgement(read, _prompt_of(index, read)),
    )
    notes = _notes_by_prompt(reads)
    labeled = _each(
        reads["labeled_logits"],
        "labeled_logits",
        report,
        _labeled(index, token_ids, judgements, notes, report),
    )
    _skip_orphan_notes(notes, labeled, report)
    rejected = _each(
        reads["bad_prompts"],
        "bad_prompts",
        report,
        lambda read: (read, from_bad_prompt(read, _prompt_of(index, read))),
    )
    queue = _each(
        reads["manual_labeling_queue"],
        "manual_labeling_queue",
        report,
        lambda read: _queue_item(read, _prompt_of(index, read), judgements),
    )

    report.tally("prompts", len(index.listed), insert_prompts(store, index.listed, run_id))
    derived = insert_prompts(store, index.derived, run_id)
    report.tally("prompts (from other files)", len(index.derived), derived)
    report.tally("logits", len(next_tokens), import_next_tokens(store, next_tokens, run_id))
    rows = [(j.judgement, j.created_at) for j in judgements]
    report.tally("verdicts", len(rows), import_judgements(store, rows, run_id))
    _write_labels_and_reviews(store, labeled, rejected, notes, report, run_id)
    report.tally("manual_labeling_queue", len(queue), import_queue_items(store, queue, run_id))
    return report


def _read_all(files: list[LegacyFile], report: ImportReport) -> dict[str, list[LegacyRead]]:
    reads: dict[str, list[LegacyRead]] = {kind: [] for kind in READERS}
    for file in files:
        try:
            reads[file.kind].append(READERS[file.kind](file))
        except Exception as exc:
            report.skip(file.kind, file.rel, _reason(exc))
    return reads


def _each(
    reads: list[LegacyRead],
    kind: str,
    report: ImportReport,
    mapper: Callable[[LegacyRead], Mapped],
) -> list[Mapped]:
    """Map every file; one that cannot be mapped is skipped with its reason."""
    mapped = []
    for read in reads:
        try:
            mapped.append(mapper(read))
        except Exception as exc:
            report.skip(kind, read.file.rel, _reason(exc))
    return mapped


def _reason(exc: Exception) -> str:
    # Years of hand-edited JSON hold shapes no reader foresaw: one such file is reported, not
    # allowed to stop the import. Expected problems (ValueError) need no type name.
    return str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"


def _prompt_of(index: PromptIndex, read: LegacyRead) -> str:
    data: Any = read.data
    prompt = index.resolve(data.prompt_id, data.prompt_text, data.prompt_type, read.file.rel)
    return prompt.prompt_id


def _logits(index: PromptIndex, token_ids: TokenIds, report: ImportReport):
    def mapper(read: LegacyRead[LegacyLogits]) -> NextTokens:
        data, file = read.data, read.file
        prompt = index.resolve(data.prompt_id, data.prompt_text, data.prompt_type, file.rel)
        ids = [token_ids.resolve(data.prompt_id, token) for token in data.top_k]
        model_id = legacy_model_id(data.tested_model or file.model_dir or "", file.graph)
        rendered = data.prompt_text or prompt.text  # what the original fed the model
        next_tokens, problems = legacy_next_tokens(
            prompt.prompt_id, model_id, rendered, data.top_k, ids
        )
        for problem in problems:
            report.warn(file.rel, problem)
        return next_tokens

    return mapper


def _queue_item(read: LegacyRead, prompt_id: str, judgements: list[ImportedJudgement]):
    return from_queue_entry(read, prompt_id, latest_judgement(judgements, prompt_id))


def _notes_by_prompt(reads: dict[str, list[LegacyRead]]) -> dict[str, list[LegacyRead]]:
    notes: dict[str, list[LegacyRead]] = defaultdict(list)
    for kind in NOTE_KINDS:
        for read in reads[kind]:
            notes[read.data.prompt_id].append(read)
    return notes


def _labeled(
    index: PromptIndex,
    token_ids: TokenIds,
    judgements: list[ImportedJudgement],
    notes: dict[str, list[LegacyRead[LegacyNote]]],
    report: ImportReport,
):
    def mapper(read: LegacyRead[LegacyLabeled]) -> tuple[LegacyRead, LabeledImport]:
        data = read.data
        prompt_id = _prompt_of(index, read)
        judgement = latest_judgement(
            judgements, prompt_id, data.tested_model or read.file.model_dir, data.judge_model
        )
        imported = from_labeled(read, prompt_id, token_ids, judgement, notes[data.prompt_id])
        for warning in imported.warnings:
            report.warn(read.file.rel, warning)
        return read, imported

    return mapper


def _skip_orphan_notes(notes, labeled, report: ImportReport) -> None:
    """A note explains a labelled file's labels; without that file it has nothing to explain."""
    explained = {read.data.prompt_id for read, imported in labeled if imported.review}
    for prompt_id, reads in notes.items():
        if prompt_id in explained:
            continue
        for read in reads:
            report.skip(
                read.file.kind,
                read.file.rel,
                f"no imported review in labeled_logits/ for prompt {prompt_id} to attach it to",
            )


def _write_labels_and_reviews(
    store: Store,
    labeled: list[tuple[LegacyRead, LabeledImport]],
    rejected: list[tuple[LegacyRead, Review]],
    notes: dict[str, list[LegacyRead]],
    report: ImportReport,
    run_id: str,
) -> None:
    judge_rows = [row for _, imported in labeled for row in imported.judge_labels]
    reviews = [(i.review, i.tokens) for _, i in labeled if i.review] + [
        (review, {}) for _, review in rejected
    ]
    # New-or-not per file, for the report; the writes themselves are insert-or-ignore.
    stored = stored_review_ids(store, [review.review_id for review, _ in reviews])
    stored_labels = stored_label_keys(store, {row.prompt_id for row in judge_rows})
    report.tally("labeled_logits", len(labeled), _new_labeled(labeled, stored, stored_labels))
    report.tally("bad_prompts", len(rejected), sum(r.review_id not in stored for _, r in rejected))
    _tally_notes(labeled, notes, stored, report)

    report.tally("judge labels", len(judge_rows), import_token_labels(store, judge_rows, run_id))
    human_rows = sum(len(r.labels) for r, _ in reviews if r.action != "reject")
    report.tally("human labels", human_rows, import_reviews(store, reviews, run_id)[1])


def _new_labeled(labeled, stored_reviews: set[str], stored_labels: set[tuple]) -> int:
    """Files that add something: a review not stored yet, or a judge label not stored yet."""
    new, seen = 0, set(stored_labels)
    for _, imported in labeled:
        keys = {(r.prompt_id, r.token_id, r.labeller) for r in imported.judge_labels}
        review = imported.review
        new += bool((review and review.review_id not in stored_reviews) or keys - seen)
        seen |= keys
    return new


def _tally_notes(labeled, notes, stored_reviews: set[str], report: ImportReport) -> None:
    """A note is new when a review it was attached to is new."""
    attached: dict[str, tuple[LegacyRead, bool]] = {}
    for read, imported in labeled:
        if imported.review is None:
            continue
        is_new = imported.review.review_id not in stored_reviews
        for note in notes.get(read.data.prompt_id, []):
            earlier = attached.get(note.file.rel, (note, False))[1]
            attached[note.file.rel] = (note, earlier or is_new)
    for note, is_new in attached.values():
        report.tally(note.file.kind, 1, int(is_new))
