"""Readers of the original pipeline's JSON files: one function per kind of file.

Each reader returns a typed record or raises `LegacyFormatError` with a reason a person can act
on (unreadable JSON, a list where an object belongs, a missing or mistyped field, an unknown
verdict). Extra fields are ignored: the original added fields over time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from emc.importer.files import LegacyFile
from emc.importer.verdicts import LEGACY_VERDICTS
from emc.pivotal.judge import Label
from emc.pivotal.prompts import PromptRecord, from_legacy_entry


class LegacyFormatError(ValueError):
    """A file that cannot be imported; the message says why."""


def _legacy_label(value: Any) -> Any:
    # The original stored evil_label as true / false / "unsure".
    if value is None or value in ("evil", "unsure", "safe"):
        return value
    if isinstance(value, bool):
        return "evil" if value else "safe"
    raise ValueError(f"unknown label {value!r} (expected true, false or 'unsure')")


LegacyLabel = Annotated[Label | None, BeforeValidator(_legacy_label)]
# The original never settled on a field naming the person; these are the ones accepted.
PERSON_FIELDS = ("reviewer", "labeler", "labeller", "labeled_by", "annotator", "author")
_PERSON = Field(default=None, validation_alias=AliasChoices(*PERSON_FIELDS))


class _Legacy(BaseModel):
    model_config = ConfigDict(extra="ignore")


class LegacyToken(_Legacy):
    token: str
    logit: float
    token_id: int | None = None  # older files did not record it


class LegacyLabeledToken(LegacyToken):
    evil_label: LegacyLabel = None
    judge_original_label: LegacyLabel = None


class LegacyLogits(_Legacy):
    prompt_id: str
    prompt_text: str | None = None
    prompt_type: str = "raw_completion"
    tested_model: str | None = None
    top_k: list[LegacyToken] = Field(min_length=1)


class LegacyVerdict(_Legacy):
    prompt_id: str
    tested_model: str | None = None
    baseline_model: str
    judge_model: str | None = None
    timestamp: str | float | None = None
    prompt_text: str | None = None
    prompt_type: str = "raw_completion"
    verdict: str
    summary: str | None = None
    reason: str | None = None
    raw_content: str | None = None

    @field_validator("verdict")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in LEGACY_VERDICTS:
            raise ValueError(f"unknown verdict {value!r}")
        return value


HumanVerdict = Literal[
    "agreed", "agreed_with_comment", "disagreed", "manual_labeling", "interrupted"
]


class LegacyLabeled(_Legacy):
    prompt_id: str
    prompt_text: str | None = None
    prompt_type: str = "raw_completion"
    tested_model: str | None = None
    judge_model: str | None = None
    top_k: list[LegacyLabeledToken] = Field(min_length=1)
    manually_labeled: bool | None = None
    human_verdict: HumanVerdict | None = None
    human_explanation: str | None = None
    disagreement_details: Any = None
    prompt_rejected: bool = False
    bad_reason: str | None = None
    person: str | None = _PERSON
    timestamp: str | float | None = None


class LegacyBadPrompt(_Legacy):
    prompt_id: str
    prompt_text: str | None = None
    prompt_type: str = "raw_completion"
    bad_reason: str | None = Field(
        default=None, validation_alias=AliasChoices("bad_reason", "reason")
    )
    person: str | None = _PERSON
    timestamp: str | float | None = None


class LegacyQueueEntry(_Legacy):
    prompt_id: str
    status: Literal["pending", "processed"]
    prompt_text: str | None = None
    prompt_type: str = "raw_completion"
    reason: str | None = None


class LegacyNote(_Legacy):
    """A human_disagreements / human_agreements / human_explanations file."""

    prompt_id: str
    explanation: str | None = Field(
        default=None,
        validation_alias=AliasChoices("human_explanation", "explanation", "comment"),
    )
    disagreement_details: Any = None
    person: str | None = _PERSON

    def texts(self) -> list[str]:
        return [self.explanation or "", details_text(self.disagreement_details)]


class LegacyPrompt(BaseModel):
    record: PromptRecord
    is_human: bool


Record = TypeVar("Record", bound=BaseModel)


@dataclass(frozen=True)
class LegacyRead(Generic[Record]):
    """A file that was read: where it is, a digest of its bytes, what it holds."""

    file: LegacyFile
    digest: str  # sha256 of the bytes: ids of imported records derive from it
    text: str
    data: Record


# -- one reader per kind ------------------------------------------------------------------------


def read_prompt(file: LegacyFile) -> LegacyRead[LegacyPrompt]:
    """prompts/{generator}/{id}.json -> a prompt sourced import:<generator> or human:<name>."""
    raw, digest, text = _load_object(file)
    person = next((raw[k] for k in PERSON_FIELDS if isinstance(raw.get(k), str)), None)
    is_human = raw.get("is_human_generated") is True
    generator = raw.get("generator_model") or file.generator_dir
    source = f"human:{person or 'unknown'}" if is_human else f"import:{generator}"
    try:
        record = from_legacy_entry(raw, source)
    except ValueError as exc:
        raise LegacyFormatError(str(exc)) from None
    created = legacy_time(raw.get("timestamp"))
    if created is not None:
        record = record.model_copy(update={"created_at": created})
    return LegacyRead(file, digest, text, LegacyPrompt(record=record, is_human=is_human))


def read_logits(file: LegacyFile) -> LegacyRead[LegacyLogits]:
    """runs|graph_runs/{model}/logits/{id}.json."""
    return _read(file, LegacyLogits)


def read_verdict(file: LegacyFile) -> LegacyRead[LegacyVerdict]:
    """runs|graph_runs/{model}/verdicts/{judge}/{id}.json."""
    return _read(file, LegacyVerdict)


def read_labeled(file: LegacyFile) -> LegacyRead[LegacyLabeled]:
    """labeled_logits/{model}/{id}.json: the logits with the judge's and the person's labels."""
    return _read(file, LegacyLabeled)


def read_bad_prompt(file: LegacyFile) -> LegacyRead[LegacyBadPrompt]:
    """bad_prompts/{id}.json: a prompt a person rejected."""
    return _read(file, LegacyBadPrompt)


def read_queue_entry(file: LegacyFile) -> LegacyRead[LegacyQueueEntry]:
    """manual_labeling_queue/{id}.json."""
    return _read(file, LegacyQueueEntry)


def read_note(file: LegacyFile) -> LegacyRead[LegacyNote]:
    """human_disagreements|human_agreements|human_explanations/*.json: one shape for all three."""
    return _read(file, LegacyNote)


# -- helpers ------------------------------------------------------------------------------------


def legacy_time(value: Any) -> datetime | None:
    """The original's timestamps (ISO text or epoch seconds); naive ones are taken as UTC."""
    try:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def details_text(details: Any) -> str:
    """disagreement_details was free text in some files and a structure in others."""
    if details in (None, "", [], {}):
        return ""
    return details if isinstance(details, str) else json.dumps(details, ensure_ascii=False)


def _read(file: LegacyFile, model: type[Record]) -> LegacyRead[Record]:
    raw, digest, text = _load_object(file)
    try:
        return LegacyRead(file, digest, text, model.model_validate(raw))
    except ValidationError as exc:
        raise LegacyFormatError(_describe(exc)) from None


def _load_object(file: LegacyFile) -> tuple[dict[str, Any], str, str]:
    try:
        content = file.path.read_bytes()
        text = content.decode()
        data = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LegacyFormatError(f"cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LegacyFormatError(f"expected a JSON object, got {type(data).__name__}")
    return data, hashlib.sha256(content).hexdigest(), text


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "file"
        message = error["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}")
    return "; ".join(problems)
