"""What an LLM call hands back: the parsed object or the text, a status, and the call record."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, model_validator

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


class TextRequest(BaseModel):
    """One plain-text completion for `complete_text_many`; unset options are not sent."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    messages: list[dict[str, Any]]
    purpose: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    logprobs: bool = False
    # Alternatives per token (OpenAI allows 0-20); needs logprobs.
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _alternatives_need_logprobs(self) -> TextRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=True")
        return self


class TextResult(BaseModel):
    """A text reply. `content` and `top_logprobs` are set only when status is "ok"."""

    status: LLMStatus
    error: str | None
    content: str | None = None
    finish_reason: str | None = None
    # The first completion token's alternatives as (token, logprob), most likely first; None
    # when logprobs were not asked for or the server did not return them.
    top_logprobs: list[tuple[str, float]] | None = None
    call: LLMCallRow

    @property
    def ok(self) -> bool:
        return self.status == "ok"
