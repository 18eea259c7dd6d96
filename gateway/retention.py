"""Retention: records that never grow without bound, and a prune that never becomes the outage.

Two horizons. Per task (the policy's ``retention.body_days``): a record's request and answer are
cleared after N days unless a dataset snapshot holds the record (a snapshot must stay
reproducible); the metered row (tokens, cost, latency, status) stays for the ledger. For all
records (``settings.retention.records_months``): older months go whole. On PostgreSQL ``record``
is partitioned by month (migration 0002), so a month is one ``DROP TABLE`` of its partition, never
a long ``DELETE``; on SQLite rows are deleted by the indexed ``created_at`` in bounded batches.
Every statement touches at most ``batch_size`` rows, so no prune holds many locks at once.

The prune also creates the next months' partitions ahead of time, deletes usage counters no
limit reads any more and expired shared-cache entries. ``distillgate db prune`` runs it once; the
gateway runs it every ``prune_every_s`` (on PostgreSQL one replica at a time, by advisory lock).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
from sqlalchemy import and_, delete, null, or_, select, text, tuple_, update

from gateway.settings import RetentionSettings
from gateway.store import partitions
from gateway.store.db import Database
from gateway.store.models import CacheEntry, DatasetSnapshot, Record, Task, Usage
from router.policy import Policy

log = logging.getLogger("distillgate.retention")

RECORD = Record.__table__  # type: ignore[attr-defined]
PRUNE_LOCK = 0x64697374  # "dist": the advisory lock one replica holds while it prunes


class PruneResult(msgspec.Struct, kw_only=True):
    bodies_cleared: dict[str, int] = msgspec.field(default_factory=dict)
    """Per task: records whose request and answer were cleared."""
    bodies_held: int = 0
    """Records past their task's body retention kept whole because a dataset snapshot holds them."""
    partitions_dropped: list[str] = msgspec.field(default_factory=list)
    partitions_created: list[str] = msgspec.field(default_factory=list)
    rows_deleted: int = 0
    """Records deleted row by row (SQLite; stray rows in PostgreSQL's default partition)."""
    usage_deleted: int = 0
    cache_deleted: int = 0
    skipped: bool = False
    """Another replica was pruning (PostgreSQL advisory lock)."""


def _held_ids(db: Database, task: str) -> set[str]:
    snapshots = DatasetSnapshot.__table__  # type: ignore[attr-defined]
    with db.engine.connect() as conn:
        rows = conn.execute(
            select(snapshots.c.train_ids, snapshots.c.holdout_ids).where(snapshots.c.task == task)
        ).all()
    held: set[str] = set()
    for train, holdout in rows:
        held.update(train or ())
        held.update(holdout or ())
    return held


def clear_bodies(db: Database, task: str, cutoff: datetime, *, batch_size: int) -> tuple[int, int]:
    """Clear the request and answer of ``task``'s records older than ``cutoff`` that no snapshot
    holds, ``batch_size`` at a time in ``created_at`` order (keyset, on the ``(task, created_at)``
    index). Returns (cleared, held)."""
    held = _held_ids(db, task)
    cleared = kept = 0
    after: tuple[datetime, str] | None = None
    has_body = or_(
        RECORD.c.request.is_not(None), RECORD.c.response.is_not(None), RECORD.c.shadow.is_not(None)
    )
    while True:
        query = (
            select(RECORD.c.id, RECORD.c.created_at)
            .where(RECORD.c.task == task, RECORD.c.created_at < cutoff, has_body)
            .order_by(RECORD.c.created_at, RECORD.c.id)
            .limit(batch_size)
        )
        if after is not None:
            query = query.where(tuple_(RECORD.c.created_at, RECORD.c.id) > tuple_(*after))
        with db.engine.begin() as conn:
            rows = conn.execute(query).all()
            if not rows:
                return cleared, kept
            after = (rows[-1].created_at, rows[-1].id)
            ids = [(row.id, row.created_at) for row in rows if row.id not in held]
            kept += len(rows) - len(ids)
            if ids:
                conn.execute(
                    update(RECORD)
                    .where(tuple_(RECORD.c.id, RECORD.c.created_at).in_(ids))
                    .values(request=null(), response=null(), shadow=null())
                )
                cleared += len(ids)


def _month_cutoff(keep_months: int, now: datetime) -> datetime:
    """The start of the oldest month kept (the current month counts as one)."""
    return partitions.add_months(partitions.month_start(now), -(keep_months - 1))


def _delete_before(db: Database, table: str, cutoff: datetime, *, batch_size: int) -> int:
    """Delete records older than ``cutoff`` from ``table`` in batches (SQLite; PostgreSQL's default
    partition), by the indexed ``created_at``."""
    deleted = 0
    key = "rowid" if db.dialect == "sqlite" else "ctid"
    while True:
        with db.engine.begin() as conn:
            done = conn.execute(
                text(
                    f"DELETE FROM {table} WHERE {key} IN "
                    f"(SELECT {key} FROM {table} WHERE created_at < :cutoff ORDER BY created_at LIMIT :n)"
                ),
                {"cutoff": cutoff, "n": batch_size},
            ).rowcount
        deleted += done
        if done < batch_size:
            return deleted


def prune(
    db: Database, policy: Policy | None, settings: RetentionSettings, *, now: datetime | None = None
) -> PruneResult:
    """One pass of retention (see the module docstring); safe to run at any time, and again."""
    now = now or datetime.now(UTC)
    result = PruneResult()
    if db.dialect == "postgresql":
        with db.engine.connect() as lock_conn:
            if not lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": PRUNE_LOCK}).scalar():
                result.skipped = True
                return result
            try:
                _prune(db, policy, settings, now, result)
            finally:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PRUNE_LOCK})
                lock_conn.commit()
        return result
    _prune(db, policy, settings, now, result)
    return result


def _prune(
    db: Database, policy: Policy | None, settings: RetentionSettings, now: datetime, result: PruneResult
) -> None:
    batch = settings.batch_size
    if policy is not None:
        with db.engine.connect() as conn:
            tasks = list(conn.execute(select(Task.__table__.c.key)).scalars())  # type: ignore[attr-defined]
        for task in tasks:
            days = policy.for_task(task).retention.body_days
            if days is None:
                continue
            cleared, held = clear_bodies(db, task, now - timedelta(days=days), batch_size=batch)
            if cleared:
                result.bodies_cleared[task] = cleared
            result.bodies_held += held
    with db.engine.begin() as conn:
        partitioned = partitions.is_partitioned(conn)
        if partitioned:
            result.partitions_created = partitions.ensure_partitions(conn)
    if settings.records_months is not None:
        cutoff = _month_cutoff(settings.records_months, now)
        if partitioned:
            with db.engine.begin() as conn:
                result.partitions_dropped = partitions.drop_months_before(conn, cutoff)
            result.rows_deleted = _delete_before(db, partitions.DEFAULT_PARTITION, cutoff, batch_size=batch)
        else:
            result.rows_deleted = _delete_before(db, "record", cutoff, batch_size=batch)
    with db.engine.begin() as conn:
        usage = Usage.__table__  # type: ignore[attr-defined]
        result.usage_deleted = conn.execute(
            delete(usage).where(
                or_(
                    and_(usage.c.window == "minute", usage.c.start < now - timedelta(hours=1)),
                    usage.c.start < now - timedelta(days=70),
                )
            )
        ).rowcount
        cache = CacheEntry.__table__  # type: ignore[attr-defined]
        result.cache_deleted = conn.execute(delete(cache).where(cache.c.expires_at <= now)).rowcount


class Pruner:
    """The gateway's scheduled prune: every ``prune_every_s``, in a worker thread."""

    def __init__(
        self, db: Database, policy: Callable[[], Policy | None], settings: RetentionSettings
    ) -> None:
        self.db = db
        self.policy = policy
        self.settings = settings
        self.last: PruneResult | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.settings.prune_every_s is not None:
            self._task = asyncio.create_task(
                self._forever(self.settings.prune_every_s), name="distillgate-prune"
            )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                self.last = await asyncio.to_thread(prune, self.db, self.policy(), self.settings)
            except Exception as exc:
                log.warning("prune failed (%s); next try in %.0f s", type(exc).__name__, every_s)
