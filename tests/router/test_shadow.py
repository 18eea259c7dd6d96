"""The shadow mirror: pairs are fetched, scored and stored off the request path, under a bound.

The student and the teacher are stand-ins (async callables answering like vLLM and an OpenAI API).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import Record, ShadowPair, Stage
from router.policy import Policy, parse_policy
from router.shadow import ScoredPair, ShadowJob, ShadowMirror

REQUEST = {
    "model": "gpt-big",
    "messages": [{"role": "user", "content": "Classify: my card was charged twice"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}


def reply(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
    }


def make_policy(**defaults: Any) -> Policy:
    return parse_policy(
        {
            "teacher": {"base_url": "http://teacher/v1", "model": "gpt-big", "timeout": 5},
            "student": {"base_url": "http://student/v1", "base_model": "tiny", "timeout": 0.3},
            "defaults": {"shadow": {"max_concurrency": 3}, "promote": {"scorer": "exact"}, **defaults},
        }
    )


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.create_all()
    yield database
    database.dispose()


def add_record(db: Database, record_id: str, task: str = "classify") -> None:
    with db.session() as session:
        session.add(Record(id=record_id, task=task, model="gpt-big"))
        session.commit()


def pairs(db: Database) -> list[ShadowPair]:
    with db.session() as session:
        return list(session.exec(select(ShadowPair).order_by(col(ShadowPair.id))).all())


def record_shadow(db: Database, record_id: str) -> dict[str, Any] | None:
    with db.session() as session:
        row = session.get(Record, record_id)
        return None if row is None else row.shadow


def mirror_job(record_id: str, teacher: str = "billing", **kw: Any) -> ShadowJob:
    return ShadowJob(
        record_id=record_id,
        task=kw.pop("task", "classify"),
        adapter=kw.pop("adapter", "classify@v1"),
        kind=kw.pop("kind", "shadow"),
        stage=kw.pop("stage", Stage.shadow),
        request=REQUEST,
        teacher_response=reply(teacher),
        **kw,
    )


async def test_a_mirrored_pair_is_scored_stored_and_attached_to_its_record(db: Database) -> None:
    seen: list[tuple[str, dict[str, Any]]] = []

    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        seen.append((adapter, body))
        return reply("Billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student)
    scored: list[ScoredPair] = []
    stored: list[int] = []
    mirror.on_pair.append(scored.append)
    mirror.on_stored.append(lambda batch: stored.append(len(batch)))
    add_record(db, "r1")
    await mirror.start()
    assert mirror.submit(mirror_job("r1"))
    await mirror.drain()
    await mirror.stop()

    adapter, body = seen[0]
    assert adapter == "classify@v1" and body["model"] == "classify@v1"
    assert "stream" not in body and "stream_options" not in body and body["messages"] == REQUEST["messages"]
    [pair] = pairs(db)
    assert (pair.record_id, pair.task, pair.adapter, pair.kind, pair.stage, pair.scorer) == (
        "r1",
        "classify",
        "classify@v1",
        "shadow",
        "shadow",
        "exact",
    )
    assert (pair.score, pair.passed, pair.error) == (1.0, True, None)
    assert pair.student_response == reply("Billing") and pair.student_latency_ms is not None
    summary = record_shadow(db, "r1")
    assert summary is not None
    assert (summary["score"], summary["passed"], summary["pair_id"], summary["kind"]) == (
        1.0,
        True,
        pair.id,
        "shadow",
    )
    assert summary["student_response"] == reply("Billing")
    assert [p.score for p in scored] == [1.0] and stored == [1]
    assert (mirror.counters.submitted, mirror.counters.scored, mirror.counters.stored) == (1, 1, 1)


async def test_submit_never_waits_and_drops_past_the_tasks_concurrency(db: Database) -> None:
    release = asyncio.Event()

    async def slow_student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return reply("billing")

    policy = make_policy()  # shadow.max_concurrency: 3
    mirror = ShadowMirror(db, lambda: policy, slow_student)
    dropped: list[str] = []
    mirror.on_drop.append(lambda job: dropped.append(job.record_id))
    await mirror.start()
    started = time.perf_counter()
    accepted = [mirror.submit(mirror_job(f"r{i}")) for i in range(5)]
    other_task = mirror.submit(mirror_job("o1", task="extract", adapter="extract@v1"))
    elapsed = time.perf_counter() - started
    assert accepted == [True, True, True, False, False] and other_task
    assert elapsed < 0.5  # submit is plain synchronous code: the blocked student is never awaited
    assert mirror.in_flight("classify") == 3 and mirror.in_flight() == 4
    assert mirror.counters.dropped == 2 and mirror.counters.dropped_by_task == {"classify": 2}
    assert dropped == ["r3", "r4"]
    release.set()
    await mirror.drain()
    await mirror.stop()
    assert len(pairs(db)) == 4 and mirror.in_flight() == 0


async def test_the_global_cap_bounds_all_tasks_together(db: Database) -> None:
    release = asyncio.Event()

    async def slow_student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        await release.wait()
        return reply("billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, slow_student, max_in_flight=2)
    results = [mirror.submit(mirror_job(f"r{i}", task=f"t{i}")) for i in range(3)]
    assert results == [True, True, False]
    release.set()
    await mirror.drain()


async def test_student_errors_and_timeouts_are_failed_pairs_with_the_reason(db: Database) -> None:
    async def broken(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        if body["messages"][0]["content"].endswith("slow"):
            await asyncio.sleep(5)
        raise RuntimeError("HTTP 500 from the student")

    policy = make_policy()  # student.timeout: 0.3 s
    mirror = ShadowMirror(db, lambda: policy, broken)
    slow_request = {**REQUEST, "messages": [{"role": "user", "content": "slow"}]}
    mirror.submit(mirror_job("r1"))
    mirror.submit(
        ShadowJob("r2", "classify", "classify@v1", "shadow", Stage.shadow, slow_request, reply("billing"))
    )
    await mirror.drain()
    by_record = {p.record_id: p for p in pairs(db)}
    assert by_record["r1"].error == "RuntimeError: HTTP 500 from the student"
    assert by_record["r2"].error == "timeout"
    assert all(not p.passed and p.score == 0.0 and p.scorer == "exact" for p in by_record.values())
    assert 250 <= by_record["r2"].student_latency_ms < 2000  # type: ignore[operator]
    assert mirror.counters.student_errors == 2


async def test_an_audit_fetches_the_teacher_and_keeps_its_answer_on_the_record(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("an audit must not call the student again")

    teacher_bodies: list[dict[str, Any]] = []

    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        teacher_bodies.append(body)
        return reply("refund")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student, teacher)
    add_record(db, "r1")
    job = ShadowJob(
        "r1",
        "classify",
        "classify@v1",
        "audit",
        Stage.serving,
        REQUEST,
        student_response=reply("billing"),
        student_latency_ms=12.5,
    )
    mirror.submit(job)
    await mirror.drain()
    [pair] = pairs(db)
    assert (pair.kind, pair.stage, pair.score, pair.passed, pair.student_latency_ms) == (
        "audit",
        "serving",
        0.0,
        False,
        12.5,
    )
    assert teacher_bodies[0]["model"] == "gpt-big" and "stream" not in teacher_bodies[0]
    summary = record_shadow(db, "r1")
    assert summary is not None and summary["teacher_response"] == reply("refund")
    assert "student_response" not in summary


async def test_a_failing_teacher_abandons_the_audit_without_blaming_the_student(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply("x")

    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        raise ConnectionError("teacher down")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student, teacher)
    mirror.submit(
        ShadowJob("r1", "classify", "a", "audit", Stage.serving, REQUEST, student_response=reply("x"))
    )
    await mirror.drain()
    assert pairs(db) == []
    assert (mirror.counters.teacher_errors, mirror.counters.student_errors, mirror.counters.scored) == (
        1,
        0,
        0,
    )


async def test_opted_out_exchanges_keep_scores_but_no_answers(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply("billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student)
    add_record(db, "r1")
    mirror.submit(mirror_job("r1", stored=False))
    await mirror.drain()
    [pair] = pairs(db)
    assert pair.passed and pair.student_response is None
    summary = record_shadow(db, "r1")
    assert summary is not None and summary["passed"]
    assert "student_response" not in summary and "teacher_response" not in summary


async def test_a_pair_waits_for_a_record_the_recorder_has_not_written_yet(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply("billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student)
    mirror.submit(mirror_job("late"))
    await mirror.drain()
    assert len(pairs(db)) == 1 and record_shadow(db, "late") is None
    add_record(db, "late")
    await mirror.flush()
    summary = record_shadow(db, "late")
    assert summary is not None and summary["passed"]


async def test_pairs_survive_a_database_outage_and_are_stored_when_it_returns(tmp_path: Any) -> None:
    db = Database(f"sqlite:///{tmp_path / 'down.db'}")  # no tables yet: every insert fails

    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply("billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student)
    for i in range(3):
        mirror.submit(mirror_job(f"r{i}"))
    await mirror.drain()
    assert mirror.counters.stored == 0 and mirror.counters.store_failures >= 1
    db.create_all()
    await mirror.flush()
    assert mirror.counters.stored == 3 and len(pairs(db)) == 3
    db.dispose()


async def test_stop_refuses_new_jobs_and_stores_what_ran(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return reply("billing")

    policy = make_policy()
    mirror = ShadowMirror(db, lambda: policy, student, flush_interval_s=10)
    await mirror.start()
    mirror.submit(mirror_job("r1"))
    await mirror.stop()
    assert not mirror.submit(mirror_job("r2"))
    assert [p.record_id for p in pairs(db)] == ["r1"]


async def test_the_task_policys_scorer_and_pass_score_decide_the_pair(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply('{"intent": "billing", "urgent": false}')

    policy = make_policy(promote={"scorer": "auto", "pass_score": 0.5})
    mirror = ShadowMirror(db, lambda: policy, student)
    mirror.submit(mirror_job("r1", teacher='{"intent": "billing", "urgent": true}'))
    await mirror.drain()
    [pair] = pairs(db)
    assert (pair.scorer, pair.score, pair.passed) == ("json_fields", 0.5, True)


async def test_without_a_policy_nothing_is_mirrored(db: Database) -> None:
    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        return reply("x")

    mirror = ShadowMirror(db, lambda: None, student)
    assert not mirror.submit(mirror_job("r1"))
    assert mirror.counters.dropped == 1


async def test_a_pairs_own_teacher_calls_are_metered_in_the_ledger_and_charged_to_the_key(
    db: Database,
) -> None:
    from gateway.keys import create_key
    from gateway.store.models import Usage

    async def student(adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        raise AssertionError("an audit must not call the student again")

    async def teacher(body: dict[str, Any]) -> dict[str, Any]:
        judging = body["messages"][0]["role"] == "system"
        answer = reply("8" if judging else "refund")
        answer["usage"] = {"prompt_tokens": 300 if judging else 40, "completion_tokens": 1 if judging else 2}
        return answer

    policy = parse_policy(
        {
            "teacher": {"base_url": "http://teacher/v1", "model": "gpt-big", "timeout": 5},
            "student": {"base_url": "http://student/v1", "base_model": "tiny", "timeout": 0.3},
            "prices": {"gpt-big": {"input": 2.0, "output": 10.0}},
            "defaults": {"shadow": {"max_concurrency": 3}, "promote": {"scorer": "judge"}},
        }
    )
    key, _ = create_key(db, "app")
    mirror = ShadowMirror(db, lambda: policy, student, teacher)
    add_record(db, "r1")
    job = ShadowJob(
        "r1",
        "classify",
        "classify@v1",
        "audit",
        Stage.serving,
        REQUEST,
        student_response=reply("billing"),
        api_key_id=key.id,
    )
    mirror.submit(job)
    await mirror.drain()
    with db.session() as session:
        ledger = {
            r.target: r
            for r in session.exec(select(Record).where(col(Record.target).in_(["audit", "judge"])))
        }
        spent = session.exec(
            select(Usage).where(Usage.key_id == key.id, Usage.task == "", Usage.window == "month")
        ).all()
    assert set(ledger) == {"audit", "judge"}
    assert ledger["audit"].cost_usd == pytest.approx((40 * 2.0 + 2 * 10.0) / 1e6)
    assert ledger["judge"].cost_usd == pytest.approx((300 * 2.0 + 1 * 10.0) / 1e6)
    assert all(not r.stored and r.request is None and r.api_key_id == key.id for r in ledger.values())
    assert sum(u.spend_usd for u in spent) == pytest.approx((80 + 20 + 600 + 10) / 1e6)
