"""Verdict files -> judgements, and which judgement a labelled file or queue item belongs to."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

from emc.importer.files import legacy_model_id, sanitise_model_name
from emc.importer.readers import LegacyRead, LegacyVerdict, legacy_time
from emc.importer.verdicts import LEGACY_VERDICTS
from emc.pivotal.judge import Judgement


def stable_id(*parts: str) -> str:
    """An id from a file's place and bytes: the same file imports to the same id every time."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class ImportedJudgement:
    """A judgement with what it needs beyond the record: its time and the legacy names."""

    judgement: Judgement
    created_at: datetime | None
    adapted_dir: str  # the sanitised tested model, to match labeled_logits/{model}


def to_judgement(read: LegacyRead[LegacyVerdict], prompt_id: str) -> ImportedJudgement:
    verdict, file = read.data, read.file
    mapped = LEGACY_VERDICTS[verdict.verdict]
    tested = verdict.tested_model or file.model_dir or ""
    judgement = Judgement(
        judgement_id=stable_id("verdict", file.rel, read.digest),
        prompt_id=prompt_id,
        base_model_id=legacy_model_id(verdict.baseline_model, file.graph),
        adapted_model_id=legacy_model_id(tested, file.graph),
        judge_model=verdict.judge_model or file.judge_dir or "unknown",
        status=mapped.status,
        verdict=mapped.verdict,
        outcome=mapped.outcome,
        summary=verdict.summary,
        reason=verdict.reason,
        # The reply itself where the original kept it (json errors); otherwise the verdict file,
        # which is the parsed reply: it keeps the original verdict name and the evil/unsure
        # token strings, which have no token ids to become labels by.
        raw_response=verdict.raw_content or read.text,
        error="the judge's reply was not valid JSON" if mapped.status == "json_error" else None,
    )
    return ImportedJudgement(judgement, legacy_time(verdict.timestamp), sanitise_model_name(tested))


def latest_judgement(
    judgements: list[ImportedJudgement],
    prompt_id: str,
    adapted_dir: str | None = None,
    judge_model: str | None = None,
) -> ImportedJudgement | None:
    """The newest imported judgement of a prompt, optionally for one tested model and judge."""
    matching = [
        j
        for j in judgements
        if j.judgement.prompt_id == prompt_id
        and (adapted_dir is None or j.adapted_dir == sanitise_model_name(adapted_dir))
        and (judge_model is None or j.judgement.judge_model == judge_model)
    ]
    if not matching:
        return None
    oldest = datetime.min.replace(tzinfo=UTC)
    return max(matching, key=lambda j: (j.created_at or oldest, j.judgement.judgement_id))
