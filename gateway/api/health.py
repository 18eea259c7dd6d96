"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Request, Response, get

from gateway.runtime import Gateway


@get(["/healthz", "/health"], summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@get("/readyz", summary="Readiness")
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """Ready when the database answers, a policy is loaded and a teacher is configured."""
    gw: Gateway = request.app.state.gateway
    db_ok = await asyncio.to_thread(gw.db.ping)
    checks = {"database": db_ok, "policy": gw.policy is not None, "teacher": gw.teacher is not None}
    ready = all(checks.values())
    return Response(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


ROUTES = [healthz, readyz]
