"""Load shedding: past capacity, new API requests get an OpenAI-shaped 503 at once; health stays up."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from tests.conftest import make_policy, start_gateway


async def test_requests_past_capacity_are_shed_with_503_and_retry_after(
    teacher, sqlite_url: str, tmp_path: Path
) -> None:
    state, teacher_server = teacher
    state.delay_s = 0.5
    server, gw, key = start_gateway(sqlite_url, make_policy(teacher_server.url), tmp_path, max_in_flight=2)
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "busy"}]}
        async with httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            replies = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(6))
            )
            health = await client.get("/healthz")
        statuses = sorted(r.status_code for r in replies)
        assert statuses.count(200) == 2 and statuses.count(503) == 4
        shed = next(r for r in replies if r.status_code == 503)
        assert shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert health.status_code == 200
        # Only accepted requests are recorded, every one of them.
        assert gw.recorder.flush(30) and gw.recorder.written == 2
        # Capacity frees up again once the load is gone.
        again = httpx.post(
            server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        )
        assert again.status_code == 200
    finally:
        server.stop()
