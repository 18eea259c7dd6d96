"""Reads of recorded exchanges for the admin API, and the one write a client makes on them (feedback).

Synchronous (database), as the rest of the store; the gateway runs these in a worker thread.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec
from sqlmodel import col, select

from gateway.store.db import Database
from gateway.store.models import Record


class RecordView(msgspec.Struct, kw_only=True):
    """One recorded exchange, as ``GET /admin/records`` shows it (``Record``'s columns)."""

    id: str
    created_at: datetime
    api_key_id: int | None
    task: str
    endpoint: str
    model: str
    """The model the client asked for."""
    target: str
    """``teacher`` | ``student:<adapter>`` | ``cache``."""
    stream: bool
    stored: bool
    """False when the client opted out (``store: false``): content is not kept."""
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    status: int
    error: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    latency_ms: float
    ttft_ms: float | None
    cost_usd: float
    teacher_cost_usd: float
    cache_hit: bool
    feedback: dict[str, Any] | None
    shadow: dict[str, Any] | None
    redacted: bool | None = None
    """Redaction replaced something in this record's content (``gateway.redaction``)."""


def _view(row: Record) -> RecordView:
    return RecordView(**row.model_dump())


def recent_records(db: Database, *, task: str | None = None, limit: int = 50) -> list[RecordView]:
    """The newest ``limit`` records, all tasks' or one task's."""
    with db.session() as session:
        stmt = select(Record).order_by(col(Record.created_at).desc()).limit(limit)
        if task is not None:
            stmt = stmt.where(Record.task == task)
        return [_view(row) for row in session.exec(stmt)]


class RecordSearch(msgspec.Struct, kw_only=True, frozen=True):
    """What a records search filters on; each field left ``None`` matches everything."""

    task: str | None = None
    target: str | None = None
    """``teacher``, ``cache``, ``student`` (any adapter) or ``student:<adapter>``."""
    status: int | None = None
    since: datetime | None = None
    until: datetime | None = None


def search_records(
    db: Database, search: RecordSearch, *, offset: int = 0, limit: int = 50
) -> list[RecordView]:
    """One page of the records ``search`` matches, newest first (``limit + 1`` asked for tells a
    caller whether another page follows)."""
    stmt = select(Record)
    if search.task is not None:
        stmt = stmt.where(Record.task == search.task)
    if search.target == "student":
        stmt = stmt.where(col(Record.target).startswith("student:"))
    elif search.target is not None:
        stmt = stmt.where(Record.target == search.target)
    if search.status is not None:
        stmt = stmt.where(Record.status == search.status)
    if search.since is not None:
        stmt = stmt.where(col(Record.created_at) >= search.since)
    if search.until is not None:
        stmt = stmt.where(col(Record.created_at) < search.until)
    stmt = stmt.order_by(col(Record.created_at).desc(), col(Record.id).desc()).offset(offset).limit(limit)
    with db.session() as session:
        return [_view(row) for row in session.exec(stmt)]


def record(db: Database, record_id: str) -> RecordView | None:
    with db.session() as session:
        row = session.get(Record, record_id)
        return None if row is None else _view(row)


def attach_feedback(
    db: Database, record_id: str, feedback: dict[str, Any], *, key_id: int | None, admin: bool
) -> bool:
    """Store ``feedback`` on a record; False when there is no such record, or it belongs to another
    key (only its own key, or the admin credential, may rate an exchange)."""
    with db.session() as session:
        row = session.get(Record, record_id)
        if row is None or (row.api_key_id is not None and not admin and row.api_key_id != key_id):
            return False
        row.feedback = feedback
        session.add(row)
        session.commit()
        return True
