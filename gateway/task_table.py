"""The tasks as routing reads them, kept in memory: re-read every second (other replicas, the CLI
and the worker move tasks too) and changed at once by each transition this process applies
(``TaskTable.moved``, the one place a transition reaches the metrics)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Self

from sqlmodel import select

from gateway.metrics import Metrics
from gateway.store.db import Database
from gateway.store.models import Stage, Task
from router.decide import TaskState
from router.policy import Policy
from router.promotion import GateOutcome

_SERVING = frozenset({Stage.canary, Stage.serving})


class TaskTable:
    """Task rows (``rows``) and what the route decision reads (``task_states``), by task key."""

    def __init__(
        self, db: Database, metrics: Metrics, policy: Callable[[], Policy | None], *, refresh_s: float = 1.0
    ) -> None:
        self.db = db
        self.metrics = metrics
        self.policy = policy
        self.refresh_s = refresh_s
        self.rows: dict[str, Task] = {}
        self.task_states: dict[str, TaskState] = {}
        self._lock = threading.Lock()
        """Serialises updates: the refresh, the gate and admin moves run in threads."""
        self._refresh: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.load)
        self._refresh = asyncio.create_task(self._refresh_forever(), name="distillgate-tasks")
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            await asyncio.gather(self._refresh, return_exceptions=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            await asyncio.to_thread(self.load)

    def load(self) -> None:
        """Re-read every task from the database (in a worker thread); keeps the last known states
        while the database is away."""
        try:
            with self.db.session() as session:
                stored = session.exec(select(Task)).all()
        except Exception:
            return
        with self._lock:
            loaded = {row.key: row for row in stored}
            # A transition applied while this read was in flight (gate, admin, scheduler) is
            # newer than what was read: keep it, or routing would step back for a refresh period.
            for key, task in self.rows.items():
                if key not in loaded or task.updated_at > loaded[key].updated_at:
                    loaded[key] = task
            self._set(loaded)

    def apply(self, task: Task) -> None:
        """Route on a task's new state now (after a transition this process applied)."""
        with self._lock:
            current = self.rows.get(task.key)
            if current is not None and current.updated_at > task.updated_at:
                return  # a later transition of this task is applied already
            self._set({**self.rows, task.key: task})

    def moved(self, task: Task, *, promoted: bool = False) -> None:
        """``apply`` a transition and count it: a rollback, or (``promoted``) a promotion."""
        self.apply(task)
        if task.stage == Stage.rolled_back:
            self.metrics.child(self.metrics.rollbacks, task.key).inc()
        elif promoted:
            self.metrics.child(self.metrics.promotions, task.key).inc()

    def gate_moved(self, outcome: GateOutcome) -> None:
        """The gate's transitions (``Promoter.on_transition``, in the thread that ran the gate)."""
        if outcome.applied is not None:
            self.moved(outcome.applied, promoted=outcome.verdict.action != "rollback")

    def serving_adapters(self) -> list[tuple[str, str]]:
        """(adapter, task) for each task whose student serves traffic now."""
        return [(t.adapter, t.key) for t in self.rows.values() if t.adapter and t.stage in _SERVING]

    def _set(self, rows: dict[str, Task]) -> None:
        policy = self.policy()
        student = policy.student if policy is not None else None
        self.task_states = {key: TaskState.from_task(task, student) for key, task in rows.items()}
        self.rows = rows
        for key, task in rows.items():
            if self.metrics.has_task_label(key):
                self.metrics.set_stage(key, task.stage)
                self.metrics.student_ratio.labels(key).set(task.student_ratio)
