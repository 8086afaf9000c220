"""OpenAI-compatible chat client: structured JSON output, retries, and a record of every call."""

from emc.llm.client import (
    PLACEHOLDER_API_KEY,
    LLMClient,
    LLMConfigError,
    build_request,
    resolve_api_key,
    run_blocking,
)
from emc.llm.fake_server import FakeChatServer, ScriptedReply
from emc.llm.parse import JSONExtractionError, extract_json, parse_reply
from emc.llm.records import JSONRequest, LLMResult, LLMStatus
from emc.llm.retry import Failure, RetryPolicy, classify_error

__all__ = [
    "PLACEHOLDER_API_KEY",
    "Failure",
    "FakeChatServer",
    "JSONExtractionError",
    "JSONRequest",
    "LLMClient",
    "LLMConfigError",
    "LLMResult",
    "LLMStatus",
    "RetryPolicy",
    "ScriptedReply",
    "build_request",
    "classify_error",
    "extract_json",
    "parse_reply",
    "resolve_api_key",
    "run_blocking",
]
