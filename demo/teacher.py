"""A scripted OpenAI-compatible teacher: a local, deterministic STAND-IN for a real teacher API.

It exists for tests, benchmarks and the offline demo, where no real model or key is at hand.
Answers are a pure function of the request (``answer_fn``), so every run is reproducible.
Magic prefixes in the last user message script failures: ``!error <status>``, ``!slow <ms>``,
``!drop`` (close the connection mid-stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from litestar import Litestar, Request, Response, get, post
from litestar.response import Stream

AnswerFn = Callable[[dict[str, Any]], dict[str, Any] | None]
"""Maps a chat request to an assistant message dict (``content`` and/or ``tool_calls``), or None for the default."""


@dataclass
class TeacherStats:
    chat: int = 0
    completions: int = 0
    embeddings: int = 0
    authorizations: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    streams_cut: int = 0
    """Streams that ended before their last event (the reader went away, or a scripted drop)."""


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _text_of(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))


def last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if message.get("role") == "user":
            return _text_of(message.get("content"))
    return ""


def default_answer(body: dict[str, Any]) -> dict[str, Any]:
    """Echo-style answers that exercise every response shape: text, JSON mode, tool calls."""
    text = last_user_text(body)
    tools = body.get("tools") or []
    if tools and body.get("tool_choice") != "none":
        name = tools[0].get("function", {}).get("name", "tool")
        call_id = "call_" + hashlib.sha256(text.encode()).hexdigest()[:24]
        args = orjson.dumps({"query": text}).decode()
        return {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            ],
        }
    fmt = (body.get("response_format") or {}).get("type")
    if fmt in ("json_object", "json_schema"):
        return {"role": "assistant", "content": orjson.dumps({"answer": text, "length": len(text)}).decode()}
    return {"role": "assistant", "content": f"You said: {text}"}


class ScriptedTeacher:
    """The teacher's state: its answer function, expected key, counters and timing knobs."""

    def __init__(
        self,
        answer_fn: AnswerFn | None = None,
        *,
        api_key: str | None = None,
        model: str = "teacher-large",
        delay_s: float = 0.0,
        chunk_delay_s: float = 0.0,
        cached_ratio: float = 0.0,
        linger_s: float = 0.0,
    ) -> None:
        self.answer_fn = answer_fn
        self.api_key = api_key
        self.model = model
        self.delay_s = delay_s
        self.chunk_delay_s = chunk_delay_s
        self.cached_ratio = cached_ratio
        self.linger_s = linger_s
        """Keep a stream open this long after its ``data: [DONE]`` (some servers end the body late)."""
        self.stats = TeacherStats()
        self.fail_next: list[int] = []
        """Statuses to answer the next chat requests with (then normal service resumes)."""

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.answer_fn is not None:
            scripted = self.answer_fn(body)
            if scripted is not None:
                return scripted
        return default_answer(body)


def _canonical(body: dict[str, Any]) -> bytes:
    """The body's bytes with sorted keys, for a deterministic id; bodies orjson cannot write
    (nested past its 254 levels, as a real API accepts them) by their messages alone."""
    try:
        return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        return orjson.dumps(body.get("messages"), option=orjson.OPT_SORT_KEYS, default=str)


def _error(
    status: int, message: str, type_: str = "invalid_request_error", code: str | None = None
) -> Response[bytes]:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return Response(content=orjson.dumps(body), status_code=status, media_type="application/json")


def create_teacher_app(teacher: ScriptedTeacher | None = None) -> Litestar:
    """The stand-in teacher as an ASGI app (serve it with uvicorn)."""
    state = teacher or ScriptedTeacher()

    def check_key(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        auth = request.headers.get("authorization", "")
        state.stats.authorizations.append(auth)
        if state.api_key is not None and auth != f"Bearer {state.api_key}":
            return _error(401, "Incorrect API key provided.", code="invalid_api_key")
        return None

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Any:
        if (denied := check_key(request)) is not None:
            return denied
        body = orjson.loads(await request.body())
        state.stats.chat += 1
        state.stats.bodies.append(body)
        if state.fail_next:
            return _error(state.fail_next.pop(0), "Scripted failure.", "server_error")
        text = last_user_text(body)
        if text.startswith("!error "):
            status = int(text.split()[1])
            return _error(
                status,
                f"Scripted error {status}.",
                "server_error" if status >= 500 else "invalid_request_error",
            )
        if text.startswith("!slow "):
            await asyncio.sleep(int(text.split()[1]) / 1000)
        if state.delay_s:
            await asyncio.sleep(state.delay_s)
        n = int(body.get("n") or 1)
        message = state.answer(body)
        finish = "tool_calls" if message.get("tool_calls") else "stop"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        content = message.get("content")
        if content and max_tokens and _words(content) > max_tokens:
            message = {**message, "content": " ".join(content.split()[:max_tokens])}
            finish = "length"
        prompt_tokens = sum(_words(_text_of(m.get("content"))) for m in body.get("messages") or [])
        completion_tokens = _words(
            _text_of(message.get("content")) or orjson.dumps(message.get("tool_calls")).decode()
        )
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens * n,
            "total_tokens": prompt_tokens + completion_tokens * n,
            "prompt_tokens_details": {"cached_tokens": int(prompt_tokens * state.cached_ratio)},
        }
        rid = "chatcmpl-" + hashlib.sha256(_canonical(body)).hexdigest()[:24]
        created = int(time.time())
        model = body.get("model") or state.model
        logprobs = None
        if body.get("logprobs") and content:
            logprobs = {
                "content": [
                    {"token": w, "logprob": -0.1, "bytes": list(w.encode()), "top_logprobs": []}
                    for w in (message.get("content") or "").split()
                ]
            }
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return Stream(
                _stream(
                    state,
                    rid,
                    created,
                    model,
                    message,
                    finish,
                    n,
                    usage if include_usage else None,
                    drop=text.startswith("!drop"),
                ),
                media_type="text/event-stream",
            )
        choices = [
            {"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish} for i in range(n)
        ]
        out = {
            "id": rid,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": "fp_scripted",
        }
        return Response(content=orjson.dumps(out), media_type="application/json")

    @post("/v1/completions", status_code=200)
    async def completions(request: Request[Any, Any, Any]) -> Any:
        if (denied := check_key(request)) is not None:
            return denied
        body = orjson.loads(await request.body())
        state.stats.completions += 1
        prompt = body.get("prompt")
        text = prompt if isinstance(prompt, str) else str(prompt)
        out = {
            "id": "cmpl-" + hashlib.sha256(text.encode()).hexdigest()[:24],
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.get("model") or state.model,
            "choices": [
                {"index": 0, "text": f" completion of {text}", "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {
                "prompt_tokens": _words(text),
                "completion_tokens": _words(text) + 2,
                "total_tokens": 2 * _words(text) + 2,
            },
        }
        return Response(content=orjson.dumps(out), media_type="application/json")

    @post("/v1/embeddings", status_code=200)
    async def embeddings(request: Request[Any, Any, Any]) -> Any:
        if (denied := check_key(request)) is not None:
            return denied
        body = orjson.loads(await request.body())
        state.stats.embeddings += 1
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) else [inputs]
        data = []
        for i, item in enumerate(items):
            digest = hashlib.sha256(str(item).encode()).digest()
            data.append(
                {"object": "embedding", "index": i, "embedding": [(b - 128) / 128 for b in digest[:16]]}
            )
        tokens = sum(_words(str(x)) for x in items)
        out = {
            "object": "list",
            "data": data,
            "model": body.get("model") or "embed",
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return Response(content=orjson.dumps(out), media_type="application/json")

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [{"id": state.model, "object": "model", "created": 0, "owned_by": "scripted"}],
        }

    @get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    app = Litestar([chat, completions, embeddings, models, health], openapi_config=None, logging_config=None)
    app.state.teacher = state
    return app


async def _stream(state: ScriptedTeacher, *args: Any, **kwargs: Any) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in _events(state, *args, **kwargs):
            yield chunk
        finished = True
    finally:
        if not finished:
            state.stats.streams_cut += 1


async def _events(
    state: ScriptedTeacher,
    rid: str,
    created: int,
    model: str,
    message: dict[str, Any],
    finish: str,
    n: int,
    usage: dict[str, Any] | None,
    *,
    drop: bool,
) -> AsyncIterator[bytes]:
    head = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": "fp_scripted",
    }

    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        return b"data: " + orjson.dumps({**head, "choices": choices, **extra}) + b"\n\n"

    for i in range(n):
        yield event(
            [
                {
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )
    content = message.get("content")
    if content:
        words = content.split(" ")
        for j, word in enumerate(words):
            piece = word if j == 0 else " " + word
            if state.chunk_delay_s:
                await asyncio.sleep(state.chunk_delay_s)
            if drop and j == len(words) // 2:
                raise ConnectionResetError("scripted drop")
            for i in range(n):
                yield event(
                    [{"index": i, "delta": {"content": piece}, "logprobs": None, "finish_reason": None}]
                )
    for k, call in enumerate(message.get("tool_calls") or []):
        args = call["function"]["arguments"]
        half = len(args) // 2
        for i in range(n):
            yield event(
                [
                    {
                        "index": i,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": k,
                                    "id": call["id"],
                                    "type": "function",
                                    "function": {"name": call["function"]["name"], "arguments": args[:half]},
                                }
                            ]
                        },
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
            yield event(
                [
                    {
                        "index": i,
                        "delta": {"tool_calls": [{"index": k, "function": {"arguments": args[half:]}}]},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
    for i in range(n):
        yield event([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
    if usage is not None:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"
    if state.linger_s:
        await asyncio.sleep(state.linger_s)
