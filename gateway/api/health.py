"""Liveness and readiness probes."""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import Response, get

from gateway.recorder import Recorder
from gateway.store.db import Database
from gateway.upstream import Upstreams
from router.policy_store import PolicyStore


@get(["/healthz", "/health"], summary="Liveness", include_in_schema=True)
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@get("/readyz", summary="Readiness")
async def readyz(
    db: Database, policy_store: PolicyStore | None, upstreams: Upstreams, recorder: Recorder
) -> Response[dict[str, Any]]:
    """Ready when the database answers, a policy is loaded, a teacher is configured and the
    recorder's spool takes writes (a pod that could not keep records through an outage is not ready)."""
    db_ok = await asyncio.to_thread(db.ping)
    checks = {
        "database": db_ok,
        "policy": policy_store is not None,
        "teacher": upstreams.teacher is not None,
        "spool": recorder.spool_writable,
    }
    ready = all(checks.values())
    return Response(
        {"status": "ready" if ready else "not ready", "checks": checks}, status_code=200 if ready else 503
    )


ROUTES = [healthz, readyz]
