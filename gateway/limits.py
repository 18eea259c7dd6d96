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
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, or_, select

from gateway.auth import Caller, KeyLimits
from gateway.errors import PermissionDenied, RateLimited
from gateway.store import usage
from gateway.store.db import Database
from gateway.store.usage import KEY_SCOPE, MINUTE, PERIODS, USAGE_TABLE, period_end, period_start
from gateway.store.usage import Delta as _Delta

log = logging.getLogger("distillgate.limits")


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
class _Scope:
    """One set of limits that holds a (key, task): the key's own (``name`` ``""``) or the task's."""

    name: str
    rpm: int | None
    tpm: int | None
    budget: float | None
    minute: Counter
    period: Counter | None


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
        self._plans: dict[tuple[int, str], tuple[KeyLimits, tuple[_Scope, ...]]] = {}
        self._periods: dict[str, tuple[float, float]] = {}
        self._task: asyncio.Task[None] | None = None
        self.syncs = 0

    # -- the request path ------------------------------------------------------------------
    def admit(self, caller: Caller, task: str) -> dict[str, str] | None:
        """Let ``caller`` call ``task`` now, or raise: 403 outside its allow-list, 429 over a
        limit. Returns the ``x-ratelimit-*`` headers of its limits (None for a key without any).

        O(1) and lock-free: the scopes that apply to (key, task) are worked out once per key
        version (``_plan``), and the counters are plain floats this event loop alone changes."""
        if caller.tasks is not None and task not in caller.tasks:
            raise PermissionDenied(f"This API key may not call the task '{task}'.", code="task_not_allowed")
        limits = caller.limits
        if limits is None or caller.key_id is None:
            return None
        if self._charges:
            self._take_charges()
        plan = self._plans.get((caller.key_id, task))
        if plan is None or plan[0] is not limits:
            plan = self._plan(caller.key_id, task, limits)
        now = time.time()
        minute_start = now - now % 60.0
        elapsed = now - minute_start
        weight = 1.0 - elapsed / 60.0
        reset = 60.0 - elapsed
        headers: dict[str, str] | None = None
        for scope in plan[1]:
            minute = scope.minute
            if minute.start != minute_start:
                self._roll(caller.key_id, scope.name, MINUTE, minute, minute_start)
            rpm, tpm = scope.rpm, scope.tpm
            if rpm is not None:
                used = minute.used(0) + minute.prev[0] * weight
                if used + 1 > rpm:
                    wait = _wait(used + 1 - rpm, minute.prev[0], reset)
                    what = f"requests per min (RPM): Limit {rpm}, Used {int(used)}, Requested 1"
                    raise self._limited_error(
                        "requests", scope.name, what, wait, rpm, tpm, minute, weight, reset
                    )
            if tpm is not None:
                used_tokens = minute.used(1) + minute.prev[1] * weight
                if used_tokens >= tpm:
                    wait = _wait(used_tokens - tpm + 1, minute.prev[1], reset)
                    what = f"tokens per min (TPM): Limit {tpm}, Used {int(used_tokens)}"
                    raise self._limited_error(
                        "tokens", scope.name, what, wait, rpm, tpm, minute, weight, reset
                    )
            spent = scope.period
            if spent is not None and scope.budget is not None:
                start, end = self._bounds(limits.budget_period, now)
                if spent.start != start:
                    self._roll(caller.key_id, scope.name, limits.budget_period, spent, start)
                if spent.used(2) >= scope.budget:
                    raise RateLimited(
                        f"This API key has used its budget of ${scope.budget:g} for this {limits.budget_period}"
                        + (f" on the task '{scope.name}'" if scope.name else "")
                        + ". It renews at the start of the next one.",
                        kind="insufficient_quota",
                        code="insufficient_quota",
                        headers={"retry-after": str(max(1, int(end - now + 0.999)))},
                    )
            if headers is None and (rpm is not None or tpm is not None):
                headers = _headers(rpm, tpm, minute, weight, reset, taking=1)
        for scope in plan[1]:
            scope.minute.unsynced[0] += 1.0
        return headers

    def _plan(self, key_id: int, task: str, limits: KeyLimits) -> tuple[KeyLimits, tuple[_Scope, ...]]:
        """The scopes that hold (key, task): the key's own limits, then the task's; their counters."""
        self._limited.add(key_id)
        scopes = []
        for name, rpm, tpm, budget in (
            (KEY_SCOPE, limits.rpm, limits.tpm, limits.budget_usd),
            *((task, t.rpm, t.tpm, t.budget_usd) for t in (limits.tasks.get(task),) if t is not None),
        ):
            if rpm is None and tpm is None and budget is None:
                continue
            now = time.time()
            minute = self._counter(key_id, name, MINUTE, now - now % 60.0)
            period = None
            if budget is not None:
                period = self._counter(
                    key_id, name, limits.budget_period, self._bounds(limits.budget_period, now)[0]
                )
            scopes.append(_Scope(name, rpm, tpm, budget, minute, period))
        if len(self._plans) > 100_000:
            self._plans.clear()
        plan = self._plans[(key_id, task)] = (limits, tuple(scopes))
        return plan

    def _bounds(self, period: str, now: float) -> tuple[float, float]:
        """The current ``period``'s start and end, recomputed only once it is over."""
        bounds = self._periods.get(period)
        if bounds is None or not bounds[0] <= now < bounds[1]:
            start = period_start(period, now)
            bounds = self._periods[period] = (start, period_end(period, start))
        return bounds

    def _limited_error(
        self,
        kind: str,
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
            code="rate_limit_exceeded",
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
            usage.add(conn, deltas)
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


def _wait(excess: float, prev: float, reset: float) -> float:
    """Seconds until the sliding estimate is ``excess`` lower: the previous minute's weight falls
    by ``prev / 60`` a second; past the window's end only the current minute counts."""
    return min(reset, excess * 60.0 / prev) if prev > 0 else reset


def _headers(
    rpm: int | None, tpm: int | None, minute: Counter, weight: float, reset: float, *, taking: int
) -> dict[str, str]:
    """``x-ratelimit-*`` as OpenAI sends them (limit, remaining, time to reset), per minute."""
    headers = {}
    resets = _RESETS[int(reset + 0.999)]
    if rpm is not None:
        used = minute.used(0) + minute.prev[0] * weight + taking
        headers["x-ratelimit-limit-requests"] = str(rpm)
        headers["x-ratelimit-remaining-requests"] = str(max(0, int(rpm - used)))
        headers["x-ratelimit-reset-requests"] = resets
    if tpm is not None:
        used_tokens = minute.used(1) + minute.prev[1] * weight
        headers["x-ratelimit-limit-tokens"] = str(tpm)
        headers["x-ratelimit-remaining-tokens"] = str(max(0, int(tpm - used_tokens)))
        headers["x-ratelimit-reset-tokens"] = resets
    return headers


_RESETS = [duration(float(s)) for s in range(62)]
"""``x-ratelimit-reset-*`` values to the whole second (the window's end), formatted once."""
