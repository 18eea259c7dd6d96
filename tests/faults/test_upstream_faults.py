"""A teacher that misbehaves after it was asked (items 5, 8, 9 and 11 of issue 14): every request
gets an answer or an OpenAI-shaped error, every exchange that reached the teacher is recorded,
and nothing waits for ever."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.conftest import RunningGateway
from tests.faults.conftest import FaultTable
from tests.faults.teacher import CHAT, FaultyTeacher, chat, param_and_code, record_count, records

pytestmark = pytest.mark.postgres


@pytest.fixture
def gateway(faulty_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return faulty_gateway(upstream={"read_timeout_s": 1.0, "max_retries": 2})


@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_cut_or_stalled_body_is_retried_before_the_client_sees_anything(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault: str, fault_table: FaultTable
) -> None:
    faulty_teacher.play([fault], default="ok")
    r = chat(gateway)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "fine"
    found = records(gateway, status=200)
    assert faulty_teacher.calls == 2 and len(found) == 1
    fault_table.row(
        f"teacher body {fault} after the headers, once", "200 (retried)", 1, len(found), "2 teacher calls"
    )


def test_a_body_cut_on_every_attempt_is_a_recorded_502(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault_table: FaultTable
) -> None:
    faulty_teacher.play([], default="cut")
    r = chat(gateway)
    assert r.status_code == 502 and param_and_code(r)[1] == "upstream_unavailable"
    assert r.headers["x-should-retry"] == "false"
    found = records(gateway, status=502)
    assert len(found) == 1 and "cut after the headers" in (found[0].error or "")
    assert faulty_teacher.calls == 3  # max_retries 2
    fault_table.row("teacher body cut on every attempt", "502 upstream_unavailable", 1, len(found))


@pytest.mark.parametrize("fault", ["html", "not_json"])
def test_a_success_that_is_not_json_is_a_502_recorded_as_an_error(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault: str, fault_table: FaultTable
) -> None:
    faulty_teacher.play([fault, fault])
    r = chat(gateway)
    assert r.status_code == 502 and param_and_code(r)[1] == "upstream_invalid_response"
    found = records(gateway)
    assert [(x.status, x.error is not None) for x in found] == [(502, True)]
    assert faulty_teacher.calls == 1  # the teacher answered (and was paid): not asked again
    stream = chat(gateway, {**CHAT, "stream": True}) if fault == "html" else None
    if stream is not None:
        assert stream.status_code == 502 and param_and_code(stream)[1] == "upstream_invalid_response"
    fault_table.row(
        f"teacher 200 {'text/html' if fault == 'html' else 'body not JSON'}",
        "502 upstream_invalid_response",
        2 if stream is not None else 1,
        record_count(gateway),
        "a stream request too" if stream is not None else "",
    )


@pytest.mark.parametrize("fault", ["drop", "cut"])
def test_a_failed_cache_leader_wakes_its_followers(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault: str, fault_table: FaultTable
) -> None:
    """Five identical deterministic requests while the teacher drops every connection (before
    or after its headers): every one gets an OpenAI-shaped error, nobody hangs, ``in_flight``
    returns to 0, and once the teacher is back the same request is answered (the key is free)."""
    faulty_teacher.play([], default=fault)
    body = {**CHAT, "temperature": 0}
    with ThreadPoolExecutor(5) as pool:
        answers = list(pool.map(lambda _: chat(gateway, body), range(5)))
    assert {r.status_code for r in answers} == {502}
    codes = sorted(param_and_code(r)[1] or "" for r in answers)
    assert set(codes) <= {"upstream_unavailable", "coalesced_failure"}
    assert gateway.gateway.admission.in_flight == 0
    assert not gateway.gateway.cache._inflight
    failed = records(gateway, status=502)
    leaders = codes.count("upstream_unavailable")
    assert len(failed) == leaders  # each request that called the teacher is recorded
    faulty_teacher.play([], default="ok")
    again = chat(gateway, body)
    assert again.status_code == 200
    fault_table.row(
        f"5 identical deterministic requests, teacher {'drops connections' if fault == 'drop' else 'cuts bodies'}",
        f"5 x 502 ({leaders} led, {5 - leaders} coalesced_failure); in_flight 0",
        leaders,
        len(failed),
        "then the same request: 200",
    )


def test_one_teacher_500_is_not_multiplied_by_the_sdk(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault_table: FaultTable
) -> None:
    """The OpenAI SDK (2 retries of its own) in front of the gateway (2 retries): 3 teacher calls,
    not 9, since the gateway tells the SDK it retried already (``x-should-retry: false``)."""
    faulty_teacher.play([], default="500")
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=2)
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="teacher-large", messages=[{"role": "user", "content": "x"}])
    assert faulty_teacher.calls == 3
    found = records(gateway, status=500)
    fault_table.row(
        "teacher 500 on every call, SDK with 2 retries", "500 (3 teacher calls, not 9)", 1, len(found)
    )
    assert len(found) == 1


def test_retries_across_requests_are_bounded_by_the_budget(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault_table: FaultTable
) -> None:
    faulty_teacher.play([], default="500")
    for _ in range(40):
        assert chat(gateway).status_code == 500
    # 40 first attempts, a reserve of 10 retries and 0.2 earned per request: at most 58 calls,
    # against 120 with per-request retries alone.
    assert 40 < faulty_teacher.calls <= 58
    found = record_count(gateway)
    fault_table.row(
        "40 requests, teacher 500 on every call", f"40 x 500; {faulty_teacher.calls} teacher calls", 40, found
    )
    assert found == 40


def test_the_teachers_retry_after_reaches_the_client(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault_table: FaultTable
) -> None:
    faulty_teacher.play(["429"])
    r = chat(gateway)
    assert r.status_code == 429 and r.headers["retry-after"] == "7"
    assert r.json()["error"]["message"] == "Rate limit reached."
    assert faulty_teacher.calls == 1  # a rate limit is the client's to wait out, not retried here
    found = records(gateway, status=429)
    fault_table.row("teacher 429 Retry-After: 7", "429, Retry-After: 7", 1, len(found))
    assert len(found) == 1
