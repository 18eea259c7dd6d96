"""The gateway's errors as HTTP answers: every one OpenAI-shaped (``{"error": {"message", "type",
"param", "code"}}``) with the status OpenAI uses; nothing reaches a client as a bare 500."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from gateway.errors import GatewayError, UpstreamError, error_bytes

log = logging.getLogger("distillgate")
JSON = "application/json"

_STATUS_TYPES = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "permission_denied"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    415: ("invalid_request_error", "unsupported_media_type"),
    429: ("rate_limit_error", "rate_limited"),
}


def _gateway_error(_: Request[Any, Any, Any], exc: GatewayError) -> Response[bytes]:
    headers = {"retry-after": "1"} if exc.status in (429, 503) else None
    if exc.headers:
        headers = {**(headers or {}), **exc.headers}
    if exc.status == 405:
        headers = {"allow": "POST"}
    if isinstance(exc, UpstreamError):
        # The gateway retried the upstream within its budget already: an SDK retrying too
        # would multiply the calls (the OpenAI SDKs honour this header).
        headers = {**(headers or {}), "x-should-retry": "false"}
    return Response(content=exc.to_bytes(), status_code=exc.status, media_type=JSON, headers=headers)


def _http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    type_, code = _STATUS_TYPES.get(
        status, ("invalid_request_error" if status < 500 else "server_error", None)
    )
    message = exc.detail or "Request failed."
    if status == 413:
        message = "The request body is too large."
    if isinstance(exc, ValidationException):
        message = f"Invalid request: {exc.detail}"
    return Response(content=error_bytes(message, type_, None, code), status_code=status, media_type=JSON)


def _unexpected(_: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # Log the type and where, never the request (it may hold secrets).
    log.error("unexpected %s", type(exc).__name__, exc_info=exc)
    body = error_bytes("The gateway failed to handle this request.", "server_error", None, "internal_error")
    return Response(content=body, status_code=500, media_type=JSON)


HANDLERS: ExceptionHandlersMap = {
    GatewayError: _gateway_error,
    HTTPException: _http_error,
    Exception: _unexpected,
}
