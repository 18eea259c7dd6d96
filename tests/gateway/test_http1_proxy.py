"""The hot-path client through an HTTP proxy (corporate networks): HTTPS in a CONNECT tunnel,
plain HTTP in absolute form, proxy credentials, refusals, and the environment variables the
OpenAI SDK honours. The proxy is a scripted stand-in, like the upstreams in test_http1.py."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import uvloop

from gateway.http1 import HttpClientError, Pool, proxy_from_environment
from gateway.settings import UpstreamSettings
from gateway.upstream import Upstream
from tests.gateway.test_http1 import certificate, echo_server, serve  # noqa: F401 (fixture)

Runner = Callable[[Coroutine[Any, Any, None]], None]
RUNNERS = pytest.mark.parametrize("run", [asyncio.run, uvloop.run], ids=["asyncio", "uvloop"])


class Proxy:
    def __init__(self, refuse: int | None = None) -> None:
        self.refuse = refuse
        self.heads: list[tuple[str, dict[str, str]]] = []
        self.url = ""


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@asynccontextmanager
async def proxy_server(refuse: int | None = None) -> AsyncIterator[Proxy]:
    state = Proxy(refuse)

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        state.heads.append((lines[0], headers))
        if state.refuse is not None:
            writer.write(f"HTTP/1.1 {state.refuse} No\r\nContent-Length: 0\r\n\r\n".encode())
            writer.close()
            return
        method, target, _ = lines[0].split(" ")
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:  # absolute form: forward to the origin as it is (our stand-in origins read any form)
            origin = target.split("/")[2]
            host, _, port = origin.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            up_writer.write(head)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    state.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        yield state
    finally:
        server.close()


@RUNNERS
def test_https_goes_through_a_connect_tunnel_with_the_proxys_credentials(
    run: Runner,
    certificate: tuple[Path, Path],  # noqa: F811
) -> None:
    cert, key = certificate
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    origin_requests: list[tuple[bytes, dict[str, str], bytes]] = []

    async def scenario() -> None:
        async with serve(echo_server(origin_requests), server_ctx) as (url, origin), proxy_server() as proxy:
            auth_url = proxy.url.replace("http://", "http://user:p%40ss@")
            pool = Pool(url, ssl_context=ssl.create_default_context(cafile=str(cert)), proxy=auth_url)
            for body in (b"1", b"2"):
                answer = await pool.request("POST", "/x", {"Authorization": "Bearer k"}, body)
                assert await answer.read() == b'{"echo":' + body + b"}"
            await pool.close()
        port = url.split(":")[2].split("/")[0]
        # One tunnel carried both requests (keep-alive inside it), to the origin's name and port.
        assert [line for line, _ in proxy.heads] == [f"CONNECT localhost:{port} HTTP/1.1"]
        expected = "Basic " + base64.b64encode(b"user:p@ss").decode()
        assert proxy.heads[0][1]["proxy-authorization"] == expected
        assert origin.connections == 1
        # Inside the tunnel the origin sees an ordinary request, and never the proxy's credentials.
        assert [line for line, _, _ in origin_requests] == [b"POST /v1/x HTTP/1.1"] * 2
        assert all(
            "proxy-authorization" not in h and h["authorization"] == "Bearer k" for _, h, _ in origin_requests
        )

    run(scenario())


@RUNNERS
def test_plain_http_goes_in_absolute_form(run: Runner) -> None:
    origin_requests: list[tuple[bytes, dict[str, str], bytes]] = []

    async def scenario() -> None:
        async with serve(echo_server(origin_requests)) as (url, _), proxy_server() as proxy:
            pool = Pool(url, proxy=proxy.url.replace("http://", "http://bob:pw@"))
            assert await (await pool.request("POST", "/x", {}, b"7")).read() == b'{"echo":7}'
            await pool.close()
        origin = url.split("/")[2]
        assert proxy.heads[0][0] == f"POST http://{origin}/v1/x HTTP/1.1"
        assert proxy.heads[0][1]["proxy-authorization"] == "Basic " + base64.b64encode(b"bob:pw").decode()
        assert origin_requests[0][2] == b"7"

    run(scenario())


@RUNNERS
def test_a_proxy_that_refuses_the_tunnel_is_a_clear_error(
    run: Runner,
    certificate: tuple[Path, Path],  # noqa: F811
) -> None:
    async def scenario() -> None:
        async with proxy_server(refuse=407) as proxy:
            pool = Pool("https://api.example.com/v1", proxy=proxy.url)
            with pytest.raises(HttpClientError, match=r"refused the tunnel: HTTP/1\.1 407"):
                await pool.request("POST", "/chat/completions", {}, b"{}")
            await pool.close()

    run(scenario())


def test_the_proxy_comes_from_the_environment_as_the_openai_sdk_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (
        "HTTPS_PROXY",
        "HTTP_PROXY",
        "ALL_PROXY",
        "NO_PROXY",
        "https_proxy",
        "http_proxy",
        "all_proxy",
        "no_proxy",
    ):
        monkeypatch.delenv(name, raising=False)
    assert proxy_from_environment("https://api.openai.com/v1") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal")
    assert proxy_from_environment("https://api.openai.com/v1") == "http://proxy.corp:3128"
    assert proxy_from_environment("http://vllm.internal:8000/v1") is None  # no HTTP_PROXY
    assert proxy_from_environment("https://student.internal/v1") is None  # NO_PROXY
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp:8080")  # scheme-less, as people write it
    assert proxy_from_environment("http://teacher.example/v1") == "http://proxy.corp:8080"


async def test_the_upstream_client_uses_the_environments_proxy_unless_told_not_to(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with serve(echo_server()) as (url, _), proxy_server() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        through = Upstream("teacher", url, UpstreamSettings())
        answer = await through.send("/chat/completions", b"3")
        assert answer.status == 200
        await through.close()
        assert len(proxy.heads) == 1
        direct = Upstream("teacher", url, UpstreamSettings(trust_env=False))
        assert (await direct.send("/chat/completions", b"4")).status == 200
        await direct.close()
        assert len(proxy.heads) == 1
