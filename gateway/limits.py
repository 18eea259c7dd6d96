"""Per-key limits: requests and tokens per minute, and a spend budget per period, per key and per
key and task, held across every replica of the gateway.

Where the counting happens, and why: the request path only reads and bumps counters in this
process's memory (a few dict lookups and additions, no lock, no database); once a second a
background sync adds what this replica counted to the shared ``usage`` table (one upsert per
counter that moved) and reads every replica's sums back (one indexed query). A shared counter
service (Redis) would bound the overshoot tighter but adds a part to run and a network round trip
per request; the database is already shared by every replica.

The bound this gives: a replica sees the others' use at most one sync (``sync_s`` plus the
upsert's time) late, so across ``R`` replicas a window can admit up to what the other ``R - 1``
admitted in that last second beyond its limit. Tokens and spend are known once an answer is
recorded (the recorder's listener hands them over), so requests in flight when a budget runs out
still finish: the budget overshoots by at most their cost.

Windows: per-minute counts are a sliding estimate over two fixed minutes (the previous minute's
count weighted by how much of it is still in the last 60 s), so a burst at a minute's edge cannot
double the rate; budgets are calendar periods (UTC day, ISO week, month).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.auth import Caller, KeyLimits
from gateway.errors import PermissionDenied, RateLimited
from gateway.store.db import Database
from gateway.store.models import Usage

log = logging.getLogger("distillgate.limits")

USAGE_TABLE = Usage.__table__  # type: ignore[attr-defined]
MINUTE = "minute"
PERIODS = ("day", "week", "month")
KEY_SCOPE = ""
"""The ``task`` of a key's own counters (its task counters carry the task's name)."""


def period_start(period: str, now: float) -> float:
    """The start of the calendar period (UTC) ``now`` falls in."""
    day = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        return day.timestamp()
    if period == "week":
        return (day - timedelta(days=day.weekday())).timestamp()
    return day.replace(day=1).timestamp()


def period_end(period: str, start: float) -> float:
    begin = datetime.fromtimestamp(start, UTC)
    if period == "day":
        return (begin + timedelta(days=1)).timestamp()
    if period == "week":
        return (begin + timedelta(days=7)).timestamp()
    index = begin.year * 12 + begin.month
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC).timestamp()


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it in ``x-ratelimit-reset-*``: ``17ms``, ``1.5s``, ``6m0s``."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{rest}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes}m{rest}s"


class Counter:
    """One window's use: the shared sum as of the last sync, plus what this replica counted since."""

    __slots__ = ("prev", "shared", "start", "syncing", "unsynced")

    def __init__(self, start: float) -> None:
        self.start = start
        self.prev = [0.0, 0.0, 0.0]
        """The previous window's totals (minute windows: the sliding estimate)."""
        self.shared = [0.0, 0.0, 0.0]
        """requests, tokens, spend: every replica's, as the last sync read them."""
        self.unsynced = [0.0, 0.0, 0.0]
        """This replica's since the last sync began."""
        self.syncing = [0.0, 0.0, 0.0]
        """Handed to the sync in progress (counted until its read comes back)."""

    def used(self, i: int) -> float:
        return self.shared[i] + self.unsynced[i] + self.syncing[i]


@dataclass(slots=True)
class _Delta:
    key_id: int
    task: str
    window: str
    start: float
    values: list[float]


class Limiter:
    """The hot path's ``admit`` and the background sync behind it."""

    def __init__(self, db: Database, *, sync_s: float = 1.0) -> None:
        self.db = db
        self.sync_s = sync_s
        self._counters: dict[tuple[int, str, str], Counter] = {}
        self._charges: deque[tuple[int, str, int, float]] = deque()
        """(key, task, tokens, spend) of recorded exchanges, from the recorder's thread."""
        self._leftover: list[_Delta] = []
        """Counts of windows that ended before they were synced."""
        self._limited: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0

    # -- the request path ------------------------------------------------------------------
    def admit(self, caller: Caller, task: str) -> dict[str, str] | None:
        """Let ``caller`` call ``task`` now, or raise: 403 outside its allow-list, 429 over a
        limit. Returns the ``x-ratelimit-*`` headers of its limits (None for a key without any)."""
        if caller.tasks is not None and task not in caller.tasks:
            raise PermissionDenied(f"This API key may not call the task '{task}'.", code="task_not_allowed")
        limits = caller.limits
        if limits is None or caller.key_id is None:
            return None
        if self._charges:
            self._take_charges()
        key_id = caller.key_id
        self._limited.add(key_id)
        now = time.time()
        per_task = limits.tasks.get(task)
        scopes: list[tuple[str, int | None, int | None, float | None]] = [
            (KEY_SCOPE, limits.rpm, limits.tpm, limits.budget_usd)
        ]
        if per_task is not None:
            scopes.append((task, per_task.rpm, per_task.tpm, per_task.budget_usd))
        headers: dict[str, str] | None = None
        minutes = []
        for scope, rpm, tpm, budget in scopes:
            if rpm is None and tpm is None and budget is None:
                continue
            minute = self._counter(key_id, scope, MINUTE, now - now % 60.0)
            elapsed = now - minute.start
            weight = 1.0 - elapsed / 60.0
            reset = 60.0 - elapsed
            if rpm is not None:
                used = minute.used(0) + minute.prev[0] * weight
                if used + 1 > rpm:
                    wait = _wait(used + 1 - rpm, minute.prev[0], reset)
                    raise self._limited_error(
                        "requests",
                        "rate_limit_exceeded",
                        scope,
                        f"requests per min (RPM): Limit {rpm}, Used {int(used)}, Requested 1",
                        wait,
                        rpm,
                        tpm,
                        minute,
                        weight,
                        reset,
                    )
            if tpm is not None:
                used_tokens = minute.used(1) + minute.prev[1] * weight
                if used_tokens >= tpm:
                    wait = _wait(used_tokens - tpm + 1, minute.prev[1], reset)
                    raise self._limited_error(
                        "tokens",
                        "rate_limit_exceeded",
                        scope,
                        f"tokens per min (TPM): Limit {tpm}, Used {int(used_tokens)}",
                        wait,
                        rpm,
                        tpm,
                        minute,
                        weight,
                        reset,
                    )
            if budget is not None:
                start = period_start(limits.budget_period, now)
                spent = self._counter(key_id, scope, limits.budget_period, start)
                if spent.used(2) >= budget:
                    wait = period_end(limits.budget_period, start) - now
                    raise RateLimited(
                        f"This API key has used its budget of ${budget:g} for this {limits.budget_period}"
                        + (f" on the task '{scope}'" if scope else "")
                        + ". It renews at the start of the next one.",
                        kind="insufficient_quota",
                        code="insufficient_quota",
                        headers={"retry-after": str(max(1, int(wait + 0.999)))},
                    )
            minutes.append(minute)
            if headers is None and (rpm is not None or tpm is not None):
                headers = _headers(rpm, tpm, minute, weight, reset, taking=1)
        for minute in minutes:
            minute.unsynced[0] += 1.0
        return headers

    def _limited_error(
        self,
        kind: str,
        code: str,
        scope: str,
        what: str,
        wait: float,
        rpm: int | None,
        tpm: int | None,
        minute: Counter,
        weight: float,
        reset: float,
    ) -> RateLimited:
        where = f" on the task '{scope}'" if scope else ""
        headers = _headers(rpm, tpm, minute, weight, reset, taking=0)
        headers["retry-after"] = str(max(1, int(wait + 0.999)))
        return RateLimited(
            f"Rate limit reached for this API key{where} on {what}. Please try again in {duration(wait)}.",
            kind=kind,
            code=code,
            headers=headers,
        )

    def _counter(self, key_id: int, scope: str, window: str, start: float) -> Counter:
        counter = self._counters.get((key_id, scope, window))
        if counter is None:
            counter = self._counters[(key_id, scope, window)] = Counter(start)
        elif counter.start != start:
            self._roll(key_id, scope, window, counter, start)
        return counter

    def _roll(self, key_id: int, scope: str, window: str, counter: Counter, start: float) -> None:
        """A new window began: what this replica counted in the old one still goes to its row."""
        if any(counter.unsynced):
            self._leftover.append(_Delta(key_id, scope, window, counter.start, counter.unsynced))
        adjacent = window == MINUTE and start - counter.start == 60.0
        counter.prev = [counter.used(i) for i in range(3)] if adjacent else [0.0, 0.0, 0.0]
        counter.start = start
        counter.shared = [0.0, 0.0, 0.0]
        counter.unsynced = [0.0, 0.0, 0.0]
        counter.syncing = [0.0, 0.0, 0.0]

    # -- what answers cost (the recorder's writer thread) ----------------------------------
    def charge_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """The recorder's listener: each stored exchange's tokens and cost (the ledger's
        ``cost_usd``: teacher or student, whoever answered) go to its key's counters."""
        limited = self._limited
        for row in rows:
            key_id = row.get("api_key_id")
            if key_id is not None and key_id in limited:
                tokens = int(row.get("prompt_tokens") or 0) + int(row.get("completion_tokens") or 0)
                self._charges.append((key_id, row.get("task", ""), tokens, float(row.get("cost_usd") or 0.0)))

    def charge(self, key_id: int, task: str, *, tokens: int = 0, spend_usd: float = 0.0) -> None:
        """Count a cost made on a key's behalf outside the request (e.g. a judge call)."""
        self._charges.append((key_id, task, tokens, spend_usd))

    def _take_charges(self) -> None:
        now = time.time()
        minute_start = now - now % 60.0
        while self._charges:
            key_id, task, tokens, spend = self._charges.popleft()
            for scope in (KEY_SCOPE, task):
                minute = self._counters.get((key_id, scope, MINUTE))
                if minute is not None:
                    if minute.start != minute_start:
                        self._roll(key_id, scope, MINUTE, minute, minute_start)
                    minute.unsynced[1] += tokens
                for window in PERIODS:
                    counter = self._counters.get((key_id, scope, window))
                    if counter is not None:
                        start = period_start(window, now)
                        if counter.start != start:
                            self._roll(key_id, scope, window, counter, start)
                        counter.unsynced[2] += spend

    # -- the sync ---------------------------------------------------------------------------
    async def start(self) -> None:
        self._task = asyncio.create_task(self._sync_forever(), name="distillgate-limits")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.sync()  # what this replica counted last still reaches the shared table

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_s)
            await self.sync()

    async def sync(self) -> None:
        """Add this replica's counts to ``usage`` and read every replica's sums back. The
        counters are handed over and read back on the event loop: the request path never locks."""
        self._take_charges()
        deltas = self._leftover
        self._leftover = []
        handed: list[Counter] = []
        for (key_id, scope, window), counter in self._counters.items():
            if any(counter.unsynced):
                deltas.append(_Delta(key_id, scope, window, counter.start, counter.unsynced))
                counter.syncing = [a + b for a, b in zip(counter.syncing, counter.unsynced, strict=True)]
                counter.unsynced = [0.0, 0.0, 0.0]
                handed.append(counter)
        if not self._counters:
            return
        now = time.time()
        try:
            sums = await asyncio.to_thread(self._exchange, deltas, now)
        except Exception as exc:
            # The database is away: counts stay local (each replica still holds its own share)
            # and are added once it answers.
            log.warning("usage sync failed (%s)", type(exc).__name__)
            self._leftover.extend(deltas)
            for counter in handed:
                counter.syncing = [0.0, 0.0, 0.0]
            return
        for counter in handed:
            counter.syncing = [0.0, 0.0, 0.0]
        for (key_id, scope, window), counter in self._counters.items():
            found = sums.get((key_id, scope, window, counter.start))
            if found is not None:
                counter.shared = list(found)
            if window == MINUTE:
                prev = sums.get((key_id, scope, window, counter.start - 60.0))
                if prev is not None:
                    counter.prev = list(prev)
        self.syncs += 1

    def _exchange(
        self, deltas: list[_Delta], now: float
    ) -> dict[tuple[int, str, str, float], tuple[float, float, float]]:
        table = USAGE_TABLE
        with self.db.engine.begin() as conn:
            if deltas:
                rows = [
                    {
                        "key_id": d.key_id,
                        "task": d.task,
                        "window": d.window,
                        "start": datetime.fromtimestamp(d.start, UTC),
                        "requests": int(d.values[0]),
                        "tokens": int(d.values[1]),
                        "spend_usd": d.values[2],
                    }
                    for d in _merged(deltas)
                ]
                insert = pg_insert if self.db.dialect == "postgresql" else sqlite_insert
                stmt = insert(table)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["key_id", "task", "window", "start"],
                    set_={
                        "requests": table.c.requests + stmt.excluded.requests,
                        "tokens": table.c.tokens + stmt.excluded.tokens,
                        "spend_usd": table.c.spend_usd + stmt.excluded.spend_usd,
                    },
                )
                conn.execute(stmt, rows)
            minute_floor = datetime.fromtimestamp(now - now % 60.0 - 60.0, UTC)
            period_floor = datetime.fromtimestamp(
                min(period_start("week", now), period_start("month", now)), UTC
            )
            keys = list(self._limited)
            query = select(
                table.c.key_id,
                table.c.task,
                table.c.window,
                table.c.start,
                table.c.requests,
                table.c.tokens,
                table.c.spend_usd,
            ).where(
                or_(
                    and_(table.c.window == MINUTE, table.c.start >= minute_floor),
                    and_(table.c.window != MINUTE, table.c.start >= period_floor),
                ),
                table.c.key_id.in_(keys),
            )
            found = {}
            for row in conn.execute(query):
                start = row.start if row.start.tzinfo else row.start.replace(tzinfo=UTC)
                found[(row.key_id, row.task, row.window, start.timestamp())] = (
                    float(row.requests),
                    float(row.tokens),
                    float(row.spend_usd),
                )
            return found


def _merged(deltas: list[_Delta]) -> list[_Delta]:
    """One delta per row (an upsert must not touch a row twice)."""
    merged: dict[tuple[int, str, str, float], _Delta] = {}
    for d in deltas:
        key = (d.key_id, d.task, d.window, d.start)
        if key in merged:
            merged[key].values = [a + b for a, b in zip(merged[key].values, d.values, strict=True)]
        else:
            merged[key] = _Delta(d.key_id, d.task, d.window, d.start, list(d.values))
    return list(merged.values())


def _wait(excess: float, prev: float, reset: float) -> float:
    """Seconds until the sliding estimate is ``excess`` lower: the previous minute's weight falls
    by ``prev / 60`` a second; past the window's end only the current minute counts."""
    return min(reset, excess * 60.0 / prev) if prev > 0 else reset


def _headers(
    rpm: int | None, tpm: int | None, minute: Counter, weight: float, reset: float, *, taking: int
) -> dict[str, str]:
    """``x-ratelimit-*`` as OpenAI sends them (limit, remaining, time to reset), per minute."""
    headers = {}
    if rpm is not None:
        used = minute.used(0) + minute.prev[0] * weight + taking
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, int(rpm - used)))
        headers["x-ratelimit-reset-requests"] = duration(reset)
    if tpm is not None:
        used_tokens = minute.used(1) + minute.prev[1] * weight
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(tpm - used_tokens)))
        headers["x-ratelimit-reset-tokens"] = duration(reset)
    return headers


__all__ = ["KeyLimits", "Limiter", "duration", "period_end", "period_start"]
