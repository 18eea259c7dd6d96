"""The task table (the gateway's view of its tasks): moves apply at once and a stale re-read never undoes them."""

from __future__ import annotations

from datetime import timedelta

from gateway.store.models import Stage, Task, utcnow
from router.stages import transition_task
from tests.conftest import RunningGateway


def test_a_task_refresh_that_read_the_table_before_a_move_does_not_undo_it(gateway: RunningGateway) -> None:
    gw, db = gateway.gateway.tasks, gateway.db()
    with db.session() as session:
        session.add(
            Task(key="t", stage=Stage.serving, adapter="t@v1", student_ratio=1.0, updated_at=utcnow())
        )
        session.commit()
    gw.load()
    assert gw.task_states["t"].stage is Stage.serving

    # A move applied by an admin call or the gate while a refresh was reading the table: the
    # refresh's rows are older than the move, so they must not put the old stage back.
    with db.session() as session:
        stored = session.get(Task, "t")
    assert stored is not None
    moved = Task.model_validate(
        stored.model_dump()
        | {
            "stage": "paused",
            "paused": True,
            "paused_from": "serving",
            "updated_at": utcnow() + timedelta(seconds=1),
        }
    )
    gw.apply(moved)
    gw.load()
    assert gw.task_states["t"].stage is Stage.paused

    # A newer stored row wins, and applying an older task object afterwards changes nothing.
    later = transition_task(db, "t", Stage.rolled_back, "test", forced=True)
    later.updated_at = moved.updated_at + timedelta(seconds=1)
    with db.session() as session:
        session.add(later)
        session.commit()
    gw.load()
    assert gw.task_states["t"].stage is Stage.rolled_back
    gw.apply(moved)
    assert gw.task_states["t"].stage is Stage.rolled_back
