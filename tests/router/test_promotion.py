"""The gate applied to stored pairs: shadow → canary steps → serving on evidence, rollback on drift and errors."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import ShadowPair, Stage, Task, TaskTransition, utcnow
from router.policy import Policy, parse_policy
from router.promotion import GateOutcome, Promoter


def make_policy(**defaults: Any) -> Policy:
    base: dict[str, Any] = {
        "promote": {"threshold": 0.8, "min_samples": 30, "confidence": 0.95},
        "audit": {"rollback_below": 0.7, "min_samples": 20, "window": 50, "error_burst": 3},
        "canary": [0.1, 0.5, 1.0],
    }
    base.update(defaults)
    return parse_policy({"teacher": {"base_url": "http://t/v1"}, "defaults": base})


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database(database_url)
    database.create_all()
    with database.session() as session:
        session.add(
            Task(
                key="classify",
                stage=Stage.shadow,
                adapter="classify@v1",
                first_seen_at=utcnow() - timedelta(hours=1),
            )
        )
        session.commit()
    yield database
    database.dispose()


def add_pairs(
    db: Database, n: int, *, passed: int, kind: str, adapter: str = "classify@v1", errors: int = 0
) -> None:
    """``n`` pairs, ``passed`` of them passing, the last ``errors`` of them student errors."""
    now = utcnow()
    with db.session() as session:
        for i in range(n):
            error = "timeout" if i >= n - errors else None
            session.add(
                ShadowPair(
                    record_id=f"r{i}",
                    task="classify",
                    adapter=adapter,
                    kind=kind,
                    passed=i < passed,
                    score=1.0 if i < passed else 0.0,
                    error=error,
                    created_at=now + timedelta(microseconds=i),
                )
            )
        session.commit()


def task(db: Database) -> Task:
    with db.session() as session:
        row = session.get(Task, "classify")
        assert row is not None
        return row


def transitions(db: Database) -> list[TaskTransition]:
    with db.session() as session:
        return list(session.exec(select(TaskTransition).order_by(col(TaskTransition.id))).all())


def test_the_task_walks_to_serving_with_fresh_evidence_at_every_step(db: Database) -> None:
    policy = make_policy()
    promoter = Promoter(db, lambda: policy)
    moved: list[GateOutcome] = []
    promoter.on_transition.append(moved.append)

    assert promoter.check("classify").verdict.action == "hold"  # type: ignore[union-attr]
    add_pairs(db, 30, passed=30, kind="shadow")
    outcome = promoter.check("classify")
    assert outcome is not None and outcome.verdict.action == "promote"
    assert (task(db).stage, task(db).canary_step, task(db).student_ratio) == ("canary", 0, 0.1)

    # The shadow evidence does not carry over: step 0 needs its own pairs.
    assert promoter.check("classify").verdict.action == "hold"  # type: ignore[union-attr]
    for step, ratio in ((1, 0.5), (2, 1.0)):
        add_pairs(db, 30, passed=30, kind="canary")
        assert promoter.check("classify").verdict.action == "advance_canary"  # type: ignore[union-attr]
        assert (task(db).stage, task(db).canary_step, task(db).student_ratio) == ("canary", step, ratio)
    add_pairs(db, 30, passed=30, kind="canary")
    assert promoter.check("classify").verdict.action == "promote"  # type: ignore[union-attr]
    assert (task(db).stage, task(db).student_ratio) == ("serving", 1.0)

    rows = transitions(db)
    assert [(r.from_stage, r.to_stage) for r in rows] == [
        ("shadow", "canary"),
        ("canary", "canary"),
        ("canary", "canary"),
        ("canary", "serving"),
    ]
    assert all(r.evidence["n"] == 30 and r.evidence["passed"] == 30 and not r.forced for r in rows)  # type: ignore[index]
    assert [r.evidence.get("canary_step") for r in rows] == [0, 1, 2, None]  # type: ignore[union-attr]
    assert [r.evidence["student_ratio"] for r in rows] == [0.1, 0.5, 1.0, 1.0]  # type: ignore[index]
    assert [o.applied.stage for o in moved] == ["canary", "canary", "canary", "serving"]  # type: ignore[union-attr]


def test_a_disagreeing_student_never_leaves_shadow(db: Database) -> None:
    policy = make_policy()
    promoter = Promoter(db, lambda: policy)
    add_pairs(db, 300, passed=150, kind="shadow")
    outcome = promoter.check("classify")
    assert outcome is not None and outcome.verdict.action == "hold" and outcome.applied is None
    assert task(db).stage == "shadow" and transitions(db) == []


def test_pairs_of_another_adapter_are_not_evidence(db: Database) -> None:
    policy = make_policy()
    add_pairs(db, 100, passed=100, kind="shadow", adapter="classify@v0")
    assert Promoter(db, lambda: policy).check("classify").verdict.evidence["n"] == 0  # type: ignore[union-attr]


def test_a_serving_task_whose_audits_drift_is_rolled_back(db: Database) -> None:
    policy = make_policy()
    promoter = Promoter(db, lambda: policy)
    from router.stages import transition_task

    transition_task(db, "classify", "serving", "set up", forced=True)
    add_pairs(db, 40, passed=20, kind="audit")
    outcome = promoter.check("classify")
    assert outcome is not None and outcome.verdict.action == "rollback"
    assert (task(db).stage, task(db).student_ratio) == ("rolled_back", 0.0)
    assert transitions(db)[-1].evidence["upper"] < 0.7  # type: ignore[index]


def test_a_canary_task_with_an_error_burst_in_its_pairs_is_rolled_back(db: Database) -> None:
    policy = make_policy()
    promoter = Promoter(db, lambda: policy)
    from router.stages import transition_task

    transition_task(db, "classify", "canary", "set up")
    add_pairs(db, 5, passed=2, kind="canary", errors=3)
    outcome = promoter.check("classify")
    assert outcome is not None and outcome.verdict.action == "rollback"
    assert "3 consecutive student errors" in outcome.verdict.reason
    assert task(db).stage == "rolled_back"


def test_request_path_errors_roll_back_at_the_burst_and_successes_reset_the_count(db: Database) -> None:
    policy = make_policy()  # error_burst: 3
    promoter = Promoter(db, lambda: policy)
    from router.stages import transition_task

    transition_task(db, "classify", "serving", "set up", forced=True)
    assert not promoter.student_outcome("classify", "classify@v1", ok=False)
    assert not promoter.student_outcome("classify", "classify@v1", ok=False)
    assert not promoter.student_outcome("classify", "classify@v1", ok=True)
    assert promoter.error_streak("classify") == 0
    burst = [promoter.student_outcome("classify", "classify@v1", ok=False) for _ in range(3)]
    assert burst == [False, False, True]
    outcome = promoter.rollback_for_errors("classify", "classify@v1")
    assert outcome is not None and outcome.applied is not None and outcome.applied.stage == "rolled_back"
    assert transitions(db)[-1].evidence["consecutive_errors"] == 3  # type: ignore[index]
    assert promoter.error_streak("classify") == 0
    # A second rollback for the same burst (another request finishing late) does nothing.
    assert promoter.rollback_for_errors("classify", "classify@v1") is None


def test_paused_and_ungated_tasks_are_left_alone(db: Database) -> None:
    policy = make_policy()
    promoter = Promoter(db, lambda: policy)
    from router.stages import transition_task

    add_pairs(db, 100, passed=100, kind="shadow")
    transition_task(db, "classify", "paused", "incident")
    assert promoter.check("classify") is None
    assert promoter.check("unknown") is None
    assert Promoter(db, lambda: None).check("classify") is None
    assert promoter.check_many(["classify", "classify", "unknown"]) == []
