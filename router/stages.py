"""The task state machine: which stage changes are legal, and applying one to the store.

``transition`` is pure; ``transition_task`` applies it to a ``Task`` row and stores the
``TaskTransition`` beside it in one database transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import update
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import Stage, Task, TaskTransition, utcnow

DEFAULT_CANARY: Final = (0.05, 0.25, 1.0)

RESUME: Final = "resume"
"""``to_stage`` value that returns a paused task to the stage it was paused in."""

# Non-forced moves. Canary → canary (the next step) and paused → the stage it left are
# handled apart, as is "any stage → paused".
_ALLOWED: Final[dict[Stage, frozenset[Stage]]] = {
    Stage.collecting: frozenset({Stage.training}),
    Stage.training: frozenset({Stage.shadow, Stage.collecting}),
    Stage.shadow: frozenset({Stage.canary, Stage.collecting}),
    Stage.canary: frozenset({Stage.serving, Stage.rolled_back}),
    Stage.serving: frozenset({Stage.rolled_back}),
    Stage.rolled_back: frozenset({Stage.collecting}),
    Stage.paused: frozenset(),
}

_NEEDS_ADAPTER: Final = frozenset({Stage.shadow, Stage.canary, Stage.serving})


class TransitionError(ValueError):
    """The move is not allowed (or would leave the task incoherent); the message says why."""


class StaleTransition(TransitionError):
    """The task changed after the caller looked at it (another replica moved it first)."""


class UnknownTask(LookupError):
    """No task with that key is stored."""


class _Keep:
    def __repr__(self) -> str:
        return "KEEP"


KEEP: Final = _Keep()
"""Default ``adapter`` argument: leave the task's adapter as the transition's rules say."""


@dataclass(frozen=True)
class StageState:
    """The parts of a task the state machine owns."""

    stage: Stage
    adapter: str | None = None
    canary_step: int = 0
    student_ratio: float = 0.0
    paused_from: Stage | None = None
    """The stage a paused task resumes to."""

    @classmethod
    def from_task(cls, task: Task) -> StageState:
        return cls(
            stage=Stage(task.stage),
            adapter=task.adapter,
            canary_step=task.canary_step,
            student_ratio=task.student_ratio,
            paused_from=Stage(task.paused_from) if task.paused_from else None,
        )


@dataclass(frozen=True)
class TransitionRecord:
    """One stage change with its reason and the numbers behind it (a ``TaskTransition`` row)."""

    from_stage: Stage
    to_stage: Stage
    adapter: str | None
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    forced: bool = False
    canary_step: int = 0
    student_ratio: float = 0.0

    def stored_evidence(self) -> dict[str, Any]:
        """The evidence as stored, with the new traffic share (and canary step) the move set.

        Those two describe the task after the move and win over same-named evidence keys
        (the gate's ``canary_step`` is the step the evidence was gathered in: the one before).
        """
        out = dict(self.evidence)
        out["student_ratio"] = self.student_ratio
        if self.to_stage is Stage.canary:
            out["canary_step"] = self.canary_step
        else:
            out.pop("canary_step", None)
        return out


def student_ratio(stage: Stage, canary_step: int, canary: Sequence[float]) -> float:
    """The student's share of traffic in a stage: 0 before canary, the step's share, 1 serving."""
    if stage is Stage.serving:
        return 1.0
    if stage is Stage.canary:
        return float(canary[min(canary_step, len(canary) - 1)])
    return 0.0


def promotion_target(state: StageState, canary: Sequence[float] = DEFAULT_CANARY) -> tuple[Stage, int]:
    """The next stage (and canary step) up from ``state``: what "promote" means for it.

    collecting → training → shadow → canary 0 → … → last canary step → serving.
    """
    if state.stage is Stage.collecting:
        return Stage.training, 0
    if state.stage is Stage.training:
        return Stage.shadow, 0
    if state.stage is Stage.shadow:
        return Stage.canary, 0
    if state.stage is Stage.canary:
        if state.canary_step + 1 < len(canary):
            return Stage.canary, state.canary_step + 1
        return Stage.serving, 0
    raise TransitionError(f"a task in stage {state.stage} has no next stage to be promoted to")


def transition(
    state: StageState,
    to_stage: Stage | str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    forced: bool = False,
    *,
    adapter: str | _Keep | None = KEEP,
    canary_step: int | None = None,
    canary: Sequence[float] = DEFAULT_CANARY,
) -> tuple[StageState, TransitionRecord]:
    """Move ``state`` to ``to_stage`` (a ``Stage`` or ``RESUME``), or raise ``TransitionError``.

    Legal without ``forced``: collecting → training; training → shadow | collecting;
    shadow → canary (step 0) | collecting; canary i → canary i+1; last canary step → serving;
    canary | serving → rolled_back; rolled_back → collecting; any stage → paused; paused →
    the stage it was paused in (``RESUME``). ``forced`` (an engineer, through the admin API)
    allows any move, still refusing incoherent ones: shadow, canary and serving need an
    adapter, and a canary step must exist.

    Adapter: kept unless ``adapter`` is given; entering ``collecting`` clears it (the old
    candidate or serving adapter no longer matters). ``student_ratio`` follows the stage
    (``canary`` gives each step's share).
    """
    if to_stage == RESUME:
        if state.stage is not Stage.paused or state.paused_from is None:
            raise TransitionError(f"only a paused task can be resumed (this one is {state.stage})")
        to = state.paused_from
        resuming = True
    else:
        try:
            to = Stage(to_stage)
        except ValueError:
            raise TransitionError(
                f"unknown stage {to_stage!r} (one of {', '.join(Stage)}, or {RESUME})"
            ) from None
        resuming = state.stage is Stage.paused and to == state.paused_from
    frm = state.stage

    if to is Stage.canary:
        if canary_step is not None:
            step = canary_step
        elif frm is Stage.canary:
            step = state.canary_step + 1
        elif resuming:
            step = state.canary_step
        else:
            step = 0
        if not 0 <= step < len(canary):
            raise TransitionError(f"canary step {step} does not exist (the policy has {len(canary)} steps)")
    else:
        step = 0 if to is not Stage.paused else state.canary_step

    if not forced:
        _check_legal(state, frm, to, step, resuming, canary)

    new_adapter: str | None
    if isinstance(adapter, _Keep):
        new_adapter = None if to is Stage.collecting else state.adapter
    else:
        new_adapter = adapter
    if to in _NEEDS_ADAPTER and not new_adapter:
        raise TransitionError(f"stage {to} needs an adapter and the task has none")

    paused_from = (state.paused_from if frm is Stage.paused else frm) if to is Stage.paused else None
    ratio = 0.0 if to is Stage.paused else student_ratio(to, step, canary)
    new_state = StageState(
        stage=to, adapter=new_adapter, canary_step=step, student_ratio=ratio, paused_from=paused_from
    )
    record = TransitionRecord(
        from_stage=frm,
        to_stage=to,
        adapter=new_adapter,
        reason=reason,
        evidence=dict(evidence or {}),
        forced=forced,
        canary_step=step,
        student_ratio=ratio,
    )
    return new_state, record


def _check_legal(
    state: StageState, frm: Stage, to: Stage, step: int, resuming: bool, canary: Sequence[float]
) -> None:
    if frm is Stage.paused:
        if not resuming:
            back = state.paused_from or "its earlier stage"
            raise TransitionError(
                f"a paused task can only resume to {back}, not move to {to} (force it to do that)"
            )
        if to is Stage.canary and step != state.canary_step:
            raise TransitionError(f"a paused canary task resumes at its step {state.canary_step}, not {step}")
        return
    if to is Stage.paused:
        return
    if frm is Stage.canary and to is Stage.canary:
        if step != state.canary_step + 1:
            raise TransitionError(
                f"canary advances one step at a time: step {state.canary_step} → "
                f"{state.canary_step + 1}, not {step}"
            )
        return
    if frm is Stage.shadow and to is Stage.canary and step != 0:
        raise TransitionError(f"a task enters canary at step 0, not {step}")
    if frm is Stage.canary and to is Stage.serving and state.canary_step != len(canary) - 1:
        raise TransitionError(
            f"serving follows the last canary step ({len(canary) - 1}); "
            f"the task is at step {state.canary_step}"
        )
    if to not in _ALLOWED[frm]:
        allowed: list[str] = [*sorted(_ALLOWED[frm]), Stage.paused]
        if frm is Stage.canary:
            allowed.append("canary (next step)")
        raise TransitionError(
            f"illegal transition {frm} → {to} (allowed: {', '.join(allowed)}; force it to override)"
        )


def transition_task(
    db: Database,
    task_key: str,
    to_stage: Stage | str,
    reason: str,
    evidence: dict[str, Any] | None = None,
    forced: bool = False,
    *,
    adapter: str | _Keep | None = KEEP,
    canary_step: int | None = None,
    canary: Sequence[float] = DEFAULT_CANARY,
    expect_stage: Stage | str | None = None,
    expect_step: int | None = None,
) -> Task:
    """Apply a transition to the stored task and record it, atomically; return the new ``Task``.

    The row is locked (``SELECT … FOR UPDATE`` on PostgreSQL) and the update is conditional on
    the state it was computed from, so two replicas deciding the same promotion cannot both
    apply it: the second gets ``StaleTransition``. ``expect_stage``/``expect_step`` let a caller
    whose decision rests on an earlier read (the gate) refuse to act on a task that moved since.
    """
    with db.session() as session:
        task = session.exec(select(Task).where(Task.key == task_key).with_for_update()).first()
        if task is None:
            raise UnknownTask(f"no task {task_key!r}")
        state = StageState.from_task(task)
        if expect_stage is not None and state.stage != Stage(expect_stage):
            raise StaleTransition(f"task {task_key!r} is in {state.stage}, not {Stage(expect_stage)}")
        if expect_step is not None and state.canary_step != expect_step:
            raise StaleTransition(
                f"task {task_key!r} is at canary step {state.canary_step}, not {expect_step}"
            )
        new, record = transition(
            state, to_stage, reason, evidence, forced, adapter=adapter, canary_step=canary_step, canary=canary
        )
        now = utcnow()
        result = session.execute(
            update(Task)
            .where(
                col(Task.key) == task_key,
                col(Task.stage) == state.stage,
                col(Task.canary_step) == state.canary_step,
            )
            .values(
                stage=new.stage,
                adapter=new.adapter,
                canary_step=new.canary_step,
                student_ratio=new.student_ratio,
                paused=new.stage is Stage.paused,
                paused_from=new.paused_from,
                reason=reason,
                updated_at=now,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            session.rollback()
            raise StaleTransition(f"task {task_key!r} changed while the transition was being applied")
        session.add(
            TaskTransition(
                task=task_key,
                from_stage=record.from_stage,
                to_stage=record.to_stage,
                adapter=record.adapter,
                reason=record.reason,
                evidence=record.stored_evidence(),
                forced=record.forced,
                created_at=now,
            )
        )
        session.commit()
        stored = session.exec(
            select(Task).where(Task.key == task_key).execution_options(populate_existing=True)
        ).one()
        return stored


def last_transition(db: Database, task_key: str) -> TaskTransition | None:
    """The task's most recent transition: when its current stage (or canary step) began."""
    with db.session() as session:
        return session.exec(
            select(TaskTransition)
            .where(TaskTransition.task == task_key)
            .order_by(col(TaskTransition.created_at).desc(), col(TaskTransition.id).desc())
            .limit(1)
        ).first()
