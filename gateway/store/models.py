"""Table models. One row per request (``Record``) is the source every later stage reads.

Words as in docs/ARCHITECTURE.md: a *task* is one prompt family; its *stage* is where it is in
collecting → training → shadow → canary → serving; an *adapter* is a trained student
version named ``task@vN``; a *shadow pair* is a teacher answer beside a student answer.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, LargeBinary, String, Text, TypeDecorator
from sqlalchemy.dialects.postgresql import JSONB
from sqlmodel import Field, SQLModel

# JSONB on PostgreSQL (indexable, compact), plain JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite hands back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    """A sortable unique id: 12 hex digits of milliseconds, then 20 random hex digits."""
    return f"{time.time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


class Stage(StrEnum):
    collecting = "collecting"
    training = "training"
    shadow = "shadow"
    canary = "canary"
    serving = "serving"
    rolled_back = "rolled_back"
    paused = "paused"


class StageType(TypeDecorator[Stage]):
    """A ``Stage`` stored as its name in a ``VARCHAR(20)``: the column the first migration made."""

    impl = String(20)
    cache_ok = True

    def process_bind_param(self, value: Stage | str | None, dialect: Any) -> str | None:
        return None if value is None else Stage(value).value

    def process_result_value(self, value: str | None, dialect: Any) -> Stage | None:
        return None if value is None else Stage(value)


class Record(SQLModel, table=True):
    """One request/response exchange, as the client saw it.

    On PostgreSQL the table is partitioned by month of ``created_at`` (``gateway.store.partitions``),
    its primary key ``(id, created_at)``; the ids stay unique (``new_id``).
    """

    __table_args__ = (Index("ix_record_task_created_at", "task", "created_at"),)

    id: str = Field(default_factory=new_id, primary_key=True, max_length=40)
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)
    api_key_id: int | None = Field(default=None, index=True)
    task: str = Field(index=True, max_length=200)
    endpoint: str = Field(default="chat.completions", max_length=40)
    model: str = Field(default="", max_length=200)
    """The model the client asked for."""
    target: str = Field(default="teacher", max_length=240)
    """``teacher`` | ``student:<adapter>`` | ``cache``."""
    stream: bool = False
    stored: bool = True
    """False when the client opted out (``store: false``): content is not kept."""
    request: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    status: int = 200
    error: str | None = Field(default=None, sa_column=Column(Text))
    finish_reason: str | None = Field(default=None, max_length=40)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float | None = None
    cost_usd: float = 0.0
    teacher_cost_usd: float = 0.0
    """What the teacher would have cost for this exchange (equals cost_usd when the teacher served)."""
    cache_hit: bool = False
    feedback: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    shadow: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    """Student answer and scores where this exchange was mirrored (also in ``ShadowPair``)."""
    redacted: bool | None = None
    """True when redaction replaced something in this record's content: such records are not
    trained on unless the task's policy says ``redact.train_on_redacted`` (``gateway.redaction``)."""


class ApiKey(SQLModel, table=True):
    """A gateway API key. Only the SHA-256 of the key is stored; the key is shown once."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, max_length=200)
    prefix: str = Field(max_length=16)
    """The first characters of the key, to tell keys apart in listings."""
    key_hash: str = Field(unique=True, index=True, max_length=64)
    admin: bool = False
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    revoked_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    expires_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    """Past this the key is refused like a revoked one; None never expires."""
    updated_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)
    """Set by every change, so each replica's key ring re-reads only the keys changed lately."""
    tasks: list[str] | None = Field(default=None, sa_column=Column(JSONType))
    """The tasks this key may call (403 ``task_not_allowed`` outside them); None allows all."""
    rpm: int | None = None
    """Requests per minute, across all replicas; None is unlimited."""
    tpm: int | None = None
    """Prompt plus completion tokens per minute."""
    budget_usd: float | None = None
    """Spend (the ledger's cost of every exchange the key made) allowed per ``budget_period``."""
    budget_period: str = Field(default="month", max_length=8)
    """``day`` | ``week`` | ``month`` (calendar, UTC)."""
    task_limits: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    """Per task: ``{"rpm", "tpm", "budget_usd"}`` limits of this key on that task."""


class Task(SQLModel, table=True):
    """The state of one task in the distillation loop."""

    key: str = Field(primary_key=True, max_length=200)
    stage: Stage = Field(default=Stage.collecting, sa_type=StageType)
    adapter: str | None = Field(default=None, max_length=240)
    """The candidate (shadow/canary) or serving adapter."""
    student_ratio: float = 0.0
    """Share of the task's traffic the student serves now."""
    canary_step: int = 0
    reason: str | None = Field(default=None, sa_column=Column(Text))
    paused: bool = False
    paused_from: Stage | None = Field(default=None, sa_type=StageType)
    """The stage a paused task returns to when it is resumed."""
    records_at_last_train: int = 0
    last_trained_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    first_seen_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    updated_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    features: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    """What the student was trained on (models, tools, max prompt tokens): the route decision
    keeps requests outside this envelope on the teacher."""


class TaskTransition(SQLModel, table=True):
    """A stage change with its reason and the numbers behind it."""

    __table_args__ = (Index("ix_tasktransition_task_created_at", "task", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    task: str = Field(index=True, max_length=200)
    from_stage: Stage = Field(sa_type=StageType)
    to_stage: Stage = Field(sa_type=StageType)
    adapter: str | None = Field(default=None, max_length=240)
    reason: str = Field(default="", sa_column=Column(Text))
    evidence: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    forced: bool = False
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)


class DatasetSnapshot(SQLModel, table=True):
    """A versioned, reproducible training set for one task."""

    id: int | None = Field(default=None, primary_key=True)
    task: str = Field(index=True, max_length=200)
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    train_ids: list[str] = Field(default_factory=list, sa_column=Column(JSONType))
    holdout_ids: list[str] = Field(default_factory=list, sa_column=Column(JSONType))
    counts: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType))
    """How many records each filter kept or dropped."""
    content_hash: str = Field(max_length=64)


class TrainingRun(SQLModel, table=True):
    """One fine-tuning attempt, successful or not."""

    id: int | None = Field(default=None, primary_key=True)
    task: str = Field(index=True, max_length=200)
    dataset_id: int | None = None
    adapter: str | None = Field(default=None, max_length=240)
    status: str = Field(default="running", max_length=20)
    """running | succeeded | failed | rejected."""
    started_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    finished_at: datetime | None = Field(default=None, sa_type=UTCDateTime)
    metrics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    error: str | None = Field(default=None, sa_column=Column(Text))


class Adapter(SQLModel, table=True):
    """A trained student version ``task@vN`` and everything needed to reproduce it."""

    name: str = Field(primary_key=True, max_length=240)
    task: str = Field(index=True, max_length=200)
    version: int
    path: str = Field(sa_column=Column(Text))
    base_model: str = Field(sa_column=Column(Text))
    method: str = Field(default="lora", max_length=20)
    """lora | full."""
    dataset_id: int | None = None
    hyperparams: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType))
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSONType))
    """Losses, timings, tokens/s and offline evaluation scores."""
    status: str = Field(default="trained", max_length=20)
    """trained | published | retired | failed."""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)


class ShadowPair(SQLModel, table=True):
    """A teacher answer beside the student's answer to the same request, scored."""

    __table_args__ = (Index("ix_shadowpair_task_adapter_created_at", "task", "adapter", "created_at"),)

    id: int | None = Field(default=None, primary_key=True)
    record_id: str = Field(index=True, max_length=40)
    task: str = Field(index=True, max_length=200)
    adapter: str = Field(index=True, max_length=240)
    kind: str = Field(default="shadow", max_length=20)
    """shadow (candidate mirrored) | canary (evidence at a canary step) | audit (serving task checked)."""
    stage: Stage = Field(default=Stage.shadow, sa_type=StageType)
    """The task's stage when the request was routed."""
    scorer: str = Field(default="exact", max_length=40)
    score: float = 0.0
    passed: bool = False
    student_response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSONType))
    student_latency_ms: float | None = None
    error: str | None = Field(default=None, sa_column=Column(Text))
    created_at: datetime = Field(default_factory=utcnow, index=True, sa_type=UTCDateTime)


class CacheEntry(SQLModel, table=True):
    """The shared tier of the prompt cache (every replica reads and writes it)."""

    key: str = Field(primary_key=True, max_length=64)
    task: str = Field(index=True, max_length=200)
    body: bytes = Field(sa_column=Column(LargeBinary))
    """The complete (non-streamed form of the) response JSON."""
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(index=True, sa_type=UTCDateTime)
    hits: int = 0


class TrainingLock(SQLModel, table=True):
    """One trainer per task across all replicas; a lock whose holder stops renewing expires."""

    task: str = Field(primary_key=True, max_length=200)
    owner: str = Field(max_length=200)
    acquired_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
    expires_at: datetime = Field(sa_type=UTCDateTime)


class Usage(SQLModel, table=True):
    """Shared usage counters behind the per-key limits: every replica adds what it admitted and
    reads the sums back once a second (``gateway.limits``). ``task`` is ``""`` for the key as a
    whole; ``window`` is ``minute`` (rpm, tpm) or the budget's period (``day``/``week``/``month``)."""

    __table_args__ = (Index("ix_usage_window_start", "window", "start"),)

    key_id: int = Field(primary_key=True)
    task: str = Field(primary_key=True, max_length=200)
    window: str = Field(primary_key=True, max_length=8)
    start: datetime = Field(primary_key=True, sa_type=UTCDateTime)
    requests: int = Field(default=0, sa_type=BigInteger)
    tokens: int = Field(default=0, sa_type=BigInteger)
    spend_usd: float = 0.0


class AnswerCheck(SQLModel, table=True):
    """A teacher answer scored by a second model before it may become training data
    (``trainer.validation``). One row per record: the result is computed once and kept; an
    answer under the task's ``validate.min_score`` stays in ``record`` and is left out of datasets."""

    __tablename__ = "answer_check"
    __table_args__ = (Index("ix_answer_check_task_passed", "task", "passed"),)

    record_id: str = Field(primary_key=True, max_length=40)
    task: str = Field(max_length=200)
    score: float | None = None
    """0..1; None when the checker's reply held no score (counted as not checked)."""
    passed: bool = True
    checker: str = Field(default="", max_length=200)
    """The checking model."""
    detail: str | None = Field(default=None, sa_column=Column(Text))
    cost_usd: float = 0.0
    created_at: datetime = Field(default_factory=utcnow, sa_type=UTCDateTime)
