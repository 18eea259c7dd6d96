"""Month partitions of the ``record`` table on PostgreSQL: created ahead of time, dropped whole.

Retention that deletes row by row is what turns a records table into the outage (a long
``DELETE`` holding locks and bloating the heap); a month past the horizon is one
``DROP TABLE`` of its partition instead. A ``DEFAULT`` partition catches any row outside the
months created ahead (a skewed clock, a job that did not run), so an insert never fails.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text

PARENT = "record"
DEFAULT_PARTITION = "record_default"
_MONTH_NAME = re.compile(r"^record_(\d{4})_(\d{2})$")


def month_start(when: datetime) -> datetime:
    return datetime(when.year, when.month, 1, tzinfo=UTC)


def add_months(when: datetime, months: int) -> datetime:
    index = when.year * 12 + when.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def partition_name(month: datetime) -> str:
    return f"record_{month.year:04d}_{month.month:02d}"


def is_partitioned(conn: Any) -> bool:
    """Whether ``record`` is a partitioned table (PostgreSQL after migration 0002)."""
    if conn.dialect.name != "postgresql":
        return False
    kind = conn.execute(text("SELECT relkind FROM pg_class WHERE relname = :n"), {"n": PARENT}).scalar()
    return kind == "p"


def month_partitions(conn: Any) -> dict[datetime, str]:
    """The month partitions that exist, by the month each holds."""
    names = conn.execute(
        text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :n"
        ),
        {"n": PARENT},
    ).scalars()
    found = {}
    for name in names:
        m = _MONTH_NAME.match(name)
        if m:
            found[datetime(int(m.group(1)), int(m.group(2)), 1, tzinfo=UTC)] = name
    return found


def ensure_partitions(conn: Any, *, since: datetime | None = None, months_ahead: int = 2) -> list[str]:
    """Create the month partitions from ``since`` (default: this month) to ``months_ahead`` after
    this one; returns the names created. Rows already in the default partition for a month being
    created are moved into it (PostgreSQL refuses the partition otherwise)."""
    now = datetime.now(UTC)
    month = month_start(since or now)
    last = add_months(month_start(now), months_ahead)
    existing = month_partitions(conn)
    created = []
    while month <= last:
        if month not in existing:
            name, upper = partition_name(month), add_months(month, 1)
            bounds = {"lo": month, "hi": upper}
            moved = conn.execute(
                text(
                    f"SELECT count(*) FROM {DEFAULT_PARTITION} WHERE created_at >= :lo AND created_at < :hi"
                ),
                bounds,
            ).scalar()
            if moved:
                conn.execute(
                    text(
                        f"CREATE TEMP TABLE record_moving ON COMMIT DROP AS SELECT * FROM {DEFAULT_PARTITION} "
                        "WHERE created_at >= :lo AND created_at < :hi"
                    ),
                    bounds,
                )
                conn.execute(
                    text(f"DELETE FROM {DEFAULT_PARTITION} WHERE created_at >= :lo AND created_at < :hi"),
                    bounds,
                )
            conn.execute(
                text(
                    f"CREATE TABLE {name} PARTITION OF {PARENT} "
                    f"FOR VALUES FROM ('{month.isoformat()}') TO ('{upper.isoformat()}')"
                )
            )
            if moved:
                conn.execute(text(f"INSERT INTO {PARENT} SELECT * FROM record_moving"))
                conn.execute(text("DROP TABLE record_moving"))
            created.append(name)
        month = add_months(month, 1)
    return created


def drop_months_before(conn: Any, cutoff: datetime) -> list[str]:
    """Drop every month partition that ends at or before ``cutoff``: whole, never row by row."""
    dropped = []
    for month, name in sorted(month_partitions(conn).items()):
        if add_months(month, 1) <= cutoff:
            conn.execute(text(f"DROP TABLE {name}"))
            dropped.append(name)
    return dropped
