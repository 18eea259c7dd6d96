"""The bare forwarder: a raw ASGI app on uvicorn + uvloop + httptools, one aiohttp client, one worker.

It is the Python floor (docs/ARCHITECTURE.md, "Measured choices"): no framework, no parsing, no recording; the
body goes to the upstream as bytes and the answer (streamed or not) comes back as it arrives.
Run: ``python bench/forwarder.py --port 9200 --upstream http://127.0.0.1:9100``.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive", "content-encoding"}


def create_forwarder(upstream: str) -> Any:
    session: aiohttp.ClientSession | None = None

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        nonlocal session
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                connector = aiohttp.TCPConnector(limit=1000, ttl_dns_cache=None)
                session = aiohttp.ClientSession(upstream, connector=connector, auto_decompress=False)
                await send({"type": "lifespan.startup.complete"})
            assert session is not None
            await session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        assert session is not None
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {"content-type": "application/json"}
        async with session.request(scope["method"], scope["path"], data=body, headers=headers) as resp:
            out = [(k.lower().encode(), v.encode()) for k, v in resp.headers.items() if k.lower() not in _HOP]
            if resp.content_length is not None:  # a whole answer: one body with its length
                payload = await resp.read()
                out.append((b"content-length", str(len(payload)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": payload})
                return
            await send({"type": "http.response.start", "status": resp.status, "headers": out})
            async for chunk in resp.content.iter_any():  # a stream: each piece as it arrives
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--upstream", default="http://127.0.0.1:9100")
    args = parser.parse_args()
    uvicorn.run(
        create_forwarder(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        workers=1,
        access_log=False,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
