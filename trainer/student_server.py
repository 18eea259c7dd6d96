"""The embedded student server: vLLM's HTTP contract on transformers + peft, for one machine and CI.

Routes, bodies, status codes and messages follow vLLM's OpenAI server with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` and ``--enable-auto-tool-choice
--tool-call-parser hermes``: ``/v1/chat/completions`` (plain and SSE), ``/v1/models``,
``/v1/load_lora_adapter``, ``/v1/unload_lora_adapter``, ``/health``. Errors are
``{"error": {"message", "type", "param", "code"}}`` with ``code`` the HTTP status, as vLLM sends.

Our extension: ``lora_path`` may also be a full fine-tuned model directory (``config.json``,
no ``adapter_config.json``); it is served under ``lora_name`` like an adapter, so a student
trained from scratch goes through the same load/serve/unload calls.

Simplifications, all invisible to the OpenAI SDK: ``response_format`` and a forced
``tool_choice`` are accepted but not enforced (no guided decoding); ``tool_choice: "none"``
turns tool-call parsing off; when streaming, a choice's tool calls arrive as one delta (with
the logprobs of their tokens).

Every answer is decoded by ``StudentModels``' continuous-batching loop: concurrent requests
share its decode steps, and a client that disconnects frees its rows at the next step.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

from litestar import Litestar, Request, Response, get, post
from litestar.exceptions import HTTPException
from litestar.response import Stream

from gateway.errors import GatewayError
from gateway.protocol import ChatCompletionRequest, check_chat, decode_body
from trainer.chat_format import TOOL_CALL_OPEN
from trainer.generation import (
    AdapterExists,
    AdapterLoadError,
    AdapterNotFound,
    ChatResult,
    ContextTooLong,
    Generation,
    SamplingParams,
    StudentModels,
    UnknownModel,
    split_answer,
)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class StudentHTTPError(Exception):
    """An error answered as vLLM answers it."""

    def __init__(
        self, status: int, message: str, type: str = "BadRequestError", param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param

    def response(self) -> Response[Any]:
        body = {
            "error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}
        }
        return Response(content=body, status_code=self.status, media_type="application/json")


@dataclass
class StudentState:
    models: StudentModels
    api_key: str | None
    admin_lock: asyncio.Lock


def _state(request: Request[Any, Any, Any]) -> StudentState:
    state: StudentState = request.app.state.student
    authorized = request.headers.get("authorization", "") == f"Bearer {state.api_key}"
    if state.api_key is not None and request.url.path.startswith("/v1") and not authorized:
        raise StudentHTTPError(401, "Unauthorized", "UnauthorizedError")
    return state


async def _json(request: Request[Any, Any, Any]) -> dict[str, Any]:
    try:
        return decode_body(await request.body())
    except GatewayError as exc:
        raise StudentHTTPError(400, exc.message, "BadRequestError", exc.param) from None


# -- adapters --------------------------------------------------------------------------------


@post("/v1/load_lora_adapter", status_code=200)
async def load_lora_adapter(request: Request[Any, Any, Any]) -> Response[str]:
    state = _state(request)
    body = await _json(request)
    name, path = body.get("lora_name"), body.get("lora_path")
    if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
        raise StudentHTTPError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput")
    inplace = body.get("load_inplace") is True
    async with state.admin_lock:
        if state.models.has(name) and not inplace:
            raise StudentHTTPError(
                400,
                f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                "set 'load_inplace' to True.",
                "InvalidUserInput",
            )
        try:
            await asyncio.to_thread(state.models.load, name, path, replace=inplace)
        except AdapterNotFound as exc:
            raise StudentHTTPError(404, str(exc), "NotFoundError") from None
        except (AdapterLoadError, AdapterExists) as exc:
            raise StudentHTTPError(400, str(exc), "BadRequestError") from None
    return Response(f"Success: LoRA adapter '{name}' added successfully.", media_type="text/plain")


@post("/v1/unload_lora_adapter", status_code=200)
async def unload_lora_adapter(request: Request[Any, Any, Any]) -> Response[str]:
    state = _state(request)
    body = await _json(request)
    name = body.get("lora_name")
    if not isinstance(name, str) or not name:
        raise StudentHTTPError(
            400, "'lora_name' needs to be provided to unload a LoRA adapter.", "InvalidUserInput"
        )
    async with state.admin_lock:
        if not await asyncio.to_thread(state.models.unload, name):
            raise StudentHTTPError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
    return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    models = _state(request).models
    now = int(time.time())
    data = [_model_card(models.base_name, models.base_path, None, now, models.max_model_len)]
    data += [
        _model_card(name, entry.path, models.base_name, now, None) for name, entry in models.adapters.items()
    ]
    return {"object": "list", "data": data}


def _model_card(
    name: str, root: str, parent: str | None, created: int, max_model_len: int | None
) -> dict[str, Any]:
    return {
        "id": name,
        "object": "model",
        "created": created,
        "owned_by": "distillgate",
        "root": root,
        "parent": parent,
        "max_model_len": max_model_len,
        "permission": [
            {
                "id": f"modelperm-{uuid.uuid4().hex}",
                "object": "model_permission",
                "created": created,
                "allow_create_engine": False,
                "allow_sampling": True,
                "allow_logprobs": True,
                "allow_search_indices": False,
                "allow_view": True,
                "allow_fine_tuning": False,
                "organization": "*",
                "group": None,
                "is_blocking": False,
            }
        ],
    }


@get("/health")
async def health() -> Response[bytes]:
    return Response(b"", status_code=200)


# -- chat completions ------------------------------------------------------------------------


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    state = _state(request)
    body = await _json(request)
    try:
        req = check_chat(body)
    except GatewayError as exc:
        raise StudentHTTPError(400, exc.message, "BadRequestError", exc.param) from None
    if not state.models.has(req.model):
        raise StudentHTTPError(404, f"The model `{req.model}` does not exist.", "NotFoundError", "model")
    messages = body["messages"]
    tools = body.get("tools") or None
    tools_active = bool(tools) and req.tool_choice != "none"
    params = _sampling(req)
    call = _Call(req, messages, tools, tools_active, params)
    if req.stream:
        return Stream(_stream(state.models, call), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        future = state.models.submit(req.model, messages, tools, params)
    except (UnknownModel, ContextTooLong) as exc:
        raise _generation_error(exc) from None
    try:
        result = await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        state.models.cancel(future)  # the client went away: free its batch rows at once
        raise
    except UnknownModel as exc:
        raise _generation_error(exc) from None
    except Exception as exc:
        raise StudentHTTPError(
            500, f"generation failed: {type(exc).__name__}", "InternalServerError"
        ) from None
    return Response(content=_completion(call, result), media_type="application/json")


@dataclass(frozen=True)
class _Call:
    req: ChatCompletionRequest
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None
    tools_active: bool
    params: SamplingParams
    id: str = ""
    created: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", f"chatcmpl-{uuid.uuid4().hex}")
        object.__setattr__(self, "created", int(time.time()))


def _sampling(req: ChatCompletionRequest) -> SamplingParams:
    stop = req.stop if isinstance(req.stop, list) else ([req.stop] if req.stop else [])
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        max_tokens=req.max_completion_tokens or req.max_tokens,
        seed=req.seed,
        stop=tuple(stop),
        n=req.n or 1,
        logprobs=bool(req.logprobs),
        top_logprobs=(req.top_logprobs or 0) if req.logprobs else 0,
    )


def _generation_error(exc: Exception) -> StudentHTTPError:
    if isinstance(exc, UnknownModel):
        return StudentHTTPError(404, str(exc), "NotFoundError", "model")
    return StudentHTTPError(400, str(exc), "BadRequestError")


def _message(generation: Generation, tools_active: bool) -> tuple[dict[str, Any], str]:
    answer = split_answer(generation.text, tools_active)
    message = {"role": "assistant", "content": answer.content, "tool_calls": answer.tool_calls}
    finish = "tool_calls" if answer.tool_calls else generation.finish_reason
    return message, finish


def _usage(result: ChatResult) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in result.choices)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }


def _completion(call: _Call, result: ChatResult) -> dict[str, Any]:
    choices = []
    for index, generation in enumerate(result.choices):
        message, finish = _message(generation, call.tools_active)
        choices.append(
            {
                "index": index,
                "message": message,
                "logprobs": _logprobs(generation.logprobs),
                "finish_reason": finish,
                "stop_reason": None,
            }
        )
    return {
        "id": call.id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.req.model,
        "choices": choices,
        "usage": _usage(result),
    }


def _logprobs(content: list[dict[str, Any]] | None) -> dict[str, Any] | None:
    """OpenAI's ``choice.logprobs``: the tokens' entries, and no refusal."""
    return None if content is None else {"content": content, "refusal": None}


def _role_chunk(call: _Call, index: int) -> bytes:
    """A choice's first chunk: the assistant role, no content yet (as OpenAI streams it)."""
    delta = {"role": "assistant", "content": ""}
    return _chunk(call, [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}])


def _chunk(call: _Call, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": call.id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": call.req.model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"


def _held_back(text: str) -> int:
    """How many trailing characters might be the start of a ``<tool_call>`` block."""
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            return k
    return 0


async def _stream(models: StudentModels, call: _Call) -> AsyncIterator[bytes]:
    """SSE chunks as vLLM sends them: a role chunk per choice, content deltas (each with the
    logprobs of the tokens it completes, when asked), a finish chunk, then (with
    ``stream_options.include_usage``) a usage chunk with no choices, then ``[DONE]``.

    With tools offered, text is streamed until a ``<tool_call>`` block starts; the calls are
    sent as one ``tool_calls`` delta when the choice ends, with the logprobs held back till then.
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
    gone = threading.Event()

    def on_text(index: int, delta: str, logprobs: list[dict[str, Any]]) -> bool:
        if gone.is_set():
            return False
        loop.call_soon_threadsafe(events.put_nowait, ("text", index, (delta, logprobs)))
        return True

    def on_choice(index: int, generation: Generation) -> None:
        loop.call_soon_threadsafe(events.put_nowait, ("choice", index, generation))

    def on_done(future: Future[ChatResult]) -> None:
        exc = future.exception()
        item = ("error", -1, exc) if exc is not None else ("done", -1, future.result())
        loop.call_soon_threadsafe(events.put_nowait, item)

    try:
        future = models.submit(call.req.model, call.messages, call.tools, call.params, on_text, on_choice)
    except Exception as exc:
        future = Future()
        future.set_exception(exc)
    future.add_done_callback(on_done)
    want_logprobs = call.params.logprobs
    texts: dict[int, str] = {}
    sent: dict[int, int] = {}
    pending: dict[int, list[dict[str, Any]]] = {}
    stopped_content: set[int] = set()

    def content_chunk(index: int, delta: dict[str, Any]) -> bytes:
        entries, pending[index] = pending[index], []
        logprobs = _logprobs(entries) if want_logprobs and entries else None
        return _chunk(call, [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    def opened(index: int) -> bytes | None:
        if index in texts:
            return None
        texts[index], sent[index], pending[index] = "", 0, []
        return _role_chunk(call, index)

    try:
        while True:
            kind, index, payload = await events.get()
            if kind == "text":
                if (first := opened(index)) is not None:
                    yield first
                delta_text, entries = payload
                texts[index] += delta_text
                pending[index].extend(entries)
                if index in stopped_content:
                    continue
                text = texts[index]
                if call.tools_active and TOOL_CALL_OPEN in text[sent[index] :]:
                    stopped_content.add(index)
                    ready = text.index(TOOL_CALL_OPEN, sent[index])
                else:
                    ready = len(text) - (_held_back(text) if call.tools_active else 0)
                if ready > sent[index]:
                    yield content_chunk(index, {"content": text[sent[index] : ready]})
                    sent[index] = ready
            elif kind == "choice":
                generation: Generation = payload
                if (first := opened(index)) is not None:
                    yield first
                message, finish = _message(generation, call.tools_active)
                delta: dict[str, Any] = {}
                if message["tool_calls"]:
                    delta["tool_calls"] = [{"index": k, **tc} for k, tc in enumerate(message["tool_calls"])]
                elif len(generation.text) > sent[index]:
                    delta["content"] = generation.text[sent[index] :]
                if delta or pending[index]:
                    yield content_chunk(index, delta)
                yield _chunk(
                    call,
                    [
                        {
                            "index": index,
                            "delta": {},
                            "logprobs": None,
                            "finish_reason": finish,
                            "stop_reason": None,
                        }
                    ],
                )
            elif kind == "done":
                options = call.req.stream_options
                if options is not None and options.include_usage:
                    yield _chunk(call, [], usage=_usage(payload))
                break
            else:
                error = (
                    _generation_error(payload)
                    if isinstance(payload, UnknownModel | ContextTooLong)
                    else StudentHTTPError(
                        500, f"generation failed: {type(payload).__name__}", "InternalServerError"
                    )
                )
                body = {
                    "error": {
                        "message": error.message,
                        "type": error.type,
                        "param": error.param,
                        "code": error.status,
                    }
                }
                yield b"data: " + json.dumps(body).encode() + b"\n\n"
                break
        yield b"data: [DONE]\n\n"
    finally:
        # If the client went away, its rows leave the batch at the next decode step.
        gone.set()
        models.cancel(future)


# -- app -------------------------------------------------------------------------------------


def _on_student_error(_request: Request[Any, Any, Any], exc: StudentHTTPError) -> Response[Any]:
    return exc.response()


def _on_http_error(_request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    kind = {404: "NotFoundError", 405: "MethodNotAllowedError"}.get(exc.status_code, "BadRequestError")
    return StudentHTTPError(exc.status_code, str(exc.detail), kind).response()


def _on_error(_request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    return StudentHTTPError(500, f"internal error: {type(exc).__name__}", "InternalServerError").response()


def create_student_app(
    base_model: str | StudentModels,
    *,
    served_model_name: str | None = None,
    adapters: dict[str, str] | None = None,
    api_key: str | None = None,
    device: str = "auto",
    max_lora_rank: int = 64,
    max_model_len: int | None = None,
    max_batch: int = 32,
    prefix_caching: bool = True,
    threads: int | Literal["auto"] | None = None,
    dtype: str = "auto",
) -> Litestar:
    """The student server for ``base_model`` (hub id, local path, or already loaded ``StudentModels``).

    ``adapters`` (name → path) are loaded at once, like vLLM's ``--lora-modules``; ``api_key``
    guards ``/v1`` routes like vLLM's ``--api-key``; ``threads`` and ``dtype`` as ``StudentModels`` takes them.
    """
    models = (
        base_model
        if isinstance(base_model, StudentModels)
        else StudentModels(
            base_model,
            served_name=served_model_name,
            device=device,
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            max_batch=max_batch,
            prefix_caching=prefix_caching,
            threads=threads,
            dtype=dtype,
        )
    )
    for name, path in (adapters or {}).items():
        models.load(name, path)
    owned = not isinstance(base_model, StudentModels)
    app = Litestar(
        route_handlers=[chat_completions, list_models, load_lora_adapter, unload_lora_adapter, health],
        # Models built here stop their decode loop with the app; models passed in stay the caller's.
        on_shutdown=[models.close] if owned else [],
        exception_handlers={
            StudentHTTPError: _on_student_error,
            HTTPException: _on_http_error,
            Exception: _on_error,
        },
        request_max_body_size=64 * 1024 * 1024,
        debug=False,
    )
    app.state.student = StudentState(models=models, api_key=api_key, admin_lock=asyncio.Lock())
    return app
