"""A lean HTTP/1.1 client for the hot path: keep-alive pool, TLS, streamed bodies, timeouts.

Why this and not httpx or aiohttp: docs/ARCHITECTURE.md, "Measured choices". An
``asyncio.Protocol`` per connection, responses parsed by ``httptools`` (the C parser uvicorn uses:
chunked transfer decoding included), bodies handed over as the bytes each read returned.

Scope, on purpose: the requests an OpenAI-compatible upstream needs (POST/GET with a body in
memory, no redirects, no cookies, no compression asked for). An HTTP proxy is used when given
(``proxy=``, or ``HTTPS_PROXY``/``HTTP_PROXY``/``NO_PROXY`` through ``proxy_from_environment``):
HTTPS through a ``CONNECT`` tunnel, plain HTTP as absolute-form requests. A connection that
was idle in the pool and fails before any byte of its answer is retried once on a fresh one:
the server closed it between requests, so the request never ran.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
import urllib.request
from collections import deque
from collections.abc import AsyncGenerator, Mapping
from urllib.parse import unquote, urlsplit

import httptools

PAUSE_BYTES = 1 << 20
"""Stop reading a streamed answer while this much is buffered and unread (the client is slower)."""


class HttpClientError(ConnectionError):
    """The connection failed or the answer was malformed."""


def proxy_from_environment(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``,
    any case), or None when there is none or ``NO_PROXY`` exempts the host, as curl and httpx do."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(parts.netloc):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


class _TunnelReply(asyncio.Protocol):
    """Reads a proxy's answer to ``CONNECT`` (the head only: the tunnel starts right after it)."""

    def __init__(self) -> None:
        self.buffer = b""
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if b"\r\n\r\n" in self.buffer and not self.done.done():
            self.done.set_result(self.buffer)
        elif len(self.buffer) > 65536 and not self.done.done():
            self.done.set_exception(HttpClientError("The proxy sent an oversized answer to CONNECT."))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(HttpClientError("The proxy closed the connection during CONNECT."))


class StaleConnection(HttpClientError):
    """A pooled connection failed before any byte of the answer arrived."""


class ReadTimeout(TimeoutError):
    """No byte of the answer arrived for ``read_timeout_s``."""


class Response:
    """An answer whose status and headers are in; its body may still be arriving."""

    __slots__ = (
        "_buffered",
        "_chunks",
        "_conn",
        "_done",
        "_error",
        "_keep_alive",
        "_streaming",
        "_waiter",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self._chunks: deque[bytes] = deque()
        self._done = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._conn: _Connection | None = conn
        self._buffered = 0
        self._keep_alive = False
        self._streaming = False

    # -- fed by the connection --------------------------------------------------------------
    def _feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        if self._streaming and self._buffered > PAUSE_BYTES and self._conn is not None:
            self._conn.pause()
        self._wake()

    def _finish(self, keep_alive: bool) -> None:
        self._done = True
        self._keep_alive = keep_alive
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._done:
            self._error = exc
            self._done = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # -- for the caller ---------------------------------------------------------------------
    async def read(self) -> bytes:
        """The whole body."""
        try:
            while not self._done:
                await self._wait()
        except BaseException:
            self.close()
            raise
        self._release()
        if self._error is not None:
            raise self._error
        chunks = self._chunks
        return chunks.popleft() if len(chunks) == 1 else b"".join(chunks)

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives, one piece per read from the socket (decoded from chunked)."""
        chunks = self._chunks
        self._streaming = True
        try:
            while True:
                while chunks:
                    piece = chunks.popleft()
                    self._buffered -= len(piece)
                    if self._conn is not None and self._buffered < PAUSE_BYTES // 2:
                        self._conn.resume()
                    yield piece
                if self._done:
                    break
                await self._wait()
            if self._error is not None:
                raise self._error
        finally:
            self._release()

    def close(self) -> None:
        """Give up on the rest of the body: the connection is closed, not reused."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abandon()

    def _release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and self._error is None and self._keep_alive:
            conn.pool.put_back(conn)
        else:
            conn.abandon()


class _Connection(asyncio.Protocol):
    """One keep-alive connection; at most one request at a time."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: Response | None = None
        self.headers_ready: asyncio.Future[None] | None = None
        self.received_any = False
        self.reused = False
        self.idle_since = 0.0
        self.last_read = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self._header_name = b""

    # -- asyncio.Protocol ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        self.last_read = self.pool.loop.time()
        if self.response is None:
            self.abandon()  # bytes nobody asked for: the connection is unusable
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(HttpClientError("The upstream switched protocols."))
        except httptools.HttpParserError as exc:
            self._fail(HttpClientError(f"The upstream sent a malformed answer ({exc})."))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.pool.forget(self)
        response = self.response
        if response is None:
            return
        headers_in = self.headers_ready is not None and self.headers_ready.done()
        if headers_in and not response._done and self._reads_to_eof():
            # An answer without Content-Length or chunking ends when the connection does.
            self._complete(keep_alive=False)
            return
        if self.received_any or not self.reused:
            self._fail(HttpClientError("The upstream closed the connection mid-answer."))
        else:
            self._fail(StaleConnection("The pooled connection was closed by the upstream."))

    def pause_writing(self) -> None:  # large request bodies: the transport buffers them
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks ---------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.response is not None
        self.response.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        response.status = self.parser.get_status_code()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_result(None)

    def on_body(self, body: bytes) -> None:
        assert self.response is not None
        self.response._feed(body)

    def on_message_complete(self) -> None:
        self._complete(keep_alive=self.parser.should_keep_alive())

    # -- ours --------------------------------------------------------------------------------
    def _reads_to_eof(self) -> bool:
        headers = self.response.headers if self.response is not None else {}
        return "content-length" not in headers and "chunked" not in headers.get("transfer-encoding", "")

    def _complete(self, *, keep_alive: bool) -> None:
        response, self.response = self.response, None
        self._stop_timer()
        if response is not None:
            response._finish(keep_alive and self.transport is not None)

    def _fail(self, exc: BaseException) -> None:
        response, self.response = self.response, None
        self._stop_timer()
        if self.headers_ready is not None and not self.headers_ready.done():
            self.headers_ready.set_exception(exc)
        if response is not None:
            response._fail(exc)
        self.abandon()

    def send(self, data: bytes, read_timeout_s: float) -> Response:
        assert self.transport is not None
        self.response = response = Response(self)
        self.headers_ready = self.pool.loop.create_future()
        self.received_any = False  # the parser is the connection's: it reads answer after answer
        self.last_read = self.pool.loop.time()
        self.timer = self.pool.loop.call_later(read_timeout_s, self._check_timeout, read_timeout_s)
        self.transport.write(data)
        return response

    def _check_timeout(self, read_timeout_s: float) -> None:
        self.timer = None
        if self.response is None:
            return
        quiet = self.pool.loop.time() - self.last_read
        if self.paused or quiet < read_timeout_s:
            # Data came meanwhile (or we stopped reading on purpose): look again later.
            self.timer = self.pool.loop.call_later(
                max(read_timeout_s - quiet, 0.001), self._check_timeout, read_timeout_s
            )
            return
        self._fail(ReadTimeout(f"No answer from the upstream for {read_timeout_s:g} s."))

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.last_read = self.pool.loop.time()
            self.transport.resume_reading()

    def abandon(self) -> None:
        self._stop_timer()
        self.response = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self.pool.forget(self)


class Pool:
    """Keep-alive connections to one origin, at most ``max_connections`` open; waiters in order."""

    def __init__(
        self,
        base_url: str,
        *,
        max_connections: int = 1000,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 600.0,
        keepalive_s: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
        proxy: str | None = None,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"unsupported URL scheme {parts.scheme!r} (http or https)")
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.tls else 80)
        default_port = self.port == (443 if self.tls else 80)
        host_header = self.host if ":" not in self.host else f"[{self.host}]"
        self.host_header = host_header if default_port else f"{host_header}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.max_connections = max_connections
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.keepalive_s = keepalive_s
        self.ssl_context = ssl_context or (ssl.create_default_context() if self.tls else None)
        self.proxy: tuple[str, int] | None = None
        self._proxy_auth: str | None = None
        self._target = self.prefix  # what precedes a path in the request line
        if proxy:
            p = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if p.scheme != "http":
                raise ValueError(f"unsupported proxy scheme {p.scheme!r} (http)")
            self.proxy = (p.hostname or "localhost", p.port or 80)
            if p.username is not None:
                credentials = f"{unquote(p.username)}:{unquote(p.password or '')}"
                self._proxy_auth = "Basic " + base64.b64encode(credentials.encode()).decode()
            if not self.tls:  # plain HTTP through a proxy: absolute-form request lines
                self._target = f"http://{self.host_header}{self.prefix}"
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def head(self, method: str, path: str, headers: Mapping[str, str], length: int | None) -> bytes:
        """The request line and headers (``headers`` names as the caller spells them)."""
        lines = [f"{method} {self._target}{path} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        if self._proxy_auth is not None and not self.tls:
            lines.append(f"Proxy-Authorization: {self._proxy_auth}\r\n")
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if length is not None:
            lines.append(f"Content-Length: {length}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def request(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        head: bytes | None = None,
    ) -> Response:
        """Send a request; return once the answer's status and headers are in.

        ``head``: the request line and headers already built by ``head()`` (a caller that
        sends the same headers every time builds them once).
        """
        if head is None:
            head = self.head(method, path, headers, len(body) if body or method == "POST" else None)
        data = head + body
        for _ in range(3):  # stale pooled connections are retried on the next one
            conn = await self._acquire()
            try:
                response = conn.send(data, self.read_timeout_s)
                assert conn.headers_ready is not None
                await conn.headers_ready
                return response
            except StaleConnection:
                continue
            except BaseException:
                conn.abandon()
                raise
        conn = await self._acquire(fresh=True)
        response = conn.send(data, self.read_timeout_s)
        assert conn.headers_ready is not None
        try:
            await conn.headers_ready
        except BaseException:
            conn.abandon()
            raise
        return response

    async def _acquire(self, *, fresh: bool = False) -> _Connection:
        if self._closed:
            raise HttpClientError("The client is closed.")
        if fresh:
            return await self._connect()
        now = self.loop.time()
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None and now - conn.idle_since < self.keepalive_s:
                conn.reused = True
                return conn
            conn.abandon()
        if len(self._open) >= self.max_connections:
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    handed = waiter.result()
                    if handed is not None:
                        self.put_back(handed)
                    else:
                        self._hand_slot()
                raise
            if handed is not None:
                handed.reused = True
                return handed
        return await self._connect()

    async def _connect(self) -> _Connection:
        conn = _Connection(self)
        self._open.add(conn)
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if self.proxy is not None and self.tls:
                    await self._tunnel(conn, *self.proxy)
                else:
                    host, port = self.proxy or (self.host, self.port)
                    await self.loop.create_connection(
                        lambda: conn,
                        host,
                        port,
                        ssl=self.ssl_context if self.proxy is None else None,
                        server_hostname=self.host if self.tls else None,
                    )
        except BaseException:
            self.forget(conn)
            raise
        return conn

    async def _tunnel(self, conn: _Connection, proxy_host: str, proxy_port: int) -> None:
        """HTTPS through an HTTP proxy: ``CONNECT host:port``, then TLS to the origin inside it."""
        reply = _TunnelReply()
        transport, _ = await self.loop.create_connection(lambda: reply, proxy_host, proxy_port)
        try:
            authority = f"{self.host if ':' not in self.host else f'[{self.host}]'}:{self.port}"
            lines = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"]
            if self._proxy_auth is not None:
                lines.append(f"Proxy-Authorization: {self._proxy_auth}\r\n")
            transport.write(("".join(lines) + "\r\n").encode("latin-1"))
            head = await reply.done
            status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
            fields = status_line.split(" ", 2)
            if len(fields) < 2 or fields[1] != "200":
                raise HttpClientError(f"The proxy refused the tunnel: {status_line[:200]}")
            if head.index(b"\r\n\r\n") + 4 != len(head):
                raise HttpClientError("The proxy sent bytes after its answer to CONNECT.")
            assert self.ssl_context is not None
            tls = await self.loop.start_tls(transport, conn, self.ssl_context, server_hostname=self.host)
        except BaseException:
            transport.close()
            raise
        if tls is None:
            raise HttpClientError("TLS could not start inside the proxy tunnel.")
        conn.connection_made(tls)

    def put_back(self, conn: _Connection) -> None:
        """A connection whose answer was read to the end: to a waiter, or to the idle list."""
        if conn.transport is None or self._closed:
            conn.abandon()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def forget(self, conn: _Connection) -> None:
        """A connection closed: its slot goes to the next waiter (who opens a new one)."""
        if conn in self._open:
            self._open.discard(conn)
            if conn in self._idle:
                self._idle.remove(conn)
            self._hand_slot()

    def _hand_slot(self) -> None:
        """Tell the first waiter that it may open a connection."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def close(self) -> None:
        self._closed = True
        for conn in list(self._open):
            conn.abandon()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(HttpClientError("The client is closed."))
        self._waiters.clear()
