"""The OpenAI-compatible routes under ``/v1``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from litestar import Request, Response, asgi, get
from litestar.handlers import ASGIRouteHandler
from litestar.types import HTTPScope, Receive, Scope, Send

from gateway.errors import InvalidRequest, PayloadTooLarge
from gateway.pipeline import JSON, Pipeline, Reply
from gateway.shedding import shedding_middleware


class MethodNotAllowed(InvalidRequest):
    status = 405
    code = "method_not_allowed"


class ClientGone(Exception):
    """The client disconnected before its request body arrived."""


def _pipeline(scope: Scope) -> Pipeline:
    return scope["app"].state.pipeline


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    """The request body, refused with 413 past ``limit`` bytes (by its Content-Length at once)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            if not value.isdigit():
                raise InvalidRequest("Invalid Content-Length header.", code="invalid_header")
            if int(value) > limit:
                raise PayloadTooLarge("The request body is too large.")
            break
    message = await receive()
    if message["type"] == "http.disconnect":
        raise ClientGone
    body: bytes = message.get("body", b"")  # type: ignore[assignment]
    if not message.get("more_body", False):
        if len(body) > limit:
            raise PayloadTooLarge("The request body is too large.")
        return body
    parts, size = [body], len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        piece: bytes = message.get("body", b"")  # type: ignore[assignment]
        size += len(piece)
        if size > limit:
            raise PayloadTooLarge("The request body is too large.")
        parts.append(piece)
        if not message.get("more_body", False):
            return b"".join(parts)


async def send_reply(reply: Reply, receive: Receive, send: Send) -> None:
    """Send a pipeline ``Reply`` as raw ASGI messages.

    A stream is pumped chunk by chunk as it arrives (one ``send`` per upstream read, never
    re-framed); a watcher cancels the pump when the client disconnects, so an abandoned stream
    stops costing teacher tokens and is recorded as 499.
    """
    headers: list[tuple[bytes, bytes]] = [(b"content-type", reply.media_type.encode())]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers.items()]
    if reply.chunks is None:
        headers.append((b"content-length", str(len(reply.body)).encode()))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": reply.body, "more_body": False})
        return
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    chunks = reply.chunks
    if not isinstance(chunks, AsyncIterator):
        for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return
    pump = asyncio.current_task()
    assert pump is not None
    gone = False

    async def watch() -> None:
        nonlocal gone
        while (await receive())["type"] != "http.disconnect":
            pass
        gone = True
        pump.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        async for chunk in chunks:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except asyncio.CancelledError:
        if not gone:
            raise  # a shutdown's cancellation, not ours
        pump.uncancel()
    finally:
        watcher.cancel()
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()


def _route(path: str, method: str, summary: str, description: str) -> ASGIRouteHandler:
    """A raw ASGI route (Litestar's routing, middleware and exception handlers, no request or
    response objects: they cost more than the rest of the gateway's own work on a cache hit)."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        http_method = cast("HTTPScope", scope)["method"]
        if http_method != "POST":
            raise MethodNotAllowed(f"Method {http_method} is not allowed here; use POST.")
        pipeline = _pipeline(scope)
        try:
            raw = await read_body(scope, receive, pipeline.max_body_bytes)
        except ClientGone:
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        reply = await getattr(pipeline, method)(raw, headers)
        await send_reply(reply, receive, send)

    handler.__doc__ = description
    return asgi(
        path,
        name=method,
        middleware=[shedding_middleware],
        copy_scope=False,
        summary=summary,
    )(handler)


chat_completions = _route(
    "/v1/chat/completions",
    "chat",
    "Create a chat completion",
    "OpenAI's chat completions: routed to the teacher or the task's student, recorded.",
)
completions = _route(
    "/v1/completions",
    "completions",
    "Create a completion (legacy)",
    "Passed through to the teacher and recorded.",
)
embeddings = _route(
    "/v1/embeddings", "embeddings", "Create embeddings", "Passed through to the teacher and recorded."
)


@get("/v1/models", summary="List models")
async def list_models(request: Request[Any, Any, Any], pipeline: Pipeline) -> Response[bytes]:
    """The teacher's models, then each student adapter that serves a task."""
    return Response(content=await pipeline.models(request.headers.get("authorization")), media_type=JSON)


ROUTES = [chat_completions, completions, embeddings, list_models]
