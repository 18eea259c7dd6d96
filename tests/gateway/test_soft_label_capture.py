"""Soft labels captured live: the record keeps the teacher's top-k, the client gets the bytes it
would have got without the capture (streamed and not), and a client's own logprobs are kept."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from litestar import Litestar, Request, post
from litestar.response import Response, Stream
from sqlmodel import select

from gateway.store.models import Record
from tests.conftest import ADMIN_KEY, make_policy, start_gateway
from tests.servers import ServerThread, serve

WORDS = ["The", " answer", " is", " 42", "."]


def _logprobs(top_k: int) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": w,
                "logprob": -0.25,
                "bytes": list(w.encode()),
                "top_logprobs": [
                    {"token": w if j == 0 else f"{w}#{j}", "logprob": -0.25 - j, "bytes": None}
                    for j in range(top_k)
                ],
            }
            for w in WORDS
        ],
        "refusal": None,
    }


def _teacher_app() -> Litestar:
    """A teacher whose answers depend on the messages only (not on what else the body asks), in
    pretty-printed JSON, with real-shaped top-k logprobs when asked."""

    @post("/v1/chat/completions", status_code=200)
    async def chat(request: Request[Any, Any, Any]) -> Any:
        body = await request.json()
        rid = "chatcmpl-" + hashlib.sha256(json.dumps(body["messages"]).encode()).hexdigest()[:16]
        top_k = int(body.get("top_logprobs") or 0) if body.get("logprobs") else -1
        if body.get("stream"):

            async def events() -> Any:
                for i, w in enumerate(WORDS):
                    lp = None
                    if top_k >= 0:
                        lp = {"content": [_logprobs(top_k)["content"][i]], "refusal": None}
                    chunk = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": "teacher-large",
                        "choices": [
                            {"index": 0, "delta": {"content": w}, "logprobs": lp, "finish_reason": None}
                        ],
                    }
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                last = {
                    "id": rid,
                    "object": "chat.completion.chunk",
                    "created": 1700000000,
                    "model": "teacher-large",
                    "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
                }
                yield b"data: " + json.dumps(last).encode() + b"\n\n"
                if (body.get("stream_options") or {}).get("include_usage"):
                    usage = {
                        "id": rid,
                        "object": "chat.completion.chunk",
                        "created": 1700000000,
                        "model": "teacher-large",
                        "choices": [],
                        "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
                    }
                    yield b"data: " + json.dumps(usage).encode() + b"\n\n"
                yield b"data: [DONE]\n\n"

            return Stream(events(), media_type="text/event-stream")
        out = {
            "id": rid,
            "object": "chat.completion",
            "created": 1700000000,
            "model": "teacher-large",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(WORDS), "refusal": None},
                    "logprobs": _logprobs(top_k) if top_k >= 0 else None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9},
        }
        return Response(json.dumps(out, indent=1).encode(), media_type="application/json")

    return Litestar([chat])


@pytest.fixture
def logprob_teacher() -> Iterator[ServerThread]:
    with serve(_teacher_app()) as server:
        yield server


def _gateway(database_url: str, teacher: ServerThread, tmp_path: Path, rate: float) -> tuple[Any, Any, str]:
    policy = make_policy(
        teacher.url, defaults={"soft_labels": {"rate": rate, "top_k": 3}, "cache": {"enabled": False}}
    )
    policy = policy.model_copy(update={"teacher": policy.teacher.model_copy(update={"api_key_env": None})})
    return start_gateway(database_url, policy, tmp_path / f"r{rate}")


def _ask(url: str, key: str, content: str, **extra: Any) -> httpx.Response:
    body = {"model": "teacher-large", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(
        url + "/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}", "x-distillgate-task": "qa"},
        timeout=30,
    )


def _records(gw: Any) -> dict[str, Record]:
    assert gw.recorder.flush(30)
    with gw.db.session() as session:
        return {r.id: r for r in session.exec(select(Record))}


def test_captured_soft_labels_are_stored_and_the_client_sees_the_uncaptured_bytes(
    database_url: str, logprob_teacher: ServerThread, tmp_path: Path
) -> None:
    plain_server, _plain_gw, plain_key = _gateway(database_url, logprob_teacher, tmp_path, 0.0)
    try:
        plain = _ask(plain_server.url, plain_key, "what is it?")
        plain_stream = _ask(plain_server.url, plain_key, "stream it", stream=True)
    finally:
        plain_server.stop()

    server, gw, key = _gateway(database_url, logprob_teacher, tmp_path, 1.0)
    try:
        captured = _ask(server.url, key, "what is it?")
        captured_stream = _ask(server.url, key, "stream it", stream=True)
        own = _ask(server.url, key, "mine", logprobs=True, top_logprobs=2)
        assert captured.status_code == captured_stream.status_code == own.status_code == 200
        # What the client gets is exactly what it gets with capture off.
        assert captured.content == plain.content
        assert captured_stream.content == plain_stream.content
        assert b"top_logprobs" not in captured.content + captured_stream.content
        # The client that asked for logprobs keeps its own (top 2).
        assert own.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"][1]["token"] == "The#1"

        records = _records(gw)
        by_id = {r.headers["x-distillgate-request-id"]: r for r in (captured, captured_stream, own)}
        for request_id, expect_k in zip(by_id, (3, 3, 2), strict=True):
            stored = records[request_id].response
            assert stored is not None
            tops = stored["choices"][0]["logprobs"]["content"]
            assert [t["token"] for t in tops] == WORDS
            assert all(len(t["top_logprobs"]) == expect_k for t in tops)
        # The stored request is the client's, not the one with the capture added.
        assert "logprobs" not in (records[captured.headers["x-distillgate-request-id"]].request or {})

        metrics = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {ADMIN_KEY}"}).text
        assert 'distillgate_soft_label_captures_total{task="qa"} 2.0' in metrics
    finally:
        server.stop()


def test_the_openai_sdk_reads_a_captured_answer_as_a_plain_one(
    database_url: str, logprob_teacher: ServerThread, tmp_path: Path
) -> None:
    server, _gw, key = _gateway(database_url, logprob_teacher, tmp_path, 1.0)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0)
        answer = client.chat.completions.create(
            model="teacher-large", messages=[{"role": "user", "content": "sdk"}], metadata={"task": "qa"}
        )
        assert answer.choices[0].logprobs is None
        assert answer.choices[0].message.content == "".join(WORDS)
        pieces = client.chat.completions.create(
            model="teacher-large",
            messages=[{"role": "user", "content": "sdk stream"}],
            metadata={"task": "qa"},
            stream=True,
        )
        chunks = list(pieces)
        assert all(c.choices[0].logprobs is None for c in chunks if c.choices)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(WORDS)
    finally:
        server.stop()
