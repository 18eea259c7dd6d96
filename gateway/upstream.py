"""The teacher and the student as the pipeline calls them, on ``gateway.http1``'s pools.

Bodies go out as the bytes we were given; answers come back as bytes (whole, or chunk by chunk
for streams) and are never re-encoded here.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import orjson

from gateway.errors import UpstreamError, UpstreamTimeout
from gateway.http1 import Pool, Response, proxy_from_environment
from gateway.settings import UpstreamSettings
from router.policy import Policy, StudentEndpoint, TeacherEndpoint

RETRYABLE_STATUS = frozenset({500, 502, 503, 504, 529})


class RetryBudget:
    """Retries shared by all requests to one upstream: each request earns ``ratio`` of a retry
    (kept up to ``reserve``), each retry spends one. A teacher failing everything then costs
    about ``1 + ratio`` calls per request instead of ``1 + max_retries`` (as in gRPC and Finagle)."""

    __slots__ = ("ratio", "reserve", "tokens")

    def __init__(self, ratio: float, reserve: float) -> None:
        self.ratio = ratio
        self.reserve = reserve
        self.tokens = reserve

    def earn(self) -> None:
        tokens = self.tokens + self.ratio
        self.tokens = tokens if tokens < self.reserve else self.reserve

    def spend(self) -> bool:
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(slots=True)
class UpstreamAnswer:
    """An upstream's answer whose status and headers have arrived; the body may still be streaming."""

    status: int
    content_type: str
    response: Response
    attempts: int
    body: bytes | None = None
    headers: Mapping[str, str] = field(default_factory=dict)

    async def read(self) -> bytes:
        if self.body is None:
            self.body = await self.response.read()
        return self.body

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """Yield bytes as they arrive (no re-framing); a stream abandoned half-way closes its connection."""
        async for chunk in self.response.iter_chunks():
            yield chunk

    def close(self) -> None:
        self.response.close()


class Upstream:
    """One OpenAI-compatible server (teacher or student): a pooled session and its credentials."""

    def __init__(
        self,
        name: str,
        base_url: str,
        settings: UpstreamSettings,
        *,
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.settings = settings
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._get_headers = {k: v for k, v in self._headers.items() if k != "Content-Type"}
        self.budget = RetryBudget(settings.retry_budget_ratio, settings.retry_budget_reserve)
        self.pool = Pool(
            self.base_url,
            max_connections=settings.max_connections,
            connect_timeout_s=settings.connect_timeout_s,
            read_timeout_s=min(timeout_s or settings.read_timeout_s, settings.read_timeout_s),
            proxy=proxy_from_environment(self.base_url) if settings.trust_env else None,
        )

    async def close(self) -> None:
        await self.pool.close()

    async def send(
        self, path: str, body: bytes, *, retries: int | None = None, whole: bool = False
    ) -> UpstreamAnswer:
        """POST ``body`` to ``path`` and return once status and headers are in (``whole``: once
        the body is in too, in ``UpstreamAnswer.body``).

        Timeouts, connection failures, retryable statuses and (``whole``) a body cut or stalled
        after the headers are retried with exponential backoff and jitter, within ``max_retries``
        and the shared ``RetryBudget``: this is before any byte reached our client, so it is safe.
        Other statuses (4xx) are returned for the caller to pass through.
        """
        max_retries = self.settings.max_retries if retries is None else retries
        self.budget.earn()
        attempt = 0
        while True:
            attempt += 1
            resp: Response | None = None
            try:
                resp = await self.pool.request("POST", path, self._headers, body)
                if whole and resp.status not in RETRYABLE_STATUS:
                    data: bytes | None = await resp.read()
                else:
                    data = None
            except TimeoutError as exc:
                error: UpstreamError = UpstreamTimeout(
                    f"The {self.name} did not answer in time"
                    + (" (its body stalled after the headers)." if resp is not None else ".")
                )
                cause: BaseException = exc
            except OSError as exc:  # refused, reset, TLS, closed mid-answer
                where = "its body was cut after the headers" if resp is not None else "could not be reached"
                error = UpstreamError(
                    f"The {self.name} failed: {where} ({type(exc).__name__}).", code="upstream_unavailable"
                )
                cause = exc
            else:
                if resp.status in RETRYABLE_STATUS and attempt <= max_retries and self.budget.spend():
                    resp.close()
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                return UpstreamAnswer(
                    status=resp.status,
                    content_type=resp.headers.get("content-type", "application/json"),
                    response=resp,
                    attempts=attempt,
                    body=data,
                    headers=resp.headers,
                )
            if resp is not None:
                resp.close()
            if attempt > max_retries or not self.budget.spend():
                raise error from cause
            await asyncio.sleep(self._backoff(attempt))

    async def get(self, path: str) -> tuple[int, bytes]:
        resp = await self.pool.request("GET", path, self._get_headers)
        return resp.status, await resp.read()

    def _backoff(self, attempt: int) -> float:
        return self.settings.backoff_s * (2 ** (attempt - 1)) * (0.5 + random.random())


async def answer_json(upstream: Upstream, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a JSON body and return the parsed 200 answer; raise ``UpstreamError`` on anything else.

    For background calls (shadow pairs, audits, judges), never for the client's own request.
    """
    answer = await upstream.send(path, orjson.dumps(body), retries=0)
    data = await answer.read()
    if answer.status != 200:
        raise UpstreamError(f"The {upstream.name} answered HTTP {answer.status}.", status=502)
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise UpstreamError(f"The {upstream.name} answered with invalid JSON.") from None
    if not isinstance(parsed, dict) or not parsed.get("choices"):
        raise UpstreamError(f"The {upstream.name} answered without choices.")
    return parsed


class Upstreams:
    """The teacher and the student the policy names, one pooled ``Upstream`` each.

    ``apply`` follows the policy (``PolicyStore.on_reload``): a pool is rebuilt only when its
    endpoint changed, and the one it replaces is closed in the background. An async context
    manager: leaving it closes every pool.
    """

    def __init__(self, settings: UpstreamSettings) -> None:
        self.settings = settings
        self.teacher: Upstream | None = None
        self.student: Upstream | None = None
        self._teacher_at: TeacherEndpoint | None = None
        self._student_at: StudentEndpoint | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

    def apply(self, policy: Policy) -> None:
        if self._closed:
            return
        if self.teacher is None or policy.teacher != self._teacher_at:
            teacher = policy.teacher
            self._teacher_at = teacher
            self._swap(
                "teacher",
                Upstream(
                    "teacher",
                    teacher.base_url,
                    self.settings,
                    api_key=teacher.api_key(),
                    headers=teacher.headers,
                    timeout_s=teacher.timeout,
                ),
            )
        student = policy.student
        if student is None:
            self._swap("student", None)
        elif self.student is None or student != self._student_at:
            self._swap(
                "student",
                Upstream(
                    "student",
                    student.base_url,
                    self.settings,
                    api_key=student.api_key(),
                    timeout_s=student.timeout,
                ),
            )
        self._student_at = student

    def require_teacher(self) -> Upstream:
        if self.teacher is None:
            raise UpstreamError(
                "No teacher is configured: set `teacher.base_url` in the policy file.",
                code="no_teacher",
                status=503,
            )
        return self.teacher

    async def ask_student(self, adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        """The student's answer to a chat body (shadow pairs): raises ``UpstreamError`` on any failure."""
        if self.student is None:
            raise UpstreamError("No student is configured.")
        return await answer_json(self.student, "/chat/completions", {**body, "model": adapter})

    async def ask_teacher(self, body: dict[str, Any]) -> dict[str, Any]:
        """The teacher's answer to a chat body (audits, judges): raises ``UpstreamError`` on any failure."""
        return await answer_json(self.require_teacher(), "/chat/completions", body)

    def _swap(self, name: str, upstream: Upstream | None) -> None:
        previous: Upstream | None = getattr(self, name)
        setattr(self, name, upstream)
        if previous is not None:
            closing = asyncio.get_running_loop().create_task(previous.close())
            self._closing.add(closing)
            closing.add_done_callback(self._closing.discard)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        for upstream in (self.teacher, self.student):
            if upstream is not None:
                await upstream.close()
        await asyncio.gather(*self._closing, return_exceptions=True)
