"""The task state machine: legal, illegal and forced moves, pause/resume, and applying them to the store."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlmodel import select

from gateway.store.db import Database
from gateway.store.models import Stage, Task, TaskTransition
from router.stages import (
    RESUME,
    StageState,
    StaleTransition,
    TransitionError,
    UnknownTask,
    last_transition,
    promotion_target,
    transition,
    transition_task,
)

CANARY = (0.05, 0.25, 1.0)


def test_the_happy_path_walks_every_stage_with_the_right_traffic_share() -> None:
    s = StageState(Stage.collecting)
    s, r = transition(s, Stage.training, "300 new records")
    assert (s.stage, r.from_stage, r.to_stage, s.student_ratio) == (
        Stage.training,
        Stage.collecting,
        Stage.training,
        0,
    )
    s, r = transition(s, Stage.shadow, "offline score 0.97", {"offline": 0.97}, adapter="t@v1")
    assert (s.stage, s.adapter, r.adapter, r.evidence) == (Stage.shadow, "t@v1", "t@v1", {"offline": 0.97})
    shares = []
    s, r = transition(s, Stage.canary, "gate")
    shares.append((s.canary_step, s.student_ratio))
    for _ in range(2):
        s, r = transition(s, Stage.canary, "gate")
        shares.append((s.canary_step, s.student_ratio))
    assert shares == [(0, 0.05), (1, 0.25), (2, 1.0)]
    assert r.stored_evidence() == {"student_ratio": 1.0, "canary_step": 2}
    s, r = transition(s, Stage.serving, "gate")
    assert (s.stage, s.student_ratio, s.adapter, r.forced) == (Stage.serving, 1.0, "t@v1", False)
    s, r = transition(s, Stage.rolled_back, "audit drift", {"upper": 0.7})
    assert (s.stage, s.student_ratio, s.adapter) == (Stage.rolled_back, 0.0, "t@v1")
    s, _ = transition(s, Stage.collecting, "retrain")
    assert (s.stage, s.adapter) == (Stage.collecting, None)


ILLEGAL: list[tuple[StageState, Stage, str]] = [
    (StageState(Stage.collecting), Stage.shadow, "illegal transition collecting → shadow"),
    (StageState(Stage.collecting), Stage.serving, "illegal transition collecting → serving"),
    (StageState(Stage.training, adapter="a"), Stage.canary, "illegal transition training → canary"),
    (StageState(Stage.shadow, adapter="a"), Stage.serving, "illegal transition shadow → serving"),
    (StageState(Stage.shadow, adapter="a"), Stage.rolled_back, "illegal transition shadow → rolled_back"),
    (
        StageState(Stage.serving, adapter="a", student_ratio=1.0),
        Stage.canary,
        "illegal transition serving → canary",
    ),
    (StageState(Stage.rolled_back, adapter="a"), Stage.serving, "illegal transition rolled_back → serving"),
    (
        StageState(Stage.canary, adapter="a", canary_step=0),
        Stage.serving,
        "serving follows the last canary step",
    ),
    (StageState(Stage.canary, adapter="a", canary_step=2), Stage.canary, "canary step 3 does not exist"),
]


@pytest.mark.parametrize(("state", "to", "message"), ILLEGAL)
def test_illegal_moves_raise_a_clear_error(state: StageState, to: Stage, message: str) -> None:
    with pytest.raises(TransitionError, match=message):
        transition(state, to, "because", canary=CANARY)


def test_canary_moves_one_step_at_a_time() -> None:
    s = StageState(Stage.canary, adapter="a", canary_step=0, student_ratio=0.05)
    with pytest.raises(TransitionError, match="one step at a time"):
        transition(s, Stage.canary, "skip", canary_step=2)
    with pytest.raises(TransitionError, match="enters canary at step 0"):
        transition(StageState(Stage.shadow, adapter="a"), Stage.canary, "skip", canary_step=1)


@pytest.mark.parametrize(
    ("state", "to"),
    [
        (StageState(Stage.collecting, adapter="a"), Stage.serving),
        (StageState(Stage.serving, adapter="a"), Stage.shadow),
        (StageState(Stage.shadow, adapter="a"), Stage.rolled_back),
        (StageState(Stage.rolled_back, adapter="a"), Stage.canary),
        (StageState(Stage.training), Stage.collecting),
    ],
)
def test_forced_moves_go_anywhere_and_are_marked_forced(state: StageState, to: Stage) -> None:
    new, record = transition(state, to, "engineer says so", forced=True)
    assert new.stage is to and record.forced


def test_forced_moves_still_refuse_incoherent_states() -> None:
    with pytest.raises(TransitionError, match="needs an adapter"):
        transition(StageState(Stage.collecting), Stage.serving, "no adapter", forced=True)
    with pytest.raises(TransitionError, match="does not exist"):
        transition(StageState(Stage.shadow, adapter="a"), Stage.canary, "x", forced=True, canary_step=5)
    new, _ = transition(StageState(Stage.shadow, adapter="a"), Stage.canary, "x", forced=True, canary_step=1)
    assert (new.canary_step, new.student_ratio) == (1, 0.25)
    with pytest.raises(TransitionError, match="unknown stage"):
        transition(StageState(Stage.shadow, adapter="a"), "promoted", "x", forced=True)


def test_pause_keeps_the_stage_to_resume_to_and_stops_student_traffic() -> None:
    canary = StageState(Stage.canary, adapter="a", canary_step=1, student_ratio=0.25)
    paused, record = transition(canary, Stage.paused, "incident")
    assert (paused.stage, paused.paused_from, paused.student_ratio, paused.adapter) == (
        Stage.paused,
        Stage.canary,
        0.0,
        "a",
    )
    with pytest.raises(TransitionError, match="can only resume to canary"):
        transition(paused, Stage.serving, "skip ahead")
    resumed, record = transition(paused, RESUME, "incident over")
    assert (resumed.stage, resumed.canary_step, resumed.student_ratio, resumed.paused_from) == (
        Stage.canary,
        1,
        0.25,
        None,
    )
    assert (record.from_stage, record.to_stage) == (Stage.paused, Stage.canary)
    same, _ = transition(paused, Stage.canary, "explicit resume")
    assert same.stage is Stage.canary and same.canary_step == 1
    with pytest.raises(TransitionError, match="only a paused task can be resumed"):
        transition(canary, RESUME, "not paused")


@pytest.mark.parametrize("stage", [s for s in Stage if s is not Stage.paused])
def test_every_stage_can_be_paused(stage: Stage) -> None:
    adapter = "a" if stage in (Stage.shadow, Stage.canary, Stage.serving) else None
    paused, _ = transition(StageState(stage, adapter=adapter), Stage.paused, "hold everything")
    assert paused.paused_from is stage


def test_promotion_target_follows_the_policys_canary_steps() -> None:
    assert promotion_target(StageState(Stage.shadow, adapter="a"), CANARY) == (Stage.canary, 0)
    assert promotion_target(StageState(Stage.canary, adapter="a", canary_step=1), CANARY) == (Stage.canary, 2)
    assert promotion_target(StageState(Stage.canary, adapter="a", canary_step=2), CANARY) == (
        Stage.serving,
        0,
    )
    assert promotion_target(StageState(Stage.canary, adapter="a", canary_step=0), (1.0,)) == (
        Stage.serving,
        0,
    )
    with pytest.raises(TransitionError, match="no next stage"):
        promotion_target(StageState(Stage.serving, adapter="a"))


# --- the store: SQLite and PostgreSQL -----------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Any:
    database = Database(database_url)
    database.create_all()
    with database.session() as session:
        session.add(Task(key="classify", stage=Stage.shadow, adapter="classify@v1"))
        session.commit()
    yield database
    database.dispose()


def test_transition_task_updates_the_task_and_records_the_transition(db: Database) -> None:
    task = transition_task(
        db, "classify", Stage.canary, "gate: lower 0.97", {"n": 200, "lower": 0.97}, canary=CANARY
    )
    assert (task.stage, task.canary_step, task.student_ratio, task.adapter, task.reason) == (
        "canary",
        0,
        0.05,
        "classify@v1",
        "gate: lower 0.97",
    )
    with db.session() as session:
        stored = session.get(Task, "classify")
        rows = session.exec(select(TaskTransition).where(TaskTransition.task == "classify")).all()
    assert stored is not None and stored.stage == "canary" and stored.student_ratio == 0.05
    assert len(rows) == 1
    row = rows[0]
    assert (row.from_stage, row.to_stage, row.adapter, row.forced) == (
        "shadow",
        "canary",
        "classify@v1",
        False,
    )
    assert row.evidence == {"student_ratio": 0.05, "canary_step": 0, "n": 200, "lower": 0.97}
    latest = last_transition(db, "classify")
    assert latest is not None and latest.id == row.id


def test_pause_and_resume_round_trip_through_the_store(db: Database) -> None:
    paused = transition_task(db, "classify", Stage.paused, "incident")
    assert (paused.stage, paused.paused, paused.paused_from, paused.student_ratio) == (
        "paused",
        True,
        "shadow",
        0.0,
    )
    resumed = transition_task(db, "classify", RESUME, "over")
    assert (resumed.stage, resumed.paused, resumed.paused_from) == ("shadow", False, None)


def test_an_illegal_move_changes_nothing_in_the_store(db: Database) -> None:
    with pytest.raises(TransitionError):
        transition_task(db, "classify", Stage.serving, "too early")
    with db.session() as session:
        assert session.get(Task, "classify").stage == "shadow"  # type: ignore[union-attr]
        assert session.exec(select(TaskTransition)).all() == []


def test_forced_transition_is_stored_as_forced(db: Database) -> None:
    task = transition_task(db, "classify", Stage.serving, "engineer override", forced=True)
    assert task.stage == "serving" and task.student_ratio == 1.0
    latest = last_transition(db, "classify")
    assert latest is not None and latest.forced


def test_unknown_task_and_stale_expectations_are_refused(db: Database) -> None:
    with pytest.raises(UnknownTask):
        transition_task(db, "nope", Stage.training, "x")
    with pytest.raises(StaleTransition, match="is in shadow, not canary"):
        transition_task(db, "classify", Stage.canary, "x", expect_stage=Stage.canary, expect_step=0)


def test_two_replicas_promoting_at_once_apply_one_promotion(db: Database) -> None:
    transition_task(db, "classify", Stage.canary, "enter canary", canary=CANARY)
    outcomes: list[str] = []
    barrier = threading.Barrier(4)

    def advance() -> None:
        barrier.wait()
        try:
            transition_task(
                db, "classify", Stage.canary, "gate", canary=CANARY, expect_stage=Stage.canary, expect_step=0
            )
            outcomes.append("applied")
        except StaleTransition:
            outcomes.append("stale")
        except TransitionError:
            outcomes.append("illegal")

    threads = [threading.Thread(target=advance) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(outcomes) == 4 and outcomes.count("applied") == 1
    with db.session() as session:
        assert session.get(Task, "classify").canary_step == 1  # type: ignore[union-attr]
        assert len(session.exec(select(TaskTransition)).all()) == 2
