"""The task admin API (``gateway/api/tasks.py``) against a running stack, and the CLI beside it:
admin credential only, OpenAI-shaped errors, forced moves that change routing at once."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

from gateway.store.models import Stage
from router.cli import register
from tests.router.conftest import TASK, Stack, StackFactory, StudentModel
from tests.servers import wait_until

ROUTES = [
    ("GET", "/admin/tasks"),
    ("GET", f"/admin/tasks/{TASK}"),
    ("GET", f"/admin/tasks/{TASK}/pairs"),
    ("POST", f"/admin/tasks/{TASK}/promote"),
    ("POST", f"/admin/tasks/{TASK}/rollback"),
    ("POST", f"/admin/tasks/{TASK}/pause"),
    ("POST", f"/admin/tasks/{TASK}/resume"),
    ("POST", f"/admin/tasks/{TASK}/transition"),
    ("GET", "/admin/policy"),
]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def target(s: Stack) -> str:
    return s.ask().target


@pytest.fixture
def served(stack: StackFactory, disagreeing_student: StudentModel, database_url: str) -> tuple[Stack, str]:
    """A task serving an adapter (the untrained model: routing, not quality, is under test),
    on SQLite and on PostgreSQL."""
    s = stack(database_url, audit={"rate": 0.0})
    return s, s.install(disagreeing_student, Stage.serving)


def test_task_routes_need_the_admin_credential(served: tuple[Stack, str]) -> None:
    s, _ = served
    for method, path in ROUTES:
        # A body the route would refuse: the credential is checked before the body is read.
        body = {"to": "nowhere"} if method == "POST" else None
        assert_error(httpx.request(method, s.url + path, json=body), 401, "missing_api_key")
        wrong = httpx.request(method, s.url + path, json=body, headers={"Authorization": "Bearer dg-nope"})
        assert_error(wrong, 401, "invalid_api_key")
        user = httpx.request(method, s.url + path, json=body, headers={"Authorization": f"Bearer {s.key}"})
        assert_error(user, 403, "permission_denied")
    assert s.state() == ("serving", 0)  # nothing moved
    assert s.admin.get("/admin/tasks").status_code == 200


def test_unknown_tasks_are_404_and_moves_that_make_no_sense_are_409(served: tuple[Stack, str]) -> None:
    s, adapter = served
    for method, path in ROUTES[1:-1]:
        body = {"to": "shadow"} if path.endswith("/transition") else None
        error = assert_error(s.admin.request(method, path.replace(TASK, "no-such-task"), json=body), 404)
        assert error["param"] == "task" and "no-such-task" in error["message"]
    conflicts: list[tuple[str, dict[str, Any] | None, str | None]] = [
        ("promote", None, "has no next stage"),  # serving is the top
        ("resume", None, "only a paused task can be resumed"),
        ("transition", {"to": "serving"}, "is in serving already"),
        ("transition", {"to": "canary", "canary_step": 7}, "canary step 7 does not exist"),
        ("transition", {"to": "shadow", "adapter": None}, None),  # keeps its adapter: allowed
    ]
    for action, body, message in conflicts:
        response = s.admin.post(f"/admin/tasks/{TASK}/{action}", json=body)
        if message is None:
            assert response.status_code == 200 and response.json()["stage"] == "shadow"
            continue
        error = assert_error(response, 409, "illegal_transition")
        assert message in error["message"], error
    assert s.admin.post(f"/admin/tasks/{TASK}/pause").status_code == 200
    assert "paused already" in assert_error(s.admin.post(f"/admin/tasks/{TASK}/pause"), 409)["message"]
    assert s.admin.post(f"/admin/tasks/{TASK}/transition", json={"to": "collecting"}).status_code == 200
    assert (
        "no student to roll back"
        in assert_error(s.admin.post(f"/admin/tasks/{TASK}/rollback"), 409)["message"]
    )
    no_adapter = assert_error(s.admin.post(f"/admin/tasks/{TASK}/transition", json={"to": "shadow"}), 409)
    assert "needs an adapter" in no_adapter["message"]
    unknown = s.admin.post(f"/admin/tasks/{TASK}/transition", json={"to": "shadow", "adapter": "other@v9"})
    assert assert_error(unknown, 404)["param"] == "adapter"
    # Bodies and queries the routes cannot read are 400s naming the field, never 500s.
    transition = f"/admin/tasks/{TASK}/transition"
    for response, param in (
        (s.admin.post(transition, json={"to": "flying"}), "to"),
        (s.admin.post(transition, json={"reason": "no stage"}), "to"),
        (s.admin.post(transition, json={"to": "shadow", "adapterr": adapter}), "adapterr"),
        (s.admin.post(transition, content=b"{not json", headers={"content-type": "application/json"}), None),
        (s.admin.post(f"/admin/tasks/{TASK}/promote", json={"reason": 5}), "reason"),
        (s.admin.get(f"/admin/tasks/{TASK}/pairs", params={"limit": 0}), "limit"),
        (s.admin.get(f"/admin/tasks/{TASK}/pairs", params={"kind": "nope"}), "kind"),
    ):
        assert assert_error(response, 400)["param"] == param
    assert s.state() == ("collecting", 0)


def test_forced_moves_change_routing_at_once(served: tuple[Stack, str]) -> None:
    s, adapter = served
    student = f"student:{adapter}"
    assert target(s) == student

    def move(action: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        response = s.admin.post(f"/admin/tasks/{TASK}/{action}", json=body or {"reason": f"test {action}"})
        assert response.status_code == 200, response.text
        return response.json()

    # Each move is followed at once by a request routed on it (no refresh period in between).
    paused = move("pause")
    assert paused["stage"] == "paused" and paused["paused_from"] == "serving" and paused["student_ratio"] == 0
    assert [target(s) for _ in range(5)] == ["teacher"] * 5
    assert move("resume")["stage"] == "serving"
    assert [target(s) for _ in range(5)] == [student] * 5
    assert move("rollback")["stage"] == "rolled_back"
    assert [target(s) for _ in range(5)] == ["teacher"] * 5
    back = move("transition", {"to": "canary", "canary_step": 2, "adapter": adapter, "reason": "retry"})
    assert (back["stage"], back["canary_step"], back["student_ratio"]) == ("canary", 2, 1.0)
    assert [target(s) for _ in range(5)] == [student] * 5
    promoted = move("promote")
    assert promoted["stage"] == "serving"
    assert target(s) == student

    latest = promoted["transitions"][0]  # newest first, each with who moved it and why
    assert latest["forced"] is True and latest["from_stage"] == "canary" and latest["to_stage"] == "serving"
    assert latest["reason"] == "forced through the admin API: test promote"
    assert latest["evidence"] == {"source": "admin API", "student_ratio": 1.0}
    canary = promoted["transitions"][1]
    assert canary["reason"] == "forced through the admin API: retry"
    assert canary["evidence"] == {"source": "admin API", "student_ratio": 1.0, "canary_step": 2}
    metrics = httpx.get(s.url + "/metrics").text
    assert f'distillgate_rollbacks_total{{task="{TASK}"}} 1.0' in metrics
    assert f'distillgate_promotions_total{{task="{TASK}"}} 1.0' in metrics


def test_a_task_shows_its_envelope_pairs_and_transitions(
    stack: StackFactory, disagreeing_student: StudentModel
) -> None:
    s = stack()
    adapter = s.install(disagreeing_student)
    for n in range(12):
        s.ask(stream=n % 2 == 0)
    wait_until(lambda: s.task()["pairs"] >= 12, timeout_s=20)
    rows = s.admin.get("/admin/tasks").json()
    assert rows["object"] == "list"
    row = next(r for r in rows["data"] if r["task"] == TASK)
    assert (row["stage"], row["adapter"], row["student_ratio"], row["pass_rate"]) == (
        "shadow",
        adapter,
        0.0,
        0.0,
    )
    task = s.task()
    assert task["features"] == disagreeing_student.features
    assert (
        task["pairs_by_kind"]["shadow"]["pairs"] >= 12
        and task["pairs_by_kind"]["shadow"]["student_errors"] == 0
    )
    assert [(t["from_stage"], t["to_stage"], t["adapter"]) for t in task["transitions"]] == [
        ("collecting", "shadow", adapter)
    ]
    pairs = s.admin.get(f"/admin/tasks/{TASK}/pairs", params={"limit": 3, "kind": "shadow"}).json()["data"]
    assert len(pairs) == 3 and pairs[0]["created_at"] >= pairs[-1]["created_at"]
    assert {p["adapter"] for p in pairs} == {adapter}
    assert s.admin.get(f"/admin/tasks/{TASK}/pairs", params={"kind": "audit"}).json()["data"] == []


def test_the_policy_route_says_which_policy_is_in_force(served: tuple[Stack, str]) -> None:
    s, _ = served
    policy = s.policy()
    assert policy["version"] == 1 and policy["last_error"] is None and policy["file"] is None
    assert policy["policy"]["student"]["base_url"] == s.policy_data["student"]["base_url"]
    defaults = next(t for t in policy["policy"]["tasks"] if t["task"] == "(defaults)")
    assert defaults["canary"] == [0.25, 0.5, 1.0] and defaults["scorer"] == "exact"


def test_the_openapi_schema_documents_every_task_route(served: tuple[Stack, str]) -> None:
    s, _ = served
    schema = httpx.get(s.url + "/docs/openapi.json").json()
    paths = schema["paths"]
    for method, path in ROUTES:
        documented = paths[path.replace(TASK, "{task}")][method.lower()]
        assert documented["summary"] and documented["tags"] == ["admin"]
    body = paths["/admin/tasks/{task}/transition"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    ref = body["$ref"].rsplit("/", 1)[-1]
    properties = schema["components"]["schemas"][ref]["properties"]
    assert set(properties) == {"to", "reason", "adapter", "canary_step"}
    assert "serving" in json.dumps(properties["to"])


def test_the_cli_lists_shows_and_moves_tasks_as_the_api_does(served: tuple[Stack, str]) -> None:
    s, adapter = served
    app = typer.Typer()

    @app.callback()
    def main() -> None:
        """A stand-in for the distillgate entry point."""

    register(app)
    runner = CliRunner()
    db = ["--database-url", s.gw.settings.database_url]

    listed = runner.invoke(app, ["tasks", *db, "--json"])
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.output)["tasks"] == s.admin.get("/admin/tasks").json()["data"]
    shown = runner.invoke(app, ["tasks", "show", TASK, *db, "--json"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.output)
    assert detail["stage"] == "serving" and detail["transitions"] == s.task()["transitions"]

    paused = runner.invoke(app, ["tasks", "pause", TASK, *db, "--reason", "maintenance", "--json"])
    assert paused.exit_code == 0, paused.output
    assert json.loads(paused.output)["stage"] == "paused"
    wait_until(lambda: s.state()[0] == "paused", timeout_s=5)  # the gateway's next task refresh
    assert target(s) == "teacher"
    assert s.task()["transitions"][0]["reason"] == "forced through the CLI: maintenance"
    again = runner.invoke(app, ["tasks", "pause", TASK, *db, "--json"])
    assert again.exit_code == 1 and "paused already" in json.loads(again.output)["error"]
    resumed = runner.invoke(app, ["tasks", "resume", TASK, *db])
    assert resumed.exit_code == 0 and "serving" in resumed.output
    wait_until(lambda: s.state()[0] == "serving", timeout_s=5)
    assert target(s) == f"student:{adapter}"
    table = runner.invoke(app, ["tasks", "show", TASK, *db], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "forced through the CLI: maintenance" in table.output
