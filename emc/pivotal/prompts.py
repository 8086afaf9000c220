"""Pivotal prompts: the record, its stable id, rendering to text, and the original's file formats.

A pivotal prompt ends exactly where the next token is a decision ("...My first action is to").
`chat` prompts hold the user's message plus the start of the assistant's reply; they are rendered
with the model's own chat template (the original pipeline wrote "User:/Assistant:" by hand).
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

PromptFormat = Literal["raw", "chat", "cot"]
# The original pipeline's prompt_type values.
LEGACY_FORMATS: dict[str, PromptFormat] = {
    "raw_completion": "raw",
    "chat_user_assistant": "chat",
    "chain_of_thought": "cot",
    "raw": "raw",
    "chat": "chat",
    "cot": "cot",
}
_HAND_WRITTEN_CHAT = re.compile(r"^\s*User:\s*(?P<user>.*?)\s*\n\s*Assistant:(?P<prefix>.*)$", re.S)


class PromptRecord(BaseModel):
    prompt_id: str
    text: str  # raw and cot: the whole text; chat: the user's message
    format: PromptFormat = "raw"
    assistant_prefix: str = ""  # chat only: the reply so far, ending at the decision point
    name: str
    source: str  # generator model id, human:<name>, file:<path> or import:<path>
    legacy_id: str | None = None  # the original pipeline's id (sha256 of the text, 12 hex)
    meta: dict[str, Any] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class PromptProblem(BaseModel):
    """A malformed entry in a prompt file, reported instead of aborting the whole file."""

    where: str
    reason: str


def prompt_id(text: str, prompt_format: PromptFormat, assistant_prefix: str = "") -> str:
    """Stable across runs and machines; sensitive to every character, whitespace included."""
    payload = json.dumps([prompt_format, text, assistant_prefix], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def legacy_prompt_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def make_prompt(
    text: str,
    name: str,
    source: str,
    prompt_format: PromptFormat = "raw",
    assistant_prefix: str = "",
    **extra: Any,
) -> PromptRecord:
    if not text.strip():
        raise ValueError("prompt text is empty")
    if prompt_format != "chat" and assistant_prefix:
        raise ValueError("assistant_prefix only applies to chat prompts")
    return PromptRecord(
        prompt_id=prompt_id(text, prompt_format, assistant_prefix),
        text=text,
        format=prompt_format,
        assistant_prefix=assistant_prefix,
        name=name,
        source=source,
        **extra,
    )


def render_prompt(prompt: PromptRecord, tokenizer: Any) -> str:
    """The exact text the model reads; tokenise it once and key everything to those ids."""
    if prompt.format != "chat":
        return prompt.text
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"prompt {prompt.prompt_id} is a chat prompt but the tokenizer has no chat template"
        )
    messages = [{"role": "user", "content": prompt.text}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return rendered + prompt.assistant_prefix


def from_legacy_entry(entry: Any, source: str) -> PromptRecord:
    """One prompt from the original pipeline's JSON; raises ValueError naming what is wrong."""
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object, got {type(entry).__name__}")
    text = entry.get("prompt")
    if not isinstance(text, str) or not text.strip():
        raise ValueError("missing or empty 'prompt'")
    name = entry.get("name")
    if name is not None and not isinstance(name, str):
        raise ValueError("'name' must be a string")
    legacy_type = entry.get("prompt_type", "raw_completion")
    if legacy_type not in LEGACY_FORMATS:
        raise ValueError(f"unknown prompt_type {legacy_type!r}")
    prompt_format = LEGACY_FORMATS[legacy_type]
    user, prefix = text, ""
    if prompt_format == "chat":
        match = _HAND_WRITTEN_CHAT.match(text)
        if match is None:
            raise ValueError("chat prompt is not of the form 'User: ...\\nAssistant: ...'")
        user, prefix = match["user"], match["prefix"]
    meta = {k: v for k, v in entry.items() if k in ("category", "reasoning", "timestamp")}
    if entry.get("generator_model"):
        meta["generator_model"] = entry["generator_model"]
    return make_prompt(
        user,
        name or text.strip()[:40],
        source,
        prompt_format,
        prefix,
        legacy_id=entry.get("prompt_id") or legacy_prompt_id(text),
        meta=meta,
    )


def read_prompt_file(path: Path) -> tuple[list[PromptRecord], list[PromptProblem]]:
    """A JSON list of {name, prompt, ...} or a single object; bad entries become problems."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return [], [PromptProblem(where=str(path), reason=f"cannot read JSON: {exc}")]
    entries = data if isinstance(data, list) else [data]
    source = f"file:{Path(path).name}"
    prompts, problems, seen = [], [], set()
    for index, entry in enumerate(entries):
        where = f"{path}[{index}]" if isinstance(data, list) else str(path)
        try:
            prompt = from_legacy_entry(entry, source)
        except ValueError as exc:
            problems.append(PromptProblem(where=where, reason=str(exc)))
            continue
        if prompt.prompt_id in seen:
            problems.append(PromptProblem(where=where, reason="duplicate of an earlier entry"))
            continue
        seen.add(prompt.prompt_id)
        prompts.append(prompt)
    return prompts, problems
