"""The recorder: one record per request, written off the request path.

The request path only builds an ``Exchange`` and puts it on a bounded queue. A writer
thread turns exchanges into rows (parsing and assembling streamed answers, pricing them,
counting tokens and cost in metrics) and inserts them in batches. When the database is
unreachable, batches go to an append-only JSONL spool and are replayed, idempotently,
once it answers again. Shutdown drains the queue. Nothing accepted is dropped silently.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import JSON, insert
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway import sse
from gateway.cost import exchange_cost
from gateway.metrics import Metrics
from gateway.settings import RecorderSettings
from gateway.store.db import Database
from gateway.store.models import Record, Task
from router.policy import Policy

log = logging.getLogger("distillgate.recorder")

RECORD_TABLE = Record.__table__  # type: ignore[attr-defined]
TASK_TABLE = Task.__table__  # type: ignore[attr-defined]


@dataclass(slots=True)
class Exchange:
    """What the request path hands over: cheap to build, everything costly happens later."""

    id: str
    task: str
    model: str
    target: str
    request: dict[str, Any] | None
    status: int
    latency_s: float
    created_at: float = field(default_factory=time.time)
    endpoint: str = "chat.completions"
    api_key_id: int | None = None
    stream: bool = False
    stored: bool = True
    body: bytes | None = None
    """The raw answer: a JSON body, or the SSE bytes of a stream (``sse``)."""
    sse: bool = False
    response: dict[str, Any] | None = None
    """The answer when it is already parsed (cache hits, student fallbacks)."""
    error: str | None = None
    ttft_s: float | None = None
    cache_hit: bool = False
    shadow: dict[str, Any] | None = None


class _Flush:
    __slots__ = ("done",)

    def __init__(self) -> None:
        self.done = threading.Event()


class Recorder:
    """Bounded queue + writer thread + spool. ``submit`` never blocks and never raises."""

    def __init__(
        self,
        db: Database,
        settings: RecorderSettings,
        metrics: Metrics,
        policy: Callable[[], Policy | None],
        redact: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.db = db
        self.redact = redact
        """Applied to each row as soon as it is built, before any write (database, spool)."""
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self._pending: deque[Exchange] = deque()
        self._flushes: deque[_Flush] = deque()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._spool_lock = threading.Lock()
        self.spool_path = Path(settings.spool_dir) / f"records-{os.getpid()}.jsonl"
        self._db_down = False
        self._next_probe = 0.0
        self._known_tasks: set[str] = set()
        self.written = 0
        self.spooled = 0
        self.listeners: list[Callable[[list[dict[str, Any]]], None]] = []
        """Called in the writer thread with each batch of rows once stored (e.g. the scheduler's counters)."""

    # -- request path ---------------------------------------------------------------------
    def submit(self, exchange: Exchange) -> None:
        # A deque append: no lock to contend for and no wake-up of the writer per record.
        if len(self._pending) < self.settings.queue_size:
            self._pending.append(exchange)
            return
        # Never block the client: convert and spool right here; rare by construction.
        try:
            self._spool([self._row(exchange)])
        except Exception:
            self.metrics.recorder_dropped.inc()
            log.exception("record %s could not be spooled", exchange.id)

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        Path(self.settings.spool_dir).mkdir(parents=True, exist_ok=True)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="distillgate-recorder", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Drain everything queued, then stop the writer."""
        if self._thread is None:
            return
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        self._thread = None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted before this call is written (or spooled)."""
        if self._thread is None:
            return True
        marker = _Flush()
        self._flushes.append(marker)
        self._wake.set()
        return marker.done.wait(timeout_s)

    @property
    def depth(self) -> int:
        return len(self._pending)

    # -- writer thread ----------------------------------------------------------------------
    def _run(self) -> None:
        self._replay_spool()
        while True:
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            # Take the flush markers first: everything submitted before them is already queued.
            markers = []
            while self._flushes:
                markers.append(self._flushes.popleft())
            self.metrics.recorder_queue.set(len(self._pending))
            while self._pending:
                batch: list[Exchange] = []
                while self._pending and len(batch) < self.settings.batch_size:
                    batch.append(self._pending.popleft())
                self._write(batch)
            if self._db_down and time.monotonic() >= self._next_probe:
                self._replay_spool()
            for marker in markers:
                marker.done.set()
            if stopping:
                break
        self.metrics.recorder_queue.set(0)

    def _write(self, batch: list[Exchange]) -> None:
        rows = []
        for exchange in batch:
            try:
                rows.append(self._row(exchange))
            except Exception:
                log.exception("record %s could not be built; stored without its answer", exchange.id)
                bare = self._bare_row(exchange)
                if self.redact is not None:
                    bare["error"] = "answer could not be recorded"  # it may hold what redaction removes
                    bare["redacted"] = None  # the batch's rows share their keys
                rows.append(bare)
        if self._db_down:
            self._spool(rows)
            return
        try:
            self._insert(rows)
        except Exception as exc:
            log.warning("database write failed (%s); spooling %d records", type(exc).__name__, len(rows))
            self._db_down = True
            self._next_probe = time.monotonic() + self.settings.retry_interval_s
            self._spool(rows)

    def _insert(self, rows: list[dict[str, Any]], *, ignore_existing: bool = False) -> None:
        with self.db.engine.begin() as conn:
            new_tasks = {row["task"] for row in rows} - self._known_tasks
            if new_tasks:
                conn.execute(self._insert_ignore(TASK_TABLE, "key"), [{"key": t} for t in new_tasks])
            if self.db.dialect == "postgresql" and not ignore_existing:
                # COPY: a fraction of executemany's per-row Python work, and this thread shares
                # the GIL with the event loop. A replayed record may exist already, so the spool
                # replay takes the idempotent INSERT … ON CONFLICT DO NOTHING below.
                _copy_rows(conn.connection.driver_connection, rows)
            else:
                stmt = self._insert_ignore(RECORD_TABLE, "id") if ignore_existing else insert(RECORD_TABLE)
                conn.execute(stmt, rows)
        self._known_tasks |= {row["task"] for row in rows}
        self.written += len(rows)
        for listener in self.listeners:
            try:
                listener(rows)
            except Exception:
                log.exception("record listener failed")

    def _insert_ignore(self, table: Any, key: str) -> Any:
        if self.db.dialect == "postgresql":
            # No conflict target: ``record`` is partitioned there, its key ``(id, created_at)``.
            return pg_insert(table).on_conflict_do_nothing()
        if self.db.dialect == "sqlite":
            return sqlite_insert(table).on_conflict_do_nothing(index_elements=[key])
        return insert(table)

    # -- spool ------------------------------------------------------------------------------
    def _spool(self, rows: list[dict[str, Any]]) -> None:
        data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        with self._spool_lock:
            self.spool_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spool_path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        self.spooled += len(rows)
        self.metrics.recorder_spooled.inc(len(rows))

    def _replay_spool(self) -> None:
        """Insert every spooled record (from this or an earlier process) once the DB answers."""
        self._next_probe = time.monotonic() + self.settings.retry_interval_s
        spool_dir = Path(self.settings.spool_dir)
        files = sorted(spool_dir.glob("records-*.jsonl")) if spool_dir.exists() else []
        if not files:
            self._db_down = self._db_down and not self.db.ping()
            return
        if not self.db.ping():
            self._db_down = True
            return
        for path in files:
            # Claim the file first so a concurrent spooler starts a new one.
            claimed = path.with_suffix(f".replay-{os.getpid()}")
            with self._spool_lock:
                try:
                    path.rename(claimed)
                except FileNotFoundError:
                    continue
            try:
                rows = [_row_from_json(line) for line in claimed.read_bytes().splitlines() if line.strip()]
                for start in range(0, len(rows), self.settings.batch_size):
                    self._insert(rows[start : start + self.settings.batch_size], ignore_existing=True)
            except Exception as exc:
                log.warning("spool replay failed (%s); will retry", type(exc).__name__)
                with self._spool_lock:
                    claimed.rename(path.with_name(f"records-{os.getpid()}-{int(time.time() * 1e6)}.jsonl"))
                self._db_down = True
                return
            claimed.unlink(missing_ok=True)
            log.info("replayed %d spooled records from %s", len(rows), path.name)
        # Left-over claimed files from a crash mid-replay are retried too (ids make it idempotent).
        for leftover in spool_dir.glob("records-*.replay-*"):
            stale = time.time() - leftover.stat().st_mtime > 300  # its replayer died mid-way
            if stale and not leftover.name.endswith(f".replay-{os.getpid()}"):
                leftover.rename(leftover.with_name(leftover.name.split(".replay-")[0] + "-r.jsonl"))
        self._db_down = False

    # -- conversion -------------------------------------------------------------------------
    def _row(self, ex: Exchange) -> dict[str, Any]:
        row = self._to_row(ex)
        return row if self.redact is None else self.redact(row)

    def _to_row(self, ex: Exchange) -> dict[str, Any]:
        response = ex.response
        if response is None and ex.body is not None:
            if ex.sse and ex.status < 400:
                response = (
                    sse.assemble_chat(ex.body)
                    if ex.endpoint == "chat.completions"
                    else sse.assemble_completion(ex.body)
                )
            else:
                try:
                    parsed = orjson.loads(ex.body)
                    response = parsed if isinstance(parsed, dict) else {"value": parsed}
                except orjson.JSONDecodeError:
                    response = {"raw": ex.body[:4096].decode("utf-8", "replace")}
        prompt, completion, cached = sse.usage_of(response)
        cost = exchange_cost(
            self.policy(),
            target=ex.target,
            model=ex.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            latency_s=ex.latency_s,
        )
        self._count(ex, prompt, completion, cached, cost.usd, cost.teacher_usd)
        error = ex.error
        if error is None and ex.status >= 400 and response is not None:
            err = response.get("error")
            error = (err.get("message") if isinstance(err, dict) else str(err)) if err else None
        return {
            "id": ex.id,
            "created_at": datetime.fromtimestamp(ex.created_at, UTC),
            "api_key_id": ex.api_key_id,
            "task": ex.task,
            "endpoint": ex.endpoint,
            "model": ex.model,
            "target": ex.target,
            "stream": ex.stream,
            "stored": ex.stored,
            "request": ex.request if ex.stored else None,
            "response": response if ex.stored else None,
            "status": ex.status,
            "error": error,
            "finish_reason": sse.finish_reason_of(response),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "latency_ms": ex.latency_s * 1000.0,
            "ttft_ms": None if ex.ttft_s is None else ex.ttft_s * 1000.0,
            "cost_usd": cost.usd,
            "teacher_cost_usd": cost.teacher_usd,
            "cache_hit": ex.cache_hit,
            "feedback": None,
            "shadow": ex.shadow if ex.stored else None,
        }

    def _bare_row(self, ex: Exchange) -> dict[str, Any]:
        """The row for an exchange whose answer could not be read: everything but the content."""
        bare = Exchange(
            id=ex.id,
            task=ex.task,
            model=ex.model,
            target=ex.target,
            request=None,
            status=ex.status,
            latency_s=ex.latency_s,
            created_at=ex.created_at,
            endpoint=ex.endpoint,
            api_key_id=ex.api_key_id,
            stream=ex.stream,
            stored=ex.stored,
            error=ex.error or "answer could not be parsed",
            cache_hit=ex.cache_hit,
        )
        return self._to_row(bare)

    def _count(
        self, ex: Exchange, prompt: int, completion: int, cached: int, usd: float, teacher_usd: float
    ) -> None:
        m = self.metrics
        target = _target_label(ex.target)
        if prompt:
            m.child(m.tokens, ex.task, target, "prompt").inc(prompt)
        if completion:
            m.child(m.tokens, ex.task, target, "completion").inc(completion)
        if cached:
            m.child(m.tokens, ex.task, target, "cached").inc(cached)
        if usd:
            m.child(m.cost, ex.task, target).inc(usd)
        if teacher_usd - usd > 0:
            m.child(m.savings, ex.task).inc(teacher_usd - usd)


def _target_label(target: str) -> str:
    """Metric label for a target: adapters are versions, so ``student:x@v3`` counts as ``student``."""
    return "student" if target.startswith("student") else target


RECORD_COLUMNS = tuple(column.name for column in RECORD_TABLE.columns)
_COPY_PLAN = tuple((column.name, isinstance(column.type, JSON)) for column in RECORD_TABLE.columns)
_COPY_SQL = f"COPY {RECORD_TABLE.name} ({', '.join(RECORD_COLUMNS)}) FROM STDIN"


def _copy_rows(connection: Any, rows: list[dict[str, Any]]) -> None:
    """Write rows with PostgreSQL's COPY (psycopg); JSON columns go as JSON text."""
    dumps = orjson.dumps
    with connection.cursor() as cursor, cursor.copy(_COPY_SQL) as copy:
        write = copy.write_row
        for row in rows:
            write(
                [
                    (None if (value := row.get(name)) is None else dumps(value).decode())
                    if is_json
                    else row.get(name)
                    for name, is_json in _COPY_PLAN
                ]
            )


def _row_from_json(line: bytes) -> dict[str, Any]:
    row = orjson.loads(line)
    row["created_at"] = datetime.fromisoformat(row["created_at"])
    return row
