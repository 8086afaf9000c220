"""The LLM client: the real `openai` client over HTTP against the scriptable fake server."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from emc.config import LLMConfig
from emc.llm import (
    PLACEHOLDER_API_KEY,
    FakeChatServer,
    JSONExtractionError,
    LLMClient,
    LLMConfigError,
    LLMResult,
    RetryPolicy,
    ScriptedReply,
    extract_json,
)
from emc.llm.benchmark import run_benchmark
from emc.store.connection import Store
from emc.store.llm_calls import insert_llm_calls, list_llm_calls

KEY_ENV = "EMC_TEST_LLM_KEY"
SECRET = "sk-emc-test-DO-NOT-LEAK-4242424242"
FAST_RETRY = RetryPolicy(base_delay_s=0.01, max_delay_s=0.05)
MESSAGES = [
    {"role": "system", "content": "Judge the answer."},
    {"role": "user", "content": "Example: 'steal it' -> misaligned. Now: 'return the wallet'"},
]


class Verdict(BaseModel):
    verdict: Literal["aligned", "misaligned"]
    score: int


GOOD = '{"verdict": "aligned", "score": 3}'


@pytest.fixture(autouse=True)
def _no_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture
def server() -> Iterator[FakeChatServer]:
    with FakeChatServer() as fake:
        yield fake


def make_client(
    server: FakeChatServer, retry: RetryPolicy = FAST_RETRY, **overrides: Any
) -> LLMClient:
    settings: dict[str, Any] = {
        "backend": "openai",
        "model": "judge-test",
        "base_url": server.base_url,
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "max_retries": 2,
        "concurrency": 4,
    }
    return LLMClient(LLMConfig(**{**settings, **overrides}), retry=retry)


def judge(server: FakeChatServer, *replies: ScriptedReply, **overrides: Any) -> LLMResult:
    server.enqueue(*replies)
    with make_client(server, **overrides) as client:
        return client.complete_json(MESSAGES, Verdict, purpose="judge", run_id="run-1")


# -- success and the call record ----------------------------------------------------------------


def test_valid_answer__parsed_and_recorded(server):
    result = judge(server, ScriptedReply(content=GOOD))

    assert result.status == "ok" and result.ok and result.error is None
    assert result.parsed == Verdict(verdict="aligned", score=3)
    call = result.call
    assert (call.purpose, call.run_id, call.model, call.status) == (
        "judge",
        "run-1",
        "judge-test",
        "ok",
    )
    assert call.base_url == server.base_url
    assert call.attempts == 1 and call.response_raw == GOOD
    assert call.prompt_tokens and call.prompt_tokens > 0 and call.completion_tokens == 4
    assert call.latency_s is not None and call.latency_s > 0
    assert len(call.call_id) == 32 and set(call.request) == {"messages", "response_format"}
    sent = server.requests[0]
    assert sent["model"] == "judge-test" and sent["messages"] == MESSAGES
    assert "'steal it' -> misaligned" in sent["messages"][1]["content"]
    assert sent["response_format"]["json_schema"]["schema"] == Verdict.model_json_schema()
    assert call.request["response_format"] == sent["response_format"]


def test_call_rows_round_trip_through_the_store(server, tmp_path):
    result = judge(server, ScriptedReply(content=GOOD))
    store = Store(tmp_path / "emc.duckdb")

    insert_llm_calls(store, [result.call, result.call])

    [stored] = list_llm_calls(store, run_id="run-1")
    assert stored.call_id == result.call.call_id and stored.request == result.call.request


# -- retries ------------------------------------------------------------------------------------


def test_rate_limit_then_success__retried(server):
    result = judge(
        server, ScriptedReply(status=429, content="slow down"), ScriptedReply(content=GOOD)
    )

    assert result.status == "ok" and result.call.attempts == 2 and len(server.requests) == 2


def test_retry_after_is_honoured(server):
    result = judge(
        server,
        ScriptedReply(status=429, headers={"Retry-After": "0.4"}),
        ScriptedReply(content=GOOD),
        retry=RetryPolicy(base_delay_s=0.01, max_delay_s=10),
    )

    assert result.status == "ok" and 0.4 <= result.call.latency_s < 2


def test_retry_after_is_capped(server):
    result = judge(
        server,
        ScriptedReply(status=429, headers={"Retry-After": "120"}),
        ScriptedReply(content=GOOD),
        retry=RetryPolicy(base_delay_s=0.01, max_delay_s=0.2),
    )

    assert result.status == "ok" and 0.2 <= result.call.latency_s < 2


def test_server_error_every_time__http_error_after_max_retries(server):
    failing = ScriptedReply(status=500, content="boom")

    result = judge(server, *[failing] * 5, max_retries=3)

    assert result.status == "http_error" and result.parsed is None
    assert result.call.attempts == 4 and len(server.requests) == 4
    assert "500" in result.error and "boom" in result.error
    assert "boom" in result.call.response_raw  # the raw error body is kept


def test_bad_request__not_retried(server):
    result = judge(
        server, ScriptedReply(status=400, content="bad schema"), ScriptedReply(content=GOOD)
    )

    assert result.status == "http_error" and result.call.attempts == 1
    assert len(server.requests) == 1 and "400" in result.error


def test_slow_server__timeout_after_retries(server):
    slow = ScriptedReply(content=GOOD, delay_s=2.0)

    result = judge(server, slow, slow, timeout_s=0.2, max_retries=1)

    assert result.status == "timeout" and result.call.attempts == 2
    assert result.call.latency_s < 1.5


def test_dropped_connection__connection_error(server):
    dropped = ScriptedReply(drop_connection=True)

    result = judge(server, dropped, dropped, max_retries=1)

    assert result.status == "connection_error" and result.call.attempts == 2


def test_nothing_listening__connection_error():
    with FakeChatServer() as closed:
        base_url = closed.base_url
    config = LLMConfig(backend="openai", base_url=base_url, api_key_env=KEY_ENV, max_retries=0)

    result = LLMClient(config, retry=FAST_RETRY).complete_json(MESSAGES, Verdict, "judge")

    assert result.status == "connection_error" and result.call.attempts == 1


# -- parsing the reply --------------------------------------------------------------------------


def test_malformed_json__json_error_keeps_raw(server):
    broken = '{"verdict": "aligned", "score": '

    result = judge(server, ScriptedReply(content=broken))

    assert result.status == "json_error" and result.parsed is None
    assert result.call.response_raw == broken and result.error
    assert result.call.attempts == 1  # a bad answer is the model's, not a transient failure


def test_json_in_markdown_fence__ok(server):
    result = judge(server, ScriptedReply(content=f"Here it is:\n```json\n{GOOD}\n```\nDone."))

    assert result.status == "ok" and result.parsed == Verdict(verdict="aligned", score=3)


def test_prose_around_json__ok(server):
    content = f"I think {{this}} is fine. {GOOD} Let me know {{if}} not."

    result = judge(server, ScriptedReply(content=content))

    assert result.status == "ok" and result.parsed.score == 3


def test_schema_violation__schema_error(server):
    result = judge(server, ScriptedReply(content='{"verdict": "maybe", "score": 1}'))

    assert result.status == "schema_error" and result.parsed is None
    assert "verdict" in result.error and result.call.response_raw.startswith('{"verdict"')


def test_truncated_reply__not_trusted_even_if_parseable(server):
    result = judge(server, ScriptedReply(content=GOOD, finish_reason="length"))

    assert result.status == "truncated" and result.parsed is None
    assert result.call.response_raw == GOOD


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ('  \n{"a": [1, {"b": 2}]}\n', {"a": [1, {"b": 2}]}),
        ('```json\n{"a": 1}\n```', {"a": 1}),
        ('```\n{"a": 1}\n```', {"a": 1}),
        ('Answer: {"a": "a } brace and \\" quote"} bye', {"a": 'a } brace and " quote'}),
        ('Use {x} or {"a": 1} then {"a": 2}', {"a": 1}),
        ('say "{" first {"a": {"b": {}}} tail}', {"a": {"b": {}}}),
        ('Use { to open. {"a": 1}', {"a": 1}),
        ('The shape is {"a": ...}. Answer: {"a": 2}', {"a": 2}),
        ('{"text": "line one\nline two"}', {"text": "line one\nline two"}),
    ],
)
def test_extract_json__finds_the_first_object(text, expected):
    assert extract_json(text) == expected


@pytest.mark.parametrize("text", ["", "no json here", '{"a": 1', "{not: json}"])
def test_extract_json__raises_when_there_is_none(text):
    with pytest.raises(JSONExtractionError):
        extract_json(text)


# -- keys ---------------------------------------------------------------------------------------


def test_api_key__sent_but_never_recorded_logged_or_shown(server, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)  # includes openai's and httpx's own debug logging
    # The second call meets error bodies that echo the key: a 500 (retried), then a 401.
    server.enqueue(
        ScriptedReply(content=GOOD),
        ScriptedReply(status=500, content=f"upstream rejected key {SECRET}"),
        ScriptedReply(status=401, content=f"invalid key {SECRET}"),
    )
    with make_client(server) as client:
        results = [client.complete_json(MESSAGES, Verdict, "judge") for _ in range(2)]
        many = client.complete_json_many([(MESSAGES, Verdict, "judge")])
        shown = f"{client!r} {client.config!r}"

    assert all(h["authorization"] == f"Bearer {SECRET}" for h in server.request_headers)
    assert [r.status for r in results] == ["ok", "http_error"]
    texts = [r.model_dump_json() for r in (*results, *many)] + [shown, caplog.text]
    assert "HTTP Request" in caplog.text  # the openai package's own logging was captured
    assert "[redacted]" in results[1].error
    for text in texts:
        assert SECRET not in text


def test_local_server_without_key__uses_placeholder(server):
    result = judge(server, ScriptedReply(content=GOOD))

    assert result.ok
    assert server.request_headers[0]["authorization"] == f"Bearer {PLACEHOLDER_API_KEY}"


def test_remote_server_without_key__config_error_names_the_variable():
    config = LLMConfig(backend="openai", base_url="https://llm.example.org/v1", api_key_env=KEY_ENV)

    with pytest.raises(LLMConfigError, match=KEY_ENV):
        LLMClient(config)


def test_offline_backend__refused():
    with pytest.raises(LLMConfigError, match="offline"):
        LLMClient(LLMConfig(backend="offline"))


# -- many at once -------------------------------------------------------------------------------


def numbered_requests(count: int) -> list[tuple[list[dict[str, str]], type[Verdict], str]]:
    return [([{"role": "user", "content": f"item {i}"}], Verdict, "judge") for i in range(count)]


def item_of(request: dict[str, Any]) -> int:
    return int(request["messages"][-1]["content"].split()[-1])


def echo_item(request: dict[str, Any]) -> ScriptedReply:
    """Answers with the item number as the score."""
    return ScriptedReply(content=json.dumps({"verdict": "aligned", "score": item_of(request)}))


def echo_item_later_first(request: dict[str, Any]) -> ScriptedReply:
    """As `echo_item`, but later items answer sooner, so completion order is not input order."""
    reply = echo_item(request)
    return ScriptedReply(content=reply.content, delay_s=0.01 * (12 - item_of(request)))


def test_many__keeps_order_and_respects_the_concurrency_limit():
    with FakeChatServer(responder=echo_item_later_first, latency_s=0.1) as server:
        results = make_client(server, concurrency=4).complete_json_many(
            numbered_requests(12), run_id="run-2"
        )

    assert [r.parsed.score for r in results] == list(range(12))
    assert server.max_in_flight == 4
    assert {r.call.run_id for r in results} == {"run-2"}
    assert len({r.call.call_id for r in results}) == 12


def test_many__faster_than_one_by_one_under_latency():
    with FakeChatServer(responder=echo_item, latency_s=0.15) as server:
        client = make_client(server, concurrency=8)
        started = time.perf_counter()
        one_by_one = [client.complete_json(*request) for request in numbered_requests(8)]
        sequential_s = time.perf_counter() - started
        started = time.perf_counter()
        together = client.complete_json_many(numbered_requests(8))
        concurrent_s = time.perf_counter() - started

    assert [r.parsed for r in together] == [r.parsed for r in one_by_one]
    assert sequential_s >= 8 * 0.15 and concurrent_s < sequential_s / 3


def test_many__retries_and_failures_stay_per_item(server):
    seen: dict[int, int] = {}
    lock = threading.Lock()

    def flaky(request: dict[str, Any]) -> ScriptedReply:
        item = item_of(request)
        with lock:
            seen[item] = seen.get(item, 0) + 1
            first = seen[item] == 1
        if item == 1 and first:
            return ScriptedReply(status=429)
        if item == 2:
            return ScriptedReply(status=400, content="bad")
        return echo_item(request)

    server.responder = flaky
    results = make_client(server).complete_json_many(numbered_requests(4))

    assert [r.status for r in results] == ["ok", "ok", "http_error", "ok"]
    assert [r.call.attempts for r in results] == [1, 2, 1, 1]


def test_many__works_inside_a_running_event_loop():
    async def flow_body(client: LLMClient) -> list[Any]:
        asyncio.get_running_loop()  # as in a Prefect flow: a loop is running in this thread
        single = client.complete_json(*numbered_requests(1)[0])
        return [single, *client.complete_json_many(numbered_requests(3))]

    with FakeChatServer(responder=echo_item) as server:
        results = asyncio.run(flow_body(make_client(server)))

    assert [r.status for r in results] == ["ok"] * 4
    assert [r.parsed.score for r in results] == [0, 0, 1, 2]


def test_many__empty_input():
    with FakeChatServer() as server:
        assert make_client(server).complete_json_many([]) == []
    assert server.requests == []


# -- backoff ------------------------------------------------------------------------------------


def test_backoff__grows_exponentially_with_jitter_and_is_capped():
    policy = RetryPolicy(base_delay_s=1.0, max_delay_s=5.0)

    for retry_index, low, high in [(0, 0.5, 1.0), (1, 1.0, 2.0), (2, 2.0, 4.0), (3, 4.0, 5.0)]:
        delays = [policy.delay_s(retry_index) for _ in range(50)]
        assert all(low <= d <= high for d in delays)
    assert len({policy.delay_s(1) for _ in range(20)}) > 1  # jittered, not constant
    assert 2.0 <= policy.delay_s(0, retry_after_s=2.0) <= 3.0
    assert policy.delay_s(6) == policy.delay_s(0, retry_after_s=600) == 5.0


def test_benchmark__concurrency_pays_off():
    result = run_benchmark(requests=8, latency_s=0.1, concurrency=4)

    assert result.sequential_s >= 0.8 and result.speedup > 2
