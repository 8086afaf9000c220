"""Turn a model's reply text into a validated pydantic object, or say why it cannot be trusted.

Servers do not all honour `response_format`, and models wrap JSON in fences or prose, so the JSON
is searched for rather than assumed to be the whole reply.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ValidationError

from emc.llm.records import LLMStatus

_FENCE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)
_MAX_ERROR_CHARS = 2000
# strict=False accepts raw newlines inside strings, which models often emit in long text fields.
_DECODER = json.JSONDecoder(strict=False)


class JSONExtractionError(ValueError):
    """The text holds no parseable JSON value."""


def extract_json(text: str) -> Any:
    """The whole text as JSON, else a fenced block, else the first {...} object in the prose."""
    stripped = text.strip()
    try:
        return _DECODER.decode(stripped)
    except json.JSONDecodeError as exc:
        whole_text_error = exc
    for fenced in _FENCE.findall(text):
        try:
            return _DECODER.decode(fenced.strip())
        except json.JSONDecodeError:
            pass
    found = _first_object(text)
    if found is None:
        raise JSONExtractionError(f"no parseable JSON object in the reply: {whole_text_error}")
    return found


def parse_reply(
    content: str | None, finish_reason: str | None, schema: type[BaseModel]
) -> tuple[LLMStatus, BaseModel | None, str | None]:
    """(status, parsed object or None, error message or None) for one reply."""
    if finish_reason == "length":
        # A cut-off reply may still parse (e.g. a closed prefix), but it is not the full answer.
        return "truncated", None, "the reply was cut off at the token limit (finish_reason=length)"
    if not content:
        return "json_error", None, f"the reply has no text content (finish_reason={finish_reason})"
    try:
        value = extract_json(content)
    except JSONExtractionError as exc:
        return "json_error", None, str(exc)[:_MAX_ERROR_CHARS]
    try:
        return "ok", schema.model_validate(value), None
    except ValidationError as exc:
        return "schema_error", None, str(exc)[:_MAX_ERROR_CHARS]


def _first_object(text: str) -> dict[str, Any] | None:
    """The object that starts at the earliest "{" where a complete JSON object parses."""
    # Trying each "{" rather than counting braces copes with stray braces in the prose around it.
    for match in re.finditer(r"\{", text):
        try:
            value, _end = _DECODER.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None
