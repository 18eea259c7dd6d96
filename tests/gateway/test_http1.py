"""The hot-path HTTP/1.1 client against scripted servers speaking raw bytes (the upstream is not
ours, so the stand-ins here misbehave the ways real servers do: closing idle keep-alive
connections, chunked streams, answers that end at EOF, silence, TLS)."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.http1 import HttpClientError, Pool, ReadTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return lines[0].encode(), headers, body


def answer(body: bytes, *, status: int = 200, extra: str = "") -> bytes:
    return (
        f"HTTP/1.1 {status} OK\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


class Server:
    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []
        self.writers: list[asyncio.StreamWriter] = []


@asynccontextmanager
async def serve(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[str, Server]]:
    state = Server()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        state.writers.append(writer)
        try:
            await handler(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    scheme = "https" if ssl_context else "http"
    try:
        yield f"{scheme}://{'localhost' if ssl_context else '127.0.0.1'}:{port}/v1", state
    finally:
        server.close()
        for writer in state.writers:
            writer.close()


def echo_server(state_requests: list[tuple[bytes, dict[str, str], bytes]] | None = None) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            line, headers, body = await read_request(reader)
            if state_requests is not None:
                state_requests.append((line, headers, body))
            writer.write(answer(b'{"echo":' + (body or b"null") + b"}"))
            await writer.drain()

    return handler


async def test_keep_alive_reuses_one_connection_and_sends_the_exact_bytes() -> None:
    seen: list[tuple[bytes, dict[str, str], bytes]] = []
    async with serve(echo_server(seen)) as (url, state):
        pool = Pool(url)
        for i in range(5):
            response = await pool.request(
                "POST", "/chat/completions", {"Authorization": "Bearer k"}, b'{"n":%d}' % i
            )
            assert response.status == 200 and response.headers["content-type"] == "application/json"
            assert await response.read() == b'{"echo":{"n":%d}}' % i
        await pool.close()
    assert state.connections == 1
    line, headers, body = seen[0]
    assert line == b"POST /v1/chat/completions HTTP/1.1"
    assert headers["authorization"] == "Bearer k" and headers["host"] == url.split("//")[1].split("/")[0]
    assert body == b'{"n":0}'


async def test_a_connection_the_server_closed_while_idle_is_replaced_without_an_error() -> None:
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))  # keep-alive advertised, then closed: the classic race
        await writer.drain()

    async with serve(one_per_connection) as (url, state):
        pool = Pool(url)
        for _ in range(3):
            response = await pool.request("POST", "/x", {}, b"{}")
            assert await response.read() == b"{}"
            await asyncio.sleep(0.05)  # the server's close reaches the idle connection
        await pool.close()
    assert state.connections == 3


async def test_a_reused_connection_closed_before_any_answer_byte_is_retried_on_a_fresh_one() -> None:
    async def answers_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(b"{}"))
        await writer.drain()
        await read_request(reader)  # the server's idle timer fired as the request arrived
        writer.transport.abort()

    async with serve(answers_once) as (url, state):
        pool = Pool(url)
        assert await (await pool.request("POST", "/x", {}, b"{}")).read() == b"{}"
        assert await (await pool.request("POST", "/x", {}, b"{}")).read() == b"{}"
        await pool.close()
    assert state.connections == 2


async def test_chunked_stream_arrives_piece_by_piece_as_sent() -> None:
    gate = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for i in range(3):
            event = b"data: %d\n\n" % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await gate.wait()
            gate.clear()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await read_request(reader)  # the connection is reused afterwards
        writer.write(answer(b"{}"))
        await writer.drain()
        await asyncio.sleep(1)

    async with serve(chunked) as (url, state):
        pool = Pool(url)
        response = await pool.request("POST", "/x", {}, b"{}")
        pieces = []
        async for piece in response.iter_chunks():
            pieces.append(piece)  # each event arrives before the server sends the next
            gate.set()
        assert pieces == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
        assert await (await pool.request("POST", "/x", {}, b"{}")).read() == b"{}"
        await pool.close()
    assert state.connections == 1


async def test_an_answer_without_length_ends_at_eof_and_a_cut_one_is_an_error() -> None:
    async def to_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, _, body = await read_request(reader)
        if body == b"eof":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        await writer.drain()

    async with serve(to_eof) as (url, _):
        pool = Pool(url)
        assert await (await pool.request("POST", "/x", {}, b"eof")).read() == b"all of it"
        response = await pool.request("POST", "/x", {}, b"cut")
        with pytest.raises(HttpClientError, match="mid-answer"):
            await response.read()
        await pool.close()


async def test_silence_past_the_read_timeout_fails_and_refused_connections_raise_oserror() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with serve(silent) as (url, _):
        pool = Pool(url, read_timeout_s=0.2)
        with pytest.raises(ReadTimeout):
            await pool.request("POST", "/x", {}, b"{}")
        await pool.close()
    with pytest.raises(OSError):
        await Pool(url).request("POST", "/x", {}, b"{}")  # the server is gone


async def test_the_pool_never_opens_more_than_its_limit_and_serves_waiters_in_turn() -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            _, _, body = await read_request(reader)
            await asyncio.sleep(0.02)
            writer.write(answer(body))
            await writer.drain()

    async with serve(slow) as (url, state):
        pool = Pool(url, max_connections=3)

        async def one(i: int) -> bytes:
            return await (await pool.request("POST", "/x", {}, b"%d" % i)).read()

        answers = await asyncio.gather(*(one(i) for i in range(12)))
        assert answers == [b"%d" % i for i in range(12)]
        await pool.close()
    assert state.connections == 3


async def test_an_abandoned_stream_closes_its_connection(tmp_path: Path) -> None:
    closed = asyncio.Event()

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            while True:
                writer.write(b"5\r\nhello\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)
        except ConnectionError:
            closed.set()

    async with serve(endless) as (url, _):
        pool = Pool(url)
        response = await pool.request("POST", "/x", {}, b"{}")
        chunks = response.iter_chunks()
        assert await anext(chunks) == b"hello"
        await chunks.aclose()  # the client went away
        await asyncio.wait_for(closed.wait(), 5)
        await pool.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_tls_with_verification(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    async with serve(echo_server(), server_ctx) as (url, _):
        trusting = ssl.create_default_context(cafile=str(cert))
        pool = Pool(url, ssl_context=trusting)
        assert await (await pool.request("POST", "/x", {}, b"1")).read() == b'{"echo":1}'
        await pool.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # an unknown CA is refused
            await Pool(url).request("POST", "/x", {}, b"1")
