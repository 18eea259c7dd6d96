"""The scheduler that closes the loop: for each collecting task, decide when to train, train,
evaluate offline against the untuned base and the teacher, publish, and move the task on.

It runs inside the gateway (one machine) or as ``distillgate worker``. Training and the
offline evaluation run in a spawned child process (``trainer.isolation``), driven from a
worker thread: never on the event loop, never under its interpreter lock. Only one training
per task runs across every replica: a ``TrainingLock`` row whose holder renews it while it works and which expires if
the holder dies.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, or_, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import Adapter, Record, Stage, Task, TrainingLock, utcnow
from router.policy import Policy, TaskPolicy
from router.stages import TransitionError, transition_task
from trainer.dataset import snapshot_examples
from trainer.distributed import Torchrun
from trainer.evaluate import EvalResult, evaluate_base_and_adapter
from trainer.finetune import FinetuneConfig
from trainer.isolation import ChildDied, ChildProcess, Inline
from trainer.memory_plan import TrainingMemoryError
from trainer.publish import PublishError, StudentPublisher, publish_adapter
from trainer.registry import NotEnoughData, set_adapter_status, train_task
from trainer.validation import AnswerChecker, CheckCounts

log = logging.getLogger("distillgate.scheduler")

MAX_EVAL_EXAMPLES = 200
"""Held-out prompts answered in an offline evaluation (the rest stay held out, unused)."""


@dataclass
class SchedulerEvent:
    """What one pass did for one task (shown by the demo, stored in transitions)."""

    task: str
    outcome: str
    """``shadow`` (published, now mirrored) | ``rejected`` (offline bar not met) | ``failed`` | ``skipped``."""
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def usable_records_since(db: Database, task: str, since: Any, *, include_redacted: bool = True) -> int:
    """Teacher answers that could become training data, recorded after ``since`` (None: ever);
    records redaction changed count only when the task trains on them (``include_redacted``)."""
    with db.session() as session:
        stmt = (
            select(func.count())
            .select_from(Record)
            .where(
                Record.task == task,
                Record.target == "teacher",
                Record.status == 200,
                col(Record.stored).is_(True),
                Record.endpoint == "chat.completions",
            )
        )
        if since is not None:
            stmt = stmt.where(Record.created_at > since)
        if not include_redacted:
            stmt = stmt.where(col(Record.redacted).is_not(True))
        return int(session.exec(stmt).one())


def due_reason(task: Task, policy: TaskPolicy, new_records: int, now: Any) -> str | None:
    """Why ``task`` should train now, or None. Pure: the caller counts the records."""
    if not policy.distill or not policy.train.enabled or task.paused:
        return None
    if new_records < policy.train.min_new_records:
        return None
    if (
        task.last_trained_at is not None
        and (now - task.last_trained_at).total_seconds() < policy.train.schedule
    ):
        return None
    return f"{new_records} new teacher answers (bar {policy.train.min_new_records})"


class TrainingLease:
    """The per-task training lock: acquired atomically, renewed while held, expired if abandoned."""

    def __init__(self, db: Database, task: str, owner: str, ttl_s: float) -> None:
        self.db, self.task, self.owner, self.ttl_s = db, task, owner, ttl_s
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self.lost = False
        """Another holder took the lease (ours expired, e.g. the database was unreachable for a
        whole TTL): whatever this holder trained must not be published."""

    def acquire(self) -> bool:
        now = utcnow()
        expires = now + timedelta(seconds=self.ttl_s)
        with self.db.session() as session:
            taken = session.execute(
                update(TrainingLock)
                .where(
                    col(TrainingLock.task) == self.task,
                    or_(col(TrainingLock.expires_at) < now, col(TrainingLock.owner) == self.owner),
                )
                .values(owner=self.owner, acquired_at=now, expires_at=expires)
            )
            session.commit()
            if taken.rowcount:  # type: ignore[attr-defined]
                return self._hold()
            try:
                session.add(
                    TrainingLock(task=self.task, owner=self.owner, acquired_at=now, expires_at=expires)
                )
                session.commit()
            except IntegrityError:
                session.rollback()
                return False
        return self._hold()

    def _hold(self) -> bool:
        self._renewer = threading.Thread(target=self._renew, name=f"lease-{self.task}", daemon=True)
        self._renewer.start()
        return True

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                with self.db.session() as session:
                    renewed = session.execute(
                        update(TrainingLock)
                        .where(col(TrainingLock.task) == self.task, col(TrainingLock.owner) == self.owner)
                        .values(expires_at=utcnow() + timedelta(seconds=self.ttl_s))
                    )
                    session.commit()
            except Exception:
                log.warning("could not renew the training lock of %s", self.task)
                continue
            if not renewed.rowcount:  # type: ignore[attr-defined]
                self.lost = True
                log.warning("the training lock of %s was taken over by another worker", self.task)
                return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(5)
        with self.db.session() as session:
            session.execute(
                delete(TrainingLock).where(
                    col(TrainingLock.task) == self.task, col(TrainingLock.owner) == self.owner
                )
            )
            session.commit()


class Scheduler:
    """Trains tasks when they are due and moves them collecting → training → shadow (or back)."""

    def __init__(
        self,
        db: Database,
        policy: Callable[[], Policy | None],
        adapters_dir: str | Path,
        *,
        interval_s: float = 10.0,
        lock_ttl_s: float = 300.0,
        owner: str | None = None,
        finetune_overrides: dict[str, Any] | None = None,
        progress: bool | Callable[[Any], None] = False,
        isolate: bool = True,
        parallel: int = 1,
    ) -> None:
        self.db = db
        self.policy = policy
        self.adapters_dir = Path(adapters_dir)
        self.interval_s = interval_s
        self.lock_ttl_s = lock_ttl_s
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.finetune_overrides = finetune_overrides or {}
        self.progress = progress
        self.isolate = isolate and not callable(progress)
        """Train and evaluate in a child process (a progress callback needs this process)."""
        self._runners: set[Inline | Torchrun] = set()
        self._stopping = False
        self.events: list[SchedulerEvent] = []
        self.on_event: list[Callable[[SchedulerEvent], None]] = []
        self.on_task: list[Callable[[Task], None]] = []
        """Called with each task the scheduler moved (the gateway routes on it at once)."""
        self.on_check: list[Callable[[CheckCounts], None]] = []
        """Called after each pass of answer checks (the gateway counts them in its metrics)."""
        self._task: asyncio.Task[None] | None = None
        self._busy = threading.Lock()
        if parallel < 1:
            raise ValueError(f"parallel must be at least 1, not {parallel}")
        self.parallel = parallel
        """Trainings at once. 1: a pass trains each due task in turn and returns when done. More:
        a pass starts due tasks in background threads while fewer than ``parallel`` run and
        returns at once; their events come from a later pass (and ``on_event``). Each training
        is its own child process; on a CPU machine with ``train.cpu_threads: auto`` two
        single-thread trainings use two cores better than one two-thread training."""
        self._running: dict[str, concurrent.futures.Future[SchedulerEvent]] = {}
        self._pool = (
            concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="distillgate-train")
            if parallel > 1
            else None
        )

    # -- the loop ----------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="distillgate-scheduler")

    async def stop(self) -> None:
        # A training in progress is stopped, not waited for: its task goes back to collecting.
        self._stopping = True
        for runner in list(self._runners):
            runner.kill()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._pool is not None:
            for runner in list(self._runners):  # started after the first kill
                runner.kill()
            await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self.tick)
            except Exception:
                log.exception("scheduler pass failed")
            await asyncio.sleep(self.interval_s)

    def tick(self) -> list[SchedulerEvent]:
        """One pass over every task; returns what it did. Thread-safe (one pass at a time)."""
        policy = self.policy()
        if policy is None or policy.student is None:
            return []
        with self._busy:
            events = self._finished()
            with self.db.session() as session:
                tasks = session.exec(select(Task)).all()
            for task in tasks:
                if task.stage == Stage.rolled_back:
                    self._move(
                        task.key,
                        Stage.collecting,
                        "collecting again after a rollback",
                        None,
                        expect=Stage.rolled_back,
                    )
                    continue
                if task.stage == Stage.training and self._abandoned(task.key):
                    # Its trainer died (process killed, machine lost) before moving it on.
                    self._move(
                        task.key,
                        Stage.collecting,
                        "collecting again: its training run was interrupted (the trainer stopped"
                        " and its lease expired)",
                        None,
                        expect=Stage.training,
                    )
                    continue
                if task.stage != Stage.collecting:
                    continue
                self.check_answers(policy, task.key)
                tp = policy.for_task(task.key)
                now = utcnow()
                reason = due_reason(
                    task,
                    tp,
                    usable_records_since(
                        self.db, task.key, task.last_trained_at, include_redacted=tp.redact.train_on_redacted
                    ),
                    now,
                )
                if reason is None:
                    continue
                if self._pool is None:
                    events.append(self.run_task(task.key, reason))
                elif len(self._running) < self.parallel and task.key not in self._running:
                    self._running[task.key] = self._pool.submit(self.run_task, task.key, reason)
            return events

    def _finished(self) -> list[SchedulerEvent]:
        """Events of the background trainings that ended since the last pass."""
        events = []
        for key, future in list(self._running.items()):
            if future.done():
                del self._running[key]
                if not future.cancelled() and future.exception() is None:
                    events.append(future.result())
                elif not future.cancelled():
                    log.error("training %s failed outside its run", key, exc_info=future.exception())
        return events

    @property
    def running(self) -> set[str]:
        """Keys of the tasks whose background training (``parallel`` > 1) has not been reported."""
        return set(self._running)

    def wait(self, timeout_s: float | None = None) -> list[SchedulerEvent]:
        """Wait for the background trainings started so far (``parallel`` > 1); their events."""
        concurrent.futures.wait(list(self._running.values()), timeout=timeout_s)
        with self._busy:
            return self._finished()

    def check_answers(self, policy: Policy, key: str, limit: int = 200) -> CheckCounts | None:
        """Score the task's unchecked teacher answers (its ``validate`` section), so failed ones
        stay out of its next dataset; None when the task has no ``validate`` section."""
        if policy.for_task(key).validate_answers is None:
            return None
        try:
            counts = AnswerChecker(self.db, policy).run(key, limit=limit)
        except Exception:
            log.exception("answer checks of %s failed", key)
            return None
        if counts is not None:
            for listener in self.on_check:
                listener(counts)
        return counts

    def _abandoned(self, key: str) -> bool:
        """A task in training whose lease is gone or expired: nobody is training it any more.
        (A trainer takes the lease before it moves the task to training and frees it after.)"""
        with self.db.session() as session:
            lock = session.get(TrainingLock, key)
            return lock is None or lock.expires_at < utcnow()

    # -- one task ----------------------------------------------------------------------------
    def run_task(self, key: str, reason: str = "asked to train") -> SchedulerEvent:
        """Train, evaluate and publish one task now (``distillgate train`` and the loop use this)."""
        policy = self.policy()
        if policy is None or policy.student is None:
            return self._event(key, "skipped", "no student is configured in the policy")
        lease = TrainingLease(self.db, key, self.owner, self.lock_ttl_s)
        if not lease.acquire():
            return self._event(key, "skipped", "another worker is training this task")
        try:
            moved = self._move(key, Stage.training, reason, None, expect=Stage.collecting)
            if moved is None:
                return self._event(key, "skipped", "the task left collecting meanwhile")
            return self._train_and_judge(key, policy, lease)
        finally:
            lease.release()

    def _train_and_judge(self, key: str, policy: Policy, lease: TrainingLease) -> SchedulerEvent:
        runner = ChildProcess(f"distillgate-train-{key}") if self.isolate else Inline()
        # More than one GPU: the training itself is a torchrun job (its own processes); the
        # offline evaluation stays in the child.
        gpus = policy.for_task(key).train.gpus
        training: Inline | Torchrun = Torchrun(gpus) if gpus > 1 else runner
        self._runners.update((runner, training))
        try:
            if self._stopping:
                runner.kill()
                training.kill()
            return self._train_and_judge_with(key, policy, runner, lease, training)
        finally:
            self._runners.discard(runner)
            self._runners.discard(training)
            runner.close()

    def _train_and_judge_with(
        self, key: str, policy: Policy, runner: Inline, lease: TrainingLease, training: Inline | Torchrun
    ) -> SchedulerEvent:
        assert policy.student is not None
        tp = policy.for_task(key)
        base_model = policy.student.base_model
        if tp.validate_answers is not None:
            # Every answer the dataset may take is checked first (a bounded pass at a time).
            while (counts := self.check_answers(policy, key, limit=500)) is not None and counts.checked:
                pass
        started = time.perf_counter()
        try:
            config = FinetuneConfig.from_policy(tp.train, tp.soft_labels, **self.finetune_overrides)
            trained = train_task(
                self.db,
                key,
                tp,
                base_model,
                self.adapters_dir,
                config=config,
                progress=self.progress,
                runner=training,
            )
        except NotEnoughData as exc:
            return self._back_to_collecting(key, "rejected", f"not enough data: {exc}", {})
        except TrainingMemoryError as exc:
            return self._back_to_collecting(key, "refused", f"training not started: {exc}", {})
        except ChildDied as exc:
            log.error("training %s died: %s", key, exc)
            died: dict[str, Any] = {
                "cause": exc.cause,
                "exit_code": exc.exit_code,
                "peak_rss_bytes": exc.peak_rss_bytes,
            }
            return self._back_to_collecting(key, exc.cause, f"training died: {exc}", died)
        except Exception as exc:
            log.exception("training %s failed", key)
            return self._back_to_collecting(
                key, "failed", f"training failed: {type(exc).__name__}: {exc}", {}
            )
        adapter = trained.adapter
        train_s = time.perf_counter() - started
        _, holdout = snapshot_examples(self.db, trained.snapshot)
        holdout = holdout[:MAX_EVAL_EXAMPLES]
        numbers: dict[str, Any] = {
            "adapter": adapter.name,
            "train_examples": len(trained.selection.train),
            "holdout_examples": len(holdout),
            "train_s": round(train_s, 2),
            "tokens_per_s": round(trained.result.tokens_per_s, 1)
            if hasattr(trained.result, "tokens_per_s")
            else None,
            "teacher": 1.0,
        }
        if not holdout:
            return self._reject(key, adapter, "no held-out teacher answers to evaluate on", numbers)
        try:
            kwargs = {
                "scorer": tp.promote.scorer,
                "pass_score": tp.promote.pass_score,
                "max_tokens": tp.train.max_completion_tokens,
            }
            baseline, tuned = runner.call(
                evaluate_base_and_adapter, base_model, adapter.path, holdout, **kwargs
            )
        except Exception as exc:
            log.exception("offline evaluation of %s failed", adapter.name)
            return self._reject(
                key, adapter, f"offline evaluation failed: {type(exc).__name__}: {exc}", numbers
            )
        numbers |= {
            "baseline": _score(baseline),
            "finetuned": _score(tuned),
            "scorer": tuned.scorer,
            "student_latency_ms_p50": round(tuned.latency_ms_p50, 2),
            "eval_s": round(max(baseline.wall_s, tuned.wall_s), 2),
        }
        set_adapter_status(self.db, adapter.name, "trained", eval=numbers)
        bar = tp.train.min_offline_score
        summary = (
            f"offline agreement on {len(holdout)} held-out teacher answers: base {numbers['baseline']:.3f}"
            f" → fine-tuned {numbers['finetuned']:.3f} → teacher 1.000 (bar {bar:.2f})"
        )
        if tuned.pass_rate < bar:
            return self._reject(
                key, adapter, f"{summary}: below the bar, the task stays on the teacher", numbers
            )
        if lease.lost:
            return self._reject(
                key,
                adapter,
                f"{summary}; not published: another worker took over the training lease",
                numbers,
            )
        try:
            with StudentPublisher(policy.student.base_url, api_key=policy.student.api_key()) as publisher:
                publish_adapter(
                    self.db,
                    publisher,
                    _reload(self.db, adapter),
                    adapters_dir=self.adapters_dir,
                    adapter_root=policy.student.adapter_root,
                )
        except (PublishError, OSError, Exception) as exc:
            return self._reject(
                key, adapter, f"{summary}; publishing failed: {exc}", numbers, status="failed"
            )
        self._move(key, Stage.shadow, summary, numbers, adapter=adapter.name, expect=Stage.training)
        return self._event(key, "shadow", summary, numbers)

    def _reject(
        self, key: str, adapter: Adapter, reason: str, numbers: dict[str, Any], status: str = "rejected"
    ) -> SchedulerEvent:
        set_adapter_status(self.db, adapter.name, status)
        return self._back_to_collecting(key, status, reason, numbers)

    def _back_to_collecting(
        self, key: str, outcome: str, reason: str, numbers: dict[str, Any]
    ) -> SchedulerEvent:
        self._move(key, Stage.collecting, reason, numbers, expect=Stage.training)
        return self._event(key, outcome, reason, numbers)

    def _move(
        self,
        key: str,
        to: Stage,
        reason: str,
        evidence: dict[str, Any] | None,
        *,
        expect: Stage,
        adapter: Any = None,
    ) -> Task | None:
        kwargs: dict[str, Any] = {"expect_stage": expect}
        if adapter is not None:
            kwargs["adapter"] = adapter
        try:
            task = transition_task(self.db, key, to, reason, evidence, **kwargs)
        except TransitionError as exc:
            log.info("task %s not moved to %s: %s", key, to, exc)
            return None
        if to is Stage.training:
            with self.db.session() as session:
                row = session.get(Task, key)
                if row is not None:
                    row.last_trained_at = utcnow()
                    session.add(row)
                    session.commit()
                    task = row
        for callback in self.on_task:
            try:
                callback(task)
            except Exception:
                log.exception("task callback failed")
        return task

    def _event(
        self, key: str, outcome: str, reason: str, numbers: dict[str, Any] | None = None
    ) -> SchedulerEvent:
        event = SchedulerEvent(key, outcome, reason, numbers or {})
        self.events.append(event)
        for callback in self.on_event:
            try:
                callback(event)
            except Exception:
                log.exception("scheduler event callback failed")
        return event


def _score(result: EvalResult) -> float:
    return round(result.pass_rate, 4)


def _reload(db: Database, adapter: Adapter) -> Adapter:
    with db.session() as session:
        return session.get(Adapter, adapter.name) or adapter
