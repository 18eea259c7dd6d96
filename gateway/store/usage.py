"""The shared ``usage`` counters behind per-key limits (``gateway.limits`` reads them): additions
are upserts (``requests = requests + excluded.requests``), so every process that spends on a
key's behalf adds its share without reading first: the gateway's replicas (requests, tokens, the
answers' cost), the shadow writer (a pair's audit and judge calls) and the training worker (answer
checks: validator calls on the key's records), the last two through ``charge``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from gateway.store.models import Record, Usage

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


@dataclass(slots=True)
class Delta:
    """What to add to one counter row."""

    key_id: int
    task: str
    window: str
    start: float
    values: list[float]
    """requests, tokens, spend (USD)."""


def merged(deltas: Iterable[Delta]) -> list[Delta]:
    """One delta per row (an upsert must not touch a row twice)."""
    out: dict[tuple[int, str, str, float], Delta] = {}
    for d in deltas:
        key = (d.key_id, d.task, d.window, d.start)
        if key in out:
            out[key].values = [a + b for a, b in zip(out[key].values, d.values, strict=True)]
        else:
            out[key] = Delta(d.key_id, d.task, d.window, d.start, list(d.values))
    return list(out.values())


def add(conn: Any, deltas: Iterable[Delta]) -> None:
    """Upsert ``deltas`` into ``usage`` on ``conn`` (a SQLAlchemy connection in a transaction)."""
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
        for d in merged(deltas)
    ]
    if not rows:
        return
    table = USAGE_TABLE
    stmt = (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["key_id", "task", "window", "start"],
        set_={
            "requests": table.c.requests + stmt.excluded.requests,
            "tokens": table.c.tokens + stmt.excluded.tokens,
            "spend_usd": table.c.spend_usd + stmt.excluded.spend_usd,
        },
    )
    conn.execute(stmt, rows)


def spend(key_id: int, task: str, when: float, *, tokens: int = 0, usd: float = 0.0) -> list[Delta]:
    """A cost made on a key's behalf outside its requests, for every budget period (the key's
    own period is the one its limits read): the key's counters and its task's."""
    return [
        Delta(key_id, scope, period, period_start(period, when), [0.0, float(tokens), usd])
        for scope in (KEY_SCOPE, task)
        for period in PERIODS
    ]


def charge(engine: Engine, ledger: Iterable[Record]) -> None:
    """Count ledger rows made on a key's behalf outside its requests (a shadow pair's audit and
    judge calls, an answer check) against that key's budgets; rows with no key or no cost add
    nothing. The gateway's replicas read these counters back within a second (``gateway.limits``)."""
    deltas = [
        delta
        for entry in ledger
        if entry.api_key_id is not None and entry.cost_usd
        for delta in spend(
            entry.api_key_id,
            entry.task,
            entry.created_at.timestamp(),
            tokens=entry.prompt_tokens + entry.completion_tokens,
            usd=entry.cost_usd,
        )
    ]
    if deltas:
        with engine.begin() as conn:
            add(conn, deltas)
