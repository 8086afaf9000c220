"""What a structured LLM call hands back: the parsed object, a status, and the call record."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, SerializeAsAny

from emc.store.llm_calls import LLMCallRow

LLMStatus = Literal[
    "ok", "json_error", "schema_error", "truncated", "timeout", "http_error", "connection_error"
]

# One request for `complete_json_many`: (messages, schema, purpose).
JSONRequest = tuple[list[dict[str, Any]], type[BaseModel], str]


class LLMResult(BaseModel):
    """`parsed` is set only when status is "ok"; `call` is the row to store in `llm_calls`."""

    # SerializeAsAny: dump the caller's schema fields, not the (empty) BaseModel ones.
    parsed: SerializeAsAny[BaseModel] | None
    status: LLMStatus
    error: str | None
    call: LLMCallRow

    @property
    def ok(self) -> bool:
        return self.status == "ok"
