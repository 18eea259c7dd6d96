"""A static OpenAI-compatible upstream for benchmarks: one raw asyncio protocol on uvloop, no framework.

It answers ``POST .../chat/completions`` with a fixed ``chat.completion`` (after an optional
fixed delay) or, when the body asks for ``"stream": true``, with an SSE stream of ``--chunks``
chunks sent ``--chunk-delay-ms`` apart. Each streamed chunk's ``content`` carries the
``time.monotonic_ns()`` at which it was written (``t<ns>;``); CLOCK_MONOTONIC is system-wide on
Linux, so a client on the same host measures each chunk's pass-through delay exactly.
``GET /healthz`` and ``GET /v1/models`` answer too.

Chosen by measurement on the 2-core dev box (wrk, same JSON body): 28k req/s at 1 connection and
121k at 64 (Debian's nginx-light with ``return 200 '...'``: 17k and 162k); either is 10x+ faster
than the bare Python forwarder it sits behind, and only a server of ours streams with delays and
send stamps, so one server does all.

Run: ``python bench/upstream.py --port 9100 [--delay-ms 0] [--chunks 10] [--chunk-delay-ms 5]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from typing import cast

import orjson

MODEL = "bench-model"

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 24,
            "completion_tokens": 10,
            "total_tokens": 34,
            "prompt_tokens_details": {"cached_tokens": 0},
        },
    }
)
MODELS = orjson.dumps({"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]})

_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_CHUNK_PREFIX = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"' + MODEL.encode() + b'","choices":[{"index":0,"delta":{'
)
_STREAM_STOP = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
    b'"model":"' + MODEL.encode() + b'","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":24,"completion_tokens":%d,"total_tokens":%d}}\n\n'
    b"data: [DONE]\n\n"
)
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
_STREAM_TRUE = re.compile(rb'"stream"\s*:\s*true')


def _response(status: bytes, body: bytes, content_type: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: "
        + content_type
        + b"\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


COMPLETION_RESPONSE = _response(b"200 OK", COMPLETION)
MODELS_RESPONSE = _response(b"200 OK", MODELS)
HEALTH_RESPONSE = _response(b"200 OK", b'{"status":"ok"}')
NOT_FOUND_RESPONSE = _response(
    b"404 Not Found",
    b'{"error":{"message":"not found","type":"invalid_request_error","param":null,"code":"not_found"}}',
)
LENGTH_REQUIRED_RESPONSE = _response(
    b"411 Length Required",
    b'{"error":{"message":"content-length required","type":"invalid_request_error",'
    b'"param":null,"code":null}}',
)


def _chunk(payload: bytes) -> bytes:
    """One HTTP/1.1 chunked-encoding frame."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def stream_event(index: int, sent_ns: int) -> bytes:
    """The SSE event for chunk ``index``, its content stamped with the send time."""
    delta = b'"role":"assistant",' if index == 0 else b""
    return _CHUNK_PREFIX + delta + b'"content":"t%d;"},"finish_reason":null}]}\n\n' % sent_ns


class UpstreamConfig:
    """How the static upstream answers."""

    def __init__(self, delay_s: float = 0.0, chunks: int = 10, chunk_delay_s: float = 0.005) -> None:
        self.delay_s = delay_s
        """Fixed delay before a non-streamed answer, and before the first streamed chunk."""
        self.chunks = chunks
        """Content chunks in a streamed answer (then one stop chunk with usage and ``[DONE]``)."""
        self.chunk_delay_s = chunk_delay_s
        """Delay between two streamed chunks."""


class UpstreamProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one request at a time per connection; enough for benchmark clients."""

    __slots__ = ("buf", "busy", "config", "loop", "transport")

    def __init__(self, config: UpstreamConfig) -> None:
        self.config = config
        self.buf = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have the same methods.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self._serve()

    def _serve(self) -> None:
        while self.transport is not None and not self.busy:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = bytes(self.buf[:head_end])
            length = 0
            if head.startswith(b"POST"):
                m = _CONTENT_LENGTH.search(head)
                if m is None:
                    self.transport.write(LENGTH_REQUIRED_RESPONSE)
                    self.transport.close()
                    return
                length = int(m.group(1))
            end = head_end + 4 + length
            if len(self.buf) < end:
                return
            body = bytes(self.buf[head_end + 4 : end])
            del self.buf[:end]
            self._answer(head, body)

    def _answer(self, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        line_end = head.find(b"\r\n")
        method, _, rest = head[: line_end if line_end >= 0 else len(head)].partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method == b"POST" and path.endswith(b"/chat/completions"):
            if b'"stream"' in body and _STREAM_TRUE.search(body):
                self.busy = True
                self.transport.write(_STREAM_HEAD)
                self._later(self.config.delay_s, lambda: self._stream(0))
            elif self.config.delay_s > 0:
                self.busy = True
                self._later(self.config.delay_s, self._delayed_completion)
            else:
                self.transport.write(COMPLETION_RESPONSE)
        elif method == b"GET" and path in (b"/healthz", b"/health"):
            self.transport.write(HEALTH_RESPONSE)
        elif method == b"GET" and path.endswith(b"/models"):
            self.transport.write(MODELS_RESPONSE)
        else:
            self.transport.write(NOT_FOUND_RESPONSE)

    def _later(self, delay_s: float, fn: Callable[[], None]) -> None:
        if delay_s > 0:
            self.loop.call_later(delay_s, fn)
        else:
            fn()

    def _delayed_completion(self) -> None:
        if self.transport is not None:
            self.transport.write(COMPLETION_RESPONSE)
        self._done()

    def _stream(self, index: int) -> None:
        if self.transport is None:
            return
        if index < self.config.chunks:
            self.transport.write(_chunk(stream_event(index, time.monotonic_ns())))
            self._later(self.config.chunk_delay_s, lambda: self._stream(index + 1))
            return
        n = self.config.chunks
        self.transport.write(_chunk(_STREAM_STOP % (n, n + 24)) + b"0\r\n\r\n")
        self._done()

    def _done(self) -> None:
        self.busy = False
        if self.buf:
            self._serve()


def _bound_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(host: str, port: int, config: UpstreamConfig) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: UpstreamProtocol(config), sock=_bound_socket(host, port), backlog=4096
    )
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def _run(host: str, port: int, config: UpstreamConfig) -> None:
    try:
        import uvloop

        uvloop.run(serve(host, port, config))
    except ImportError:
        asyncio.run(serve(host, port, config))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="delay before each answer / first chunk")
    parser.add_argument("--chunks", type=int, default=10, help="content chunks per streamed answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=5.0, help="delay between streamed chunks")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args()
    config = UpstreamConfig(args.delay_ms / 1000, args.chunks, args.chunk_delay_ms / 1000)
    children = []
    for _ in range(args.workers - 1):
        pid = os.fork()
        if pid == 0:
            _run(args.host, args.port, config)
            os._exit(0)
        children.append(pid)
    try:
        _run(args.host, args.port, config)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
