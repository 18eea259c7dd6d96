"""Bad input gets the right 4xx with an OpenAI-shaped error, never a 500."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.conftest import RunningGateway
from tests.servers import wait_until


def assert_openai_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


@pytest.fixture
def http(gateway: RunningGateway):
    with httpx.Client(base_url=gateway.v1, headers={"Authorization": f"Bearer {gateway.key}"}) as client:
        yield client


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m"}, "messages"),
        ({"model": 3, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "m", "messages": "hello"}, "messages"),
        ({"model": "m", "messages": []}, "messages"),
        ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"content": "x"}]}, "messages[0].role"),
        ({"model": "m", "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 7}, "temperature"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
        (
            {"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": {"task": 1}},
            "metadata.task",
        ),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": "all"}, "tools"),
    ],
)
def test_wrong_fields_are_400_naming_the_param(http: httpx.Client, body: dict, param: str) -> None:
    error = assert_openai_error(http.post("/chat/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "raw", [b"{not json", b"", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"model": "m", "messages": [}']
)
def test_malformed_json_is_400(http: httpx.Client, raw: bytes) -> None:
    assert_openai_error(
        http.post("/chat/completions", content=raw, headers={"content-type": "application/json"}), 400
    )


def test_oversized_body_is_413(gateway: RunningGateway, http: httpx.Client) -> None:
    big = "x" * (gateway.gateway.settings.max_body_bytes + 10)
    r = http.post("/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": big}]})
    assert_openai_error(r, 413)


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer wrong-key", "Basic abc", "bearer dg-nope"])
def test_bad_or_missing_key_is_401(gateway: RunningGateway, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = httpx.post(
        gateway.v1 + "/chat/completions",
        headers=headers,
        json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
    )
    error = assert_openai_error(r, 401)
    assert "wrong-key" not in error["message"] and "dg-nope" not in error["message"]


def test_a_flood_of_made_up_keys_costs_the_database_almost_nothing(gateway: RunningGateway) -> None:
    from gateway.auth import MISS_LOOKUPS_PER_S, generate_key
    from gateway.keys import create_key

    ring = gateway.gateway.keys
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    before, started = ring.lookups, time.monotonic()
    with httpx.Client(base_url=gateway.v1) as client:
        for i in range(400):
            token = generate_key() if i % 2 else f"sk-made-up-{i}"  # shaped like ours, or not
            r = client.post("/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 401, r.text
    elapsed = time.monotonic() - started
    assert ring.lookups - before <= MISS_LOOKUPS_PER_S * (1 + elapsed) + 1
    # A new key asked for by many requests at once costs one lookup, whatever the budget.
    _, burst_key = create_key(gateway.db(), "burst")
    lookups = ring.lookups

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=gateway.v1, headers={"Authorization": f"Bearer {burst_key}"}
        ) as ac:
            replies = await asyncio.gather(*(ac.post("/chat/completions", json=body) for _ in range(50)))
        return [r.status_code for r in replies]

    time.sleep(1.0)  # let the budget refill a little after the flood
    assert asyncio.run(burst()) == [200] * 50
    assert ring.lookups - lookups <= 1
    # A key created now still works: at once while lookups are left, else after the next refresh.
    _, fresh = create_key(gateway.db(), "fresh")
    with httpx.Client(base_url=gateway.v1, headers={"Authorization": f"Bearer {fresh}"}) as client:
        wait_until(lambda: client.post("/chat/completions", json=body).status_code == 200, 15)


def test_openai_sdk_raises_authentication_error(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key="dg-not-a-real-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])


def test_admin_routes_need_the_admin_credential(gateway: RunningGateway) -> None:
    r = httpx.post(gateway.url + "/admin/recorder/flush", headers={"Authorization": f"Bearer {gateway.key}"})
    assert_openai_error(r, 403)
    r = httpx.post(gateway.url + "/admin/recorder/flush")
    assert_openai_error(r, 401)
    r = httpx.post(
        gateway.url + "/admin/recorder/flush", headers={"Authorization": f"Bearer {gateway.admin_key}"}
    )
    assert r.status_code == 200


def test_unknown_route_and_wrong_method_are_openai_errors(http: httpx.Client) -> None:
    assert_openai_error(http.post("/nope", json={}), 404)
    assert_openai_error(r := http.get("/chat/completions"), 405)
    assert r.headers["allow"] == "POST"
    assert_openai_error(http.put("/embeddings", json={}), 405)


def test_bad_requests_reach_no_upstream_and_leave_no_500(
    gateway: RunningGateway, teacher, http: httpx.Client
) -> None:
    state, _ = teacher
    for raw in (b"{", b"{}", b'{"model": "m", "messages": [{"role": "user"}], "n": 500}'):
        assert http.post("/chat/completions", content=raw).status_code == 400
    assert state.stats.chat == 0


def test_feedback_attaches_to_a_record_and_unknown_ids_are_404(
    gateway: RunningGateway, http: httpx.Client
) -> None:
    r = http.post(
        "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "rate me"}]}
    )
    rid = r.headers["x-distillgate-request-id"]
    ok = http.post("/feedback", json={"request_id": rid, "score": -1, "comment": "wrong"})
    assert ok.status_code == 200, ok.text
    assert_openai_error(http.post("/feedback", json={"request_id": "nope", "score": 1}), 404, "request_id")
    assert_openai_error(http.post("/feedback", json={"score": 1}), 400, "request_id")
    from gateway.store.models import Record

    with gateway.db().session() as session:
        record = session.get(Record, rid)
        assert record is not None and record.feedback == {"score": -1.0, "comment": "wrong"}
