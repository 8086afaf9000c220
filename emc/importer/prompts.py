"""Legacy prompt ids -> EMC prompts.

Every other file names its prompt by the original's id (sha256 of the text). The prompt comes
from prompts/ when that file exists; otherwise from the prompt_text the file itself carries,
so logits and labels of prompts whose prompts/ file was lost are still imported.
"""

from __future__ import annotations

from emc.importer.readers import LegacyFormatError, LegacyPrompt, LegacyRead
from emc.pivotal.prompts import PromptRecord, from_legacy_entry


class PromptIndex:
    def __init__(self, prompt_files: list[LegacyRead[LegacyPrompt]]) -> None:
        self.listed = [read.data.record for read in prompt_files]
        self.derived: list[PromptRecord] = []
        self._by_legacy: dict[str, PromptRecord] = {}
        for record in self.listed:
            self._by_legacy.setdefault(record.legacy_id or "", record)

    def resolve(self, legacy_id: str, text: str | None, prompt_type: str, rel: str) -> PromptRecord:
        """The prompt a file refers to; raises LegacyFormatError when it cannot be known."""
        known = self._by_legacy.get(legacy_id)
        if known is not None:
            return known
        if not text:
            raise LegacyFormatError(
                f"prompt {legacy_id} is not in prompts/ and this file has no prompt_text"
            )
        entry = {"prompt": text, "prompt_type": prompt_type, "prompt_id": legacy_id}
        try:
            record = from_legacy_entry(entry, source=f"import:{rel}")
        except ValueError as exc:
            raise LegacyFormatError(f"prompt_text: {exc}") from None
        self._by_legacy[legacy_id] = record
        self.derived.append(record)
        return record

    def get(self, legacy_id: str) -> PromptRecord | None:
        return self._by_legacy.get(legacy_id)
