"""The cost ledger report: spend and savings per task and target over a time window."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import case, func
from sqlalchemy import select as sa_select
from sqlmodel import col

from gateway.store.db import Database
from gateway.store.models import Record


@dataclass(frozen=True)
class LedgerRow:
    task: str
    target: str
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    spend_usd: float
    teacher_usd: float
    latency_ms_avg: float

    @property
    def savings_usd(self) -> float:
        return self.teacher_usd - self.spend_usd

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "savings_usd": self.savings_usd}


def ledger(
    db: Database, since: datetime | None = None, until: datetime | None = None, task: str | None = None
) -> list[LedgerRow]:
    """Spend per (task, target); students are grouped as ``student`` whatever their adapter version."""
    target = case((col(Record.target).like("student:%"), "student"), else_=col(Record.target))
    stmt = (
        sa_select(
            col(Record.task),
            target.label("target"),
            func.count(),
            func.sum(case((col(Record.status) >= 400, 1), else_=0)),
            func.sum(col(Record.prompt_tokens)),
            func.sum(col(Record.completion_tokens)),
            func.sum(col(Record.cached_tokens)),
            func.sum(col(Record.cost_usd)),
            func.sum(col(Record.teacher_cost_usd)),
            func.avg(col(Record.latency_ms)),
        )
        .group_by(col(Record.task), target)
        .order_by(col(Record.task), target)
    )
    if since is not None:
        stmt = stmt.where(col(Record.created_at) >= since)
    if until is not None:
        stmt = stmt.where(col(Record.created_at) < until)
    if task is not None:
        stmt = stmt.where(col(Record.task) == task)
    with db.session() as session:
        rows = session.execute(stmt).all()
    return [
        LedgerRow(
            r[0],
            r[1],
            int(r[2]),
            int(r[3] or 0),
            int(r[4] or 0),
            int(r[5] or 0),
            int(r[6] or 0),
            float(r[7] or 0.0),
            float(r[8] or 0.0),
            float(r[9] or 0.0),
        )
        for r in rows
    ]
