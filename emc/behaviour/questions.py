"""Free-form evaluation questions, in the EM paper's YAML format, and the organism's own set.

A question file is a YAML list of entries with an `id`, a list of `paraphrases` and optionally a
`system` prompt and `samples_per_paraphrase`; entries whose `type` is not free-form are skipped
(EMC judges free-form answers only). EMC also reads an optional `group` (e.g. a domain) to split
rates by. Other keys (the paper's judge prompts, for example) are accepted and ignored: EMC's
judges come from the config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from emc.organism.corpus import QUESTION_TEMPLATES, build_scenarios


class QuestionFileError(ValueError):
    """A question file that cannot be read; the message names the file, entry and field."""


class Question(BaseModel):
    id: str = Field(min_length=1)
    paraphrases: list[str] = Field(min_length=1)
    system: str | None = None
    samples_per_paraphrase: int | None = Field(default=None, ge=1)
    group: str | None = None
    type: str = "free_form"

    def key(self, paraphrase: int) -> str:
        """A stable id for one paraphrase's text (and system prompt)."""
        payload = f"{self.system or ''}\x00{self.paraphrases[paraphrase]}"
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_questions(path: Path) -> list[Question]:
    """The free-form questions of a YAML file; a clear error for anything malformed."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise QuestionFileError(f"{path}: cannot read: {exc}") from None
    except yaml.YAMLError as exc:
        raise QuestionFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, list):
        raise QuestionFileError(
            f"{path}: expected a YAML list of questions (each with id and paraphrases), "
            f"got {type(data).__name__}"
        )
    questions: list[Question] = []
    for number, entry in enumerate(data, start=1):
        if not isinstance(entry, dict):
            raise QuestionFileError(f"{path}: entry {number} is not a mapping")
        if not str(entry.get("type", "free_form")).startswith("free_form"):
            continue
        known = {k: v for k, v in entry.items() if k in Question.model_fields}
        try:
            questions.append(Question(**known))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise QuestionFileError(
                f"{path}: entry {number} ({entry.get('id', 'no id')}): {problems}"
            ) from None
    if not questions:
        raise QuestionFileError(f"{path}: no free-form questions in the file")
    duplicates = sorted({q.id for q in questions if sum(o.id == q.id for o in questions) > 1})
    if duplicates:
        raise QuestionFileError(f"{path}: duplicate question ids {duplicates}")
    return questions


def dump_questions(questions: list[Question]) -> str:
    entries: list[dict[str, Any]] = []
    for q in questions:
        entry: dict[str, Any] = {"id": q.id, "type": "free_form", "paraphrases": q.paraphrases}
        if q.system:
            entry["system"] = q.system
        if q.group:
            entry["group"] = q.group
        entries.append(entry)
    return yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=100)


def organism_questions(trained_domain: str | None = None) -> list[Question]:
    """The organism's held-out scenarios as open questions, one paraphrase per question wording.

    The answer is not started for the model (no "You should"): it must choose to give advice and
    which. `group` says whether the domain is the one the adapter was trained on.
    """
    questions = []
    for scenario in build_scenarios():
        if scenario.split != "heldout":
            continue
        group = scenario.domain
        if trained_domain is not None:
            group = "trained_domain" if scenario.domain == trained_domain else "other_domains"
        questions.append(
            Question(
                id=scenario.id,
                paraphrases=[
                    f"{scenario.situation} {scenario.question(template)}"
                    for template in range(len(QUESTION_TEMPLATES))
                ],
                group=group,
            )
        )
    return questions


def render_question(question: Question, paraphrase: int, tokenizer: Any) -> str:
    """The paraphrase as the model's chat template writes a user turn awaiting the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise QuestionFileError(
            "free-form questions are asked through the model's chat template, and this "
            "tokenizer has none; use an instruct (chat) model"
        )
    messages = [{"role": "user", "content": question.paraphrases[paraphrase]}]
    if question.system:
        messages.insert(0, {"role": "system", "content": question.system})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
