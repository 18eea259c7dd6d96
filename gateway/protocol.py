"""The parts of the OpenAI wire format the gateway reads.

Bodies are validated against these shapes and then forwarded as the client sent them:
fields not named here pass through untouched, never re-serialised through a lossy model.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Literal, TypeVar

import msgspec
import orjson

from gateway.errors import InvalidRequest

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Role
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(msgspec.Struct, omit_defaults=True):
    include_usage: bool | None = None


class ChatCompletionRequest(msgspec.Struct, omit_defaults=True):
    model: str
    messages: list[ChatMessage]
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    n: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    stop: str | list[str] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    user: str | None = None


class CompletionRequest(msgspec.Struct, omit_defaults=True):
    model: str
    prompt: str | list[str | int | list[int]]
    stream: bool | None = None
    n: int | None = None
    temperature: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None


class EmbeddingRequest(msgspec.Struct, omit_defaults=True):
    model: str
    input: str | list[str | int | list[int]]
    metadata: dict[str, Any] | None = None
    store: bool | None = None


_PATH = re.compile(r"at `\$\.?([^`]*)`")


MAX_DEPTH = 128
"""Deepest JSON nesting accepted in a body. orjson parses 1,024 levels but serialises only ~254,
and a record must be written back out (issue 14): nothing an OpenAI request needs comes close."""


def decode_body(raw: bytes) -> dict[str, Any]:
    """Parse a JSON object body or raise ``InvalidRequest`` saying what is wrong."""
    if not raw:
        raise InvalidRequest("The request body is empty; expected a JSON object.")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    # Counting brackets runs in C; only a body that could be too deep is walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH:
        check_depth(body)
    return body


def check_depth(body: dict[str, Any]) -> None:
    """Refuse a body nested deeper than ``MAX_DEPTH``; ``param`` names the top-level field."""
    for name, value in body.items():
        if isinstance(value, (dict, list)) and _depth_exceeds(value, MAX_DEPTH - 1):
            raise InvalidRequest(
                f"'{name}' is nested deeper than {MAX_DEPTH} levels.",
                param=str(name),
                code="nesting_too_deep",
            )


def _depth_exceeds(value: dict[str, Any] | list[Any], budget: int) -> bool:
    """Whether ``value`` nests more than ``budget`` levels (iterative: no recursion limit)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > budget:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


T = TypeVar("T")


def validate(body: dict[str, Any], shape: type[T]) -> T:
    """Check ``body`` against ``shape``; the error names the offending field as ``param``."""
    try:
        return msgspec.convert(body, shape)
    except msgspec.ValidationError as exc:
        text = str(exc)
        m = _PATH.search(text)
        param = m.group(1) if m else None
        if text.startswith("Object missing required field"):
            field = text.split("`")[1]
            param = f"{param}.{field}" if param else field
            text = f"Missing required parameter: '{param}'."
        else:
            text = f"Invalid value for '{param}': {text.split(' - at ')[0]}." if param else f"{text}."
        raise InvalidRequest(text, param=param, code="invalid_value") from None


def check_chat(body: dict[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completions body, beyond types: the limits OpenAI also enforces."""
    req = validate(body, ChatCompletionRequest)
    if not req.messages:
        raise InvalidRequest(
            "'messages' must contain at least one message.", param="messages", code="invalid_value"
        )
    if req.n is not None and not 1 <= req.n <= 128:
        raise InvalidRequest("'n' must be between 1 and 128.", param="n", code="invalid_value")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise InvalidRequest(
            "'temperature' must be between 0 and 2.", param="temperature", code="invalid_value"
        )
    if req.top_logprobs is not None and not 0 <= req.top_logprobs <= 20:
        raise InvalidRequest(
            "'top_logprobs' must be between 0 and 20.", param="top_logprobs", code="invalid_value"
        )
    check_metadata(req.metadata)
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value < 1:
            raise InvalidRequest(f"'{name}' must be at least 1.", param=name, code="invalid_value")
    return req


def check_metadata(metadata: dict[str, Any] | None) -> None:
    """OpenAI's rule: up to 16 string values (msgspec cannot name the key of a bad dict value)."""
    if metadata is None:
        return
    if len(metadata) > 16:
        raise InvalidRequest("'metadata' may hold at most 16 keys.", param="metadata", code="invalid_value")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InvalidRequest(
                f"Invalid value for 'metadata.{key}': expected a string.",
                param=f"metadata.{key}",
                code="invalid_value",
            )
        if len(key) > 64 or len(value) > 512:
            raise InvalidRequest(
                f"'metadata.{key}' is too long (keys 64, values 512 characters).",
                param=f"metadata.{key}",
                code="invalid_value",
            )


def is_deterministic(req: ChatCompletionRequest | CompletionRequest) -> bool:
    """Temperature 0 or a fixed seed, and a single choice: safe to answer from a cache."""
    if (req.n or 1) > 1:
        return False
    return req.temperature == 0 or req.seed is not None


def system_prompt(req: ChatCompletionRequest) -> str | None:
    for message in req.messages:
        if message.role in ("system", "developer"):
            return _text(message.content)
    return None


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))


MAX_TASK_KEY = 200
_PRINTABLE = re.compile(r"[\x20-\x7e]+")


def check_header_value(value: str, param: str, what: str = "value") -> str:
    """A client value the gateway echoes into a response header (and stores as a key): 1 to
    ``MAX_TASK_KEY`` printable ASCII characters. Anything else would break the header (a CR or
    LF ends it, a non-Latin-1 character cannot be encoded) after the teacher was paid."""
    if len(value) > MAX_TASK_KEY:
        raise InvalidRequest(
            f"The {what} in '{param}' is longer than {MAX_TASK_KEY} characters.",
            param=param,
            code="invalid_value",
        )
    if not _PRINTABLE.fullmatch(value):
        raise InvalidRequest(
            f"The {what} in '{param}' must be printable ASCII (no control or non-ASCII characters).",
            param=param,
            code="invalid_value",
        )
    return value


def task_key(metadata: dict[str, Any] | None, header: str | None, req: ChatCompletionRequest | None) -> str:
    """``metadata.task``, else the ``x-distillgate-task`` header, else a fingerprint of the system prompt."""
    named = (metadata or {}).get("task")
    for candidate, param in ((named, "metadata.task"), (header, "x-distillgate-task")):
        if candidate and candidate.strip():
            return check_header_value(candidate.strip(), param, "task name")
    prompt = system_prompt(req) if req is not None else None
    if not prompt:
        return "default"
    # Whitespace-insensitive so trivially reformatted prompts stay one task.
    canonical = " ".join(prompt.split())
    return "sys-" + hashlib.sha256(canonical.encode()).hexdigest()[:12]
