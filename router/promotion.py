"""Applies the gate to stored evidence: promotes, advances canary steps, and rolls back.

Synchronous (database); the gateway runs it in a worker thread. ``check`` reads a task's
scored pairs and acts on the verdict; ``student_outcome`` counts request-path student errors
so that a burst rolls the task back at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import ShadowPair, Stage, Task
from router.gate import GateVerdict, PairSummary, evaluate_audit, evaluate_promotion
from router.policy import Policy, TaskPolicy
from router.stages import StaleTransition, TransitionError, last_transition, transition_task

log = logging.getLogger("distillgate.promotion")


@dataclass(frozen=True)
class GateOutcome:
    """A verdict and, when it moved the task, the task as stored afterwards."""

    task: str
    from_stage: Stage
    verdict: GateVerdict
    applied: Task | None = None


TransitionCallback = Callable[[GateOutcome], None]
"""Called (in the caller's thread) after the gate moved a task: metrics, the gateway's task cache."""


class Promoter:
    """Moves tasks through shadow → canary → serving on evidence, and back on drift or errors."""

    def __init__(self, db: Database, policy: Callable[[], Policy | None]) -> None:
        self.db = db
        self.policy = policy
        self.on_transition: list[TransitionCallback] = []
        self._lock = threading.Lock()
        self._error_streaks: dict[str, tuple[str, int]] = {}

    # -- evidence ------------------------------------------------------------------------------
    def stage_began(self, task: Task) -> datetime:
        """When the task's current stage (or canary step) began: its last transition."""
        last = last_transition(self.db, task.key)
        return last.created_at if last is not None else task.first_seen_at

    def evidence(self, task: Task, kinds: Iterable[str], since: datetime) -> PairSummary:
        """Counts of the current adapter's pairs of ``kinds`` since ``since``."""
        with self.db.session() as session:
            n, passed = session.execute(
                sa_select(func.count(), func.sum(case((col(ShadowPair.passed), 1), else_=0))).where(
                    col(ShadowPair.task) == task.key,
                    col(ShadowPair.adapter) == (task.adapter or ""),
                    col(ShadowPair.kind).in_(list(kinds)),
                    col(ShadowPair.created_at) >= since,
                )
            ).one()
        return PairSummary(n=int(n), passed=int(passed or 0))

    def window(self, task: Task, kinds: Iterable[str], since: datetime, size: int) -> PairSummary:
        """The newest ``size`` pairs of ``kinds`` since ``since``, with their trailing error streak."""
        with self.db.session() as session:
            rows = session.exec(
                select(ShadowPair.passed, ShadowPair.error)
                .where(
                    col(ShadowPair.task) == task.key,
                    col(ShadowPair.adapter) == (task.adapter or ""),
                    col(ShadowPair.kind).in_(list(kinds)),
                    col(ShadowPair.created_at) >= since,
                )
                .order_by(col(ShadowPair.created_at).desc(), col(ShadowPair.id).desc())
                .limit(size)
            ).all()
        return PairSummary.from_outcomes((passed, error is not None) for passed, error in reversed(rows))

    # -- the gate ------------------------------------------------------------------------------
    def check(self, task_key: str) -> GateOutcome | None:
        """Evaluate one task and apply the verdict; ``None`` when the task is not gated now."""
        judged = self.judge(task_key)
        if judged is None:
            return None
        task, verdict, task_policy = judged
        if verdict.action == "hold":
            return GateOutcome(task_key, task.stage, verdict)
        return self._apply(task, verdict, task_policy)

    def judge(self, task_key: str) -> tuple[Task, GateVerdict, TaskPolicy] | None:
        """The verdict ``check`` would act on, without acting (the console shows it as the gate's
        evidence); ``None`` when the task is not gated now."""
        policy = self.policy()
        with self.db.session() as session:
            task = session.get(Task, task_key)
        if policy is None or task is None or task.paused or not task.adapter:
            return None
        stage = Stage(task.stage)
        task_policy = policy.for_task(task_key)
        since = self.stage_began(task)
        if stage is Stage.shadow:
            verdict = evaluate_promotion(self.evidence(task, ["shadow"], since), task_policy, stage)
        elif stage is Stage.canary:
            verdict = evaluate_audit(
                self.window(task, ["canary"], since, task_policy.audit.window), task_policy
            )
            if verdict.action != "rollback":
                summary = self.evidence(task, ["canary"], since)
                verdict = evaluate_promotion(summary, task_policy, stage, task.canary_step)
        elif stage is Stage.serving:
            verdict = evaluate_audit(
                self.window(task, ["audit"], since, task_policy.audit.window), task_policy
            )
        else:
            return None
        return task, verdict, task_policy

    def check_many(self, task_keys: Iterable[str]) -> list[GateOutcome]:
        """``check`` each task once (e.g. the tasks of a stored batch of pairs); errors are logged."""
        out = []
        for key in dict.fromkeys(task_keys):
            try:
                outcome = self.check(key)
            except Exception:
                log.exception("gate check of task %r failed", key)
                continue
            if outcome is not None:
                out.append(outcome)
        return out

    def _apply(self, task: Task, verdict: GateVerdict, task_policy: TaskPolicy) -> GateOutcome:
        stage = Stage(task.stage)
        if verdict.action == "rollback":
            to, step = Stage.rolled_back, None
        elif verdict.action == "advance_canary":
            to, step = Stage.canary, task.canary_step + 1
        elif stage is Stage.shadow:
            to, step = Stage.canary, 0
        else:
            to, step = Stage.serving, None
        try:
            applied = transition_task(
                self.db,
                task.key,
                to,
                verdict.reason,
                verdict.evidence,
                canary_step=step,
                canary=task_policy.canary,
                expect_stage=stage,
                expect_step=task.canary_step,
            )
        except StaleTransition:
            return GateOutcome(task.key, task.stage, verdict)  # another replica acted first
        except TransitionError as exc:
            log.error("gate verdict %s for task %r not applied: %s", verdict.action, task.key, exc)
            return GateOutcome(task.key, task.stage, verdict)
        log.info("task %r: %s → %s (%s)", task.key, task.stage, applied.stage, verdict.reason)
        outcome = GateOutcome(task.key, task.stage, verdict, applied)
        for callback in self.on_transition:
            try:
                callback(outcome)
            except Exception:
                log.exception("gate transition callback failed")
        return outcome

    # -- request-path student errors ---------------------------------------------------------------
    def student_outcome(self, task_key: str, adapter: str, ok: bool) -> bool:
        """Count a student-served request's outcome; True when it completes an error burst.

        Cheap and thread-safe, for the request path. When it returns True the caller runs
        ``rollback_for_errors`` (in a worker thread); the request itself already fell back to
        the teacher.
        """
        policy = self.policy()
        burst = policy.for_task(task_key).audit.error_burst if policy is not None else 0
        with self._lock:
            if ok:
                self._error_streaks.pop(task_key, None)
                return False
            last_adapter, streak = self._error_streaks.get(task_key, (adapter, 0))
            streak = streak + 1 if last_adapter == adapter else 1
            self._error_streaks[task_key] = (adapter, streak)
            return bool(burst) and streak == burst

    def error_streak(self, task_key: str) -> int:
        with self._lock:
            return self._error_streaks.get(task_key, ("", 0))[1]

    def rollback_for_errors(self, task_key: str, adapter: str) -> GateOutcome | None:
        """Roll back a canary or serving task whose student keeps failing (an error burst)."""
        policy = self.policy()
        with self.db.session() as session:
            task = session.get(Task, task_key)
        if policy is None or task is None or task.adapter != adapter:
            return None
        if task.stage not in (Stage.canary, Stage.serving):
            return None
        streak = self.error_streak(task_key)
        task_policy = policy.for_task(task_key)
        verdict = evaluate_audit(PairSummary(n=0, passed=0, consecutive_errors=streak), task_policy)
        if verdict.action != "rollback":
            return GateOutcome(task_key, task.stage, verdict)
        outcome = self._apply(task, verdict, task_policy)
        if outcome.applied is not None:
            with self._lock:
                self._error_streaks.pop(task_key, None)
        return outcome
