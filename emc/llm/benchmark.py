"""Judge-like throughput: concurrent calls vs one by one, against the fake server.

Run as `python -m emc.llm.benchmark`. The fake server adds a fixed latency to every reply, which
stands in for a remote model's response time; the speed-up is what concurrency buys a judge pass.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel

from emc.config import LLMConfig
from emc.llm.client import LLMClient
from emc.llm.fake_server import FakeChatServer, ScriptedReply
from emc.llm.records import JSONRequest, LLMResult


class _Judgement(BaseModel):
    verdict: Literal["aligned", "misaligned"]
    reason: str


class BenchmarkResult(BaseModel):
    requests: int
    latency_s: float
    concurrency: int
    sequential_s: float
    concurrent_s: float

    @property
    def speedup(self) -> float:
        return self.sequential_s / self.concurrent_s


def run_benchmark(
    requests: int = 40, latency_s: float = 0.2, concurrency: int = 8
) -> BenchmarkResult:
    batch = _judge_requests(requests)
    with FakeChatServer(responder=_judge, latency_s=latency_s) as server:
        config = LLMConfig(
            backend="openai",
            model="bench-judge",
            base_url=server.base_url,
            api_key_env="EMC_FAKE_SERVER_KEY",  # never send a real key, even to localhost
            concurrency=concurrency,
        )
        with LLMClient(config) as client:
            sequential_s, one_by_one = _timed(lambda: [client.complete_json(*r) for r in batch])
            concurrent_s, together = _timed(lambda: client.complete_json_many(batch))
    # A benchmark that timed failures would measure nothing useful.
    if not all(result.ok for result in [*one_by_one, *together]):
        raise RuntimeError("benchmark calls failed; see the log")
    return BenchmarkResult(
        requests=requests,
        latency_s=latency_s,
        concurrency=concurrency,
        sequential_s=sequential_s,
        concurrent_s=concurrent_s,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LLM client throughput against the fake server")
    parser.add_argument("--requests", type=int, default=40)
    parser.add_argument("--latency", type=float, default=0.2, help="seconds added to each reply")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args(argv)
    result = run_benchmark(args.requests, args.latency, args.concurrency)
    print(
        f"{result.requests} judge calls, {result.latency_s * 1000:.0f} ms latency each\n"
        f"  one by one:           {result.sequential_s:6.2f} s\n"
        f"  concurrent (limit {result.concurrency}): {result.concurrent_s:6.2f} s\n"
        f"  speed-up:             {result.speedup:6.1f}x"
    )


def _judge_requests(count: int) -> list[JSONRequest]:
    system = {"role": "system", "content": "Label the completion aligned or misaligned, as JSON."}
    return [
        (
            [system, {"role": "user", "content": f"Completion {i}: return the wallet."}],
            _Judgement,
            "judge",
        )
        for i in range(count)
    ]


def _judge(_request: dict[str, Any]) -> ScriptedReply:
    return ScriptedReply(content=json.dumps({"verdict": "aligned", "reason": "returns it"}))


def _timed(work: Callable[[], list[LLMResult]]) -> tuple[float, list[LLMResult]]:
    started = time.perf_counter()
    results = work()
    return time.perf_counter() - started, results


if __name__ == "__main__":
    main()
