"""A scriptable OpenAI-compatible chat server on localhost, for tests, benchmarks and demos.

It speaks just enough of `POST /v1/chat/completions` for the real `openai` client to talk to it,
so tests exercise the real HTTP path (timeouts, status codes, dropped connections) rather than a
mocked client.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

CHAT_PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class ScriptedReply:
    """One reply: a chat completion (status 200) or an error whose message is `content`."""

    content: str = "{}"
    status: int = 200
    finish_reason: str = "stop"
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    # Close the socket without answering, as a crashed proxy would.
    drop_connection: bool = False
    # The first completion token's top alternatives as (token, logprob), most likely first.
    # Sent only when the request asks for `logprobs`; None: a server that never returns them.
    top_logprobs: tuple[tuple[str, float], ...] | None = None


Responder = Callable[[dict[str, Any]], ScriptedReply]


def _no_script(_request: dict[str, Any]) -> ScriptedReply:
    return ScriptedReply(status=500, content="fake server: no scripted reply and no responder")


class FakeChatServer:
    """Serves scripted replies in order, then asks `responder`; records every request body."""

    def __init__(
        self, responder: Responder | None = None, latency_s: float = 0.0, model: str = "fake-model"
    ) -> None:
        self.responder = responder or _no_script
        self.latency_s = latency_s
        self.model = model
        self._script: deque[ScriptedReply] = deque()
        self._requests: list[dict[str, Any]] = []
        self._headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._in_flight = 0
        self._max_in_flight = 0
        # Set on close so that handlers sleeping out a delay stop at once.
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeChatServer:
        # A short poll interval makes close() quick; the default 0.5 s slows every test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.02},
            name="fake-chat-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5)
        self._httpd.server_close()

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    # -- scripting and inspection ---------------------------------------------------------------

    def enqueue(self, *replies: ScriptedReply) -> None:
        with self._lock:
            self._script.extend(replies)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Every request body received so far, in arrival order."""
        with self._lock:
            return list(self._requests)

    @property
    def request_headers(self) -> list[dict[str, str]]:
        """The HTTP headers of every request, lower-cased names, in arrival order."""
        with self._lock:
            return list(self._headers)

    @property
    def max_in_flight(self) -> int:
        """The most requests that were being handled at the same moment."""
        with self._lock:
            return self._max_in_flight

    # -- used by the handler --------------------------------------------------------------------

    def _begin(self, body: dict[str, Any], headers: dict[str, str]) -> ScriptedReply:
        with self._lock:
            self._requests.append(body)
            self._headers.append(headers)
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            scripted = self._script.popleft() if self._script else None
        return scripted or self.responder(body)

    def _end(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _sleep(self, seconds: float) -> None:
        if seconds > 0:
            self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    # The benchmark opens dozens of connections at once; the default backlog of 5 would refuse some.
    request_queue_size = 128
    fake: FakeChatServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_POST(self) -> None:
        if self.path.rstrip("/") != CHAT_PATH:
            self._send(404, _error_body("not found", 404), {})
            return
        body = self._read_json()
        fake = self.server.fake
        reply = fake._begin(body, {name.lower(): value for name, value in self.headers.items()})
        try:
            fake._sleep(fake.latency_s + reply.delay_s)
            if reply.drop_connection:
                self.close_connection = True
                return
            payload = (
                _completion_body(body, reply, fake.model)
                if reply.status == 200
                else _error_body(reply.content, reply.status)
            )
            self._send(reply.status, payload, reply.headers)
        except OSError:
            pass  # the client gave up (timeout) and closed the socket first
        finally:
            fake._end()

    def _read_json(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b"{}"
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return {"_unparsed": raw.decode("utf-8", "replace")}

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep test and benchmark output clean


def _completion_body(request: dict[str, Any], reply: ScriptedReply, model: str) -> dict[str, Any]:
    prompt_words = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    completion_words = len(reply.content.split())
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", model),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": reply.content},
                "finish_reason": reply.finish_reason,
                "logprobs": _logprobs_body(request, reply),
            }
        ],
        "usage": {
            "prompt_tokens": prompt_words,
            "completion_tokens": completion_words,
            "total_tokens": prompt_words + completion_words,
        },
    }


def _logprobs_body(request: dict[str, Any], reply: ScriptedReply) -> dict[str, Any] | None:
    """OpenAI's `choices[0].logprobs` for the first token: the chosen token and its alternatives.

    The chosen token is the longest alternative the content starts with (the first one listed if
    none does); `top_logprobs` lists as many alternatives as the request asked for, in order.
    """
    if reply.top_logprobs is None or request.get("logprobs") is not True:
        return None
    alternatives = [_token_logprob(token, logprob) for token, logprob in reply.top_logprobs]
    matching = [a for a in alternatives if a["token"] and reply.content.startswith(a["token"])]
    chosen = max(matching, key=lambda a: len(a["token"])) if matching else None
    chosen = chosen or (alternatives[0] if alternatives else _token_logprob(reply.content, 0.0))
    wanted = request.get("top_logprobs")
    shown = alternatives[: wanted if isinstance(wanted, int) else 0]
    return {"content": [{**chosen, "top_logprobs": shown}], "refusal": None}


def _token_logprob(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def _error_body(message: str, status: int) -> dict[str, Any]:
    kind = "rate_limit_error" if status == 429 else "server_error" if status >= 500 else "invalid"
    return {"error": {"message": message, "type": kind, "code": str(status)}}
