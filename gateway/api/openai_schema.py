"""The ``/v1`` raw ASGI routes in the OpenAPI document, so contract tools (schemathesis) and
readers see their request and answer shapes. The routes stay raw for speed: their operations
are generated once per process from schema-only declarations and merged into each app's
document when it starts; nothing of this runs per request."""

from __future__ import annotations

import functools
from typing import Any, Literal

import msgspec
from litestar import Litestar, post
from litestar.openapi import OpenAPIConfig, ResponseSpec
from litestar.openapi.spec import PathItem, Schema

from gateway.protocol import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int | None = None
    total_tokens: int


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessage
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, kw_only=True):
    """The teacher's or the student's answer, passed through as they sent it."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class CompletionChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None


class Completion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class Embedding(msgspec.Struct, kw_only=True):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: Usage | None = None


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """Every error the gateway answers, OpenAI-shaped."""

    error: ErrorDetail


_ERRORS = {
    400: ResponseSpec(ErrorResponse, description="Invalid request (the error's `param` names the field)."),
    401: ResponseSpec(ErrorResponse, description="Missing or unknown API key."),
    413: ResponseSpec(ErrorResponse, description="Request body too large."),
    429: ResponseSpec(ErrorResponse, description="The teacher's rate limit (its `Retry-After` passed on)."),
    502: ResponseSpec(
        ErrorResponse, description="The teacher failed or answered something that is not JSON."
    ),
    503: ResponseSpec(ErrorResponse, description="The gateway sheds load (`Retry-After`)."),
    504: ResponseSpec(ErrorResponse, description="The teacher did not answer in time."),
}


# Schema-only declarations: the served routes are ``gateway.api.openai``'s raw ASGI handlers at
# the same paths; these are never routed, only read for their types by the OpenAPI generator.
@post("/v1/chat/completions", summary="Create a chat completion", status_code=200, responses=_ERRORS)
async def _chat(data: ChatCompletionRequest) -> ChatCompletion:
    """OpenAI's chat completions: routed to the teacher or the task's student, recorded. With
    `stream: true` the answer is `text/event-stream` chunks."""
    raise NotImplementedError  # pragma: no cover - never routed


@post("/v1/completions", summary="Create a completion (legacy)", status_code=200, responses=_ERRORS)
async def _completions(data: CompletionRequest) -> Completion:
    """Passed through to the teacher and recorded."""
    raise NotImplementedError  # pragma: no cover - never routed


@post("/v1/embeddings", summary="Create embeddings", status_code=200, responses=_ERRORS)
async def _embeddings(data: EmbeddingRequest) -> EmbeddingList:
    """Passed through to the teacher and recorded."""
    raise NotImplementedError  # pragma: no cover - never routed


@functools.cache
def _operations() -> tuple[dict[str, PathItem], dict[str, Schema]]:
    document = Litestar(
        route_handlers=[_chat, _completions, _embeddings],
        openapi_config=OpenAPIConfig(title="openai", version="1"),
        logging_config=None,  # Litestar's default would configure the process's root logger
    ).openapi_schema
    return dict(document.paths or {}), dict(document.components.schemas or {})


def document_openai_routes(app: Litestar) -> None:
    """Merge the ``/v1`` operations into ``app``'s document (an ``on_startup`` hook)."""
    paths, schemas = _operations()
    document = app.openapi_schema
    document.paths = {**paths, **(document.paths or {})}
    components: dict[str, Any] = dict(document.components.schemas or {})
    document.components.schemas = {**schemas, **components}
