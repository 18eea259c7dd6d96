"""Tasks as engineers see and steer them: the rows, details and shadow pairs behind
``GET /admin/tasks…`` and ``distillgate tasks``, and the forced moves both apply.

Synchronous (database); the gateway runs these in a worker thread. The admin API and the CLI
call the same functions and show the same typed views (``TaskRow``, ``TaskDetail``, ``PairView``),
so they show the same numbers and move tasks the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final, Literal

import msgspec
from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import Adapter, AnswerCheck, Record, ShadowPair, Stage, Task, TaskTransition
from router.stages import (
    DEFAULT_CANARY,
    KEEP,
    RESUME,
    StageState,
    TransitionError,
    UnknownTask,
    promotion_target,
    transition_task,
)

Action = Literal["promote", "rollback", "pause", "resume"]
ACTIONS: Final[tuple[Action, ...]] = ("promote", "rollback", "pause", "resume")

_STUDENT_STAGES: Final = frozenset({Stage.shadow, Stage.canary, Stage.serving})


class UnknownAdapter(LookupError):
    """No adapter of that name is registered for the task."""


class TaskRow(msgspec.Struct, kw_only=True):
    """A task with the shadow evidence of its current adapter."""

    task: str
    stage: Stage
    adapter: str | None
    student_ratio: float
    """The student's share of the task's traffic, set by its last transition."""
    canary_step: int
    paused_from: Stage | None
    pairs: int
    """Shadow, canary and audit pairs of the current adapter."""
    pass_rate: float | None
    mean_score: float | None
    reason: str | None
    """Why the task is where it is (its last transition's reason)."""
    updated_at: str


class KindSummary(msgspec.Struct, kw_only=True):
    """The current adapter's pairs of one kind (shadow, canary, audit)."""

    pairs: int
    pass_rate: float | None
    mean_score: float | None
    student_errors: int


class TransitionView(msgspec.Struct, kw_only=True):
    """A stage change with its reason and the numbers behind it."""

    id: int | None
    from_stage: Stage
    to_stage: Stage
    adapter: str | None
    reason: str
    evidence: dict[str, Any]
    forced: bool
    created_at: str


class AnswerChecks(msgspec.Struct, kw_only=True):
    """Teacher answers checked by a second model (the task's ``validate`` section)."""

    checked: int
    passed: int
    failed: int
    """Kept in the store, marked, and left out of datasets."""


class TaskDetail(TaskRow, kw_only=True):
    """A task's row, its training envelope, per-kind pair counts and its newest transitions."""

    first_seen_at: str
    features: dict[str, Any] | None
    """What the student was trained on (models, tools, max prompt tokens)."""
    pairs_by_kind: dict[str, KindSummary]
    transitions: list[TransitionView]
    """Newest first."""
    answer_checks: AnswerChecks


class PairView(msgspec.Struct, kw_only=True):
    """A scored shadow pair with both answers (each absent when the client opted out)."""

    id: int | None
    record_id: str
    adapter: str
    kind: str
    stage: Stage
    scorer: str
    score: float
    passed: bool
    error: str | None
    student_latency_ms: float | None
    student_response: dict[str, Any] | None
    teacher_response: dict[str, Any] | None
    created_at: str


def _row_fields(task: Task, n: int, passed: int, mean: float) -> dict[str, Any]:
    return {
        "task": task.key,
        "stage": task.stage,
        "adapter": task.adapter,
        "student_ratio": task.student_ratio,
        "canary_step": task.canary_step,
        "paused_from": task.paused_from,
        "pairs": n,
        "pass_rate": passed / n if n else None,
        "mean_score": mean if n else None,
        "reason": task.reason,
        "updated_at": task.updated_at.isoformat(),
    }


def task_rows(db: Database) -> list[TaskRow]:
    """Every stored task with its shadow evidence for the current adapter (all pairs so far).

    ``student_ratio`` is the student's share of the task's traffic set by its last transition.
    """
    with db.session() as session:
        tasks = session.exec(select(Task).order_by(col(Task.key))).all()
        counts = session.execute(
            sa_select(
                col(ShadowPair.task),
                col(ShadowPair.adapter),
                func.count(),
                func.sum(case((col(ShadowPair.passed), 1), else_=0)),
                func.avg(col(ShadowPair.score)),
            ).group_by(col(ShadowPair.task), col(ShadowPair.adapter))
        ).all()
    by_adapter = {(t, a): (int(n), int(p or 0), float(s or 0.0)) for t, a, n, p, s in counts}
    return [
        TaskRow(**_row_fields(task, *by_adapter.get((task.key, task.adapter or ""), (0, 0, 0.0))))
        for task in tasks
    ]


def transition_view(row: TaskTransition) -> TransitionView:
    return TransitionView(
        id=row.id,
        from_stage=row.from_stage,
        to_stage=row.to_stage,
        adapter=row.adapter,
        reason=row.reason,
        evidence=row.evidence or {},
        forced=row.forced,
        created_at=row.created_at.isoformat(),
    )


def task_detail(db: Database, key: str, transitions: int = 100) -> TaskDetail:
    """One task: its row (as ``task_rows``), its training envelope, per-kind pair counts for
    the current adapter, and its newest ``transitions`` with their evidence. Raises ``UnknownTask``."""
    with db.session() as session:
        task = session.get(Task, key)
        if task is None:
            raise UnknownTask(f"no task {key!r}")
        by_kind = session.execute(
            sa_select(
                col(ShadowPair.kind),
                func.count(),
                func.sum(case((col(ShadowPair.passed), 1), else_=0)),
                func.avg(col(ShadowPair.score)),
                func.sum(case((col(ShadowPair.error).is_not(None), 1), else_=0)),
            )
            .where(col(ShadowPair.task) == key, col(ShadowPair.adapter) == (task.adapter or ""))
            .group_by(col(ShadowPair.kind))
        ).all()
        checks = session.execute(
            sa_select(col(AnswerCheck.passed), func.count())
            .where(col(AnswerCheck.task) == key)
            .group_by(col(AnswerCheck.passed))
        ).all()
        moves = session.exec(
            select(TaskTransition)
            .where(TaskTransition.task == key)
            .order_by(col(TaskTransition.created_at).desc(), col(TaskTransition.id).desc())
            .limit(transitions)
        ).all()
    kinds: dict[str, KindSummary] = {}
    total = passed = 0
    score_sum = 0.0
    for kind, n, p, mean, errors in by_kind:
        n, p, mean = int(n), int(p or 0), float(mean or 0.0)
        total, passed, score_sum = total + n, passed + p, score_sum + mean * n
        kinds[kind] = KindSummary(
            pairs=n,
            pass_rate=p / n if n else None,
            mean_score=mean if n else None,
            student_errors=int(errors or 0),
        )
    mean = score_sum / total if total else 0.0
    return TaskDetail(
        **_row_fields(task, total, passed, mean),
        first_seen_at=task.first_seen_at.isoformat(),
        features=task.features,
        pairs_by_kind=kinds,
        transitions=[transition_view(row) for row in moves],
        answer_checks=AnswerChecks(
            checked=sum(int(n) for _, n in checks),
            passed=sum(int(n) for ok, n in checks if ok),
            failed=sum(int(n) for ok, n in checks if not ok),
        ),
    )


def recent_pairs(
    db: Database, key: str, limit: int = 50, *, kind: str | None = None, adapter: str | None = None
) -> list[PairView]:
    """The task's newest shadow pairs (all adapters unless ``adapter``), each with its scores,
    the student's answer and the teacher's (from the record; absent when the client opted out).
    Raises ``UnknownTask``."""
    with db.session() as session:
        if session.get(Task, key) is None:
            raise UnknownTask(f"no task {key!r}")
        query = select(ShadowPair).where(ShadowPair.task == key)
        if kind is not None:
            query = query.where(ShadowPair.kind == kind)
        if adapter is not None:
            query = query.where(ShadowPair.adapter == adapter)
        pairs = session.exec(
            query.order_by(col(ShadowPair.created_at).desc(), col(ShadowPair.id).desc()).limit(limit)
        ).all()
        ids = list({p.record_id for p in pairs})
        records = (
            {r.id: r for r in session.exec(select(Record).where(col(Record.id).in_(ids)))} if ids else {}
        )
    return [_pair_view(pair, records.get(pair.record_id)) for pair in pairs]


def shadow_pair(db: Database, key: str, pair_id: int) -> PairView | None:
    """One of the task's pairs, as ``recent_pairs`` shows it; ``None`` when the task has no such pair."""
    with db.session() as session:
        pair = session.get(ShadowPair, pair_id)
        if pair is None or pair.task != key:
            return None
        return _pair_view(pair, session.get(Record, pair.record_id))


def _pair_view(pair: ShadowPair, record: Record | None) -> PairView:
    return PairView(
        id=pair.id,
        record_id=pair.record_id,
        adapter=pair.adapter,
        kind=pair.kind,
        stage=pair.stage,
        scorer=pair.scorer,
        score=pair.score,
        passed=pair.passed,
        error=pair.error,
        student_latency_ms=pair.student_latency_ms,
        student_response=pair.student_response,
        teacher_response=_teacher_answer(record),
        created_at=pair.created_at.isoformat(),
    )


def _teacher_answer(record: Record | None) -> dict[str, Any] | None:
    # A mirrored pair's record holds the teacher's answer; an audited one holds the student's,
    # with the teacher's in its shadow summary.
    if record is None or not record.stored:
        return None
    if record.target == "teacher":
        return record.response
    teacher = (record.shadow or {}).get("teacher_response")
    return teacher if isinstance(teacher, dict) else None


def force_move(
    db: Database,
    key: str,
    move: Action | Stage | str,
    reason: str,
    *,
    source: str,
    adapter: str | None = None,
    canary_step: int | None = None,
    canary: Sequence[float] = DEFAULT_CANARY,
) -> Task:
    """Apply an engineer's move as a forced transition (stored with ``forced`` and its ``source``).

    ``move`` is an action (``promote`` to the next stage or canary step, ``rollback`` to the
    teacher, ``pause``, ``resume``) or a stage to go to, optionally with another ``adapter``
    (which must be registered for the task) and ``canary_step``. ``canary`` is the task
    policy's steps. Raises ``UnknownTask``, ``UnknownAdapter``, or ``TransitionError`` for a
    move that makes no sense here (promoting a serving task, resuming one that is not paused,
    pausing a paused one, moving to where the task already is, a stage without an adapter).
    """
    with db.session() as session:
        task = session.get(Task, key)
        registered = session.get(Adapter, adapter) if adapter is not None else None
    if task is None:
        raise UnknownTask(f"no task {key!r}")
    if adapter is not None and (registered is None or registered.task != key):
        raise UnknownAdapter(f"no adapter {adapter!r} is registered for task {key!r}")
    state = StageState.from_task(task)
    target: Stage | str
    step = canary_step
    if move == "promote":
        target, step = promotion_target(state, canary)
    elif move == "rollback":
        on_student = state.stage in _STUDENT_STAGES or (
            state.stage is Stage.paused and state.paused_from in _STUDENT_STAGES
        )
        if not on_student:
            raise TransitionError(f"task {key!r} is in {state.stage}: no student to roll back")
        target = Stage.rolled_back
    elif move == "pause":
        if state.stage is Stage.paused:
            raise TransitionError(f"task {key!r} is paused already")
        target = Stage.paused
    elif move == "resume":
        target = RESUME
    else:
        try:
            target = Stage(move)
        except ValueError:
            raise TransitionError(f"unknown stage {move!r} (one of {', '.join(Stage)})") from None
        same = target is state.stage and (target is not Stage.canary or step == state.canary_step)
        if same and adapter in (None, state.adapter):
            raise TransitionError(f"task {key!r} is in {target} already")
    return transition_task(
        db,
        key,
        target,
        reason,
        {"source": source},
        forced=True,
        adapter=KEEP if adapter is None else adapter,
        canary_step=step if target is Stage.canary else None,
        canary=canary,
        expect_stage=state.stage,
        expect_step=state.canary_step,
    )
