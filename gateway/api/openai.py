"""The OpenAI-compatible routes under ``/v1``."""

from __future__ import annotations

import time
from typing import Any

import orjson
from litestar import Request, Response, get, post
from litestar.response import Stream

from gateway.proxy import JSON, Pipeline
from gateway.runtime import Gateway
from gateway.shedding import shedding_middleware


def _pipeline(request: Request[Any, Any, Any]) -> Pipeline:
    return request.app.state.pipeline  # type: ignore[no-any-return]


@post(
    "/v1/chat/completions",
    status_code=200,
    summary="Create a chat completion",
    middleware=[shedding_middleware],
)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """OpenAI's chat completions: routed to the teacher or the task's student, recorded."""
    return await _pipeline(request).chat(await request.body(), request.headers)


@post(
    "/v1/completions",
    status_code=200,
    summary="Create a completion (legacy)",
    middleware=[shedding_middleware],
)
async def completions(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Passed through to the teacher and recorded."""
    return await _pipeline(request).completions(await request.body(), request.headers)


@post("/v1/embeddings", status_code=200, summary="Create embeddings", middleware=[shedding_middleware])
async def embeddings(request: Request[Any, Any, Any]) -> Response[bytes] | Stream:
    """Passed through to the teacher and recorded."""
    return await _pipeline(request).embeddings(await request.body(), request.headers)


@get("/v1/models", summary="List models")
async def list_models(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The teacher's models, then each student adapter that serves a task."""
    gw: Gateway = request.app.state.gateway
    await gw.authenticate(request.headers.get("authorization"))
    policy = gw.policy
    data: list[dict[str, Any]] = []
    if policy is not None:
        names = list(policy.teacher.models) or ([policy.teacher.model] if policy.teacher.model else [])
        if not names and gw.teacher is not None:
            try:
                status, raw = await gw.teacher.get("/models")
                if status == 200:
                    names = [m["id"] for m in orjson.loads(raw).get("data", []) if isinstance(m, dict)]
            except Exception:
                names = []
        data = [{"id": name, "object": "model", "created": 0, "owned_by": "teacher"} for name in names]
    for adapter, task in gw.serving_adapters():
        data.append(
            {
                "id": adapter,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "distillgate",
                "parent": policy.student.base_model if policy and policy.student else None,
                "task": task,
            }
        )
    return Response(content=orjson.dumps({"object": "list", "data": data}), media_type=JSON)


ROUTES = [chat_completions, completions, embeddings, list_models]
