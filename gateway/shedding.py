"""Load shedding: refuse new API requests early, while refusing is still cheap.

Two signals: requests in flight (``max_in_flight``) and event-loop lag. Under overload the
backlog builds *before* handlers run (accepted connections wait for the loop), so counting in
handlers alone sees it too late; the lag of a 10 ms ticker sees it at once.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_bytes

_BODY = error_bytes("The gateway is overloaded; retry shortly.", "server_error", None, "overloaded")
_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-type", b"application/json"),
    (b"retry-after", b"1"),
    (b"content-length", str(len(_BODY)).encode()),
]


class LoopLag:
    """The event loop's current lag, from a ticker that should wake every ``interval_s``."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.lag_s = 0.0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._tick(), name="distillgate-looplag")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _tick(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(self.interval_s)
            late = time.perf_counter() - started - self.interval_s
            # Smoothed both ways: one stall (a GC pass, a busy neighbour: 200 ms moves it 20 ms) is
            # not an overload, while a backlog keeps every tick late and the average follows it
            # within a few dozen ticks.
            self.lag_s = 0.9 * self.lag_s + 0.1 * late


def shedding_middleware(app: ASGIApp) -> ASGIApp:
    """Litestar middleware for the ``/v1`` routes: 503 + Retry-After before any parsing when overloaded."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        gateway: Any = scope["app"].state.gateway
        settings = gateway.settings
        if gateway.in_flight >= settings.max_in_flight or gateway.loop_lag.lag_s > settings.shed_loop_lag_s:
            gateway.metrics.shed.inc()
            await send({"type": "http.response.start", "status": 503, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": _BODY, "more_body": False})
            return
        await app(scope, receive, send)

    return middleware
