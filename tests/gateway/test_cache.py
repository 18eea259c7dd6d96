"""The prompt cache: hits skip the upstream (streamed or not), TTL, shared tier, coalescing."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TypedDict

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionStreamOptionsParam
from sqlmodel import col

from gateway.cache import cache_key
from tests.conftest import RunningGateway, make_policy, start_gateway


class Ask(TypedDict):
    """The keyword arguments of a cacheable chat completion (unpacked into the SDK's ``create``)."""

    model: str
    messages: list[ChatCompletionMessageParam]
    temperature: float


class StreamedAsk(Ask):
    stream_options: ChatCompletionStreamOptionsParam


ASK: Ask = {"model": "teacher-large", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}


def test_repeat_is_served_from_cache_without_upstream_call(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    first = client.chat.completions.with_raw_response.create(**ASK)
    second = client.chat.completions.with_raw_response.create(**ASK)
    assert state.stats.chat == 1
    assert first.headers["x-distillgate-cache"] == "miss"
    assert second.headers["x-distillgate-cache"] == "hit"
    assert second.headers["x-distillgate-target"] == "cache"
    assert second.parse().model_dump() == first.parse().model_dump()
    gateway.flush()
    from sqlmodel import select

    from gateway.store.models import Record

    with gateway.db().session() as session:
        rows = session.exec(select(Record).order_by(col(Record.created_at))).all()
    assert [(r.target, r.cache_hit) for r in rows] == [("teacher", False), ("cache", True)]
    assert rows[1].cost_usd == 0 and rows[1].teacher_cost_usd == rows[0].cost_usd > 0


def test_streamed_request_hits_cache_and_replays_a_proper_stream(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    body: StreamedAsk = {**ASK, "stream_options": {"include_usage": True}}
    streamed = list(client.chat.completions.create(stream=True, **body))
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    # Wait until the assembled stream is cached, then ask again, streamed and not.
    deadline = time.time() + 5
    while time.time() < deadline and not gateway.gateway.cache._lru:
        time.sleep(0.02)
    replay = client.chat.completions.with_raw_response.create(stream=True, **body)
    assert replay.headers["x-distillgate-cache"] == "hit"
    chunks = list(replay.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert (
        chunks[-1].usage is not None
        and streamed[-1].usage is not None
        and chunks[-1].usage.completion_tokens == streamed[-1].usage.completion_tokens
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    plain = client.chat.completions.create(**ASK)
    assert plain.choices[0].message.content == text
    assert state.stats.chat == 1


@pytest.mark.parametrize("extra", [{"temperature": 0.7}, {}, {"temperature": 0, "n": 2}])
def test_non_deterministic_requests_are_not_cached(gateway: RunningGateway, teacher, extra: dict) -> None:
    state, _ = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    body = {"model": "m", "messages": [{"role": "user", "content": "vary"}], **extra}
    for _ in range(2):
        r = client.chat.completions.with_raw_response.create(**body)
        assert r.headers.get("x-distillgate-cache") is None
    assert state.stats.chat == 2


def test_seed_makes_a_request_cacheable(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    for _ in range(3):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "seeded"}], seed=42)
    assert state.stats.chat == 1


def test_cache_control_from_client_is_honoured(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    client.chat.completions.create(**ASK)
    client.chat.completions.create(**ASK, extra_headers={"Cache-Control": "no-cache"})  # fresh, then stored
    client.chat.completions.create(**ASK, extra_headers={"Cache-Control": "no-store"})
    assert state.stats.chat == 3
    client.chat.completions.create(**ASK)
    assert state.stats.chat == 3


def test_key_ignores_key_order_and_delivery_fields() -> None:
    a = {
        "model": "m",
        "messages": [{"role": "user", "content": "x"}],
        "temperature": 0,
        "stream": True,
        "metadata": {"task": "t"},
        "user": "u1",
    }
    b = {"temperature": 0, "messages": [{"content": "x", "role": "user"}], "model": "m"}
    assert cache_key("t", a) == cache_key("t", b)
    assert cache_key("t", a) != cache_key("other-task", a)
    assert cache_key("t", a) != cache_key("t", {**b, "max_tokens": 5})


def test_ttl_expiry(teacher, sqlite_url: str, tmp_path: Path) -> None:
    state, teacher_server = teacher
    policy = make_policy(teacher_server.url, defaults={"cache": {"ttl": "1s"}})
    server, _, key = start_gateway(sqlite_url, policy, tmp_path)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key)
        client.chat.completions.create(**ASK)
        client.chat.completions.create(**ASK)
        assert state.stats.chat == 1
        time.sleep(1.2)
        r = client.chat.completions.with_raw_response.create(**ASK)
        assert r.headers["x-distillgate-cache"] == "miss"
        assert state.stats.chat == 2
    finally:
        server.stop()


def test_second_instance_hits_the_shared_tier(teacher, database_url: str, tmp_path: Path) -> None:
    state, teacher_server = teacher
    policy = make_policy(teacher_server.url)
    a, gw_a, key = start_gateway(database_url, policy, tmp_path / "a")
    b, _, _ = start_gateway(database_url, policy, tmp_path / "b")
    try:
        openai.OpenAI(base_url=a.url + "/v1", api_key=key).chat.completions.create(**ASK)
        deadline = time.time() + 5
        while time.time() < deadline and not gw_a.cache.entries("default"):
            time.sleep(0.05)
        r = openai.OpenAI(base_url=b.url + "/v1", api_key=key).chat.completions.with_raw_response.create(
            **ASK
        )
        assert r.headers["x-distillgate-cache"] == "hit"
        assert state.stats.chat == 1
    finally:
        a.stop()
        b.stop()


async def test_concurrent_identical_misses_reach_the_teacher_once(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    state.delay_s = 0.3  # keep the first call in flight while the others arrive
    body = {**ASK, "messages": [{"role": "user", "content": "fifty at once"}]}
    async with httpx.AsyncClient(
        base_url=gateway.v1,
        headers={"Authorization": f"Bearer {gateway.key}"},
        limits=httpx.Limits(max_connections=60),
        timeout=30,
    ) as client:
        replies = await asyncio.gather(*(client.post("/chat/completions", json=body) for _ in range(50)))
    assert all(r.status_code == 200 for r in replies)
    assert len({r.json()["choices"][0]["message"]["content"] for r in replies}) == 1
    assert state.stats.chat == 1
    assert sum(r.headers.get("x-distillgate-cache") == "hit" for r in replies) == 49


async def test_a_failed_leader_does_not_fail_its_followers(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    state.delay_s = 0.2
    state.fail_next = [400]
    body = {**ASK, "messages": [{"role": "user", "content": "leader fails"}]}
    async with httpx.AsyncClient(
        base_url=gateway.v1, headers={"Authorization": f"Bearer {gateway.key}"}, timeout=30
    ) as client:
        replies = await asyncio.gather(*(client.post("/chat/completions", json=body) for _ in range(5)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 200, 200, 200, 400]
