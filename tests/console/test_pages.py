"""What the console's pages show, read over HTTP with the admin key: records searched and paged,
a task's training runs, adapters and plots, sorting, and policy edits written and hot-reloaded
only when `distillgate policy check` would accept the file."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from demo.teacher import ScriptedTeacher
from gateway.app import ServingParts
from gateway.store.models import Adapter, Record, ShadowPair, Stage, Task, utcnow
from tests.conftest import ADMIN_KEY, RunningGateway
from tests.router.conftest import start_file_gateway
from tests.servers import ServerThread
from trainer.registry import finish_run, start_run

TASK = "extract"


@pytest.fixture
def admin(gateway: RunningGateway) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        yield client


def add_records(g: RunningGateway, n: int) -> list[Record]:
    now = utcnow()
    rows = [
        Record(
            task=TASK if i % 2 == 0 else "other",
            target="teacher" if i % 3 else "student:extract@v1",
            status=200 if i % 5 else 429,
            created_at=now - timedelta(minutes=n - i),
            request={"messages": [{"role": "user", "content": f"email {i}"}]},
            response={"choices": [{"message": {"role": "assistant", "content": f"answer {i}"}}]},
            latency_ms=10.0 + i,
        )
        for i in range(n)
    ]
    with g.db().session() as session:
        session.add_all(rows)
        session.commit()
        for row in rows:
            session.refresh(row)
    return rows


def ids(html: str) -> list[str]:
    return re.findall(r'href="/console/records/([0-9a-f]+)"', html)


def test_records_are_searched_by_task_target_status_and_time_and_paged(
    gateway: RunningGateway, admin: httpx.Client
) -> None:
    rows = add_records(gateway, 130)
    mine = [r for r in reversed(rows) if r.task == TASK]  # newest first
    first = admin.get("/console/records", params={"task": TASK})
    assert first.status_code == 200 and ids(first.text) == [r.id for r in mine[:50]]
    assert 'id="next-page"' in first.text and 'id="prev-page"' not in first.text
    second = admin.get("/console/records", params={"task": TASK, "page": 2})
    assert ids(second.text) == [r.id for r in mine[50:100]]
    last = admin.get("/console/records", params={"task": TASK, "page": 2, "target": "student"})
    assert ids(last.text) == [r.id for r in mine if r.target.startswith("student:")][50:100]
    failed = admin.get("/console/records", params={"status": "429", "target": "teacher"})
    assert (
        ids(failed.text) == [r.id for r in reversed(rows) if r.status == 429 and r.target == "teacher"][:50]
    )
    window = rows[10].created_at, rows[20].created_at
    timed = admin.get(
        "/console/records",
        params={"since": window[0].strftime("%Y-%m-%dT%H:%M:%S"), "until": window[1].isoformat()},
    )
    assert ids(timed.text) == [r.id for r in reversed(rows[10:20])]
    bad = admin.get("/console/records", params={"status": "teapot"})
    assert bad.status_code == 400 and "status must be an HTTP status code" in bad.text


def test_a_record_shows_the_exchange_as_stored(gateway: RunningGateway, admin: httpx.Client) -> None:
    kept = add_records(gateway, 1)[0]
    page = admin.get(f"/console/records/{kept.id}")
    assert page.status_code == 200 and "email 0" in page.text and "answer 0" in page.text
    opted_out = Record(task=TASK, stored=False, request=None, response=None)
    with gateway.db().session() as session:
        session.add(opted_out)
        session.commit()
        session.refresh(opted_out)
    page = admin.get(f"/console/records/{opted_out.id}")
    assert "the content was not kept" in page.text
    assert admin.get("/console/records/nope").status_code == 404


def test_a_task_page_shows_its_runs_adapters_pairs_and_plots(
    gateway: RunningGateway, admin: httpx.Client
) -> None:
    db = gateway.db()
    with db.session() as session:
        session.add(Task(key=TASK, stage=Stage.shadow, adapter="extract@v1", reason="offline bar met"))
        session.add(
            Adapter(
                name="extract@v1",
                task=TASK,
                version=1,
                path="/adapters/extract/v1",
                base_model="tiny",
                metrics={"eval": {"baseline": 0.25, "finetuned": 0.9, "teacher": 1.0}},
            )
        )
        record = Record(
            task=TASK,
            request={"messages": [{"role": "user", "content": "invoice"}]},
            response={"choices": [{"message": {"content": '{"total": 12, "currency": "EUR"}'}}]},
        )
        session.add(record)
        session.commit()
        session.refresh(record)
        for i in range(30):
            session.add(
                ShadowPair(
                    record_id=record.id,
                    task=TASK,
                    adapter="extract@v1",
                    scorer="json_fields",
                    score=1.0 if i % 3 else 0.5,
                    passed=bool(i % 3),
                    student_response={
                        "choices": [{"message": {"content": '{"currency": "EUR", "total": 13}'}}]
                    },
                )
            )
        session.commit()
    run = start_run(db, TASK)
    losses = {"train_losses": [[1, 2.5], [2, 1.5], [3, 0.9]], "eval_losses": [[3, 1.1]]}
    finish_run(
        db,
        run.id or 0,
        "succeeded",
        adapter="extract@v1",
        metrics={"dataset": {"train": 90, "holdout": 10}, "train_examples": 90, "eval_loss_before": 2.7}
        | {"eval_loss_after": 1.1, **losses},
    )
    page = admin.get(f"/console/tasks/{TASK}")
    assert page.status_code == 200
    html = page.text
    assert 'data-stage="shadow"' in html and "offline bar met" in html
    assert "0.250 → 0.900 → 1.000" in html  # base → student → teacher, run and adapter
    assert "train=90" in html and "2.700 → 1.100" in html
    assert 'id="gate-pairs">30 (20 passed)' in html
    needed = re.search(r'id="gate-needed">(\d+)', html)
    assert needed and int(needed.group(1)) > 0
    plots = re.findall(r'<figure id="plot-(\w+)"><svg.*?</svg>', html, re.S)
    assert plots == ["agreement", "share", "loss"]
    loss = re.search(r'<figure id="plot-loss">(.*?)</svg>', html, re.S)
    assert loss and loss.group(1).count("<polyline") == 2
    pair_id = re.search(rf'href="/console/tasks/{TASK}/pairs/(\d+)"', html)
    assert pair_id
    pair = admin.get(f"/console/tasks/{TASK}/pairs/{pair_id.group(1)}").text
    assert "(JSON, keys sorted)" in pair and '<tr class="replace"><td><pre>  &#34;total&#34;: 12' in pair
    listing = admin.get("/console/tasks", params={"sort": "offline_agreement", "dir": "desc"}).text
    assert "90.0%" in listing


def test_tasks_sort_by_any_column(gateway: RunningGateway, admin: httpx.Client) -> None:
    with gateway.db().session() as session:
        session.add(Task(key="a-task", stage=Stage.serving, student_ratio=1.0))
        session.add(Task(key="b-task", stage=Stage.collecting))
        session.add(Task(key="c-task", stage=Stage.canary, student_ratio=0.25))
        session.commit()

    def order(**params: str) -> list[str]:
        html = admin.get("/console/tasks", params=params).text
        return re.findall(r'<tr data-task="([^"]+)"', html)

    assert order() == ["a-task", "b-task", "c-task"]
    assert order(sort="stage") == ["b-task", "c-task", "a-task"]
    assert order(sort="student_ratio", dir="desc") == ["a-task", "c-task", "b-task"]
    assert (
        order(sort="pass_rate", dir="desc") == order(sort="pass_rate") == ["a-task", "b-task", "c-task"]
    )  # none: last, by name
    assert order(sort="no_such_column") == ["a-task", "b-task", "c-task"]


@pytest.fixture
def file_gateway(
    teacher: tuple[ScriptedTeacher, ServerThread], tmp_path: Path
) -> Iterator[tuple[ServerThread, ServingParts, Path]]:
    _, teacher_server = teacher
    path = tmp_path / "policy.yaml"
    path.write_text(
        "# routing for the tests\n"
        + yaml.safe_dump(
            {
                "teacher": {"base_url": teacher_server.url + "/v1", "api_key_env": "TEACHER_API_KEY"},
                "tasks": {TASK: {"shadow": {"rate": 0.5}}},
            }
        )
    )
    server, gw, _ = start_file_gateway(f"sqlite:///{tmp_path / 'gw.db'}", path, tmp_path)
    with gw.db.session() as session:
        session.add(Task(key=TASK))
        session.commit()
    try:
        yield server, gw, path
    finally:
        server.stop()


def test_a_valid_policy_edit_is_written_and_hot_reloaded(
    file_gateway: tuple[ServerThread, ServingParts, Path],
) -> None:
    server, gw, path = file_gateway
    store = gw.policy_store
    assert store is not None and store.version == 1
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        form = client.get(f"/console/tasks/{TASK}/policy")
        assert form.status_code == 200 and "rate: 0.5" in form.text
        answer = client.post(
            f"/console/tasks/{TASK}/policy",
            data={"section": "shadow:\n  rate: 0.75\npromote:\n  min_samples: 50\n"},
        )
        assert answer.status_code == 303
    assert store.version == 2 and store.last_error is None
    assert (
        store.policy.for_task(TASK).shadow.rate == 0.75
        and store.policy.for_task(TASK).promote.min_samples == 50
    )
    assert yaml.safe_load(path.read_text())["tasks"][TASK] == {
        "shadow": {"rate": 0.75},
        "promote": {"min_samples": 50},
    }


@pytest.mark.parametrize(
    ("section", "error"),
    [
        ("shadow:\n  rate: [1", "is not valid YAML"),
        ("- just\n- a list\n", f"tasks.{TASK}: Input should be a valid dictionary"),
        ("promote:\n  scorer: vibes\n", f"tasks.{TASK}.promote.scorer"),
        ("shadw:\n  rate: 0.1\n", f"tasks.{TASK}.shadw: unknown key"),
    ],
)
def test_a_refused_policy_edit_leaves_the_file_byte_identical(
    file_gateway: tuple[ServerThread, ServingParts, Path], section: str, error: str
) -> None:
    server, gw, path = file_gateway
    before = path.read_bytes()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        answer = client.post(f"/console/tasks/{TASK}/policy", data={"section": section})
    assert answer.status_code == 422 and error in answer.text, answer.text
    assert path.read_bytes() == before
    assert gw.policy_store is not None and gw.policy_store.version == 1
    assert list(path.parent.glob(".console-*")) == []


def test_a_policy_given_in_code_cannot_be_edited(gateway: RunningGateway, admin: httpx.Client) -> None:
    form = admin.get(f"/console/tasks/{TASK}/policy")
    assert "given in code" in form.text and 'id="policy-form"' not in form.text
    answer = admin.post(f"/console/tasks/{TASK}/policy", data={"section": "distill: false"})
    assert answer.status_code == 422 and "given in code" in answer.text


def test_a_forced_transition_takes_its_stage_adapter_step_and_reason(
    gateway: RunningGateway, admin: httpx.Client
) -> None:
    with gateway.db().session() as session:
        session.add(Task(key=TASK, stage=Stage.collecting))
        session.add(Adapter(name="extract@v2", task=TASK, version=2, path="/a/v2", base_model="tiny"))
        session.commit()
    form = {
        "action": "transition",
        "to": "canary",
        "adapter": "extract@v2",
        "canary_step": "1",
        "reason": "skip",
    }
    answer = admin.post(f"/console/tasks/{TASK}/act", data=form)
    assert answer.status_code == 303
    state = gateway.gateway.tasks.task_states[TASK]  # this replica routes on it at once
    assert (state.stage, state.canary_step) == (Stage.canary, 1)
    page = admin.get(f"/console/tasks/{TASK}").text
    assert (
        'data-stage="canary"' in page and "forced through the console: skip" in page and "extract@v2" in page
    )
    bad = admin.post(f"/console/tasks/{TASK}/act", data={**form, "canary_step": "one"})
    assert bad.status_code == 400 and "The canary step is a whole number" in bad.text
    unknown = admin.post(f"/console/tasks/{TASK}/act", data={**form, "adapter": "extract@v9"})
    assert unknown.status_code == 400 and "No adapter &#39;extract@v9&#39;" in unknown.text
    nowhere = admin.post(f"/console/tasks/{TASK}/act", data={**form, "to": "orbit"})
    assert nowhere.status_code == 400 and "Pick a stage" in nowhere.text
