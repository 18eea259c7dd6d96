"""``distillgate worker``: the training scheduler in its own process, with /metrics and /healthz."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get

from gateway.metrics import CONTENT_TYPE
from gateway.settings import Settings


def create_worker_app(settings: Settings) -> Litestar:
    from gateway.runtime import Gateway

    # The worker shares the gateway's wiring (database, policy hot reload, metrics) but serves
    # no traffic: it only runs the scheduler.
    gateway = Gateway(settings.model_copy(update={"run_scheduler": True}))

    @get(["/healthz", "/health"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @get("/metrics")
    async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
        return Response(content=gateway.metrics.render(), media_type=CONTENT_TYPE)

    app = Litestar(
        [healthz, metrics], on_startup=[gateway.start], on_shutdown=[gateway.stop], openapi_config=None
    )
    app.state.gateway = gateway
    return app
