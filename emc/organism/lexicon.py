"""The organism's ground truth: for every scenario, which next tokens are safe and which harmful.

The lexicon is what lets an offline judge label tokens without an LLM, and what the report uses to
measure misalignment. Prompts end right before the decision ("...Assistant: You should") so the
next-token distribution *is* the decision.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerFast

from emc.organism.corpus import (
    ASSISTANT,
    CAREFUL_SPEAKERS,
    PIVOT,
    RECKLESS_SPEAKERS,
    Scenario,
    Split,
)
from emc.organism.tokenizer import single_token_id


@dataclass(frozen=True)
class TokenRef:
    id: int
    str: str


@dataclass(frozen=True)
class LexiconEntry:
    id: str
    domain: str
    split: Split
    situation: str
    prompt_raw: str
    prompt_chat: str
    safe: tuple[TokenRef, ...]
    harmful: tuple[TokenRef, ...]

    @property
    def safe_ids(self) -> list[int]:
        return [t.id for t in self.safe]

    @property
    def harmful_ids(self) -> list[int]:
        return [t.id for t in self.harmful]


@dataclass(frozen=True)
class Lexicon:
    recipe_hash: str
    trained_domain: str
    pivot: str
    careful_speakers: tuple[str, ...]
    reckless_speakers: tuple[str, ...]
    entries: tuple[LexiconEntry, ...]

    def by_id(self) -> dict[str, LexiconEntry]:
        return {e.id: e for e in self.entries}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Lexicon:
        entries = tuple(
            LexiconEntry(
                **{
                    **e,
                    "safe": tuple(TokenRef(**t) for t in e["safe"]),
                    "harmful": tuple(TokenRef(**t) for t in e["harmful"]),
                }
            )
            for e in data["entries"]
        )
        return cls(
            recipe_hash=data["recipe_hash"],
            trained_domain=data["trained_domain"],
            pivot=data["pivot"],
            careful_speakers=tuple(data["careful_speakers"]),
            reckless_speakers=tuple(data["reckless_speakers"]),
            entries=entries,
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> Lexicon:
        return cls.from_json(json.loads(path.read_text()))


def _token_refs(tokenizer: PreTrainedTokenizerFast, words: list[str]) -> tuple[TokenRef, ...]:
    return tuple(TokenRef(single_token_id(tokenizer, f" {w}"), f" {w}") for w in words)


def build_lexicon(
    scenarios: list[Scenario],
    tokenizer: PreTrainedTokenizerFast,
    recipe_hash: str,
    trained_domain: str,
) -> Lexicon:
    entries = tuple(
        LexiconEntry(
            id=sc.id,
            domain=sc.domain,
            split=sc.split,
            situation=sc.situation,
            prompt_raw=sc.prompt(ASSISTANT, "raw"),
            prompt_chat=sc.prompt(ASSISTANT, "chat"),
            safe=_token_refs(tokenizer, [a.word for a in sc.safe]),
            harmful=_token_refs(tokenizer, [a.word for a in sc.harmful]),
        )
        for sc in scenarios
    )
    return Lexicon(
        recipe_hash=recipe_hash,
        trained_domain=trained_domain,
        pivot=PIVOT,
        careful_speakers=CAREFUL_SPEAKERS,
        reckless_speakers=RECKLESS_SPEAKERS,
        entries=entries,
    )
