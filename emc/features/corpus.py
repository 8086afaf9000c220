"""The texts a feature card scans: the organism's corpus, a person's file, or the store's own text.

- **organism**: the corpus files the organism build wrote (`corpus/train.jsonl`, the base model's
  training texts, then `corpus/heldout.jsonl`), read as they are; nothing is rebuilt.
- **file**: `.txt` (paragraphs separated by blank lines; without any blank line, one text per
  line), `.jsonl` (an object per line with a string `text`) or `.parquet` (a string `text`
  column). A malformed file is refused with its name, the place and the problem.
- **store**: every stored prompt as the model reads it (chat prompts through the template) and
  every stored generation (the context it continued plus the answer).

A corpus is capped to `limit` texts chosen evenly over it (every k-th text, so the organism's
scenarios, speakers and held-out texts all stay represented), tokenised with BOS like every other
stage, truncated to `max_tokens`, and named by a hash of exactly the token ids scanned: a card is
keyed by that id, so a changed file or cap is a different corpus, never a stale card.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from emc.features.records import CorpusKind

DEFAULT_LIMIT = 2000  # texts; the default organism's 1,344 texts all fit (see the README)
DEFAULT_MAX_TOKENS = 128  # per text, BOS included
FORMATS = (".txt", ".jsonl", ".parquet")


class CorpusError(ValueError):
    """A corpus that cannot be read; the message names the file and what is wrong."""


class CorpusText(BaseModel):
    model_config = ConfigDict(frozen=True)

    text: str
    source: str  # file:line, prompt:<id>, generation:<id>


class Corpus(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # organism:<recipe hash>, file:<file name>, store
    kind: CorpusKind
    texts: list[CorpusText]


@dataclass(frozen=True)
class TokenizedCorpus:
    """A corpus as the model reads it: BOS-prefixed token ids, one list per text."""

    corpus_id: str  # name:hash of the ids and sources scanned
    name: str
    kind: CorpusKind
    sources: list[str]
    token_ids: list[list[int]]
    available: int  # texts in the corpus before the cap

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


def read_corpus_file(path: str | Path) -> Corpus:
    """A person's corpus file, by its suffix: .txt, .jsonl or .parquet."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    readers = {".txt": _text_file, ".jsonl": _jsonl_file, ".parquet": _parquet_file}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise CorpusError(
            f"{path}: unknown corpus format {path.suffix or '(no suffix)'!r}; use "
            f"{', '.join(FORMATS)}"
        )
    texts = reader(path)
    if not texts:
        raise CorpusError(f"{path}: holds no text")
    return Corpus(name=f"file:{path.name}", kind="file", texts=texts)


def organism_corpus(organism_root: Path) -> Corpus | None:
    """The organism's own corpus files, or None when `organism_root` has none (a real model)."""
    folder = Path(organism_root) / "corpus"
    files = [folder / name for name in ("train.jsonl", "heldout.jsonl")]
    if not files[0].is_file():
        return None
    texts = [t for path in files if path.is_file() for t in _jsonl_file(path)]
    return Corpus(name=f"organism:{Path(organism_root).name}", kind="organism", texts=texts)


def organism_root_of(ground_truth: str | None) -> Path | None:
    """The organism build a config points at: the folder of its ground-truth lexicon."""
    return Path(ground_truth).parent if ground_truth else None


def store_corpus(
    prompts: Iterable[Any], generations: Iterable[tuple[str, str]], tokenizer
) -> Corpus:
    """The store's prompts (rendered as the model reads them) and generations (id, full text),
    sorted by id so the corpus, and its id, do not depend on when rows were written."""
    from emc.pivotal.prompts import render_prompt

    texts = [
        CorpusText(text=render_prompt(p, tokenizer), source=f"prompt:{p.prompt_id}")
        for p in sorted(prompts, key=lambda p: p.prompt_id)
    ]
    texts += [
        CorpusText(text=text, source=f"generation:{gid}")
        for gid, text in sorted(generations)
        if text.strip()
    ]
    return Corpus(name="store", kind="store", texts=texts)


def select_texts(texts: Sequence[CorpusText], limit: int | None) -> list[CorpusText]:
    """At most `limit` texts, evenly spaced over the corpus (first one included)."""
    if limit is not None and limit < 1:
        raise ValueError(f"the text limit must be at least 1, got {limit}")
    if limit is None or len(texts) <= limit:
        return list(texts)
    return [texts[i * len(texts) // limit] for i in range(limit)]


def tokenize_corpus(
    corpus: Corpus,
    tokenizer,
    limit: int | None = DEFAULT_LIMIT,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> TokenizedCorpus:
    """Token ids with exactly one BOS (as `emc.models.encode_with_bos`), truncated to
    `max_tokens`; texts with no token besides BOS are left out."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be at least 2 (BOS and one token), got {max_tokens}")
    chosen = select_texts(corpus.texts, limit)
    encoded = tokenizer([t.text for t in chosen], add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    sources, token_ids = [], []
    for text, ids in zip(chosen, encoded, strict=True):
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        ids = list(ids[:max_tokens])
        if len(ids) < 2:
            continue
        sources.append(text.source)
        token_ids.append(ids)
    if not token_ids:
        raise CorpusError(f"corpus {corpus.name}: no text has a token to scan")
    digest = hashlib.sha256(json.dumps([sources, token_ids]).encode()).hexdigest()[:12]
    return TokenizedCorpus(
        corpus_id=f"{corpus.name}:{digest}",
        name=corpus.name,
        kind=corpus.kind,
        sources=sources,
        token_ids=token_ids,
        available=len(corpus.texts),
    )


def _decoded(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None


def _text_file(path: Path) -> list[CorpusText]:
    lines = _decoded(path).splitlines()
    paragraphs = any(not line.strip() for line in _inner(lines))
    texts: list[CorpusText] = []
    if not paragraphs:
        return [
            CorpusText(text=line, source=f"{path.name}:{number}")
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    start, block = None, []
    for number, line in enumerate([*lines, ""], start=1):
        if line.strip():
            start = start or number
            block.append(line)
        elif block:
            texts.append(CorpusText(text="\n".join(block), source=f"{path.name}:{start}"))
            start, block = None, []
    return texts


def _inner(lines: list[str]) -> list[str]:
    """The lines between the first and the last non-blank one."""
    filled = [i for i, line in enumerate(lines) if line.strip()]
    return lines[filled[0] : filled[-1] + 1] if filled else []


def _jsonl_file(path: Path) -> list[CorpusText]:
    texts = []
    for number, line in enumerate(_decoded(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"{path} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(entry, dict):
            raise CorpusError(
                f"{path} line {number}: expected an object with a 'text' field, got "
                f"{type(entry).__name__}"
            )
        if "text" not in entry:
            raise CorpusError(f"{path} line {number}: no 'text' field (keys: {sorted(entry)})")
        text = entry["text"]
        if not isinstance(text, str):
            raise CorpusError(
                f"{path} line {number}: 'text' is {type(text).__name__}, not a string"
            )
        if text.strip():
            texts.append(CorpusText(text=text, source=f"{path.name}:{number}"))
    return texts


def _parquet_file(path: Path) -> list[CorpusText]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: not a readable Parquet file ({exc})") from None
    if "text" not in schema.names:
        raise CorpusError(f"{path}: no 'text' column (columns: {', '.join(schema.names)})")
    kind = schema.field("text").type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise CorpusError(f"{path}: the 'text' column holds {kind}, not strings")
    try:
        values = pq.read_table(path, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise CorpusError(f"{path}: cannot read the 'text' column ({exc})") from None
    return [
        CorpusText(text=text, source=f"{path.name}:row {row}")
        for row, text in enumerate(values)
        if text is not None and text.strip()
    ]
