"""The gateway through the real openai SDK: clients see exactly what the teacher sent, and it is recorded."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Required, TypedDict

import httpx
import openai
import orjson
import pytest
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionStreamOptionsParam,
    ChatCompletionToolUnionParam,
)
from sqlmodel import col, select

from gateway.store.models import Record
from tests.conftest import RunningGateway
from tests.servers import wait_until


class ChatArgs(TypedDict, total=False):
    """Keyword arguments of the SDK's chat ``create`` that are also sent, as a body, straight to the teacher."""

    model: Required[str]
    messages: Required[list[ChatCompletionMessageParam]]
    temperature: float
    metadata: dict[str, str]
    stream_options: ChatCompletionStreamOptionsParam


TOOLS: list[ChatCompletionToolUnionParam] = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Find an order",
            "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
        },
    }
]


def records(gw: RunningGateway) -> list[Record]:
    gw.flush()
    with gw.db().session() as session:
        return list(session.exec(select(Record).order_by(col(Record.created_at))))


def teacher_direct(teacher_url: str, body: Mapping[str, Any]) -> dict[str, Any]:
    from tests.conftest import TEACHER_KEY

    r = httpx.post(
        teacher_url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {TEACHER_KEY}"}
    )
    return r.json()


def test_sync_chat_matches_teacher_and_is_recorded(gateway: RunningGateway, teacher) -> None:
    _, teacher_server = teacher
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    body: ChatArgs = {
        "model": "teacher-large",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "héllo wörld ✓"},
        ],
        "temperature": 0,
        "metadata": {"task": "greet"},
    }
    raw = client.chat.completions.with_raw_response.create(**body)
    completion = raw.parse()
    direct = teacher_direct(teacher_server.url, body)
    assert completion.choices[0].message.content == direct["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == direct["choices"][0]["finish_reason"]
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == {k: v for k, v in direct["usage"].items()} | {
        "prompt_tokens_details": {"cached_tokens": 0}
    }
    assert raw.headers["x-distillgate-target"] == "teacher"
    assert raw.headers["x-distillgate-task"] == "greet"
    rows = records(gateway)
    assert len(rows) == 1
    row = rows[0]
    assert row.id == raw.headers["x-distillgate-request-id"]
    assert row.task == "greet" and row.target == "teacher" and row.status == 200
    assert row.request == body
    assert row.response is not None
    assert row.response["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    assert row.finish_reason == "stop"
    assert (row.prompt_tokens, row.completion_tokens) == (
        direct["usage"]["prompt_tokens"],
        direct["usage"]["completion_tokens"],
    )
    assert row.cost_usd > 0 and row.teacher_cost_usd == row.cost_usd
    assert row.api_key_id is not None


def test_non_streamed_body_is_byte_identical(gateway: RunningGateway, teacher) -> None:
    _, teacher_server = teacher
    body = {"model": "teacher-large", "messages": [{"role": "user", "content": "bytes please"}], "seed": 7}
    via_gateway = httpx.post(
        gateway.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {gateway.key}"}
    )
    from tests.conftest import TEACHER_KEY

    direct = httpx.post(
        teacher_server.url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {TEACHER_KEY}"},
    )
    a, b = orjson.loads(via_gateway.content), orjson.loads(direct.content)
    a.pop("created"), b.pop("created")
    assert a == b
    assert via_gateway.content.replace(
        str(orjson.loads(via_gateway.content)["created"]).encode(), b""
    ) == direct.content.replace(str(orjson.loads(direct.content)["created"]).encode(), b"")


async def test_async_streaming_assembles_same_content_and_usage(gateway: RunningGateway, teacher) -> None:
    _, teacher_server = teacher
    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key=gateway.key)
    body: ChatArgs = {
        "model": "teacher-large",
        "messages": [{"role": "user", "content": "stream me a few words"}],
        "stream_options": {"include_usage": True},
    }
    stream = await client.chat.completions.create(stream=True, **body)
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    direct = teacher_direct(teacher_server.url, body)
    assert "".join(pieces) == direct["choices"][0]["message"]["content"]
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == direct["usage"]["completion_tokens"]
    (row,) = records(gateway)
    assert (
        row.stream
        and row.response is not None
        and row.response["choices"][0]["message"]["content"] == "".join(pieces)
    )
    assert row.completion_tokens == usage.completion_tokens and row.ttft_ms is not None


def test_stream_without_usage_option_is_still_priced_but_client_gets_no_usage_chunk(
    gateway: RunningGateway,
) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    chunks = list(
        client.chat.completions.create(
            model="teacher-large", messages=[{"role": "user", "content": "no usage for me"}], stream=True
        )
    )
    assert all(c.choices for c in chunks)  # no usage-only chunk was forwarded
    assert all(c.usage is None for c in chunks)
    (row,) = records(gateway)
    assert row.completion_tokens > 0 and row.cost_usd > 0


def test_tool_call_round_trip(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    completion = client.chat.completions.create(
        model="teacher-large",
        messages=[{"role": "user", "content": "where is order 42"}],
        tools=TOOLS,
        tool_choice="auto",
    )
    tool_calls = completion.choices[0].message.tool_calls
    assert tool_calls is not None
    call = tool_calls[0]
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "lookup_order"
    assert orjson.loads(call.function.arguments) == {"query": "where is order 42"}
    streamed = list(
        client.chat.completions.create(
            model="teacher-large",
            messages=[{"role": "user", "content": "where is order 42"}],
            tools=TOOLS,
            stream=True,
        )
    )
    args = ""
    for c in streamed:
        if c.choices and c.choices[0].delta.tool_calls:
            function = c.choices[0].delta.tool_calls[0].function
            assert function is not None
            args += function.arguments or ""
    assert orjson.loads(args) == {"query": "where is order 42"}
    rows = records(gateway)
    assert [r.finish_reason for r in rows] == ["tool_calls", "tool_calls"]
    assert rows[1].response is not None and rows[0].request is not None
    assert rows[1].response["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == args
    assert rows[0].request["tools"] == TOOLS


def test_json_mode_passes_through(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    completion = client.chat.completions.create(
        model="teacher-large",
        messages=[{"role": "user", "content": "give json"}],
        response_format={"type": "json_object"},
        n=2,
        logprobs=True,
        top_logprobs=2,
        user="u-1",
        stop=["\n\n"],
    )
    content = completion.choices[0].message.content
    assert content is not None
    assert orjson.loads(content) == {"answer": "give json", "length": 9}
    assert len(completion.choices) == 2
    (row,) = records(gateway)
    assert row.request is not None
    for field in ("response_format", "n", "logprobs", "top_logprobs", "user", "stop"):
        assert field in row.request


def test_store_false_keeps_no_content(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    client.chat.completions.create(
        model="teacher-large", messages=[{"role": "user", "content": "private"}], store=False
    )
    client.chat.completions.create(
        model="teacher-large",
        messages=[{"role": "user", "content": "private 2"}],
        extra_headers={"x-distillgate-store": "false"},
    )
    rows = records(gateway)
    assert len(rows) == 2
    assert all(not r.stored and r.request is None and r.response is None for r in rows)
    assert all(r.completion_tokens > 0 for r in rows)


def test_task_key_sources(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    msgs: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Classify  the email."},
        {"role": "user", "content": "hi"},
    ]
    a = client.chat.completions.with_raw_response.create(model="m", messages=msgs)
    b = client.chat.completions.with_raw_response.create(
        model="m",
        messages=[{"role": "system", "content": "Classify the   email."}, {"role": "user", "content": "x"}],
    )
    c = client.chat.completions.with_raw_response.create(
        model="m", messages=msgs, extra_headers={"x-distillgate-task": "from-header"}
    )
    d = client.chat.completions.with_raw_response.create(
        model="m",
        messages=msgs,
        metadata={"task": "from-meta"},
        extra_headers={"x-distillgate-task": "from-header"},
    )
    assert a.headers["x-distillgate-task"].startswith("sys-")
    assert a.headers["x-distillgate-task"] == b.headers["x-distillgate-task"]
    assert c.headers["x-distillgate-task"] == "from-header"
    assert d.headers["x-distillgate-task"] == "from-meta"


def test_completions_and_embeddings_pass_through(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    completion = client.completions.create(model="teacher-large", prompt="once upon")
    assert completion.choices[0].text == " completion of once upon"
    emb = client.embeddings.create(model="embed", input=["a", "b"])
    assert len(emb.data) == 2 and len(emb.data[0].embedding) == 16
    rows = records(gateway)
    assert sorted(r.endpoint for r in rows) == ["completions", "embeddings"]


def test_models_lists_teacher_model(gateway: RunningGateway) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key)
    assert [m.id for m in client.models.list()] == ["teacher-large"]


@pytest.mark.parametrize("status", [400, 429])
def test_upstream_4xx_comes_back_with_its_status(gateway: RunningGateway, status: int) -> None:
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"!error {status}"}])
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict)
    assert info.value.body["message"] == f"Scripted error {status}."
    (row,) = records(gateway)
    assert row.status == status and row.error == f"Scripted error {status}."


def test_upstream_5xx_is_retried_then_succeeds(gateway: RunningGateway, teacher) -> None:
    state, _ = teacher
    state.fail_next = [503, 502]
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    completion = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "retry me"}])
    assert completion.choices[0].message.content == "You said: retry me"
    assert state.stats.chat == 3


def test_unreachable_teacher_is_502_openai_error(gateway: RunningGateway, teacher) -> None:
    _, server = teacher
    server.stop()
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "anyone?"}])
    assert info.value.status_code == 502
    assert isinstance(info.value.body, dict)
    assert info.value.body["type"] == "upstream_error"
    (row,) = records(gateway)
    assert row.status == 502


def test_a_client_that_leaves_right_after_done_got_the_whole_answer_and_it_is_recorded_as_200(
    gateway: RunningGateway, teacher
) -> None:
    """The OpenAI SDKs stop reading at ``data: [DONE]`` and may close the connection before the
    upstream has ended its body: that answer is complete, so it is a 200 record to train on."""
    state, _ = teacher
    state.linger_s = 1.0  # the upstream ends its body a second after [DONE]
    body = {"model": "teacher-large", "messages": [{"role": "user", "content": "a b c"}], "stream": True}
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", gateway.v1 + "/chat/completions", json=body, headers=headers) as r,
    ):
        request_id = r.headers["x-distillgate-request-id"]
        for line in r.iter_lines():
            if line == "data: [DONE]":
                break  # and leave: the context managers close the connection now
    gateway.flush()
    wait_until(lambda: len(records(gateway)) == 1, 5)
    (row,) = records(gateway)
    assert (row.id, row.status, row.error, row.finish_reason) == (request_id, 200, None, "stop")
    assert row.response is not None and row.response["choices"][0]["message"]["content"] == "You said: a b c"


def test_a_client_that_leaves_mid_stream_stops_the_teachers_stream_and_is_recorded_as_499(
    gateway: RunningGateway, teacher
) -> None:
    state, _ = teacher
    state.chunk_delay_s = 0.3  # the whole answer would take several seconds
    body = {
        "model": "teacher-large",
        "messages": [{"role": "user", "content": " ".join(f"w{i}" for i in range(30))}],
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {gateway.key}"}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", gateway.v1 + "/chat/completions", json=body, headers=headers) as r,
    ):
        request_id = r.headers["x-distillgate-request-id"]
        events = 0
        for line in r.iter_lines():
            events += bool(line)
            if events == 2:
                break
        left_at = time.monotonic()
    # The gateway notices at once and closes the teacher's stream (no tokens paid for nobody).
    deadline = time.monotonic() + 3
    while state.stats.streams_cut == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.stats.streams_cut == 1 and time.monotonic() - left_at < 3
    rows = records(gateway)
    assert [(row.id, row.status, row.finish_reason) for row in rows] == [(request_id, 499, None)]
    # What was relayed before the client left is kept, marked incomplete (never trained on).
    assert rows[0].response is not None and rows[0].response["raw"].startswith("data: {")
