"""hypothesis on the request decoder: any bytes, any JSON, any valid chat body with one field
replaced by any JSON value: the decoder and validators either accept it (and the task name they
give can go in a header) or refuse it with a 4xx OpenAI error, never anything else. Then the
same through a running gateway: 200 or 4xx, never 5xx."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import GatewayError
from gateway.protocol import (
    MAX_DEPTH,
    CompletionRequest,
    EmbeddingRequest,
    check_chat,
    check_metadata,
    decode_body,
    task_key,
    validate,
)
from tests.conftest import RunningGateway
from tests.faults.conftest import FaultTable
from tests.faults.teacher import FaultyTeacher, gateway_before, records
from tests.servers import fresh_postgres_database

EXAMPLES = int(os.environ.get("DISTILLGATE_HYPOTHESIS_EXAMPLES", "400"))

_text = st.text(st.characters(codec="utf-8"), max_size=30) | st.sampled_from(
    ["", " ", "a\u0000b", "タスク", "a\r\nb", "t" * 201, "emails/classify"]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | _text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_text, children, max_size=4),
    max_leaves=20,
)
CHAT: dict[str, Any] = {
    "model": "teacher-large",
    "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
    "metadata": {"task": "t"},
    "temperature": 0,
}
FIELDS = [*CHAT, "n", "stream", "stop", "max_tokens", "tools", "seed", "top_logprobs", "x"]


def _deep(depth: int) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    return value


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Raw bytes, any JSON document, or a chat body with one field (or a metadata value) replaced."""
    kind = draw(st.sampled_from(["bytes", "json", "field", "metadata", "deep", "big"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "big":  # past 64 bits: JSON allows it, orjson reads it as a float
        return orjson.dumps(CHAT)[:-1] + b', "seed": 123456789012345678901234567890}'
    if kind == "json":
        return orjson.dumps(draw(json_values))
    body = dict(CHAT)
    if kind == "field":
        body[draw(st.sampled_from(FIELDS))] = draw(json_values)
    elif kind == "metadata":
        body["metadata"] = {draw(_text): draw(json_values)}
    else:
        body["x"] = _deep(draw(st.integers(MAX_DEPTH - 3, MAX_DEPTH + 3)))
    return orjson.dumps(body)


def _decode(raw: bytes, header: str | None) -> str:
    """What the pipeline does with a body before anything is called: the task name it files under."""
    body = decode_body(raw)
    req = check_chat(body)
    return task_key(req.metadata, header, req)


@given(raw=bodies(), header=st.none() | _text)
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_decoder_accepts_or_refuses_with_a_4xx(raw: bytes, header: str | None) -> None:
    try:
        task = _decode(raw, header)
    except GatewayError as exc:
        assert 400 <= exc.status < 500
        assert set(exc.body()["error"]) == {"message", "type", "param", "code"}
        orjson.dumps(exc.body())  # the error itself can be written
        return
    assert 1 <= len(task) <= 200 and task.isascii() and task.isprintable()
    task.encode("latin-1")  # it goes in the x-distillgate-task header


@given(raw=bodies())
@settings(max_examples=EXAMPLES // 2, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_simple_endpoints_decoder_accepts_or_refuses_with_a_4xx(raw: bytes) -> None:
    shapes: tuple[type[CompletionRequest] | type[EmbeddingRequest], ...] = (
        CompletionRequest,
        EmbeddingRequest,
    )
    for shape in shapes:
        try:
            req = validate(decode_body(raw), shape)
            check_metadata(req.metadata)
            task_key(req.metadata, None, None)
        except GatewayError as exc:
            assert 400 <= exc.status < 500


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[RunningGateway]:
    with (
        FaultyTeacher() as teacher,
        fresh_postgres_database() as url,
        gateway_before(teacher, url, tmp_path) as gw,
    ):
        yield gw


@pytest.mark.postgres
def test_random_bodies_through_the_gateway_are_never_a_5xx(
    gateway: RunningGateway, fault_table: FaultTable
) -> None:
    statuses: Counter[int] = Counter()
    client = httpx.Client(
        base_url=gateway.v1,
        headers={"Authorization": f"Bearer {gateway.key}", "Content-Type": "application/json"},
    )

    @given(raw=bodies())
    @settings(
        max_examples=EXAMPLES // 4, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def post(raw: bytes) -> None:
        r = client.post("/chat/completions", content=raw, timeout=30)
        statuses[r.status_code] += 1
        assert r.status_code < 500, r.text[:300]
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}

    with client:
        post()
    answered = statuses[200]
    found = len(records(gateway, status=200))
    summary = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
    fault_table.row(
        f"hypothesis: {sum(statuses.values())} random chat bodies", f"0 x 5xx ({summary})", answered, found
    )
    assert found == answered
