"""Which failed attempts are worth repeating, and how long to wait before the next one.

Errors are classified once, here, so the client's loop only asks "retry?" and "how long?".
"""

from __future__ import annotations

import email.utils
import random
import time
from dataclasses import dataclass

import openai
from pydantic import BaseModel, ConfigDict, Field

from emc.llm.records import LLMStatus

# The openai exceptions that mean "this attempt failed"; anything else is a bug and propagates.
API_ERRORS = (openai.APIStatusError, openai.APIConnectionError)
_MAX_MESSAGE_CHARS = 500


class RetryPolicy(BaseModel):
    """Exponential backoff with jitter; `max_delay_s` also caps a server's Retry-After."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_delay_s: float = Field(default=1.0, ge=0)
    max_delay_s: float = Field(default=30.0, ge=0)

    def delay_s(self, retry_index: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number `retry_index` (0 for the first retry)."""
        # Jitter spreads out clients that failed together, so they do not retry together.
        if retry_after_s is not None:
            wait = retry_after_s + random.uniform(0, self.base_delay_s)
        else:
            wait = self.base_delay_s * 2**retry_index * random.uniform(0.5, 1.0)
        return min(wait, self.max_delay_s)


@dataclass(frozen=True)
class Failure:
    """One failed attempt, classified."""

    status: LLMStatus
    retryable: bool
    message: str
    raw_body: str | None = None
    retry_after_s: float | None = None


def classify_error(exc: openai.APIStatusError | openai.APIConnectionError) -> Failure:
    if isinstance(exc, openai.APITimeoutError):
        return Failure("timeout", True, "the request timed out")
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__
        detail = f": {type(cause).__name__}: {cause}" if cause else ""
        return Failure("connection_error", True, f"connection error{detail}"[:_MAX_MESSAGE_CHARS])
    status = exc.status_code
    return Failure(
        "http_error",
        # Other 4xx mean the request itself is wrong; sending it again cannot help.
        retryable=status == 429 or status >= 500,
        message=f"HTTP {status}: {_body_message(exc)}"[:_MAX_MESSAGE_CHARS],
        raw_body=exc.response.text,
        retry_after_s=_retry_after_s(exc.response.headers),
    )


def _body_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        body = body["error"]
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return exc.message


def _retry_after_s(headers: object) -> float | None:
    """Seconds from `retry-after-ms` or `retry-after` (seconds or an HTTP date), if present."""
    get = getattr(headers, "get", None)
    if get is None:
        return None
    if (millis := _as_float(get("retry-after-ms"))) is not None:
        return max(millis / 1000, 0.0)
    value = get("retry-after")
    if value is None:
        return None
    if (seconds := _as_float(value)) is not None:
        return max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _as_float(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
