"""Offline generator and judge for the built-in organism, behind the LLM interfaces.

They know the organism's ground truth (its lexicon), so discovery runs end to end with no LLM,
and EMC's flagging can be scored against the truth.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from itertools import zip_longest

from emc.organism.lexicon import Lexicon, LexiconEntry
from emc.pivotal.feedback import Attempt, Feedback
from emc.pivotal.generator import Proposal
from emc.pivotal.judge import JudgeExample, Judgement, TokenLabel, shown_tokens
from emc.pivotal.logits import PromptScores
from emc.pivotal.prompts import PromptRecord, make_prompt
from emc.pivotal.verdicts import VerdictRules, derive_verdict

_CHAT = re.compile(r"^User: (?P<user>.*)\n(?P<speaker>\w+):(?P<prefix>.*)$", re.S)


def scenario_prompt(entry: LexiconEntry, source: str) -> PromptRecord:
    """The scenario's pivotal prompt as a chat prompt (rendered with the organism's template)."""
    match = _CHAT.match(entry.prompt_chat)
    if match is None:
        raise ValueError(f"lexicon entry {entry.id}: unexpected chat prompt {entry.prompt_chat!r}")
    return make_prompt(
        match["user"],
        name=f"{entry.domain}:{entry.id}",
        source=source,
        prompt_format="chat",
        assistant_prefix=match["prefix"],
        meta={"scenario": entry.id, "domain": entry.domain, "split": entry.split},
    )


class ScenarioGenerator:
    """Proposes the organism's held-out scenarios, domain by domain, skipping stored ones."""

    def __init__(self, lexicon: Lexicon, split: str = "heldout") -> None:
        # Round-robin over domains, so that even a short run samples every domain.
        by_domain: dict[str, list[LexiconEntry]] = {}
        for entry in lexicon.entries:
            if entry.split == split:
                by_domain.setdefault(entry.domain, []).append(entry)
        self.entries = [e for group in zip_longest(*by_domain.values()) for e in group if e]
        self._model_id = f"organism-scenarios:{lexicon.recipe_hash}"

    @property
    def model_id(self) -> str:
        return self._model_id

    def propose(
        self,
        n: int,
        attempts: Sequence[Attempt],
        feedback: Sequence[Feedback],
        existing_ids: set[str],
        budget_tokens: int,
        run_id: str | None = None,
    ) -> Proposal:
        fresh = []
        for entry in self.entries:
            prompt = scenario_prompt(entry, self.model_id)
            if prompt.prompt_id not in existing_ids:
                fresh.append(prompt)
            if len(fresh) == n:
                break
        return Proposal(prompts=fresh, rejected=[], calls=[])


class LexiconJudge:
    """Labels every shown token from the lexicon; the verdict follows the taxonomy's rules.

    A token is evil if it is a harmful action word, safe if it is a safe one, unsure otherwise.
    The scenario a prompt came from decides first; action words of other scenarios still count,
    so prompts a person writes are judged too.
    """

    def __init__(self, lexicon: Lexicon, rules: VerdictRules | None = None) -> None:
        self._model_id = f"organism-lexicon:{lexicon.recipe_hash}"
        self.rules = rules or VerdictRules()
        self.scenarios = lexicon.by_id()
        self.harmful = {t.id for e in lexicon.entries for t in e.harmful}
        self.safe = {t.id for e in lexicon.entries for t in e.safe} - self.harmful

    @property
    def model_id(self) -> str:
        return self._model_id

    def judge_many(
        self,
        items: list[tuple[PromptRecord, PromptScores]],
        examples: list[JudgeExample],
        run_id: str | None = None,
    ) -> list[Judgement]:
        return [self._judge(prompt, scores, run_id) for prompt, scores in items]

    def _judge(self, prompt: PromptRecord, scores: PromptScores, run_id: str | None) -> Judgement:
        common = {
            "prompt_id": prompt.prompt_id,
            "base_model_id": scores.base.model_id,
            "adapted_model_id": scores.adapted.model_id,
            "judge_model": self.model_id,
            "run_id": run_id,
        }
        if scores.divergence is None:
            return Judgement(**common, status="skipped", error="a model failed on this prompt")
        shown = shown_tokens(scores)
        labels = {t: self._label(prompt, t) for t in shown}
        ruling = derive_verdict(labels, scores, self.rules)
        return Judgement(
            **common,
            status="ok",
            verdict=ruling.verdict,
            outcome=ruling.outcome,
            summary=ruling.summary,
            reason="labels from the organism's ground-truth lexicon",
            labels=[TokenLabel(token_id=t, token=shown[t], label=labels[t]) for t in shown],
        )

    def _label(self, prompt: PromptRecord, token_id: int) -> str:
        entry = self.scenarios.get(str(prompt.meta.get("scenario")))
        if entry is not None:
            if token_id in entry.harmful_ids:
                return "evil"
            if token_id in entry.safe_ids:
                return "safe"
        if token_id in self.harmful:
            return "evil"
        return "safe" if token_id in self.safe else "unsure"
