"""Prometheus metrics (names in docs/ARCHITECTURE.md, "Metrics"; all prefixed ``distillgate_``).

Each app owns its registry (tests build several apps in one process). With several server
workers, ``PROMETHEUS_MULTIPROC_DIR`` is set before start and ``/metrics`` aggregates the
per-process files, so counters and histograms stay correct across workers.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.store.models import Stage

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# LLM answers take from milliseconds (cache, tiny student) to minutes (long teacher generations).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SCORE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


OTHER_TASKS = "_other"
"""The ``task`` label of every task past ``max_task_labels``: ``/metrics`` stays bounded."""


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the gateway exports. At most ``max_task_labels`` tasks get their own ``task``
    label (the first seen); the rest are counted together under ``_other``."""

    def __init__(self, *, max_task_labels: int = 200) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.max_task_labels = max_task_labels
        self._task_labels: set[str] = set()
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        r = self.registry
        p = "distillgate_"
        self.requests = Counter(
            p + "requests",
            "Requests answered, by task, target and HTTP status.",
            ["task", "target", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            p + "request_duration_seconds",
            "Time from request to last byte.",
            ["task", "target"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Time from request to the first streamed byte.",
            ["task", "target"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            p + "gateway_overhead_seconds",
            "Time the gateway itself adds (request handling minus upstream wait).",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            p + "tokens",
            "Tokens by task, target and kind (prompt, completion, cached).",
            ["task", "target", "kind"],
            registry=r,
        )
        self.cost = Counter(p + "cost_usd", "USD spent, by task and target.", ["task", "target"], registry=r)
        self.savings = Counter(
            p + "savings_usd", "Teacher-equivalent USD minus USD spent.", ["task"], registry=r
        )
        self.cache_requests = Counter(
            p + "cache_requests",
            "Cache look-ups by result (hit, miss, bypass).",
            ["task", "result"],
            registry=r,
        )
        self.shadow_score = Histogram(
            p + "shadow_score",
            "Scores of shadow and audit pairs.",
            ["task", "adapter", "scorer"],
            buckets=SCORE_BUCKETS,
            registry=r,
        )
        self.task_stage = Gauge(
            p + "task_stage",
            "1 for the stage each task is in, 0 for the others.",
            ["task", "stage"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.student_ratio = Gauge(
            p + "student_traffic_ratio",
            "Share of a task's traffic routed to the student.",
            ["task"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.promotions = Counter(p + "promotions", "Stage promotions.", ["task"], registry=r)
        self.rollbacks = Counter(p + "rollbacks", "Rollbacks to the teacher.", ["task"], registry=r)
        self.recorder_queue = Gauge(
            p + "recorder_queue_depth",
            "Records waiting to be written.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.in_flight = Gauge(
            p + "in_flight_requests",
            "API requests being served (admitted, answer not finished).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.loop_lag = Gauge(
            p + "event_loop_lag_seconds",
            "How late the event loop runs its timers (smoothed); load is shed past shed_loop_lag_s.",
            registry=r,
            multiprocess_mode="livemax",
        )
        self.recorder_spooled = Counter(
            p + "recorder_spooled", "Records written to the spool file.", registry=r
        )
        self.recorder_dropped = Counter(
            p + "recorder_dropped",
            "Records lost, by reason (queue_full, shutdown, quarantine_unwritable, redaction_failed).",
            ["reason"],
            registry=r,
        )
        self.recorder_replayed = Counter(
            p + "recorder_replayed", "Spooled records written to the database.", registry=r
        )
        self.recorder_quarantined = Counter(
            p + "recorder_quarantined",
            "Records no store accepted, kept alone under <spool_dir>/quarantine/.",
            registry=r,
        )
        self.recorder_restarts = Counter(
            p + "recorder_restarts", "Recorder threads that died and were restarted.", ["thread"], registry=r
        )
        self.recorder_spool_errors = Counter(
            p + "recorder_spool_errors",
            "Failed spool writes, by errno (ENOSPC, EROFS, ...).",
            ["kind"],
            registry=r,
        )
        self.recorder_spool_writable = Gauge(
            p + "recorder_spool_writable",
            "1 while the spool directory takes writes, 0 after a write failed (until one succeeds).",
            registry=r,
            multiprocess_mode="livemin",
        )
        self.recorder_spool_writable.set(1)
        self.training_runs = Counter(
            p + "training_runs", "Training runs by outcome.", ["task", "status"], registry=r
        )
        self.upstream_errors = Counter(
            p + "upstream_errors", "Failed upstream calls by target and kind.", ["target", "kind"], registry=r
        )
        self.answer_checks = Counter(
            p + "answer_checks",
            "Teacher answers checked by a second model before training, by verdict (passed, failed, unscored, error).",
            ["task", "verdict"],
            registry=r,
        )
        self.soft_label_captures = Counter(
            p + "soft_label_captures",
            "Teacher answers asked for top-k logprobs on the client's behalf (soft labels).",
            ["task"],
            registry=r,
        )
        self.shadow_dropped = Counter(
            p + "shadow_dropped", "Shadow calls dropped under pressure.", ["task"], registry=r
        )
        self.shed = Counter(
            p + "shed_requests", "Requests refused because the gateway was at capacity.", registry=r
        )
        self.redactions = Counter(
            p + "redactions",
            "Values redacted from stored content, by task and detector.",
            ["task", "kind"],
            registry=r,
        )
        self.limited = Counter(
            p + "limited_requests",
            "Requests refused by a key's controls: requests, tokens, budget or task_not_allowed.",
            ["reason"],
            registry=r,
        )

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, remembered: the lookup is measurable on the hot path. A
        ``task`` label (always the first) is capped by ``task_label``."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            if len(self._children) > 100_000:
                self._children.clear()
            if metric._labelnames and metric._labelnames[0] == "task":
                labels = (self.task_label(labels[0]), *labels[1:])
            found = self._children[key] = metric.labels(*labels)
        return found

    def task_label(self, task: str) -> str:
        """``task`` itself while fewer than ``max_task_labels`` tasks have a label, else ``_other``."""
        known = self._task_labels
        if task in known:
            return task
        if len(known) < self.max_task_labels:
            known.add(task)
            return task
        return OTHER_TASKS

    def has_task_label(self, task: str) -> bool:
        """Whether per-task gauges (stage, traffic ratio) are exported for ``task``; they cannot be
        summed into ``_other``, so tasks past the cap have none."""
        return self.task_label(task) != OTHER_TASKS

    def render(self) -> bytes:
        if multiprocess_dir():
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)

    def set_stage(self, task: str, stage: Stage) -> None:
        if not self.has_task_label(task):
            return
        for name in Stage:
            self.task_stage.labels(task, name).set(1.0 if name == stage else 0.0)
