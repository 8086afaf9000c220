"""An OpenAI-compatible chat client that asks for JSON or text and records every call.

Retries are done here rather than by the openai package (its `max_retries` is 0) so that every
attempt is counted in the call record and the backoff is ours to configure.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel

from emc.config import LLMConfig
from emc.llm.parse import parse_reply
from emc.llm.records import JSONRequest, LLMResult, LLMStatus, TextRequest, TextResult
from emc.llm.retry import API_ERRORS, Failure, RetryPolicy, classify_error
from emc.store.llm_calls import LLMCallRow

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
# Local servers (vLLM, llama.cpp, the fake server) ignore the key, but the openai client wants one.
PLACEHOLDER_API_KEY = "emc-no-key"
_LOCAL_HOSTS = {"localhost", "127.0.0.1", "::1"}
# Shorter keys would turn redaction into mangling of ordinary text.
_MIN_REDACTED_KEY_CHARS = 6


class LLMConfigError(ValueError):
    """The client cannot be built from this config; the message names what to fix."""


@dataclass(frozen=True)
class _Outcome:
    """What the attempt loop ended with: a completion or the last failure, after n attempts."""

    reply: ChatCompletion | Failure
    attempts: int


class LLMClient:
    """One endpoint and model from an `LLMConfig`; safe to share between threads."""

    def __init__(self, config: LLMConfig, retry: RetryPolicy | None = None) -> None:
        if config.backend != "openai":
            raise LLMConfigError(
                f"LLMClient needs backend 'openai', got {config.backend!r}; the offline "
                "backend is served by the built-in organism, not over HTTP"
            )
        self.config = config
        self.retry = retry or RetryPolicy()
        self.base_url = base_url_of(config)
        self._api_key = resolve_api_key(config)
        self._sync_client = self._new_client(openai.OpenAI)

    def __repr__(self) -> str:
        return f"LLMClient(model={self.config.model!r}, base_url={self.base_url!r})"

    def close(self) -> None:
        self._sync_client.close()

    def __enter__(self) -> LLMClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public API -----------------------------------------------------------------------------

    def complete_json(
        self,
        messages: list[dict[str, Any]],
        schema: type[BaseModel],
        purpose: str,
        run_id: str | None = None,
    ) -> LLMResult:
        """Ask for one JSON object matching `schema`; failures come back as a status."""
        request = build_request(messages, schema)
        client = self._sync_client
        started = time.perf_counter()
        outcome = _attempt_sync(
            lambda: client.chat.completions.create(model=self.config.model, **request),
            self._retry_delay(purpose),
        )
        return self._result(request, schema, purpose, run_id, outcome, started)

    def complete_json_many(
        self, requests: Sequence[JSONRequest], run_id: str | None = None
    ) -> list[LLMResult]:
        """`complete_json` for each request, `config.concurrency` at a time, in input order."""
        if not requests:
            return []
        return run_blocking(self.acomplete_json_many(list(requests), run_id))

    async def acomplete_json_many(
        self, requests: Sequence[JSONRequest], run_id: str | None = None
    ) -> list[LLMResult]:
        """The async form of `complete_json_many`, for callers that already run an event loop."""
        return await self._bounded(
            requests, lambda client, request: self._acomplete_json(client, *request, run_id=run_id)
        )

    def complete_text(self, request: TextRequest, run_id: str | None = None) -> TextResult:
        """One plain-text reply, with the first token's top logprobs where asked for and given."""
        body = build_text_request(request)
        client = self._sync_client
        started = time.perf_counter()
        outcome = _attempt_sync(
            lambda: client.chat.completions.create(model=self.config.model, **body),
            self._retry_delay(request.purpose),
        )
        return self._text_result(body, request.purpose, run_id, outcome, started)

    def complete_text_many(
        self, requests: Sequence[TextRequest], run_id: str | None = None
    ) -> list[TextResult]:
        """`complete_text` for each request, `config.concurrency` at a time, in input order."""
        if not requests:
            return []
        return run_blocking(self.acomplete_text_many(list(requests), run_id))

    async def acomplete_text_many(
        self, requests: Sequence[TextRequest], run_id: str | None = None
    ) -> list[TextResult]:
        """The async form of `complete_text_many`."""
        return await self._bounded(
            requests, lambda client, request: self._acomplete_text(client, request, run_id)
        )

    # -- internals ------------------------------------------------------------------------------

    async def _bounded(
        self,
        requests: Sequence[R],
        call: Callable[[openai.AsyncOpenAI, R], Awaitable[T]],
    ) -> list[T]:
        """`call` for every request on one async client, `config.concurrency` at a time."""
        limit = asyncio.Semaphore(self.config.concurrency)
        client = self._new_client(openai.AsyncOpenAI)
        try:

            async def one(request: R) -> T:
                async with limit:
                    return await call(client, request)

            return list(await asyncio.gather(*(one(request) for request in requests)))
        finally:
            await client.close()

    async def _acomplete_text(
        self, client: openai.AsyncOpenAI, request: TextRequest, run_id: str | None
    ) -> TextResult:
        body = build_text_request(request)
        started = time.perf_counter()
        outcome = await _attempt_async(
            lambda: client.chat.completions.create(model=self.config.model, **body),
            self._retry_delay(request.purpose),
        )
        return self._text_result(body, request.purpose, run_id, outcome, started)

    async def _acomplete_json(
        self,
        client: openai.AsyncOpenAI,
        messages: list[dict[str, Any]],
        schema: type[BaseModel],
        purpose: str,
        run_id: str | None,
    ) -> LLMResult:
        request = build_request(messages, schema)
        started = time.perf_counter()
        outcome = await _attempt_async(
            lambda: client.chat.completions.create(model=self.config.model, **request),
            self._retry_delay(purpose),
        )
        return self._result(request, schema, purpose, run_id, outcome, started)

    def _new_client(self, factory: Callable[..., T]) -> T:
        return factory(
            api_key=self._api_key,
            base_url=self.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    def _retry_delay(self, purpose: str) -> Callable[[Failure, int], float | None]:
        """Seconds to wait before retrying after `failure` on attempt n, or None to give up."""

        def delay(failure: Failure, attempt: int) -> float | None:
            message = self._redact(failure.message)
            if not failure.retryable or attempt > self.config.max_retries:
                log.warning("LLM %s call failed after %d attempt(s): %s", purpose, attempt, message)
                return None
            wait = self.retry.delay_s(attempt - 1, failure.retry_after_s)
            log.info(
                "LLM %s call attempt %d failed (%s); retrying in %.2fs",
                purpose,
                attempt,
                message,
                wait,
            )
            return wait

        return delay

    def _result(
        self,
        request: dict[str, Any],
        schema: type[BaseModel],
        purpose: str,
        run_id: str | None,
        outcome: _Outcome,
        started: float,
    ) -> LLMResult:
        status, parsed, error, raw = self._interpret(outcome.reply, schema, purpose)
        call = self._call_row(request, purpose, run_id, outcome, started, status, error, raw)
        return LLMResult(parsed=parsed, status=status, error=call.error, call=call)

    def _text_result(
        self,
        request: dict[str, Any],
        purpose: str,
        run_id: str | None,
        outcome: _Outcome,
        started: float,
    ) -> TextResult:
        reply = outcome.reply
        if isinstance(reply, Failure):
            status, error, raw, choice = reply.status, reply.message, reply.raw_body, None
        else:
            choice = reply.choices[0] if reply.choices else None
            status, error, raw = "ok", None, choice.message.content if choice else None
        call = self._call_row(request, purpose, run_id, outcome, started, status, error, raw)
        if isinstance(reply, Failure):
            return TextResult(status=status, error=call.error, call=call)
        # A reply cut off at max_tokens is still "ok": short text requests expect that.
        return TextResult(
            status="ok",
            error=None,
            content=call.response_raw,
            finish_reason=choice.finish_reason if choice else None,
            top_logprobs=first_token_alternatives(reply),
            call=call,
        )

    def _call_row(
        self,
        request: dict[str, Any],
        purpose: str,
        run_id: str | None,
        outcome: _Outcome,
        started: float,
        status: LLMStatus,
        error: str | None,
        raw: str | None,
    ) -> LLMCallRow:
        usage = None if isinstance(outcome.reply, Failure) else outcome.reply.usage
        return LLMCallRow(
            call_id=uuid.uuid4().hex,
            run_id=run_id,
            purpose=purpose,
            model=self.config.model,
            base_url=self.base_url,
            request=request,
            response_raw=self._redact(raw),
            status=status,
            error=self._redact(error),
            latency_s=time.perf_counter() - started,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            attempts=outcome.attempts,
        )

    def _interpret(
        self, reply: ChatCompletion | Failure, schema: type[BaseModel], purpose: str
    ) -> tuple[LLMStatus, BaseModel | None, str | None, str | None]:
        """(status, parsed, error, raw response) for the reply the attempt loop ended with."""
        if isinstance(reply, Failure):
            return reply.status, None, reply.message, reply.raw_body
        choice = reply.choices[0] if reply.choices else None
        content = choice.message.content if choice else None
        status, parsed, error = parse_reply(content, choice and choice.finish_reason, schema)
        if error is not None:
            log.warning("LLM %s call returned %s: %s", purpose, status, self._redact(error))
        return status, parsed, error, content

    def _redact(self, text: str | None) -> str | None:
        """Remove the key from text a server sent back (an error body may echo the request)."""
        if text is None or len(self._api_key) < _MIN_REDACTED_KEY_CHARS:
            return text
        return text.replace(self._api_key, "[redacted]")


def build_request(messages: list[dict[str, Any]], schema: type[BaseModel]) -> dict[str, Any]:
    """The request body (less the model); also what the call record stores."""
    name = re.sub(r"[^A-Za-z0-9_-]", "_", schema.__name__)[:64]
    return {
        # A copy, so a caller that later edits its message list does not rewrite the record.
        "messages": copy.deepcopy(messages),
        "response_format": {
            "type": "json_schema",
            # strict=False: strict mode rejects common pydantic schemas (defaults, open objects).
            "json_schema": {"name": name, "schema": schema.model_json_schema(), "strict": False},
        },
    }


def build_text_request(request: TextRequest) -> dict[str, Any]:
    """The body of a plain-text request (less the model), only the options that were set."""
    body: dict[str, Any] = {"messages": copy.deepcopy(request.messages)}
    if request.max_tokens is not None:
        body["max_tokens"] = request.max_tokens
    if request.temperature is not None:
        body["temperature"] = request.temperature
    if request.logprobs:
        body["logprobs"] = True
    if request.top_logprobs is not None:
        body["top_logprobs"] = request.top_logprobs
    return body


def first_token_alternatives(reply: ChatCompletion) -> list[tuple[str, float]] | None:
    """The first completion token's top alternatives as (token, logprob); None if not returned.

    The chosen token is added when a server left it out of its own alternatives (it is one).
    """
    logprobs = reply.choices[0].logprobs if reply.choices else None
    if logprobs is None or not logprobs.content:
        return None
    first = logprobs.content[0]
    alternatives = [(top.token, top.logprob) for top in first.top_logprobs or []]
    if first.token not in {token for token, _ in alternatives}:
        alternatives.append((first.token, first.logprob))
    return sorted(alternatives, key=lambda pair: pair[1], reverse=True)


def base_url_of(config: LLMConfig) -> str:
    """The config's base_url, else OPENAI_BASE_URL (the openai client's own convention: a study
    config can name `o3` and run against a local server), else OpenAI's."""
    return config.base_url or os.environ.get("OPENAI_BASE_URL", "").strip() or DEFAULT_BASE_URL


def resolve_api_key(config: LLMConfig) -> str:
    """The key from `config.api_key_env`; a placeholder for a local server with none set."""
    key = os.environ.get(config.api_key_env, "").strip()
    if key:
        return key
    base_url = base_url_of(config)
    if urlparse(base_url).hostname in _LOCAL_HOSTS:
        return PLACEHOLDER_API_KEY
    raise LLMConfigError(
        f"no API key: set the environment variable {config.api_key_env} "
        f"(named by api_key_env) for {base_url}"
    )


def run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from synchronous code, even inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # asyncio.run refuses to nest (e.g. inside a Prefect flow), so use a loop in a worker thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="emc-llm") as pool:
        return pool.submit(asyncio.run, coro).result()


def _attempt_sync(
    send: Callable[[], ChatCompletion], delay: Callable[[Failure, int], float | None]
) -> _Outcome:
    attempt = 0
    while True:
        attempt += 1
        try:
            return _Outcome(send(), attempt)
        except API_ERRORS as exc:
            failure = classify_error(exc)
        wait = delay(failure, attempt)
        if wait is None:
            return _Outcome(failure, attempt)
        time.sleep(wait)


async def _attempt_async(
    send: Callable[[], Awaitable[ChatCompletion]], delay: Callable[[Failure, int], float | None]
) -> _Outcome:
    attempt = 0
    while True:
        attempt += 1
        try:
            return _Outcome(await send(), attempt)
        except API_ERRORS as exc:
            failure = classify_error(exc)
        wait = delay(failure, attempt)
        if wait is None:
            return _Outcome(failure, attempt)
        await asyncio.sleep(wait)
