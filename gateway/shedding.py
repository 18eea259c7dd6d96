"""Load shedding: refuse new API requests early, while refusing is still cheap.

Two signals, one check (``Admission``): requests in flight (``max_in_flight``) and event-loop lag.
Under overload the backlog builds *before* handlers run (accepted connections wait for the loop),
so counting in handlers alone sees it too late; the lag of a 10 ms ticker sees it at once.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType
from typing import Self

from litestar.types import ASGIApp, Receive, Scope, Send

from gateway.errors import error_bytes
from gateway.metrics import Metrics

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


class Admission:
    """Whether a new API request may start, and how many are being served (admitted, answer not
    finished). ``enter`` takes a place or refuses (counted in ``distillgate_shed_requests``);
    ``leave`` gives it back. An async context manager: while entered it reports both signals to
    the gauges every ``report_s`` (``/metrics`` may be served by another worker process)."""

    def __init__(
        self,
        loop_lag: LoopLag,
        metrics: Metrics,
        *,
        max_in_flight: int,
        max_loop_lag_s: float,
        report_s: float = 1.0,
    ) -> None:
        self.loop_lag = loop_lag
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self.max_loop_lag_s = max_loop_lag_s
        self.report_s = report_s
        self.in_flight = 0
        self._reporter: asyncio.Task[None] | None = None

    def enter(self) -> bool:
        """Take a place for one request; False (and counted as shed) when the gateway is full or late."""
        if self.in_flight >= self.max_in_flight or self.loop_lag.lag_s > self.max_loop_lag_s:
            self.metrics.shed.inc()
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1

    def report(self) -> None:
        self.metrics.in_flight.set(self.in_flight)
        self.metrics.loop_lag.set(self.loop_lag.lag_s)

    async def __aenter__(self) -> Self:
        self._reporter = asyncio.create_task(self._report_forever(), name="distillgate-admission")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._reporter is not None:
            self._reporter.cancel()
            await asyncio.gather(self._reporter, return_exceptions=True)

    async def _report_forever(self) -> None:
        while True:
            await asyncio.sleep(self.report_s)
            self.report()


def shedding_middleware(app: ASGIApp) -> ASGIApp:
    """Litestar middleware for the ``/v1`` routes: 503 + Retry-After before any parsing when
    overloaded; otherwise the request holds its place until its answer (or stream) is finished."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        admission: Admission = scope["app"].state.admission
        if not admission.enter():
            await send({"type": "http.response.start", "status": 503, "headers": _HEADERS})
            await send({"type": "http.response.body", "body": _BODY, "more_body": False})
            return
        try:
            await app(scope, receive, send)
        finally:
            admission.leave()

    return middleware
