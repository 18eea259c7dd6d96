"""Bounded load generators on loopback: wrk for closed loops, our own raw-asyncio client for the rest.

- ``run_wrk``: closed loop at N connections through Debian's ``wrk`` (C; cheapest on a 2-core box).
- ``closed_loop``: the same in Python, used when wrk is absent and where exact counts matter
  (every request it sends is waited for, so client counts can be compared with server records).
- ``open_loop``: requests at a fixed rate whatever the server does; each latency is measured from
  the request's *intended* send time, so queueing delay is counted (no coordinated omission).
  Debian has no wrk2, hence ours.
- ``stream_probe``: sequential streamed requests; per chunk, the delay between the upstream's send
  stamp (``bench/upstream.py`` writes ``t<monotonic_ns>;`` into each chunk) and its arrival here.

CLI: ``python bench/loadgen.py URL [--connections 64 | --rate 1000 | --stream 50] --duration 5``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import shutil
import subprocess
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

CHAT_PATH = "/v1/chat/completions"
_STAMP = re.compile(rb"t(\d{6,});")


def chat_body(stream: bool = False, deterministic: bool = False, content: str = "Say hello.") -> bytes:
    """A small chat request. ``deterministic`` (temperature 0) makes it cacheable; else temperature 0.7."""
    body: dict[str, Any] = {
        "model": "bench-model",
        "messages": [
            {"role": "system", "content": "You are a benchmark."},
            {"role": "user", "content": content},
        ],
        "temperature": 0.0 if deterministic else 0.7,
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body, separators=(",", ":")).encode()


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list (``q`` in 0..100); NaN when empty."""
    if not sorted_values:
        return float("nan")
    rank = max(0, min(len(sorted_values) - 1, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[rank]


@dataclass
class LoadResult:
    """What one load phase saw. Latencies are in milliseconds."""

    mode: str
    connections: int
    duration_s: float
    requests: int = 0
    """Responses received (any status)."""
    ok: int = 0
    """Responses with a 2xx status."""
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    """Requests that got no response: connect/read/write errors and timeouts."""
    rate: float | None = None
    """Offered rate (open loop)."""
    p50: float = float("nan")
    p90: float = float("nan")
    p99: float = float("nan")
    p999: float = float("nan")
    max: float = float("nan")
    elapsed_s: float = float("nan")
    """Open loop: offered window plus the drain of the last answers."""
    lag_p99: float = float("nan")
    """Open loop: p99 of how late the generator issued requests (its own timer/CPU delay), ms."""
    samples: dict[int, bytes] = field(default_factory=dict)
    """The first body seen for each non-2xx status (to check error shapes)."""
    latencies: list[float] = field(default_factory=list, repr=False)
    """Every latency (ms), kept by the Python generators only."""

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def set_latencies(self, values: list[float]) -> None:
        values.sort()
        self.latencies = values
        self.p50, self.p90, self.p99, self.p999 = (percentile(values, q) for q in (50, 90, 99, 99.9))
        self.max = values[-1] if values else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "connections": self.connections,
            "rate": self.rate,
            "duration_s": round(self.duration_s, 3),
            "requests": self.requests,
            "ok": self.ok,
            "rps": round(self.rps, 1),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": self.errors,
            "generator_lag_p99_ms": self.lag_p99,
            "latency_ms": {
                "p50": self.p50,
                "p90": self.p90,
                "p99": self.p99,
                "p99.9": self.p999,
                "max": self.max,
            },
        }


# ---------------------------------------------------------------- wrk (closed loop, C)

_WRK_SCRIPT = """
local f = assert(io.open(%(body_file)s, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50":%%f,"p90":%%f,"p99":%%f,"p999":%%f,"max":%%f}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
"""


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def run_wrk(
    url: str,
    body: bytes,
    connections: int,
    duration_s: float,
    headers: dict[str, str] | None = None,
    threads: int = 1,
    timeout_s: float = 10.0,
    delay_ms: int | None = None,
) -> LoadResult:
    """A closed loop with wrk. Requests still in flight when the time is up are not counted.

    ``delay_ms``: each connection waits about this long (uniform from half to one and a half
    times it) between an answer and its next request (wrk's ``delay()`` hook), which paces the load at about ``connections / (delay + latency)``
    requests/s for a fraction of the CPU a generator in Python needs at the same rate.
    """
    with tempfile.TemporaryDirectory(prefix="dg-wrk-") as tmp:
        body_file = Path(tmp) / "body.json"
        body_file.write_bytes(body)
        header_lines = "\n".join(
            f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in (headers or {}).items()
        )
        script = Path(tmp) / "post.lua"
        lua = _WRK_SCRIPT % {"body_file": json.dumps(str(body_file)), "headers": header_lines}
        if delay_ms is not None:
            # Uniform around the mean, so the connections do not fall into step and arrive in bursts.
            low, high = max(0, delay_ms // 2), delay_ms + delay_ms // 2
            lua += f"delay = function() return math.random({low}, {high}) end\n"
        script.write_text(lua)
        cmd = [
            "wrk",
            f"-t{min(threads, connections)}",
            f"-c{connections}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-500:]} {proc.stderr[-500:]}")
    data = json.loads(line[len("WRKJSON ") :])
    result = LoadResult("closed", connections, data["duration_us"] / 1e6)
    result.requests = data["requests"]
    result.errors = data["connect"] + data["read"] + data["write"] + data["timeout"]
    result.ok = data["requests"] - data["status"]  # wrk counts statuses > 399 as errors.status
    result.statuses = {200: result.ok} if data["status"] == 0 else {200: result.ok, 0: data["status"]}
    result.p50, result.p90, result.p99, result.p999, result.max = (
        data[k] / 1000 for k in ("p50", "p90", "p99", "p999", "max")
    )
    return result


# ---------------------------------------------------------------- our raw HTTP/1.1 client


class HttpError(Exception):
    """No usable response: the connection failed, closed early or timed out."""


_CL = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)
_CLOSE = re.compile(rb"\r\nconnection:[ \t]*close", re.IGNORECASE)


class Response:
    __slots__ = ("body", "first_byte_ns", "head", "keep_alive", "status")

    def __init__(self, status: int, head: bytes, body: bytes, keep_alive: bool, first_byte_ns: int) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.keep_alive = keep_alive
        self.first_byte_ns = first_byte_ns

    def header(self, name: str) -> str | None:
        """A response header's value (first occurrence), matched case-insensitively."""
        needle = b"\r\n" + name.lower().encode() + b":"
        start = self.head.lower().find(needle)
        if start < 0:
            return None
        start += len(needle)
        end = self.head.find(b"\r\n", start)
        return self.head[start : end if end >= 0 else None].strip().decode("latin-1")


class ClientConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; one request at a time.

    ``on_body`` (streaming probes) is called with each piece of de-chunked body and its
    arrival time (``time.monotonic_ns()``) as soon as it is decoded.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.fut: asyncio.Future[Response] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.on_body: Callable[[bytes, int], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.head = b""
        self.length: int | None = None
        self.chunked = False
        self.head_done = False
        self.keep_alive = True
        self.body = bytearray()
        self.first_byte_ns = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(HttpError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(exc)
        self.fut = None

    def request(self, raw: bytes, timeout_s: float) -> asyncio.Future[Response]:
        loop = asyncio.get_running_loop()
        self.fut = loop.create_future()
        if self.transport is None:
            self.fut.set_exception(HttpError("not connected"))
            return self.fut
        self._reset()
        self.buf.clear()
        self.timer = loop.call_later(timeout_s, self._timeout)
        self.transport.write(raw)
        return self.fut

    def _timeout(self) -> None:
        self.timer = None
        self._fail(HttpError("timeout"))
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.fut is None:
            return
        if not self.first_byte_ns:
            self.first_byte_ns = time.monotonic_ns()
        self.buf += data
        if not self.head_done:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.head = bytes(self.buf[: end + 2])
            del self.buf[: end + 4]
            self.status = int(head[9:12])
            m = _CL.search(head)
            self.length = int(m.group(1)) if m else None
            self.chunked = _CHUNKED.search(head) is not None
            self.keep_alive = _CLOSE.search(head) is None
            self.head_done = True
        if self.chunked:
            self._read_chunks()
        elif self.length is not None and len(self.buf) >= self.length:
            self._body(bytes(self.buf[: self.length]))
            self._finish()
        # neither: body ends when the connection closes (not used by the servers measured)

    def _body(self, piece: bytes) -> None:
        self.body += piece
        if self.on_body is not None and piece:
            self.on_body(piece, time.monotonic_ns())

    def _read_chunks(self) -> None:
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return
            size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(self.buf) < line_end + 4:  # "0\r\n\r\n": no trailers from these servers
                    return
                self._finish()
                return
            if len(self.buf) < line_end + 2 + size + 2:
                return
            self._body(bytes(self.buf[line_end + 2 : line_end + 2 + size]))
            del self.buf[: line_end + 2 + size + 2]

    def _finish(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        fut, self.fut = self.fut, None
        if fut is not None and not fut.done():
            fut.set_result(
                Response(self.status, self.head, bytes(self.body), self.keep_alive, self.first_byte_ns)
            )


def build_request(
    url: str, body: bytes, headers: dict[str, str] | None = None, method: str = "POST"
) -> bytes:
    parts = urlsplit(url)
    lines = [f"{method} {parts.path or '/'} HTTP/1.1", f"host: {parts.netloc}"]
    if method == "POST":
        lines += ["content-type: application/json", f"content-length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body if method == "POST" else b"")


class Pool:
    """Connections to one host, opened on demand up to ``limit``; waiters are served in order."""

    def __init__(self, host: str, port: int, limit: int) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.idle: list[ClientConnection] = []
        self.waiters: deque[asyncio.Future[ClientConnection]] = deque()
        self.open = 0
        self._tasks: set[asyncio.Future[None]] = set()

    async def _connect(self) -> ClientConnection:
        loop = asyncio.get_running_loop()
        _, proto = await loop.create_connection(ClientConnection, self.host, self.port)
        return proto

    async def acquire(self) -> ClientConnection:
        while self.idle:
            conn = self.idle.pop()
            if conn.transport is not None:
                return conn
            self.open -= 1
        if self.open < self.limit:
            self.open += 1
            try:
                return await self._connect()
            except OSError:
                self.open -= 1
                raise
        fut: asyncio.Future[ClientConnection] = asyncio.get_running_loop().create_future()
        self.waiters.append(fut)
        return await fut

    def release(self, conn: ClientConnection, reusable: bool) -> None:
        if not reusable or conn.transport is None:
            if conn.transport is not None:
                conn.transport.close()
            self.open -= 1
            while self.waiters and self.waiters[0].done():
                self.waiters.popleft()
            if self.waiters:
                self.open += 1
                task = asyncio.ensure_future(self._connect_for(self.waiters.popleft()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        self.idle.append(conn)

    async def _connect_for(self, fut: asyncio.Future[ClientConnection]) -> None:
        try:
            conn = await self._connect()
        except OSError as exc:
            self.open -= 1
            if not fut.done():
                fut.set_exception(exc)
            return
        if fut.done():
            self.release(conn, True)
        else:
            fut.set_result(conn)

    def close(self) -> None:
        for conn in self.idle:
            if conn.transport is not None:
                conn.transport.close()
        self.idle.clear()


class _Tally:
    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.samples: dict[int, bytes] = {}
        self.errors = 0

    def add(self, status: int, body: bytes, latency_ms: float) -> None:
        self.statuses[status] += 1
        self.latencies.append(latency_ms)
        if not 200 <= status < 300 and status not in self.samples:
            self.samples[status] = body[:2000]

    def result(self, mode: str, connections: int, duration_s: float) -> LoadResult:
        r = LoadResult(mode, connections, duration_s)
        r.statuses = dict(self.statuses)
        r.requests = sum(self.statuses.values())
        r.ok = sum(v for k, v in self.statuses.items() if 200 <= k < 300)
        r.errors = self.errors
        r.samples = self.samples
        r.set_latencies(self.latencies)
        return r


async def _send(pool: Pool, raw: bytes, timeout_s: float) -> Response:
    conn = await pool.acquire()
    try:
        resp = await conn.request(raw, timeout_s)
    except HttpError:
        pool.release(conn, False)
        raise
    pool.release(conn, resp.keep_alive)
    return resp


async def closed_loop(
    url: str,
    body: bytes,
    connections: int,
    duration_s: float,
    headers: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> LoadResult:
    """N connections, each sending its next request when the last answer is in; all answers awaited."""
    parts = urlsplit(url)
    raw = build_request(url, body, headers)
    tally = _Tally()
    pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80, connections)
    start = time.perf_counter()
    deadline = start + duration_s

    async def worker() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                resp = await _send(pool, raw, timeout_s)
            except (HttpError, OSError):
                tally.errors += 1
                await asyncio.sleep(0.01)
                continue
            tally.add(resp.status, resp.body, (time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    pool.close()
    return tally.result("closed", connections, elapsed)


async def open_loop(
    url: str,
    body: bytes,
    rate: float,
    duration_s: float,
    headers: dict[str, str] | None = None,
    max_connections: int = 512,
    timeout_s: float = 10.0,
    on_tick: Callable[[float], None] | None = None,
) -> LoadResult:
    """Requests at ``rate``/s for ``duration_s``, whatever the server does (no coordinated omission).

    More connections are opened while all are busy (up to ``max_connections``; past that,
    requests queue here and the wait counts in their latency). Every request sent is waited
    for (up to ``timeout_s``), so the counts are exact.
    """
    parts = urlsplit(url)
    raw = build_request(url, body, headers)
    tally = _Tally()
    pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80, max_connections)
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()

    async def one(issued: float) -> None:
        try:
            resp = await _send(pool, raw, timeout_s)
        except (HttpError, OSError):
            tally.errors += 1
            return
        tally.add(resp.status, resp.body, (time.perf_counter() - issued) * 1000)

    total = int(rate * duration_s)
    lag: list[float] = []
    start = time.perf_counter()
    sent = 0
    while sent < total:
        now = time.perf_counter()
        due = min(total, int((now - start) * rate) + 1)
        while sent < due:
            # Latency runs from the tick that issues the request, not from when a connection was
            # free: waits for the server count. The tick's own lateness (libuv timers have 1 ms
            # resolution) is the generator's, so it is reported apart as ``lag``.
            lag.append((now - start - sent / rate) * 1000)
            task = loop.create_task(one(now))
            pending.add(task)
            task.add_done_callback(pending.discard)
            sent += 1
        if on_tick is not None:
            on_tick(now - start)
        await asyncio.sleep(max(0.0, min(0.001, start + sent / rate - time.perf_counter())))
    if pending:
        await asyncio.wait(set(pending), timeout=timeout_s + 5)
    for task in list(pending):
        task.cancel()
        tally.errors += 1
    elapsed = time.perf_counter() - start
    pool.close()
    result = tally.result("open", max_connections, elapsed)
    result.rate = rate
    result.elapsed_s = elapsed
    lag.sort()
    result.lag_p99 = percentile(lag, 99)
    result.duration_s = duration_s  # the offered window; rps = answered / offered time
    return result


@dataclass
class StreamResult:
    """Streamed answers: when bytes arrived relative to when the upstream sent them (ms)."""

    requests: int
    errors: int
    ttfb: list[float]
    """Request sent → first content chunk received."""
    first_chunk: list[float]
    """Upstream sent the first chunk → it arrived here."""
    chunk: list[float]
    """Every chunk: upstream sent → arrived here."""
    chunks_per_request: float
    reads_per_request: float
    """Separate arrivals carrying content (a proxy that batches chunks shows fewer)."""

    def summary(self) -> dict[str, float]:
        out: dict[str, float] = {"requests": self.requests, "errors": self.errors}
        for name, values in (("ttfb", self.ttfb), ("first_chunk", self.first_chunk), ("chunk", self.chunk)):
            values = sorted(values)
            out[f"{name}_p50"] = percentile(values, 50)
            out[f"{name}_p99"] = percentile(values, 99)
            out[f"{name}_max"] = values[-1] if values else float("nan")
        out["chunks_per_request"] = self.chunks_per_request
        out["reads_per_request"] = self.reads_per_request
        return out


async def stream_probe(
    url: str, body: bytes, requests: int, headers: dict[str, str] | None = None, timeout_s: float = 30.0
) -> StreamResult:
    """Sequential streamed requests on one connection, timing each stamped chunk's pass-through."""
    parts = urlsplit(url)
    raw = build_request(url, body, headers)
    pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80, 1)
    ttfb: list[float] = []
    first: list[float] = []
    every: list[float] = []
    chunks = reads = errors = 0
    for _ in range(requests):
        stamps: list[tuple[int, int]] = []  # (sent_ns, received_ns)
        arrivals: set[int] = set()
        pending = bytearray()

        def on_body(
            piece: bytes,
            at_ns: int,
            stamps: Any = stamps,
            arrivals: Any = arrivals,
            pending: bytearray = pending,
        ) -> None:
            pending.extend(piece)
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                return
            complete = bytes(pending[: cut + 2])
            del pending[: cut + 2]
            found = [int(m.group(1)) for m in _STAMP.finditer(complete)]
            if found:
                arrivals.add(at_ns)
            stamps.extend((sent, at_ns) for sent in found)

        conn = await pool.acquire()
        conn.on_body = on_body
        sent_ns = time.monotonic_ns()
        try:
            resp = await conn.request(raw, timeout_s)
        except HttpError:
            pool.release(conn, False)
            errors += 1
            continue
        conn.on_body = None
        pool.release(conn, resp.keep_alive)
        if resp.status != 200 or not stamps:
            errors += 1
            continue
        ttfb.append((stamps[0][1] - sent_ns) / 1e6)
        first.append((stamps[0][1] - stamps[0][0]) / 1e6)
        every.extend((rcv - snt) / 1e6 for snt, rcv in stamps)
        chunks += len(stamps)
        reads += len(arrivals)
    pool.close()
    done = max(1, requests - errors)
    return StreamResult(requests, errors, ttfb, first, every, chunks / done, reads / done)


async def request_once(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, timeout_s: float = 10.0
) -> Response:
    """One request on a fresh connection (POST when ``body`` is given, else GET)."""
    parts = urlsplit(url)
    pool = Pool(parts.hostname or "127.0.0.1", parts.port or 80, 1)
    method = "GET" if body is None else "POST"
    try:
        return await _send(pool, build_request(url, body or b"", headers, method=method), timeout_s)
    finally:
        pool.close()


def run(coro: Any) -> Any:
    """Run a coroutine on uvloop when it is installed."""
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:9100" + CHAT_PATH)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--connections", type=int, default=1, help="closed loop at N connections")
    group.add_argument("--rate", type=float, help="open loop at this many requests/s")
    group.add_argument("--stream", type=int, help="streaming probe with this many sequential requests")
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--python", action="store_true", help="closed loop in Python even when wrk exists")
    parser.add_argument("--deterministic", action="store_true", help="temperature 0 (cacheable) body")
    args = parser.parse_args()
    if args.stream:
        res = run(stream_probe(args.url, chat_body(stream=True), args.stream))
        print(json.dumps(res.summary(), indent=2))
        return
    body = chat_body(deterministic=args.deterministic)
    if args.rate:
        result = run(open_loop(args.url, body, args.rate, args.duration))
    elif wrk_available() and not args.python:
        result = run_wrk(args.url, body, args.connections, args.duration)
    else:
        result = run(closed_loop(args.url, body, args.connections, args.duration))
    print(json.dumps(result.to_json(), indent=2))


if __name__ == "__main__":
    main()
