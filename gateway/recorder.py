"""The recorder: one record per request, written off the request path.

The request path only builds an ``Exchange`` and puts it on a bounded queue. A collector
thread turns exchanges into storable rows (parsing and assembling streamed answers, pricing
them, counting tokens and cost in metrics); a writer thread inserts them in batches. While the
database is away or stalled, batches go to the spool (``gateway/spool.py``) and are replayed,
idempotently, whenever it holds records and the database answers. What can be lost is stated
on ``Recorder`` and counted; nothing is dropped silently.
"""

from __future__ import annotations

import logging
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
from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from gateway import sse
from gateway.cost import exchange_cost
from gateway.metrics import Metrics
from gateway.serialise import storable_row
from gateway.settings import RecorderSettings
from gateway.spool import Spool, error_kind
from gateway.store.db import Database
from gateway.store.models import Record, Task
from router.policy import Policy

log = logging.getLogger("distillgate.recorder")

RECORD_TABLE = Record.__table__  # type: ignore[attr-defined]
TASK_TABLE = Task.__table__  # type: ignore[attr-defined]
HANDOFF_BATCHES = 8
"""Batches waiting for the writer before the collector spools instead (the database is slow)."""


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


_STOP = object()
"""Handed to the writer after the last batch on shutdown."""
Row = dict[str, Any]
Redact = Callable[[Row], Row]


class Recorder:
    """Bounded queue, a collector and a writer thread, spool and quarantine. ``submit`` never
    blocks, never raises and never touches a disk.

    The collector turns exchanges into storable rows (``_to_row``, ``redact``,
    ``serialise.storable_row``) and hands batches to the writer, or spools them itself while the
    database is away or the writer is stalled; it also watches the writer (a write past
    ``stall_s`` has its connection cut). The writer inserts batches, retries a failing batch row by
    row (one bad row is quarantined, the rest written), and replays the spool whenever it holds
    records and the database answers. Each thread is supervised: a death is logged, counted and
    the thread restarted with the batch it held.

    What can be lost, and is counted in ``recorder_dropped_total{reason}``: with the database and
    the spool both unavailable, records wait in memory up to ``queue_size``, then new ones are
    dropped (``queue_full``); what still waits when shutdown ends (``shutdown``); a quarantine file
    that cannot be written (``quarantine_unwritable``); a row whose redaction failed
    (``redaction_failed``, never written unredacted). SIGKILL loses what is in memory: at most
    ``flush_interval_s`` of records plus the batch being written (bounded by ``stall_s``).
    """

    def __init__(
        self,
        db: Database,
        settings: RecorderSettings,
        metrics: Metrics,
        policy: Callable[[], Policy | None],
        redact: Redact | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.metrics = metrics
        self.policy = policy
        self.redact = redact
        """Applied to each row right after it is built, before anything writes it (DB, spool, quarantine)."""
        self.spool = Spool(settings.spool_dir)
        self._store = db
        self._pending: deque[Exchange] = deque()
        self._flushes: deque[_Flush] = deque()
        self._held: deque[list[Row]] = deque()
        """Storable batches neither the writer nor the spool took yet (tried again each pass)."""
        self._held_rows = 0
        self._ready: deque[Any] = deque()
        """The writer's input: batches, flush markers, ``_STOP``."""
        self._handed_rows = 0
        self._taken_rows = 0
        self._returned: deque[list[Row]] = deque()
        """Batches the writer could not store, for the collector to spool."""
        self._taking: list[Exchange] = []
        self._taking_deaths = 0
        self._writing: list[Row] | None = None
        self._writing_deaths = 0
        self._wake = threading.Event()
        self._writer_wake = threading.Event()
        self._stopping = False
        self._threads: dict[str, threading.Thread] = {}
        self._known_tasks: set[str] = set()
        self._db_up = True
        self._next_probe = 0.0
        self._busy_since: float | None = None
        self._cut_at: float | None = None
        self._spooling = False
        self._spool_ok = True
        self._spool_retry_at = 0.0
        self._dropping = 0
        self._replay: tuple[Path, deque[Row], int] | None = None
        self._next_spool_look = 0.0
        self.written = 0
        self.spooled = 0
        self.dropped = 0
        self.quarantined = 0
        self.replayed = 0
        self.restarts = 0
        self.listeners: list[Callable[[list[Row]], None]] = []
        """Called in the writer thread with each batch of rows once stored (e.g. the scheduler's counters)."""

    # -- request path ---------------------------------------------------------------------
    def submit(self, exchange: Exchange) -> None:
        # A deque append: no lock to contend for, no wake-up of the collector, no disk.
        if len(self._pending) + self._held_rows < self.settings.queue_size:
            self._pending.append(exchange)
            return
        self.dropped += 1
        self.metrics.child(self.metrics.recorder_dropped, "queue_full").inc()
        if not self._dropping:
            log.warning(
                "recorder queue full (%d records) and neither the database nor the spool takes "
                "records: new records are dropped and counted until there is room",
                self.settings.queue_size,
            )
        self._dropping += 1

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        try:
            Path(self.settings.spool_dir).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self._spool_unwritable(exc)
        if self.db.dialect == "postgresql":
            # Its own small pool: the stall watchdog may cut every connection of it at once.
            self._store = Database(
                self.db.url,
                pool_size=2,
                connect_timeout_s=self.settings.stall_s,
                statement_timeout_s=self.settings.stall_s,
            )
        self._stopping = False
        self._next_spool_look = 0.0
        for name, loop in (("collector", self._collect_loop), ("writer", self._write_loop)):
            thread = threading.Thread(
                target=self._supervised, args=(name, loop), name=f"distillgate-recorder-{name}", daemon=True
            )
            self._threads[name] = thread
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Drain everything queued into the database or the spool, then stop both threads."""
        if not self._threads:
            return
        self._stopping = True
        self._wake.set()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads.values():
            thread.join(max(0.0, deadline - time.monotonic()))
        left = self.depth + len(self._writing or []) + sum(len(b) for b in self._returned)
        if left:
            self.dropped += left
            self.metrics.child(self.metrics.recorder_dropped, "shutdown").inc(left)
            log.error(
                "shutdown: %d records lost, neither the database nor the spool (%s) took them",
                left,
                self.spool.directory,
            )
        self._threads = {}
        if self._store is not self.db:
            self._store.dispose()

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Block until everything submitted before this call is written (or spooled)."""
        if not self._threads:
            return True
        marker = _Flush()
        self._flushes.append(marker)
        self._wake.set()
        return marker.done.wait(timeout_s)

    @property
    def depth(self) -> int:
        return len(self._pending) + self._held_rows + self._ready_rows

    @property
    def _ready_rows(self) -> int:
        return self._handed_rows - self._taken_rows

    @property
    def spool_writable(self) -> bool:
        return self._spool_ok

    @property
    def database_ok(self) -> bool:
        """The writer's view: the last write or probe succeeded."""
        return self._db_up

    def _supervised(self, name: str, loop: Callable[[], None]) -> None:
        """Run ``loop`` until it returns; a death is logged once, counted, and the loop restarted."""
        while True:
            try:
                loop()
                return
            except BaseException as exc:
                self.restarts += 1
                self.metrics.child(self.metrics.recorder_restarts, name).inc()
                log.error("recorder %s thread died (%s); restarted", name, type(exc).__name__, exc_info=True)
                time.sleep(0.01)

    # -- collector thread -------------------------------------------------------------------
    def _collect_loop(self) -> None:
        if self._taking:  # the batch a death interrupted
            self._taking_deaths += 1
            if self._taking_deaths > 1:
                self._quarantine_exchanges(self._taking)
                self._taking = []
        while True:
            self._wake.wait(self.settings.flush_interval_s)
            self._wake.clear()
            stopping = self._stopping
            markers = []
            while self._flushes:
                markers.append(self._flushes.popleft())
            self._watch_writer()
            self._probe_spool()
            self._collect(drain=stopping)
            if self._held:
                self._flushes.extendleft(reversed(markers))  # not done until the held rows are placed
            else:
                self._hand(markers)
            self.metrics.recorder_queue.set(self.depth)
            if self._dropping and len(self._pending) < self.settings.queue_size:
                log.info("recorder queue has room again; %d records were dropped", self._dropping)
                self._dropping = 0
            if stopping and not self._pending:
                self._hand([_STOP])
                writer = self._threads.get("writer")
                while writer is not None and writer.is_alive():
                    self._watch_writer()
                    writer.join(self.settings.flush_interval_s)
                self._collect(drain=True, writer_gone=True)  # what the writer handed back as it stopped
                return

    def _hand(self, items: list[Any]) -> None:
        self._ready.extend(items)
        if items:
            self._writer_wake.set()

    def _collect(self, *, drain: bool, writer_gone: bool = False) -> None:
        while self._returned:
            batch = self._returned[0]  # in ``_returned`` or ``_held`` at every moment (flush reads both)
            self._held.append(batch)
            self._held_rows += len(batch)
            self._returned.popleft()
        while self._held or self._pending or self._taking:
            if self._held:
                batch = self._held[0]
                if not self._place(batch, drain=drain, writer_gone=writer_gone):
                    return
                self._held.popleft()
                self._held_rows -= len(batch)
                continue
            if not self._taking:
                while self._pending and len(self._taking) < self.settings.batch_size:
                    self._taking.append(self._pending.popleft())
            rows = [r for r in (self._row(ex) for ex in self._taking) if r is not None]
            self._held.append(rows)
            self._held_rows += len(rows)
            self._taking = []
            self._taking_deaths = 0

    def _place(self, rows: list[Row], *, drain: bool, writer_gone: bool = False) -> bool:
        """Give ``rows`` to the writer, else to the spool; False when neither takes them now."""
        if not rows:
            return True
        writer_free = self._ready_rows < HANDOFF_BATCHES * self.settings.batch_size
        if self._db_up and not writer_gone and not self._stalled() and (writer_free or drain):
            self._handed_rows += len(rows)
            self._hand([rows])
            return True
        return self._spool(rows)

    def _stalled(self) -> bool:
        since = self._busy_since
        return since is not None and time.monotonic() - since > self.settings.stall_s

    def _watch_writer(self) -> None:
        """Cut the connections of a write that passed ``stall_s``: the writer then gets an error."""
        since = self._busy_since
        if since is None or time.monotonic() - since <= self.settings.stall_s or self._cut_at == since:
            return
        self._cut_at = since
        if self._db_up:
            log.warning(
                "database write stalled for over %.1f s: its connection is cut, records go to the spool",
                self.settings.stall_s,
            )
            self._db_up = False  # one line for the change: the writer's error that follows is expected
        self._store.cut_connections()

    def _row(self, ex: Exchange) -> Row | None:
        """The storable, redacted row of an exchange; None when redaction failed (counted)."""
        try:
            row = self._to_row(ex)
        except Exception as exc:
            # An answer of a shape nobody expected (a teacher's bug): one line, the traceback at DEBUG.
            log.warning(
                "record %s: its answer could not be read (%s); stored without it",
                ex.id,
                type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            row = _bare_row(ex, "answer could not be parsed")
        if self.redact is not None:
            try:
                row = self.redact(row)
            except Exception as exc:
                self.dropped += 1
                self.metrics.child(self.metrics.recorder_dropped, "redaction_failed").inc()
                log.error("record %s dropped: redaction failed (%s)", ex.id, type(exc).__name__)
                return None
        return storable_row(row)

    # -- spool ------------------------------------------------------------------------------
    def _spool(self, rows: list[Row]) -> bool:
        """Append ``rows`` to the spool; False (and the state logged once) when it is unwritable."""
        if not self._spool_ok:
            return False
        try:
            self.spool.append(rows)
        except OSError as exc:
            self._spool_unwritable(exc)
            return False
        if not self._spooling:
            self._spooling = True
            log.warning("database unavailable: spooling records to %s", self.spool.directory)
        self.spooled += len(rows)
        self.metrics.recorder_spooled.inc(len(rows))
        return True

    def _probe_spool(self) -> None:
        """An unwritable spool is tried again every ``retry_interval_s``, needed or not: readiness
        follows it back."""
        if self._spool_ok or time.monotonic() < self._spool_retry_at:
            return
        self._spool_retry_at = time.monotonic() + self.settings.retry_interval_s
        if self.spool.writable():
            self._spool_ok = True
            self.metrics.recorder_spool_writable.set(1)
            log.info("spool %s is writable again", self.spool.directory)

    def _spool_unwritable(self, exc: OSError) -> None:
        self._spool_retry_at = time.monotonic() + self.settings.retry_interval_s
        self.metrics.child(self.metrics.recorder_spool_errors, error_kind(exc)).inc()
        if self._spool_ok:
            self._spool_ok = False
            self.metrics.recorder_spool_writable.set(0)
            log.error(
                "spool %s unwritable (%s: %s): /readyz is not ready; while the database is away too, "
                "records wait in memory (up to queue_size %d), then new ones are dropped and counted",
                self.spool.directory,
                error_kind(exc),
                exc.strerror,
                self.settings.queue_size,
            )

    # -- writer thread ----------------------------------------------------------------------
    def _write_loop(self) -> None:
        self._busy_since = None
        if self._writing is not None:  # the batch a death interrupted
            self._writing_deaths += 1
            batch, self._writing = self._writing, None
            if self._writing_deaths > 1:
                self._quarantine_rows(batch, "the writer died twice writing it")
            else:
                self._write(batch)
        while True:
            if not self._ready:
                if not self._idle():
                    self._writer_wake.wait(self.settings.flush_interval_s)
                    self._writer_wake.clear()
                continue
            item = self._ready.popleft()
            if item is _STOP:
                self._finish_replay()
                return
            if isinstance(item, _Flush):
                if self._returned or self._held:  # rows given back, not stored yet: placed first
                    self._flushes.append(item)
                    self._wake.set()
                else:
                    item.done.set()
                continue
            self._taken_rows += len(item)
            self._writing = item
            self._write(item)
            self._writing = None
            self._writing_deaths = 0

    def _write(self, rows: list[Row]) -> None:
        if not self._db_up:
            self._give_back(rows)
            return
        try:
            self._insert(rows)
        except Exception as exc:
            if self._unavailable(exc):
                self._went_away(exc)
                self._give_back(rows)
            else:
                self._write_rows(rows, exc)

    def _write_rows(self, rows: list[Row], batch_error: Exception) -> list[Row]:
        """A batch that failed: each row alone; a row no insert takes is quarantined. Returns the
        rows not written because the database went away meanwhile (already handed back)."""
        log.warning(
            "a batch of %d records failed (%s); writing them one by one",
            len(rows),
            type(batch_error).__name__,
        )
        for i, row in enumerate(rows):
            try:
                self._insert([row], ignore_existing=True)
            except Exception as exc:
                if self._unavailable(exc):
                    self._went_away(exc)
                    rest = rows[i:]
                    self._give_back(rest)
                    return rest
                self._quarantine_rows([row], f"{type(exc).__name__}: {exc}")
        return []

    def _give_back(self, rows: list[Row]) -> None:
        """Rows the database did not take: the collector spools them (or holds them)."""
        self._returned.append(rows)
        self._wake.set()

    def _unavailable(self, exc: Exception) -> bool:
        """The database is away (or stalled), as opposed to refusing this data."""
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        if isinstance(exc, OperationalError | InterfaceError | DisconnectionError | SATimeoutError | OSError):
            return not self._ping()
        return False

    def _went_away(self, exc: Exception) -> None:
        if self._db_up:
            log.warning(
                "database write failed (%s); records go to the spool until it answers", type(exc).__name__
            )
        self._db_up = False
        self._next_probe = time.monotonic() + self.settings.retry_interval_s

    def _ping(self) -> bool:
        self._busy_since = time.monotonic()
        try:
            return self._store.ping()
        finally:
            self._busy_since = None

    def _idle(self) -> bool:
        """Nothing to write: probe a database that went away; replay the spool while it holds
        records and the database answers. True when it did some replaying."""
        now = time.monotonic()
        if not self._db_up:
            if now < self._next_probe or self._stopping:
                return False
            self._next_probe = now + self.settings.retry_interval_s
            if not self._ping():
                return False
            self._db_up = True
            self._next_spool_look = 0.0
            log.info("database answers again")
        if self._replay is None and now >= self._next_spool_look and not self._stopping:
            self._next_spool_look = now + self.settings.retry_interval_s
            self._start_replay()
        if self._replay is None:
            return False
        self._replay_chunk()
        self._next_spool_look = 0.0  # look again at once: replay while records wait
        return True

    def _start_replay(self) -> None:
        try:
            claimed = self.spool.claim()
            if claimed is None:
                self._spooling = False
                return
            rows, torn = self.spool.read(claimed)
        except OSError as exc:
            log.warning("spool could not be read (%s); will retry", error_kind(exc))
            return
        for line in torn:
            self._quarantine(
                "torn-line", {"error": "not a spooled row", "line": line.decode("utf-8", "replace")}
            )
        self._replay = (claimed, deque(rows), len(rows))

    def _replay_chunk(self) -> None:
        assert self._replay is not None
        claimed, rows, total = self._replay
        chunk = [rows.popleft() for _ in range(min(len(rows), self.settings.batch_size))]
        try:
            if chunk:
                self._insert(chunk, ignore_existing=True)
        except Exception as exc:
            if self._unavailable(exc):
                self._went_away(exc)
                self._replay = None
                self.spool.give_back(claimed)  # idempotent: what was written is skipped next time
                return
            if self._write_rows(chunk, exc):
                self._replay = None
                return
        self.replayed += len(chunk)
        self.metrics.recorder_replayed.inc(len(chunk))
        if not rows:
            self._replay = None
            self.spool.done(claimed)
            log.info("replayed %d spooled records from %s", total, claimed.name.split(".replay-")[0])

    def _finish_replay(self) -> None:
        if self._replay is not None:
            self.spool.give_back(self._replay[0])
            self._replay = None

    def _insert(self, rows: list[Row], *, ignore_existing: bool = False) -> None:
        self._busy_since = time.monotonic()
        try:
            with self._store.engine.begin() as conn:
                new_tasks = {row["task"] for row in rows} - self._known_tasks
                if new_tasks:
                    conn.execute(self._insert_ignore(TASK_TABLE), [{"key": t} for t in new_tasks])
                if self._store.dialect == "postgresql" and not ignore_existing:
                    # COPY: a fraction of executemany's per-row Python work, and this thread shares
                    # the GIL with the event loop. A replayed record may exist already, so replays
                    # and retries take the idempotent INSERT … ON CONFLICT DO NOTHING below.
                    _copy_rows(conn.connection.driver_connection, rows)
                else:
                    stmt = self._insert_ignore(RECORD_TABLE) if ignore_existing else insert(RECORD_TABLE)
                    conn.execute(stmt, rows)
        finally:
            self._busy_since = None
        self._known_tasks |= {row["task"] for row in rows}
        self.written += len(rows)
        for listener in self.listeners:
            try:
                listener(rows)
            except Exception:
                log.exception("record listener failed")

    def _insert_ignore(self, table: Any) -> Any:
        # No conflict target: whatever the key (``id``, or ``(id, created_at)`` on a partitioned table).
        if self._store.dialect == "postgresql":
            return pg_insert(table).on_conflict_do_nothing()
        if self._store.dialect == "sqlite":
            return sqlite_insert(table).on_conflict_do_nothing()
        return insert(table)

    # -- quarantine ---------------------------------------------------------------------------
    def _quarantine_rows(self, rows: list[Row], reason: str) -> None:
        for row in rows:
            self._quarantine(str(row.get("id", "record")), {"error": reason, "row": row})

    def _quarantine_exchanges(self, exchanges: list[Exchange]) -> None:
        rows = []
        for ex in exchanges:
            bare = _bare_row(ex, "the recorder died twice converting it")
            if self.redact is not None:
                try:
                    bare = self.redact(bare)
                except Exception:
                    continue
            rows.append(storable_row(bare))
        self._quarantine_rows(rows, "the collector died twice converting it")

    def _quarantine(self, name: str, content: dict[str, Any]) -> None:
        try:
            path = self.spool.quarantine(name, content)
        except OSError as exc:
            self.dropped += 1
            self.metrics.child(self.metrics.recorder_dropped, "quarantine_unwritable").inc()
            log.error(
                "record %s dropped: no store accepts it and the quarantine is unwritable (%s)",
                name,
                error_kind(exc),
            )
            return
        self.quarantined += 1
        self.metrics.recorder_quarantined.inc()
        log.warning("record %s quarantined to %s (%s)", name, path, str(content.get("error"))[:200])

    # -- conversion -------------------------------------------------------------------------
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


def _bare_row(ex: Exchange, error: str) -> Row:
    """The row of an exchange whose answer could not be read: everything but the content, unpriced."""
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
        "request": None,
        "response": None,
        "status": ex.status,
        "error": ex.error or error,
        "finish_reason": None,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "latency_ms": ex.latency_s * 1000.0,
        "ttft_ms": None if ex.ttft_s is None else ex.ttft_s * 1000.0,
        "cost_usd": 0.0,
        "teacher_cost_usd": 0.0,
        "cache_hit": ex.cache_hit,
        "feedback": None,
        "shadow": None,
    }
