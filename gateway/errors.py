"""The gateway's exception hierarchy; each maps to one OpenAI-shaped HTTP error.

``{"error": {"message", "type", "param", "code"}}`` with the status OpenAI uses for it.
Messages never contain secrets: callers pass text they composed, never raw headers.
"""

from __future__ import annotations

from typing import Any

import orjson


class GatewayError(Exception):
    """Base: an error the client sees as an OpenAI error object."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    headers: dict[str, str] | None = None
    """Extra response headers (``Retry-After`` and ``x-ratelimit-*`` on a 429)."""

    def __init__(
        self, message: str, *, param: str | None = None, code: str | None = None, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def to_bytes(self) -> bytes:
        return orjson.dumps(self.body())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    status = 415
    code = "unsupported_media_type"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class Conflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class RateLimited(GatewayError):
    """A key over its rate limit (``type`` ``requests`` or ``tokens``, as OpenAI says it) or its
    budget (``insufficient_quota``); ``headers`` carry ``Retry-After``."""

    status = 429
    type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, code: str, headers: dict[str, str]) -> None:
        super().__init__(message, code=code)
        self.type = kind
        self.headers = headers


class Overloaded(GatewayError):
    """The gateway sheds load rather than queueing without bound."""

    status = 503
    type = "server_error"
    code = "overloaded"


class UpstreamError(GatewayError):
    """The teacher or student failed: timed out, unreachable, or answered 5xx after retries."""

    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(message: str, type: str, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps(error_body(message, type, param, code))
