"""A teacher that misbehaves on command, at the socket level: bodies cut or stalled after the
headers, HTML or non-JSON successes, 429 with ``Retry-After``, 500s, dropped connections.

tests/servers.py's scripted teacher answers like a well-behaved OpenAI server; these faults live
below HTTP (a body shorter than its ``Content-Length``, a connection closed before the status
line), so this one is a plain asyncio TCP server on its own loop in a thread.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
from sqlmodel import col, func, select

from gateway.store.models import Record
from tests.conftest import ADMIN_KEY, TEACHER_KEY, RunningGateway, make_policy, start_gateway
from tests.servers import free_port

FAULTS = frozenset({"ok", "cut", "stall", "html", "not_json", "500", "429", "drop"})
"""What an answer can be: ``ok`` a chat completion; ``cut`` its headers and half its body, then
the connection closes; ``stall`` the same, then silence; ``html`` a 200 ``text/html`` page;
``not_json`` a 200 ``application/json`` that is not JSON; ``500`` an OpenAI-shaped 500; ``429``
a rate limit with ``Retry-After: 7``; ``drop`` the connection closed before any answer."""


def completion(content: str = "fine") -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-faulty",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "teacher-large",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    )


class FaultyTeacher:
    """Answers each request with the next fault of ``script`` (then ``default``); counts calls."""

    def __init__(self, default: str = "ok") -> None:
        self.port = free_port()
        self.default = default
        self.script: deque[str] = deque()
        self.calls = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def play(self, faults: Iterable[str], default: str | None = None) -> None:
        """Answer the next requests with ``faults`` in order, then with ``default``."""
        faults = list(faults)
        assert set(faults) <= FAULTS, faults
        self.script.extend(faults)
        if default is not None:
            assert default in FAULTS
            self.default = default

    def _next(self) -> str:
        self.calls += 1
        return self.script.popleft() if self.script else self.default

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value.strip())
                await reader.readexactly(length)
                if not await self._answer(self._next(), writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, fault: str, writer: asyncio.StreamWriter) -> bool:
        """Write one answer; False when the connection must close after it."""
        if fault == "drop":
            writer.transport.abort()
            return False
        if fault in ("cut", "stall"):
            body = completion()
            writer.write(_head(200, "application/json", len(body)) + body[: len(body) // 2])
            await writer.drain()
            if fault == "stall":
                await asyncio.sleep(3600)
            writer.transport.abort()
            return False
        status, content_type, body, extra = {
            "ok": (200, "application/json", completion(), ""),
            "html": (200, "text/html", b"<html><body>Service maintenance</body></html>", ""),
            "not_json": (200, "application/json", b"upstream proxy says hello", ""),
            "500": (500, "application/json", _error("The server had an error."), ""),
            "429": (429, "application/json", _error("Rate limit reached."), "Retry-After: 7\r\n"),
        }[fault]
        writer.write(_head(status, content_type, len(body), extra) + body)
        await writer.drain()
        return True

    async def _start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for writer in list(self._writers):
            writer.transport.abort()

    def __enter__(self) -> FaultyTeacher:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _head(status: int, content_type: str, length: int, extra: str = "") -> bytes:
    reason = {200: "OK", 429: "Too Many Requests", 500: "Internal Server Error"}[status]
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode()


def _error(message: str) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


@contextmanager
def gateway_before(
    teacher: FaultyTeacher, database_url: str, tmp_path: Path, **settings: Any
) -> Iterator[RunningGateway]:
    """A recording gateway on ``database_url`` in front of ``teacher`` (``settings`` override the
    tests' defaults: short backoff, the teacher's key in the environment)."""
    os.environ["TEACHER_API_KEY"] = TEACHER_KEY
    upstream = {"backoff_s": 0.01, **settings.pop("upstream", {})}
    server, gw, key = start_gateway(
        database_url, make_policy(teacher.url), tmp_path, upstream=upstream, **settings
    )
    try:
        yield RunningGateway(server.url, server, gw, key, ADMIN_KEY, database_url)
    finally:
        server.stop()


def records(gateway: RunningGateway, **where: Any) -> list[Record]:
    """The gateway's stored records (after a flush), filtered by column values."""
    gateway.flush()
    with gateway.db().session() as session:
        query = select(Record)
        for name, value in where.items():
            query = query.where(col(getattr(Record, name)) == value)
        return list(session.exec(query))


def record_count(gateway: RunningGateway) -> int:
    gateway.flush()
    with gateway.db().session() as session:
        return int(session.exec(select(func.count()).select_from(Record)).one())


CHAT: dict[str, object] = {"model": "teacher-large", "messages": [{"role": "user", "content": "hello"}]}
"""The plainest chat request the faults tests send (and vary)."""


def chat(
    gateway: RunningGateway, body: bytes | dict[str, object] | None = None, **headers: str
) -> httpx.Response:
    """POST ``body`` (``CHAT`` when left out; bytes sent as they are) to the gateway's chat
    completions with its key, plus ``headers``."""
    content = body if isinstance(body, bytes) else orjson.dumps(CHAT if body is None else body)
    return httpx.post(
        gateway.v1 + "/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json", **headers},
        timeout=30,
    )


def param_and_code(response: httpx.Response) -> tuple[str | None, str | None]:
    """The ``param`` and ``code`` of an error answer, once its body is checked to be OpenAI's
    error shape (exactly ``message``, ``type``, ``param``, ``code``)."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["param"], error["code"]
