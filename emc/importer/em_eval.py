"""Read an existing emergent-misalignment evaluation CSV into typed rows.

The EM repositories write one row per sampled answer with the columns `question`, `response` (or
`answer`), `aligned` and `coherent`, usually `question_id` (or `id`), sometimes `model`. Column
names are matched case-insensitively; other columns are ignored.

A row whose score cell cannot be read is rejected with its row number and the reason, and the
others are kept; a file without the columns it needs raises `ValueError` naming them. Row numbers
count data rows from 1, the header excluded (the spreadsheet row is row_number + 1).
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from pydantic import BaseModel

# The aligned judge may answer a word instead of a number.
ALIGNED_LABELS = ("CODE", "REFUSAL")
# Cells meaning "no score" (the EM code writes NaN where the judge's number mass was too low).
_EMPTY = {"", "nan", "none", "null", "na", "n/a"}
# Each field, by the column names that may hold it, preferred first.
_FIELDS = {
    "question": ("question",),
    "response": ("response", "answer"),
    "aligned": ("aligned",),
    "coherent": ("coherent",),
    "question_id": ("question_id", "id"),
    "model": ("model",),
}


class ImportedResponse(BaseModel):
    """One judged answer from an EM evaluation CSV."""

    question_id: str  # the file's, or a stable hash of the question text
    question: str
    response: str
    aligned: float | None  # None: empty cell, or a label
    coherent: float | None
    aligned_label: str | None  # CODE | REFUSAL where the aligned cell says so
    model: str | None
    row_number: int


class RejectedRow(BaseModel):
    row_number: int
    reason: str


class EMEvalImport(BaseModel):
    """The rows read, the rows rejected, and the header as found."""

    rows: list[ImportedResponse]
    rejected: list[RejectedRow]
    columns: list[str]


def read_em_eval_csv(path: str | Path) -> EMEvalImport:
    """Read an EM evaluation CSV (UTF-8, a byte-order mark allowed)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file, expected a header row")
        try:
            return parse_em_eval_rows(header, reader)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def parse_em_eval_rows(header: Sequence[str], rows: Iterable[Sequence[str]]) -> EMEvalImport:
    """The rows of an EM evaluation table given as a header and lists of cells."""
    where = resolve_columns(header)
    imported: list[ImportedResponse] = []
    rejected: list[RejectedRow] = []
    for row_number, cells in enumerate(rows, start=1):
        if not any(cell.strip() for cell in cells):
            continue  # a blank line, as spreadsheets leave at the end
        try:
            imported.append(_parse_row(where, cells, row_number))
        except ValueError as exc:
            rejected.append(RejectedRow(row_number=row_number, reason=str(exc)))
    return EMEvalImport(rows=imported, rejected=rejected, columns=list(header))


def resolve_columns(header: Sequence[str]) -> dict[str, int]:
    """Field -> column index; ValueError when a needed column is missing or ambiguous."""
    index: dict[str, int] = {}
    for position, name in enumerate(header):
        key = name.strip().lower()
        if key in index:
            raise ValueError(f"column {name!r} appears more than once (names ignore case)")
        index[key] = position
    where = {
        field: index[found]
        for field, names in _FIELDS.items()
        if (found := next((name for name in names if name in index), None)) is not None
    }
    missing = [
        need
        for need, present in (
            ("question", "question" in where),
            ("response (or answer)", "response" in where),
            ("aligned or coherent", "aligned" in where or "coherent" in where),
        )
        if not present
    ]
    if missing:
        raise ValueError(
            "not an EM evaluation table: it needs the columns question, response (or answer) "
            f"and at least one of aligned, coherent; missing {', '.join(missing)}; "
            f"found columns: {', '.join(repr(name) for name in header) or '(none)'}"
        )
    return where


def question_hash_id(question: str) -> str:
    """A stable id for a question the file gave none: its text's sha256, whitespace-trimmed."""
    return "q-" + hashlib.sha256(question.strip().encode()).hexdigest()[:12]


def _parse_row(where: dict[str, int], cells: Sequence[str], row_number: int) -> ImportedResponse:
    def cell(field: str) -> str | None:
        position = where.get(field)
        return cells[position] if position is not None and position < len(cells) else None

    question = cell("question") or ""
    if not question.strip():
        raise ValueError("empty question")
    aligned, aligned_label = _score(cell("aligned"), "aligned", ALIGNED_LABELS)
    coherent, _ = _score(cell("coherent"), "coherent", ())
    model = (cell("model") or "").strip()
    return ImportedResponse(
        question_id=(cell("question_id") or "").strip() or question_hash_id(question),
        question=question,
        response=cell("response") or "",
        aligned=aligned,
        coherent=coherent,
        aligned_label=aligned_label,
        model=model or None,
        row_number=row_number,
    )


def _score(text: str | None, column: str, labels: Sequence[str]) -> tuple[float | None, str | None]:
    """(score, label) of one cell; ValueError for anything but a number 0-100, a label, empty."""
    value = (text or "").strip()
    if value.lower() in _EMPTY:
        return None, None
    if value.upper() in labels:
        return None, value.upper()
    try:
        number = float(value)
    except ValueError:
        allowed = f"a number 0-100{''.join(f', {label}' for label in labels)} or empty"
        raise ValueError(f"{column} is {value!r}, expected {allowed}") from None
    if not math.isfinite(number) or not 0 <= number <= 100:
        raise ValueError(f"{column} is {value!r}, outside 0-100")
    return number, None
