"""Load shedding: past capacity, new API requests get an OpenAI-shaped 503 at once; health stays up."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx

from gateway.settings import Settings
from tests.conftest import make_policy, start_gateway
from tests.servers import wait_until


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


def test_a_saturated_event_loop_sheds_new_requests_until_it_catches_up(
    teacher, sqlite_url: str, tmp_path: Path
) -> None:
    _, teacher_server = teacher
    server, gw, key = start_gateway(
        sqlite_url,
        make_policy(teacher_server.url),
        tmp_path,
        # the shipped default (conftest moves it out of the way for the other tests)
        shed_loop_lag_s=Settings.model_fields["shed_loop_lag_s"].default,
    )
    try:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        headers = {"Authorization": f"Bearer {key}"}
        assert httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        task = gw.loop_lag._task
        assert task is not None
        loop = task.get_loop()
        # Keep the gateway's loop 150 ms behind (as a flood of connections would) for a while.
        saturated = threading.Event()

        def hog() -> None:
            if not saturated.is_set():
                time.sleep(0.15)
                loop.call_later(0.001, hog)

        loop.call_soon_threadsafe(hog)
        wait_until(lambda: gw.loop_lag.lag_s > gw.settings.shed_loop_lag_s, timeout_s=10)
        shed = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=30)
        assert shed.status_code == 503 and shed.headers["retry-after"] == "1"
        assert shed.json()["error"]["code"] == "overloaded"
        assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200  # probes are never shed
        saturated.set()
        wait_until(lambda: gw.loop_lag.lag_s < gw.settings.shed_loop_lag_s / 2, timeout_s=10)
        assert httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers).status_code == 200
        # A single stall (a GC pass) does not shed: the smoothed lag moves a fraction of it.
        loop.call_soon_threadsafe(time.sleep, 0.2)
        time.sleep(0.3)
        assert gw.loop_lag.lag_s < gw.settings.shed_loop_lag_s
        assert gw.metrics.shed._value.get() == 1
    finally:
        server.stop()
