"""The shadow mirror: asks the other model the same question in the background, scores the pair, stores it.

``submit`` never waits: past the concurrency limit a job is dropped and counted, so clients
are never delayed. Scored pairs are written in batches from a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import update
from sqlmodel import col

from gateway.store import usage
from gateway.store.db import Database
from gateway.store.models import Record, ShadowPair, Stage, new_id
from router.decide import PairKind
from router.policy import Policy, token_cost
from router.scorers import pick_scorer, score_pair

log = logging.getLogger("distillgate.shadow")

StudentCall = Callable[[str, dict[str, Any]], Awaitable[Mapping[str, Any]]]
"""``(adapter, chat body) -> chat completion dict``; raises on any failure (status, timeout, junk)."""
TeacherCall = Callable[[dict[str, Any]], Awaitable[Mapping[str, Any]]]
"""``chat body -> chat completion dict`` from the teacher; raises on any failure."""


@dataclass(frozen=True)
class ShadowJob:
    """One request to pair: the side that served it is given, the other side is fetched.

    A mirror (teacher served) carries ``teacher_response``; an audit (student served)
    carries ``student_response``.
    """

    record_id: str
    task: str
    adapter: str
    kind: PairKind
    stage: Stage
    request: Mapping[str, Any]
    """The client's chat completions body (as received)."""
    teacher_response: Mapping[str, Any] | None = None
    student_response: Mapping[str, Any] | None = None
    student_latency_ms: float | None = None
    stored: bool = True
    """False when the client opted out of storage: scores are kept, answers are not."""
    api_key_id: int | None = None
    """The key whose request this is: the pair's own calls (audit, judge) count against its budget."""
    created_at: float = field(default_factory=time.time)
    """When the request was routed: the pair counts as evidence for the stage (and canary step)
    current then, even if it is scored after the task moved on."""


@dataclass(frozen=True)
class Spend:
    """One call a pair made to the teacher on its own (an audit's teacher answer, a judge's grade):
    metered in the ledger as a ``record`` row of that target with no content."""

    target: str
    """``audit`` | ``judge``."""
    model: str
    prompt_tokens: int
    completion_tokens: int


def _usage_of(result: Any) -> tuple[int, int]:
    try:
        data = result.json() if hasattr(result, "json") else result
        found = data.get("usage") or {} if isinstance(data, Mapping) else {}
        return int(found.get("prompt_tokens") or 0), int(found.get("completion_tokens") or 0)
    except Exception:
        return 0, 0


@dataclass(frozen=True)
class ScoredPair:
    """A finished pair: what is stored as a ``ShadowPair`` and reported to listeners."""

    job: ShadowJob
    scorer: str
    score: float
    passed: bool
    student_response: Mapping[str, Any] | None
    teacher_response: Mapping[str, Any] | None
    student_latency_ms: float | None
    error: str | None = None
    """Why the student failed (an error counts as a failed pair and towards error bursts)."""
    detail: str | None = None
    spend: tuple[Spend, ...] = ()

    def row(self) -> ShadowPair:
        from datetime import UTC, datetime

        return ShadowPair(
            record_id=self.job.record_id,
            task=self.job.task,
            adapter=self.job.adapter,
            kind=self.job.kind,
            stage=self.job.stage,
            scorer=self.scorer,
            score=self.score,
            passed=self.passed,
            student_response=dict(self.student_response)
            if self.student_response and self.job.stored
            else None,
            student_latency_ms=self.student_latency_ms,
            error=self.error,
            created_at=datetime.fromtimestamp(self.job.created_at, UTC),
        )

    def record_shadow(self) -> dict[str, Any]:
        """The ``Record.shadow`` summary: scores, and the other side's answer unless opted out."""
        out: dict[str, Any] = {
            "kind": self.job.kind,
            "adapter": self.job.adapter,
            "scorer": self.scorer,
            "score": self.score,
            "passed": self.passed,
            "student_latency_ms": self.student_latency_ms,
            "error": self.error,
        }
        if self.detail:
            out["detail"] = self.detail
        if self.job.stored:
            # The record holds the answer that was served; the summary adds the other one.
            if self.job.student_response is not None:
                out["teacher_response"] = dict(self.teacher_response) if self.teacher_response else None
            else:
                out["student_response"] = dict(self.student_response) if self.student_response else None
        return out


@dataclass
class ShadowCounters:
    """Totals since start, for metrics and the admin API."""

    submitted: int = 0
    dropped: int = 0
    """Jobs refused because the limit was reached (never queued behind clients)."""
    scored: int = 0
    student_errors: int = 0
    teacher_errors: int = 0
    """Audits abandoned because the teacher failed (no pair: it says nothing about the student)."""
    stored: int = 0
    store_failures: int = 0
    lost: int = 0
    """Scored pairs discarded because the database stayed away longer than the buffer lasts."""
    dropped_by_task: dict[str, int] = field(default_factory=dict)


class ShadowMirror:
    """Runs shadow, canary and audit pairs for the gateway; owned by the app's lifespan.

    ``on_pair`` callbacks run on the event loop with each scored pair (metrics);
    ``on_stored`` callbacks run in the writer thread with each stored batch (the gate).
    """

    def __init__(
        self,
        db: Database,
        policy: Callable[[], Policy | None],
        student: StudentCall,
        teacher: TeacherCall | None = None,
        *,
        max_in_flight: int = 64,
        batch_size: int = 200,
        flush_interval_s: float = 0.5,
        max_buffered: int = 20_000,
        record_update_attempts: int = 20,
    ) -> None:
        self.db = db
        self.policy = policy
        self.student = student
        self.teacher = teacher
        self.max_in_flight = max_in_flight
        """A cap over all tasks; each task's own cap is its policy's ``shadow.max_concurrency``."""
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.max_buffered = max_buffered
        self.record_update_attempts = record_update_attempts
        self.counters = ShadowCounters()
        self.on_pair: list[Callable[[ScoredPair], None]] = []
        self.on_drop: list[Callable[[ShadowJob], None]] = []
        self.on_stored: list[Callable[[list[ScoredPair]], None]] = []
        self.redact: Callable[[str, Any], Any] | None = None
        """``(task, value) -> value``: what a pair stores of an answer, redacted as its record is
        (set by the gateway from the policy's ``redact`` section)."""
        self._in_flight: dict[str, int] = {}
        self._total_in_flight = 0
        self._jobs: set[asyncio.Task[None]] = set()
        self._buffer: deque[ScoredPair] = deque()
        self._record_updates: list[tuple[str, dict[str, Any], int]] = []
        self._writer: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._closing = False

    # -- request path --------------------------------------------------------------------------
    def submit(self, job: ShadowJob) -> bool:
        """Start pairing ``job`` in the background; False (and counted) when over a limit.

        Must be called on the event loop; does no I/O and never waits.
        """
        self.counters.submitted += 1
        policy = self.policy()
        limit = policy.for_task(job.task).shadow.max_concurrency if policy is not None else 0
        if (
            self._closing
            or policy is None
            or self._in_flight.get(job.task, 0) >= limit
            or self._total_in_flight >= self.max_in_flight
        ):
            self._drop(job)
            return False
        self._in_flight[job.task] = self._in_flight.get(job.task, 0) + 1
        self._total_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._run(job, policy), name=f"shadow-{job.record_id}")
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return True

    def in_flight(self, task: str | None = None) -> int:
        return self._total_in_flight if task is None else self._in_flight.get(task, 0)

    def _drop(self, job: ShadowJob) -> None:
        self.counters.dropped += 1
        self.counters.dropped_by_task[job.task] = self.counters.dropped_by_task.get(job.task, 0) + 1
        for callback in self.on_drop:
            _safely(callback, job)

    # -- one pair ------------------------------------------------------------------------------
    async def _run(self, job: ShadowJob, policy: Policy) -> None:
        try:
            pair = await self._pair(job, policy)
            if pair is None:
                return
            self.counters.scored += 1
            if pair.error is not None:
                self.counters.student_errors += 1
            for callback in self.on_pair:
                _safely(callback, pair)
            self._buffer.append(pair)
            while len(self._buffer) > self.max_buffered:
                self._buffer.popleft()
                self.counters.lost += 1
            if len(self._buffer) >= self.batch_size:
                self._wake.set()
        except Exception:
            log.exception("shadow pair for record %s failed", job.record_id)
        finally:
            self._in_flight[job.task] -= 1
            if not self._in_flight[job.task]:
                del self._in_flight[job.task]
            self._total_in_flight -= 1

    async def _pair(self, job: ShadowJob, policy: Policy) -> ScoredPair | None:
        task_policy = policy.for_task(job.task)
        body = _non_streaming(job.request)
        teacher, student = job.teacher_response, job.student_response
        latency = job.student_latency_ms
        if student is None:
            timeout = policy.student.timeout if policy.student is not None else 60.0
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    student = await self.student(job.adapter, {**body, "model": job.adapter})
            except Exception as exc:
                latency = (time.perf_counter() - started) * 1000
                scorer = task_policy.promote.scorer
                if scorer == "auto":
                    scorer = pick_scorer(teacher, job.request)
                return ScoredPair(job, scorer, 0.0, False, None, teacher, latency, error=_describe(exc))
            latency = (time.perf_counter() - started) * 1000
        spent: list[Spend] = []

        def metered(target: str) -> Callable[[dict[str, Any]], Awaitable[Any]]:
            call = self.teacher
            assert call is not None

            async def calling(request_body: dict[str, Any]) -> Any:
                result = await call(request_body)
                prompt, completion = _usage_of(result)
                spent.append(Spend(target, str(request_body.get("model") or ""), prompt, completion))
                return result

            return calling

        if teacher is None:
            if self.teacher is None:
                self.counters.teacher_errors += 1
                return None
            try:
                async with asyncio.timeout(policy.teacher.timeout):
                    teacher = await metered("audit")(body)
            except Exception as exc:
                self.counters.teacher_errors += 1
                log.warning(
                    "audit of record %s abandoned: the teacher failed (%s)", job.record_id, _describe(exc)
                )
                return None
        promote = task_policy.promote
        try:
            result = await score_pair(
                promote.scorer,
                teacher,
                student,
                pass_score=promote.pass_score,
                request=job.request,
                judge_call=metered("judge") if self.teacher is not None else None,
                judge_model=policy.teacher.model or str(job.request.get("model", "")),
            )
        except Exception as exc:
            # The judge could not be asked: that says nothing about the student either.
            self.counters.teacher_errors += 1
            log.warning("pair for record %s not scored (%s)", job.record_id, _describe(exc))
            return None
        return ScoredPair(
            job,
            result.scorer_used,
            result.score,
            result.passed,
            student,
            teacher,
            latency,
            detail=result.detail,
            spend=tuple(spent),
        )

    # -- storage -------------------------------------------------------------------------------
    async def start(self) -> None:
        if self._writer is None:
            self._closing = False
            self._writer = asyncio.create_task(self._write_loop(), name="distillgate-shadow-writer")

    async def stop(self, timeout_s: float = 10.0) -> None:
        """Refuse new jobs, let running ones finish (up to ``timeout_s``), store what was scored."""
        self._closing = True
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        writer, self._writer = self._writer, None
        if writer is not None:
            # Not cancelled: a batch being written in its thread must finish before the last flush.
            self._wake.set()
            await writer
        await self.flush()

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for every running pair, then store everything (tests, admin flush)."""
        if self._jobs:
            await asyncio.wait(set(self._jobs), timeout=timeout_s)
        await self.flush()

    async def flush(self) -> None:
        """Write buffered pairs now (in a worker thread)."""
        async with self._write_lock:
            while self._buffer or self._record_updates:
                batch = [self._buffer.popleft() for _ in range(min(self.batch_size, len(self._buffer)))]
                try:
                    await asyncio.to_thread(self._write, batch)
                except Exception as exc:
                    self.counters.store_failures += 1
                    log.warning("shadow pairs not stored yet (%s); retrying", type(exc).__name__)
                    self._buffer.extendleft(reversed(batch))
                    return
                if not batch:
                    return  # only record updates still waiting for their records

    async def _write_loop(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:
                log.exception("shadow writer failed; retrying")

    def _write(self, batch: list[ScoredPair]) -> None:
        """Insert ``batch`` and attach each pair's summary to its record (worker thread)."""
        if batch:
            redact = self.redact
            with self.db.session() as session:
                rows = [pair.row() for pair in batch]
                if redact is not None:
                    for row in rows:
                        row.student_response = redact(row.task, row.student_response)
                session.add_all(rows)
                ledger = self._ledger(batch)
                session.add_all(ledger)
                session.commit()
                ids = [row.id for row in rows]
            # The pairs' calls count against the budgets of the keys whose requests were paired.
            usage.charge(self.db.engine, ledger)
            self.counters.stored += len(batch)
            for pair, pair_id in zip(batch, ids, strict=True):
                summary = pair.record_shadow()
                if redact is not None:
                    summary = redact(pair.job.task, summary)
                self._record_updates.append((pair.job.record_id, {**summary, "pair_id": pair_id}, 0))
            for callback in self.on_stored:
                _safely(callback, batch)
        try:
            self._update_records()
        except Exception as exc:  # the pairs are stored; summaries wait for the next flush
            log.warning("record shadow summaries not attached yet (%s)", type(exc).__name__)

    def _ledger(self, batch: list[ScoredPair]) -> list[Record]:
        """The pairs' own teacher calls as ledger rows (target ``audit`` or ``judge``, no content)."""
        policy = self.policy()
        rows = []
        for pair in batch:
            for spent in pair.spend:
                price = policy.price(spent.model) if policy is not None else None
                cost = token_cost(price, spent.prompt_tokens, spent.completion_tokens)
                rows.append(
                    Record(
                        id=new_id(),
                        task=pair.job.task,
                        api_key_id=pair.job.api_key_id,
                        model=spent.model[:200],
                        target=spent.target,
                        stored=False,
                        prompt_tokens=spent.prompt_tokens,
                        completion_tokens=spent.completion_tokens,
                        cost_usd=cost,
                        teacher_cost_usd=0.0,
                    )
                )
        return rows

    def _update_records(self) -> None:
        # The recorder writes records from its own queue, so a record may not exist yet when
        # its pair is stored: retry for a while (each flush), then give up on the summary only.
        if not self._record_updates:
            return
        waiting: list[tuple[str, dict[str, Any], int]] = []
        with self.db.session() as session:
            for record_id, summary, attempts in self._record_updates:
                result = session.execute(
                    update(Record).where(col(Record.id) == record_id).values(shadow=summary)
                )
                if result.rowcount == 0 and attempts + 1 < self.record_update_attempts:  # type: ignore[attr-defined]
                    waiting.append((record_id, summary, attempts + 1))
            session.commit()
        self._record_updates = waiting


def _non_streaming(request: Mapping[str, Any]) -> dict[str, Any]:
    """The client's body asking for one complete answer (what a pair needs), otherwise unchanged."""
    return {k: v for k, v in request.items() if k not in ("stream", "stream_options")}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _safely(callback: Callable[[Any], None], value: Any) -> None:
    try:
        callback(value)
    except Exception:
        log.exception("shadow callback %r failed", callback)
