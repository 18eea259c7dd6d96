"""The running gateway: every client, queue and background task, created in the app's lifespan.

Handlers reach it as ``request.app.state.gateway``; nothing here runs at import time.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
from pathlib import Path
from typing import Any

from gateway.auth import ANONYMOUS, Caller, KeyRing
from gateway.cache import PromptCache
from gateway.errors import UpstreamError
from gateway.metrics import Metrics
from gateway.recorder import Recorder
from gateway.settings import Settings
from gateway.shedding import LoopLag
from gateway.store.db import Database
from gateway.store.models import Stage, Task
from gateway.upstream import Upstream, answer_json
from router.decide import TaskState
from router.policy import Policy
from router.policy_store import PolicyStore
from router.promotion import GateOutcome, Promoter
from router.shadow import ScoredPair, ShadowMirror

log = logging.getLogger("distillgate")


class Gateway:
    """Owns the database, recorder, key ring, upstream pools and policy of one process."""

    def __init__(self, settings: Settings, *, policy: Policy | None = None) -> None:
        self.settings = settings
        self._policy = policy
        self.db = Database(settings.database_url)
        self.metrics = Metrics()
        self.recorder = Recorder(self.db, settings.recorder, self.metrics, lambda: self.policy)
        admin_key = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
        self.keys = KeyRing(self.db, admin_key=admin_key)
        self.cache = PromptCache(self.db)
        self.teacher: Upstream | None = None
        self.student: Upstream | None = None
        self.tasks: dict[str, Task] = {}
        """Task rows, refreshed from the database every ``task_refresh_s``."""
        self.task_states: dict[str, TaskState] = {}
        """What the route decision reads, rebuilt with ``tasks``."""
        self._tasks_lock = threading.Lock()
        """Serialises updates of ``tasks``: the refresh, the gate and admin moves run in threads."""
        self.policy_store: PolicyStore | None = None
        self.scheduler: Any = None
        """The in-process training scheduler (``trainer.scheduler.Scheduler``) when ``run_scheduler``."""
        self.promoter = Promoter(self.db, lambda: self.policy)
        self.promoter.on_transition.append(self._on_transition)
        self.shadow = ShadowMirror(self.db, lambda: self.policy, self._student_call, self._teacher_call)
        self.shadow.on_pair.append(
            lambda p: self.metrics.shadow_score.labels(p.job.task, p.job.adapter, p.scorer).observe(p.score)
        )
        self.shadow.on_drop.append(lambda job: self.metrics.shadow_dropped.labels(job.task).inc())
        self.shadow.on_stored.append(self._check_promotions)
        self.task_refresh_s = 1.0
        self._background: list[asyncio.Task[None]] = []
        self.in_flight = 0
        self.loop_lag = LoopLag()
        self.started = False
        self.db_ready = False

    @property
    def policy(self) -> Policy | None:
        return self._policy

    def _check_promotions(self, batch: list[ScoredPair]) -> None:
        """After shadow pairs are stored: run the gate for the tasks they belong to."""
        self.promoter.check_many({pair.job.task for pair in batch})

    def set_policy(self, policy: Policy) -> None:
        """Swap the policy atomically; upstream pools are rebuilt only when an endpoint changed."""
        old = self._policy
        self._policy = policy
        if old is None or old.teacher != policy.teacher or self.teacher is None:
            self._replace_upstream(
                "teacher",
                Upstream(
                    "teacher",
                    policy.teacher.base_url,
                    self.settings.upstream,
                    api_key=policy.teacher.api_key(),
                    headers=policy.teacher.headers,
                    timeout_s=policy.teacher.timeout,
                ),
            )
        if policy.student is None:
            self._replace_upstream("student", None)
        elif old is None or old.student != policy.student or self.student is None:
            self._replace_upstream(
                "student",
                Upstream(
                    "student",
                    policy.student.base_url,
                    self.settings.upstream,
                    api_key=policy.student.api_key(),
                    timeout_s=policy.student.timeout,
                ),
            )

    def _replace_upstream(self, name: str, upstream: Upstream | None) -> None:
        previous: Upstream | None = getattr(self, name)
        setattr(self, name, upstream)
        if previous is not None:
            asyncio.get_running_loop().create_task(previous.close())

    async def start(self) -> None:
        if self.settings.migrate_on_start:
            try:
                await asyncio.to_thread(self.db.migrate)
                self.db_ready = True
            except Exception as exc:
                # Serve anyway: the recorder spools until the database is back.
                log.error("database migration failed (%s); serving with the spool", type(exc).__name__)
        else:
            self.db_ready = True
        if self.settings.policy_file is not None:
            path = Path(self.settings.policy_file)
            if self._policy is None:
                self.policy_store = await asyncio.to_thread(PolicyStore, path)
            else:
                self.policy_store = PolicyStore(path, policy=self._policy)
        elif self._policy is not None:
            self.policy_store = PolicyStore(policy=self._policy)
        if self.policy_store is not None:
            self._policy = None
            self.set_policy(self.policy_store.policy)
            self.policy_store.on_reload(self.set_policy)
            await self.policy_store.start()
        self.recorder.start()
        await self.shadow.start()
        if self.settings.run_scheduler:
            await self.start_scheduler()
        await self.keys.start()
        await asyncio.to_thread(self._load_tasks)
        self._background.append(asyncio.create_task(self._refresh_tasks(), name="distillgate-tasks"))
        await self.loop_lag.start()
        # Everything allocated so far lives as long as the process: keep it out of the cyclic
        # collector's full passes, which otherwise stalled requests for 60-130 ms under load.
        gc.collect()
        gc.freeze()
        if self.settings.gil_switch_interval_s is not None:
            sys.setswitchinterval(self.settings.gil_switch_interval_s)
        self.started = True

    async def start_scheduler(self) -> None:
        """Train in this process (one machine). Imports torch lazily: the gateway alone stays light."""
        try:
            from trainer.scheduler import Scheduler
        except ImportError as exc:
            log.warning("training scheduler off: the train extra is not installed (%s)", exc.name)
            return
        self.scheduler = Scheduler(
            self.db,
            lambda: self.policy,
            self.settings.adapters_dir,
            interval_s=self.settings.scheduler_interval_s,
        )
        self.scheduler.on_task.append(self.apply_task)
        self.scheduler.on_event.append(
            lambda e: (
                self.metrics.training_runs.labels(e.task, e.outcome).inc() if e.outcome != "skipped" else None
            )
        )
        await self.scheduler.start()

    async def stop(self) -> None:
        await self.loop_lag.stop()
        if self.scheduler is not None:
            await self.scheduler.stop()
        if self.policy_store is not None:
            await self.policy_store.stop()
        await self.shadow.stop()
        await self.cache.drain()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.keys.stop()
        await asyncio.to_thread(self.recorder.stop)
        for upstream in (self.teacher, self.student):
            if upstream is not None:
                await upstream.close()
        self.db.dispose()

    def serving_adapters(self) -> list[tuple[str, str]]:
        """(adapter, task) for each task whose student serves traffic now."""
        return [
            (t.adapter, t.key)
            for t in self.tasks.values()
            if t.adapter and t.stage in (Stage.canary, Stage.serving)
        ]

    def _load_tasks(self) -> None:
        from sqlmodel import select

        try:
            with self.db.session() as session:
                rows = session.exec(select(Task)).all()
        except Exception:
            return  # keep the last known states while the database is away
        with self._tasks_lock:
            loaded = {row.key: row for row in rows}
            # A transition applied while this read was in flight (gate, admin, scheduler) is
            # newer than what was read: keep it, or routing would step back for a refresh period.
            for key, task in self.tasks.items():
                if key not in loaded or task.updated_at > loaded[key].updated_at:
                    loaded[key] = task
            self._set_tasks(loaded)

    def _set_tasks(self, tasks: dict[str, Task]) -> None:
        policy = self.policy
        student = policy.student if policy is not None else None
        self.task_states = {key: TaskState.from_task(task, student) for key, task in tasks.items()}
        self.tasks = tasks
        stages = tuple(Stage)
        for key, task in tasks.items():
            self.metrics.set_stage(key, task.stage, stages)
            self.metrics.student_ratio.labels(key).set(task.student_ratio)

    def _on_transition(self, outcome: GateOutcome) -> None:
        """The gate moved a task (in some thread): route on its new state at once, count it."""
        task = outcome.applied
        if task is None:
            return
        self.apply_task(task)
        if outcome.verdict.action == "rollback":
            self.metrics.rollbacks.labels(task.key).inc()
        else:
            self.metrics.promotions.labels(task.key).inc()

    def apply_task(self, task: Task) -> None:
        """Route on a task's new state now (after an admin or scheduler transition)."""
        with self._tasks_lock:
            current = self.tasks.get(task.key)
            if current is not None and current.updated_at > task.updated_at:
                return  # a later transition of this task is applied already
            tasks = dict(self.tasks)
            tasks[task.key] = task
            self._set_tasks(tasks)

    async def _student_call(self, adapter: str, body: dict[str, Any]) -> dict[str, Any]:
        if self.student is None:
            raise UpstreamError("No student is configured.")
        return await answer_json(self.student, "/chat/completions", {**body, "model": adapter})

    async def _teacher_call(self, body: dict[str, Any]) -> dict[str, Any]:
        return await answer_json(self.require_teacher(), "/chat/completions", body)

    async def _refresh_tasks(self) -> None:
        while True:
            await asyncio.sleep(self.task_refresh_s)
            # Each worker's own gauges (``/metrics`` may be served by another worker).
            self.metrics.in_flight.set(self.in_flight)
            self.metrics.loop_lag.set(self.loop_lag.lag_s)
            await asyncio.to_thread(self._load_tasks)

    async def authenticate(self, authorization: str | None) -> Caller:
        if not self.settings.auth.required:
            if authorization:
                # An admin credential still identifies an admin in no-auth mode.
                try:
                    return await self.keys.authenticate(authorization)
                except Exception:
                    return ANONYMOUS
            return ANONYMOUS
        return await self.keys.authenticate(authorization)

    def require_teacher(self) -> Upstream:
        if self.teacher is None:
            raise UpstreamError(
                "No teacher is configured: set `teacher.base_url` in the policy file.",
                code="no_teacher",
                status=503,
            )
        return self.teacher
