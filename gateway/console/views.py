"""What each console page shows, read with the admin API's own queries plus the few the pages add
(spend, latencies, training runs, the plots' points).

Synchronous (database); the console runs these in a worker thread. Numbers come from the same
functions the admin API and the CLI call (``router.tasks``, ``gateway.report``, the gate's
``Promoter.judge``), so the pages and ``distillgate tasks`` agree.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from statistics import median
from typing import Any

from sqlmodel import col, select

from gateway.report import ledger
from gateway.store.db import Database
from gateway.store.models import Adapter, Record, ShadowPair, TrainingRun, utcnow
from router.gate import wilson_interval
from router.promotion import Promoter
from router.tasks import TaskDetail, TaskRow, task_detail, task_rows

WINDOW = timedelta(days=7)
"""Spend, savings and latencies are the last week's (``distillgate report``'s default window)."""
LATENCY_SAMPLE = 20_000
"""Most answered records (newest first) the p50 latencies are taken over, all tasks together."""
PLOT_PAIRS = 400
"""Newest pairs of the current adapter in the agreement plot."""
AGREEMENT_WINDOW = 20
"""Pairs per point of the agreement plot (a rolling pass rate)."""


@dataclass(frozen=True)
class TaskOverview:
    """A row of the tasks page: the admin API's ``TaskRow`` and what the ledger adds."""

    row: TaskRow
    offline_agreement: float | None
    """The current adapter's held-out agreement with the teacher (its offline evaluation)."""
    spend_usd: float
    savings_usd: float
    teacher_p50_ms: float | None
    student_p50_ms: float | None

    def value(self, column: str) -> Any:
        """What the column sorts on: stages in the loop's order, the rest as shown."""
        value = getattr(self.row, column) if hasattr(self.row, column) else getattr(self, column, None)
        return STAGE_ORDER.get(str(value), 99) if column == "stage" else value


STAGE_ORDER = {
    s: i
    for i, s in enumerate(["collecting", "training", "shadow", "canary", "serving", "paused", "rolled_back"])
}
SORTABLE = (
    "task",
    "stage",
    "adapter",
    "student_ratio",
    "pass_rate",
    "offline_agreement",
    "spend_usd",
    "savings_usd",
    "teacher_p50_ms",
    "student_p50_ms",
)


def _latencies(db: Database, task: str | None) -> dict[str, dict[str, list[float]]]:
    stmt = (
        select(Record.task, Record.target, Record.latency_ms)
        .where(
            Record.status == 200,
            col(Record.cache_hit).is_(False),
            col(Record.created_at) >= utcnow() - WINDOW,
        )
        .order_by(col(Record.created_at).desc())
        .limit(LATENCY_SAMPLE)
    )
    if task is not None:
        stmt = stmt.where(Record.task == task)
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    with db.session() as session:
        for key, target, latency in session.exec(stmt):
            kind = "student" if target.startswith("student:") else target
            out[key][kind].append(latency)
    return out


def _offline(adapter: Adapter | None) -> float | None:
    evaluation = (adapter.metrics or {}).get("eval") if adapter is not None else None
    value = evaluation.get("finetuned") if isinstance(evaluation, dict) else None
    return float(value) if isinstance(value, int | float) else None


def _p50(values: list[float]) -> float | None:
    return median(values) if values else None


def overview(db: Database, task: str | None = None) -> list[TaskOverview]:
    """Every task (or one) with the last week's spend, savings and p50 latencies."""
    rows = [r for r in task_rows(db) if task is None or r.task == task]
    money: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for line in ledger(db, since=utcnow() - WINDOW, task=task):
        money[line.task][0] += line.spend_usd
        money[line.task][1] += line.savings_usd
    latencies = _latencies(db, task)
    with db.session() as session:
        names = [r.adapter for r in rows if r.adapter]
        adapters = {a.name: a for a in session.exec(select(Adapter).where(col(Adapter.name).in_(names)))}
    return [
        TaskOverview(
            row=r,
            offline_agreement=_offline(adapters.get(r.adapter or "")),
            spend_usd=money[r.task][0],
            savings_usd=money[r.task][1],
            teacher_p50_ms=_p50(latencies[r.task]["teacher"]),
            student_p50_ms=_p50(latencies[r.task]["student"]),
        )
        for r in rows
    ]


def sorted_overview(rows: list[TaskOverview], column: str, descending: bool) -> list[TaskOverview]:
    """Sorted by ``column`` (by task name when it is not one of ``SORTABLE``), ties by task name;
    tasks without a number there come last either way."""
    column = column if column in SORTABLE else "task"
    by_name = sorted(rows, key=lambda r: r.row.task)
    known = [r for r in by_name if r.value(column) is not None]
    missing = [r for r in by_name if r.value(column) is None]
    return sorted(known, key=lambda r: r.value(column), reverse=descending) + missing


def samples_needed(passed: int, n: int, min_samples: int, threshold: float, confidence: float) -> int | None:
    """How many more pairs, every one passing, before the gate's lower bound clears ``threshold``
    with at least ``min_samples`` pairs: the least the task must still see. ``None``: unreachable."""
    k = max(0, min_samples - n)
    if wilson_interval(passed + k, n + k, confidence)[0] >= threshold - 1e-12:
        return k
    hi = max(1, k)
    while wilson_interval(passed + hi, n + hi, confidence)[0] < threshold - 1e-12:
        hi *= 2
        if hi > 1_000_000:
            return None
    lo = k
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if wilson_interval(passed + mid, n + mid, confidence)[0] >= threshold - 1e-12:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class GateView:
    """The gate's verdict on the task now, with the numbers it rests on."""

    action: str
    reason: str
    evidence: dict[str, Any]
    needed: int | None
    """Passing pairs still needed to promote (promotion verdicts only)."""


def gate_view(promoter: Promoter, task: str) -> GateView | None:
    judged = promoter.judge(task)
    if judged is None:
        return None
    _, verdict, _ = judged
    e = verdict.evidence
    needed = None
    if "threshold" in e:
        needed = samples_needed(e["passed"], e["n"], e["min_samples"], e["threshold"], e["confidence"])
    return GateView(verdict.action, verdict.reason, e, needed)


@dataclass(frozen=True)
class RunView:
    id: int | None
    status: str
    adapter: str | None
    started_at: str
    finished_at: str | None
    dataset: dict[str, Any]
    train_examples: int | None
    eval_loss_before: float | None
    eval_loss_after: float | None
    train_losses: list[tuple[float, float]]
    eval_losses: list[tuple[float, float]]
    offline: dict[str, Any] | None
    """Base → fine-tuned → teacher agreement on held-out teacher answers."""
    error: str | None


@dataclass(frozen=True)
class AdapterView:
    name: str
    version: int
    status: str
    method: str
    base_model: str
    created_at: str
    offline: dict[str, Any] | None


@dataclass
class TaskPage:
    detail: TaskDetail
    overview: TaskOverview | None
    gate: GateView | None
    runs: list[RunView] = field(default_factory=list)
    adapters: list[AdapterView] = field(default_factory=list)
    agreement: list[tuple[float, float]] = field(default_factory=list)
    """(pair number, pass rate of the ``AGREEMENT_WINDOW`` pairs up to it), current adapter."""
    shares: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since the first transition, the student's share after each transition)."""


def _points(raw: Any) -> list[tuple[float, float]]:
    return [(float(p[0]), float(p[1])) for p in raw or [] if isinstance(p, list | tuple) and len(p) == 2]


def _run_view(run: TrainingRun, adapters: dict[str, Adapter]) -> RunView:
    m = run.metrics or {}
    adapter = adapters.get(run.adapter or "")
    evaluation = (adapter.metrics or {}).get("eval") if adapter is not None else None
    return RunView(
        id=run.id,
        status=run.status,
        adapter=run.adapter,
        started_at=run.started_at.isoformat(timespec="seconds"),
        finished_at=run.finished_at.isoformat(timespec="seconds") if run.finished_at else None,
        dataset=m.get("dataset") or {},
        train_examples=m.get("train_examples"),
        eval_loss_before=m.get("eval_loss_before"),
        eval_loss_after=m.get("eval_loss_after"),
        train_losses=_points(m.get("train_losses")),
        eval_losses=_points(m.get("eval_losses")),
        offline=evaluation if isinstance(evaluation, dict) else None,
        error=run.error,
    )


def task_page(db: Database, promoter: Promoter, key: str) -> TaskPage:
    """Everything the task page shows. Raises ``UnknownTask``."""
    detail = task_detail(db, key, 50)
    with db.session() as session:
        adapters = list(
            session.exec(select(Adapter).where(Adapter.task == key).order_by(col(Adapter.version).desc()))
        )
        runs = list(
            session.exec(
                select(TrainingRun)
                .where(TrainingRun.task == key)
                .order_by(col(TrainingRun.started_at).desc())
                .limit(10)
            )
        )
        outcomes = list(
            session.exec(
                select(ShadowPair.passed)
                .where(ShadowPair.task == key, ShadowPair.adapter == (detail.adapter or ""))
                .order_by(col(ShadowPair.created_at).desc(), col(ShadowPair.id).desc())
                .limit(PLOT_PAIRS)
            )
        )
    by_name = {a.name: a for a in adapters}
    outcomes.reverse()
    agreement = []
    for i in range(len(outcomes)):
        window = outcomes[max(0, i + 1 - AGREEMENT_WINDOW) : i + 1]
        agreement.append((float(i + 1), sum(window) / len(window)))
    moves = list(reversed(detail.transitions))
    shares: list[tuple[float, float]] = []
    if moves:
        start = datetime.fromisoformat(moves[0].created_at)
        for move in moves:
            ratio = move.evidence.get("student_ratio")
            if isinstance(ratio, int | float):
                at = (datetime.fromisoformat(move.created_at) - start).total_seconds()
                shares.append((at, float(ratio)))
    found = overview(db, key)
    return TaskPage(
        detail=detail,
        overview=found[0] if found else None,
        gate=gate_view(promoter, key),
        runs=[_run_view(r, by_name) for r in runs],
        adapters=[
            AdapterView(
                name=a.name,
                version=a.version,
                status=a.status,
                method=a.method,
                base_model=a.base_model,
                created_at=a.created_at.isoformat(timespec="seconds"),
                offline=(a.metrics or {}).get("eval")
                if isinstance((a.metrics or {}).get("eval"), dict)
                else None,
            )
            for a in adapters
        ],
        agreement=agreement,
        shares=shares,
    )
