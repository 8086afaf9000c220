"""What an import did: counts per kind, and every file it skipped or only partly used."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

# Print order; "prompts (from other files)" are prompts known only from a file's prompt_text.
KINDS = (
    "prompts",
    "prompts (from other files)",
    "logits",
    "verdicts",
    "labeled_logits",
    "judge labels",
    "human labels",
    "bad_prompts",
    "manual_labeling_queue",
    "human_disagreements",
    "human_agreements",
    "human_explanations",
)


class KindCount(BaseModel):
    kind: str
    read: int = 0  # files (or, for labels, label rows) read and mapped
    new: int = 0  # records that were not stored before
    skipped: int = 0

    @property
    def present(self) -> int:
        """Already stored, or the same record twice in this import."""
        return self.read - self.new


class FileProblem(BaseModel):
    path: str  # relative to pivotal_tokens/
    reason: str


class ImportReport(BaseModel):
    root: str
    counts: dict[str, KindCount] = Field(
        default_factory=lambda: {kind: KindCount(kind=kind) for kind in KINDS}
    )
    skipped: list[FileProblem] = Field(default_factory=list)  # nothing imported from these
    warnings: list[FileProblem] = Field(default_factory=list)  # imported in part, or ignored

    def skip(self, kind: str, path: str, reason: str) -> None:
        self.counts[kind].skipped += 1
        self.skipped.append(FileProblem(path=path, reason=reason))

    def warn(self, path: str, reason: str) -> None:
        self.warnings.append(FileProblem(path=path, reason=reason))

    def tally(self, kind: str, read: int, new: int) -> None:
        self.counts[kind].read += read
        self.counts[kind].new += new

    def rows(self) -> list[dict[str, Any]]:
        return [
            {
                "kind": c.kind,
                "read": c.read,
                "new": c.new,
                "already present": c.present,
                "skipped": c.skipped,
            }
            for c in self.counts.values()
        ]

    def summary(self) -> dict[str, Any]:
        """For the run's summary column."""
        return {
            "root": self.root,
            "counts": {c.kind: [c.read, c.new, c.skipped] for c in self.counts.values()},
            "skipped": len(self.skipped),
            "warnings": len(self.warnings),
        }
