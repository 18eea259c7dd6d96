"""The Litestar application factory: explicit pieces, no import-time side effects."""

from __future__ import annotations

import logging
import os
from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi import OpenAPIConfig

from gateway import __version__
from gateway.api import admin, health, openai, tasks
from gateway.errors import GatewayError, error_bytes
from gateway.metrics import CONTENT_TYPE
from gateway.proxy import JSON, Pipeline
from gateway.runtime import Gateway
from gateway.settings import Settings
from router.policy import Policy

log = logging.getLogger("distillgate")

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
    if exc.status == 405:
        headers = {"allow": "POST"}
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


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request[Any, Any, Any]) -> Response[bytes]:
    gw: Gateway = request.app.state.gateway
    gw.metrics.recorder_queue.set(gw.recorder.depth)
    gw.metrics.in_flight.set(gw.in_flight)
    gw.metrics.loop_lag.set(gw.loop_lag.lag_s)
    return Response(content=gw.metrics.render(), media_type=CONTENT_TYPE)


def create_app(settings: Settings | None = None, *, policy: Policy | None = None) -> Litestar:
    """Build a gateway app. ``policy`` overrides ``settings.policy_file`` (tests, embedding)."""
    settings = settings or Settings()
    gateway = Gateway(settings, policy=policy)
    app = Litestar(
        route_handlers=[*openai.ROUTES, *health.ROUTES, *admin.ROUTES, *tasks.ROUTES, metrics_endpoint],
        on_startup=[gateway.start],
        on_shutdown=[gateway.stop],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
        openapi_config=OpenAPIConfig(title="distillgate", version=__version__, path="/docs"),
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )
    app.state.gateway = gateway
    app.state.pipeline = Pipeline(gateway)
    return app


def app_from_environment() -> Litestar:
    """Factory for ``uvicorn --factory`` (each worker builds its app from ``DISTILLGATE_CONFIG``)."""
    from gateway.settings import load_settings

    return create_app(load_settings(os.environ.get("DISTILLGATE_CONFIG")))
