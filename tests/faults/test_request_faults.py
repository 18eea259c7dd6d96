"""Requests that used to break after the teacher was paid, or that grow the gateway without bound
(items 1's edge, 7, 10, 13 and 14 of issue 14): refused at the edge with a 400 naming the field
before the teacher is called, or folded into bounded state."""

from __future__ import annotations

import socket
from collections.abc import Callable

import httpx
import orjson
import pytest

from gateway.store.models import Stage, Task
from gateway.task_limits import OVERFLOW_TASK
from tests.conftest import RunningGateway
from tests.faults.conftest import FaultTable
from tests.faults.teacher import CHAT, FaultyTeacher, chat, param_and_code, record_count, records
from tests.servers import wait_until

pytestmark = pytest.mark.postgres


@pytest.fixture
def gateway(faulty_gateway: Callable[..., RunningGateway]) -> RunningGateway:
    return faulty_gateway(tasks={"max_new_per_key": 5, "max_tasks": 8, "max_task_labels": 3})


def _raw_post(gateway: RunningGateway, header_line: bytes) -> bytes:
    """A request whose header httpx would refuse to send (raw bytes: non-ASCII, a NUL)."""
    body = orjson.dumps(CHAT)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {gateway.key}\r\nContent-Length: {len(body)}\r\n".encode()
        + header_line
        + b"\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.server.port), timeout=10) as s:
        s.sendall(head + body)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


def test_deep_nesting_is_refused_before_the_teacher(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, fault_table: FaultTable
) -> None:
    deep = b'{"model":"teacher-large","messages":[{"role":"user","content":"x"}],"x":' + b"[" * 1000
    deep += b"]" * 1000 + b"}"
    r = chat(gateway, deep)
    assert r.status_code == 400 and param_and_code(r) == ("x", "nesting_too_deep")
    assert faulty_teacher.calls == 0
    within = chat(gateway, {**CHAT, "x": orjson.loads(b"[" * 100 + b"]" * 100)})
    assert within.status_code == 200
    found = record_count(gateway)
    fault_table.row(
        "request with a field nested 1,000 levels",
        "400 nesting_too_deep (param x)",
        1,
        found,
        "teacher not called; then 100 levels: 200, recorded",
    )
    assert found == 1


@pytest.mark.parametrize(
    ("name", "task"),
    [
        ("non-ASCII", "タスク"),
        ("CR LF", "a\r\nx-injected: 1"),
        ("NUL", "a\u0000b"),
        ("201 characters", "t" * 201),
    ],
)
def test_task_names_a_header_cannot_carry_are_refused(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, name: str, task: str, fault_table: FaultTable
) -> None:
    r = chat(gateway, {**CHAT, "metadata": {"task": task}})
    assert r.status_code == 400 and param_and_code(r) == ("metadata.task", "invalid_value")
    assert faulty_teacher.calls == 0
    found = record_count(gateway)
    fault_table.row(f"metadata.task {name}", "400 (param metadata.task)", 0, found, "teacher not called")
    assert found == 0


@pytest.mark.parametrize(("name", "value"), [("Latin-1 é", "caf\xe9".encode("latin-1")), ("NUL", b"a\x00b")])
def test_task_headers_a_response_cannot_carry_are_refused(
    gateway: RunningGateway, faulty_teacher: FaultyTeacher, name: str, value: bytes, fault_table: FaultTable
) -> None:
    answer = _raw_post(gateway, b"x-distillgate-task: " + value)
    status = int(answer.split(b" ", 2)[1])
    assert status == 400
    body = answer.split(b"\r\n\r\n", 1)[1]
    # The gateway's 400 names the header; a server that refuses the bytes itself answers first.
    refused_by = "gateway" if body.startswith(b"{") else "HTTP server"
    if refused_by == "gateway":
        assert orjson.loads(body)["error"]["param"] == "x-distillgate-task"
    assert faulty_teacher.calls == 0
    found = record_count(gateway)
    fault_table.row(
        f"x-distillgate-task header {name}", f"400 from the {refused_by}", 0, found, "teacher not called"
    )
    assert found == 0


def test_a_good_task_name_is_echoed_and_recorded(gateway: RunningGateway, fault_table: FaultTable) -> None:
    r = chat(gateway, CHAT, **{"x-distillgate-task": "emails/classify v2"})
    assert r.status_code == 200 and r.headers["x-distillgate-task"] == "emails/classify v2"
    found = records(gateway, task="emails/classify v2")
    assert len(found) == 1
    detail = httpx.get(
        gateway.url + "/admin/task",
        params={"task": "emails/classify v2"},
        headers={"Authorization": f"Bearer {gateway.admin_key}"},
    )
    assert detail.status_code == 200 and detail.json()["task"] == "emails/classify v2"
    fault_table.row(
        "task named emails/classify v2 (a slash)", "200; /admin/task?task=… finds it", 1, len(found)
    )


def test_unique_task_names_fold_into_one_bounded_task(
    gateway: RunningGateway, fault_table: FaultTable
) -> None:
    """Per key 5 new names (of 8 overall): the 12 requests are all answered and recorded, the 7
    past the cap under ``_overflow``, which is held paused; /metrics labels 3 tasks, then ``_other``."""
    tasks = [
        chat(gateway, {**CHAT, "metadata": {"task": f"unique-{i}"}}).headers["x-distillgate-task"]
        for i in range(12)
    ]
    assert tasks == [f"unique-{i}" for i in range(5)] + [OVERFLOW_TASK] * 7
    folded = records(gateway, task=OVERFLOW_TASK)
    assert len(folded) == 7 and record_count(gateway) == 12

    def overflow_paused() -> bool:
        with gateway.db().session() as session:
            row = session.get(Task, OVERFLOW_TASK)
            return row is not None and row.stage == Stage.paused

    wait_until(overflow_paused, 10)
    metrics = httpx.get(gateway.url + "/metrics").text
    labelled = {
        line.split('task="')[1].split('"')[0]
        for line in metrics.splitlines()
        if line.startswith("distillgate_requests_total{")
    }
    assert len(labelled) == 4 and "_other" in labelled
    fault_table.row(
        "12 unique task names from one key (cap 5 per key)",
        "12 x 200, 7 filed under _overflow (paused)",
        12,
        record_count(gateway),
        "/metrics: 3 task labels + _other",
    )


def test_admin_queries_with_a_nul_are_400(gateway: RunningGateway, fault_table: FaultTable) -> None:
    admin = {"Authorization": f"Bearer {gateway.admin_key}"}
    answers = [
        httpx.get(gateway.url + "/admin/records", params={"task": "\x00"}, headers=admin),
        httpx.get(gateway.url + "/admin/task", params={"task": "a\x00"}, headers=admin),
        httpx.get(gateway.url + "/admin/task/pairs", params={"task": "a\x00"}, headers=admin),
    ]
    assert [r.status_code for r in answers] == [400, 400, 400]
    assert {param_and_code(r)[0] for r in answers} == {"task"}
    fault_table.row(
        "GET /admin/records?task=%00 (and the task routes)", "400 (param task)", 0, record_count(gateway)
    )


def test_the_openai_routes_are_in_the_openapi_document(
    gateway: RunningGateway, fault_table: FaultTable
) -> None:
    document = httpx.get(gateway.url + "/docs/openapi.json").json()
    for path, shape in [
        ("/v1/chat/completions", "ChatCompletionRequest"),
        ("/v1/completions", "CompletionRequest"),
        ("/v1/embeddings", "EmbeddingRequest"),
    ]:
        operation = document["paths"][path]["post"]
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{shape}"}
        assert {"200", "400", "502"} <= set(operation["responses"])
    assert "messages" in document["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    fault_table.row("OpenAPI document", "lists /v1/chat/completions, /v1/completions, /v1/embeddings", 0, 0)
