"""The scheduler closes the loop by itself: due → train → offline eval vs base → publish → shadow,
or back to collecting with the reason; one trainer per task across workers (a lease that expires)."""

from __future__ import annotations

import asyncio
import random
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from demo.teacher import ScriptedTeacher
from gateway.store.db import Database
from gateway.store.models import Stage, Task, TaskTransition, TrainingLock, utcnow
from router.policy import Policy, parse_policy
from tests.conftest import RunningGateway
from tests.servers import ServerThread
from tests.trainer.conftest import INTENT_SYSTEM, add_records, intent_email, intent_records
from tests.trainer.test_end_to_end import TASK, intent_teacher, send_traffic
from trainer.scheduler import Scheduler, TrainingLease, due_reason


def loop_policy(teacher_url: str, student_url: str, base_model: Path, **train: Any) -> Policy:
    values = {
        "method": "full",
        "min_new_records": 50,
        "holdout": 0.2,
        "max_seq_len": 256,
        "batch_tokens": 1024,
        "learning_rate": 3e-3,
        "epochs": 15,
        "schedule": "1h",
        "min_offline_score": 0.8,
        "max_completion_tokens": 8,
    }
    values.update(train)
    return parse_policy(
        {
            "teacher": {"base_url": teacher_url + "/v1", "api_key_env": "TEACHER_API_KEY"},
            "student": {"base_url": student_url + "/v1", "base_model": str(base_model), "engine": "embedded"},
            "defaults": {"train": values, "promote": {"scorer": "exact"}},
        }
    )


def recorded(teacher: tuple[ScriptedTeacher, ServerThread], gateway: RunningGateway, n: int) -> Database:
    """``n`` intent-classification exchanges recorded through the gateway; its database."""
    teacher[0].answer_fn = intent_teacher
    send_traffic(gateway.v1, gateway.key, n)
    gateway.flush()
    return gateway.db()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_due_task_is_trained_evaluated_published_and_shadowed(
    teacher: tuple[ScriptedTeacher, ServerThread],
    gateway: RunningGateway,
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    db = recorded(teacher, gateway, 160)
    policy = loop_policy(teacher[1].url, student.url, tiny_model)
    scheduler = Scheduler(db, lambda: policy, tmp_path / "adapters")
    moved: list[Task] = []
    scheduler.on_task.append(moved.append)

    (event,) = scheduler.tick()
    assert event.outcome == "shadow", event.reason
    numbers = event.numbers
    assert numbers["finetuned"] >= 0.8 > numbers["baseline"]
    assert numbers["teacher"] == 1.0 and numbers["holdout_examples"] > 10
    assert "base 0.000" in event.reason or f"base {numbers['baseline']:.3f}" in event.reason
    with db.session() as session:
        task = session.get(Task, TASK)
        transitions = session.exec(
            __import__("sqlmodel").select(TaskTransition).where(TaskTransition.task == TASK)
        ).all()
    assert task is not None and task.stage == Stage.shadow.value and task.adapter == f"{TASK}@v1"
    assert task.features is not None and task.last_trained_at is not None
    assert [(t.from_stage, t.to_stage) for t in transitions] == [
        ("collecting", "training"),
        ("training", "shadow"),
    ]
    assert transitions[-1].evidence["finetuned"] == numbers["finetuned"]
    assert [t.stage for t in moved] == ["training", "shadow"]
    models = httpx.get(student.url + "/v1/models").json()["data"]
    assert f"{TASK}@v1" in {m["id"] for m in models}
    # Nothing is due any more: the task is in shadow, and no lock is left behind.
    assert scheduler.tick() == []
    with db.session() as session:
        assert session.get(TrainingLock, TASK) is None


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_candidate_under_the_bar_goes_back_to_collecting_with_the_reason(
    teacher: tuple[ScriptedTeacher, ServerThread],
    gateway: RunningGateway,
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    db = recorded(teacher, gateway, 60)
    policy = loop_policy(teacher[1].url, student.url, tiny_model, epochs=0.05, min_offline_score=0.99)
    (event,) = (Scheduler(db, lambda: policy, tmp_path / "adapters").run_task(TASK, "asked by the test"),)
    assert event.outcome == "rejected"
    with db.session() as session:
        task = session.get(Task, TASK)
    assert task is not None and task.stage == Stage.collecting.value
    assert task.reason is not None and "offline agreement" in task.reason and "bar 0.99" in task.reason
    assert httpx.get(student.url + "/v1/models").json()["data"][1:] == []  # nothing was published


def test_due_reason_is_pure_and_honours_the_bar_and_schedule() -> None:
    policy = parse_policy(
        {
            "teacher": {"base_url": "http://t/v1"},
            "defaults": {"train": {"min_new_records": 10, "schedule": "1h"}},
        }
    ).for_task("t")
    now = utcnow()
    fresh = Task(key="t")
    assert due_reason(fresh, policy, 9, now) is None
    assert due_reason(fresh, policy, 10, now) == "10 new teacher answers (bar 10)"
    recent = Task(key="t", last_trained_at=now - timedelta(minutes=30))
    assert due_reason(recent, policy, 100, now) is None
    assert due_reason(Task(key="t", last_trained_at=now - timedelta(hours=2)), policy, 100, now) is not None
    assert due_reason(Task(key="t", paused=True), policy, 100, now) is None
    off = parse_policy(
        {
            "teacher": {"base_url": "http://t/v1"},
            "defaults": {"distill": False, "train": {"min_new_records": 1}},
        }
    ).for_task("t")
    assert due_reason(fresh, off, 100, now) is None


def test_one_trainer_per_task_and_a_dead_holders_lease_expires(database_url: str) -> None:
    from gateway.store.db import Database

    db = Database(database_url)
    db.migrate()
    first = TrainingLease(db, "t", "worker-a", ttl_s=30)
    second = TrainingLease(db, "t", "worker-b", ttl_s=30)
    assert first.acquire()
    assert not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    # A worker that died holding the lease: its row expires and another takes over.
    with db.session() as session:
        session.add(TrainingLock(task="u", owner="dead", expires_at=utcnow() - timedelta(seconds=1)))
        session.commit()
    taker = TrainingLease(db, "u", "worker-c", ttl_s=30)
    assert taker.acquire()
    with db.session() as session:
        lock = session.get(TrainingLock, "u")
        assert lock is not None and lock.owner == "worker-c"
    taker.release()
    db.dispose()


def test_a_holder_whose_lease_was_taken_over_knows_it(database_url: str) -> None:
    import time

    from sqlalchemy import update
    from sqlmodel import col

    db = Database(database_url)
    db.migrate()
    lease = TrainingLease(db, "t", "slow-worker", ttl_s=0.6)  # renewed every 0.2 s
    assert lease.acquire()
    time.sleep(0.5)
    assert not lease.lost  # renewals keep it
    # Its lease expired while it could not reach the database, and another worker took it.
    with db.session() as session:
        session.execute(update(TrainingLock).where(col(TrainingLock.task) == "t").values(owner="other"))
        session.commit()
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lease.lost
    lease.release()
    with db.session() as session:
        row = session.get(TrainingLock, "t")
    assert row is not None and row.owner == "other"  # release leaves the new holder's row
    db.dispose()


def test_a_task_left_in_training_by_a_dead_trainer_goes_back_to_collecting(database_url: str) -> None:
    from router.stages import transition_task

    db = Database(database_url)
    db.migrate()
    with db.session() as session:
        session.add(Task(key="orphan"))
        session.add(Task(key="busy"))
        session.commit()
    policy = parse_policy(
        {
            "teacher": {"base_url": "http://t/v1"},
            "student": {"base_url": "http://s/v1", "base_model": "m", "engine": "embedded"},
            "defaults": {"train": {"min_new_records": 1000}},
        }
    )
    for key in ("orphan", "busy"):
        transition_task(db, key, Stage.training, "due", expect_stage=Stage.collecting)
    # "orphan": its trainer died, its lease expired; "busy": another worker holds a live lease.
    with db.session() as session:
        session.add(TrainingLock(task="orphan", owner="dead", expires_at=utcnow() - timedelta(seconds=1)))
        session.add(TrainingLock(task="busy", owner="alive", expires_at=utcnow() + timedelta(minutes=5)))
        session.commit()
    scheduler = Scheduler(db, lambda: policy, "unused-adapters")
    assert scheduler.tick() == []
    with db.session() as session:
        orphan, busy = session.get(Task, "orphan"), session.get(Task, "busy")
    assert orphan is not None and orphan.stage == Stage.collecting.value
    assert orphan.reason is not None and "interrupted" in orphan.reason
    assert busy is not None and busy.stage == Stage.training.value
    db.dispose()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_task_whose_teacher_answers_at_random_is_never_promoted_and_says_why(
    teacher: tuple[ScriptedTeacher, ServerThread],
    gateway: RunningGateway,
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    """Answers that do not depend on the prompt cannot be learnt: the trained candidate scores
    at chance on held-out answers and the task stays on the teacher, with the numbers."""
    rng = random.Random(11)
    words = [f"{a}{b}" for a in ("zo", "ka", "mi", "te", "ru") for b in ("lin", "par", "vos", "dek")]
    teacher[0].answer_fn = lambda body: {"role": "assistant", "content": rng.choice(words)}
    send_traffic_unchecked(gateway, 80)
    db = gateway.db()
    policy = loop_policy(teacher[1].url, student.url, tiny_model, epochs=3)

    (event,) = Scheduler(db, lambda: policy, tmp_path / "adapters").tick()

    assert event.outcome == "rejected", event.reason
    assert event.numbers["finetuned"] < 0.8 and event.numbers["holdout_examples"] >= 10
    with db.session() as session:
        task = session.get(Task, TASK)
    assert task is not None and task.stage == Stage.collecting.value and task.adapter is None
    assert task.reason is not None and "offline agreement" in task.reason
    assert "below the bar" in task.reason and "stays on the teacher" in task.reason
    assert httpx.get(student.url + "/v1/models").json()["data"][1:] == []  # nothing was published


def send_traffic_unchecked(gateway: RunningGateway, n: int) -> None:
    """``n`` intent emails through the gateway whatever the teacher answers; recorded."""
    client = openai.OpenAI(base_url=gateway.v1, api_key=gateway.key, max_retries=0)
    rng = random.Random(3)
    for i in range(n):
        email, _ = intent_email(i, rng)
        client.chat.completions.create(
            model="teacher-large",
            messages=[{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}],
            metadata={"task": TASK},
            temperature=0,
        )
    gateway.flush()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_parallel_trainings_run_at_once_and_report_from_a_later_pass(
    database_url: str,
    teacher: tuple[ScriptedTeacher, ServerThread],
    student: ServerThread,
    tiny_model: Path,
    tmp_path: Path,
) -> None:
    db = Database(database_url)
    db.migrate()
    keys = ("intent-a", "intent-b")
    with db.session() as session:
        session.add_all([Task(key=key) for key in keys])
        session.commit()
    for seed, key in enumerate(keys):
        add_records(db, intent_records(key, 160, seed=seed))
    policy = loop_policy(teacher[1].url, student.url, tiny_model)
    scheduler = Scheduler(db, lambda: policy, tmp_path / "adapters", parallel=2)
    moves: list[tuple[str, str]] = []
    scheduler.on_task.append(lambda task: moves.append((task.key, task.stage)))
    try:
        assert scheduler.tick() == []  # both started, neither waited for
        assert scheduler.running == set(keys)
        assert scheduler.tick() == []  # running tasks are not started again
        events = scheduler.wait(600)
    finally:
        asyncio.run(scheduler.stop())
    assert sorted(e.task for e in events) == sorted(keys)
    assert all(e.outcome == "shadow" for e in events), [e.reason for e in events]
    # Both were training before either was judged: the runs overlapped.
    first_judged = next(i for i, (_, stage) in enumerate(moves) if stage != Stage.training.value)
    assert {key for key, stage in moves[:first_judged] if stage == Stage.training.value} == set(keys)
    with db.session() as session:
        assert all(session.get(Task, key).stage == Stage.shadow.value for key in keys)  # type: ignore[union-attr]
    assert scheduler.tick() == []
    db.dispose()


def test_parallel_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Scheduler(None, lambda: None, tmp_path, parallel=0)  # type: ignore[arg-type]
