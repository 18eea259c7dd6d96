"""Client traffic for the demo and tests: the reference workload replayed against an OpenAI-compatible
endpoint (normally the gateway) with the real ``openai`` SDK, at bounded concurrency, from a seed.

Some families tag requests with ``metadata.task``; others send only their system prompt, so the
gateway must group them by fingerprint, as it does for untagged applications.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import openai

from demo.workload import FAMILIES, TaskFamily, traffic
from router.scorers import score

MAX_ERRORS_KEPT = 20


@dataclass
class TaskTraffic:
    """What one family's requests got back."""

    sent: int = 0
    ok: int = 0
    failed: int = 0
    score_sum: float = 0.0
    """Sum over successful answers of the family's scorer against the scripted teacher's answer."""
    student_ok: int = 0
    """Successful answers that the student gave (``x-distillgate-target: student:…``)."""
    student_score_sum: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    targets: Counter[str] = field(default_factory=Counter)
    """Who answered, from the gateway's ``x-distillgate-target`` header (``teacher``, ``student:…``, ``cache``)."""

    @property
    def agreement(self) -> float | None:
        """Mean score of the answers clients received against the scripted teacher's (None before any)."""
        return self.score_sum / self.ok if self.ok else None

    @property
    def student_agreement(self) -> float | None:
        """Mean score of the student's answers alone: None while the student has answered nobody
        (the teacher agreeing with itself says nothing about the student)."""
        return self.student_score_sum / self.student_ok if self.student_ok else None

    @property
    def p50_ms(self) -> float | None:
        ordered = sorted(self.latencies_ms)
        return ordered[len(ordered) // 2] if ordered else None


@dataclass
class TrafficReport:
    """Counts per family name, the first errors, and the wall time of the replay."""

    tasks: dict[str, TaskTraffic] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def sent(self) -> int:
        return sum(t.sent for t in self.tasks.values())

    @property
    def ok(self) -> int:
        return sum(t.ok for t in self.tasks.values())

    @property
    def failed(self) -> int:
        return sum(t.failed for t in self.tasks.values())


@dataclass(frozen=True)
class Outcome:
    """One request's result, as a progress callback sees it."""

    index: int
    task: str
    ok: bool
    latency_ms: float
    target: str | None
    score: float | None
    error: str | None


OutcomeCallback = Callable[[Outcome], None]


def _sdk_arguments(body: dict[str, Any]) -> dict[str, Any]:
    """A workload body as ``chat.completions.create`` keyword arguments (the same fields)."""
    return {key: value for key, value in body.items() if value is not None}


async def _send(
    client: openai.AsyncOpenAI, index: int, family: TaskFamily, body: dict[str, Any], report: TrafficReport
) -> Outcome:
    counts = report.tasks.setdefault(family.name, TaskTraffic())
    counts.sent += 1
    started = time.perf_counter()
    try:
        raw = await client.chat.completions.with_raw_response.create(**_sdk_arguments(body))
        completion = raw.parse()
    except openai.OpenAIError as exc:
        counts.failed += 1
        status = getattr(exc, "status_code", None)
        message = f"{family.name}: {type(exc).__name__}{f' {status}' if status else ''}: {exc}"
        if len(report.errors) < MAX_ERRORS_KEPT:
            report.errors.append(message)
        return Outcome(index, family.name, False, (time.perf_counter() - started) * 1000, None, None, message)
    latency_ms = (time.perf_counter() - started) * 1000
    target = raw.headers.get("x-distillgate-target")
    if raw.headers.get("x-distillgate-cache") == "hit":
        target = "cache"
    expected = {"choices": [{"message": family.answer(body)}]}
    value = score(family.scorer, expected, completion.model_dump()).score
    counts.ok += 1
    counts.score_sum += value
    counts.latencies_ms.append(latency_ms)
    counts.targets[target or "unknown"] += 1
    if target is not None and target.startswith("student"):
        counts.student_ok += 1
        counts.student_score_sum += value
    return Outcome(index, family.name, True, latency_ms, target, value, None)


async def replay(
    client: openai.AsyncOpenAI,
    *,
    n: int,
    seed: int = 0,
    families: Sequence[TaskFamily] = FAMILIES,
    weights: Sequence[float] | None = None,
    concurrency: int = 8,
    model: str = "teacher-large",
    on_outcome: OutcomeCallback | None = None,
) -> TrafficReport:
    """Send ``n`` workload requests (``workload.traffic(seed, …)``) with at most ``concurrency`` in flight.

    A request that fails (an API error, a timeout, a refused connection, after the client's own
    retries) is counted, never raised. Use a new ``seed`` per round to send new prompts; the same
    seed repeats the same ones (and so exercises the gateway's cache).
    """
    report = TrafficReport(tasks={family.name: TaskTraffic() for family in families})
    requests = enumerate(traffic(seed, n, families, weights))
    started = time.perf_counter()

    async def worker() -> None:
        # One shared iterator: each worker takes the next request as soon as it is free.
        for index, (family, body) in requests:
            outcome = await _send(client, index, family, {**body, "model": model}, report)
            if on_outcome is not None:
                on_outcome(outcome)

    await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
    report.wall_s = time.perf_counter() - started
    return report


async def replay_to(
    base_url: str,
    api_key: str,
    *,
    timeout_s: float = 120.0,
    max_retries: int = 2,
    **options: Any,
) -> TrafficReport:
    """``replay`` through a client made for ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), closed afterwards."""
    async with openai.AsyncOpenAI(
        base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries
    ) as client:
        return await replay(client, **options)


def run_traffic(base_url: str, api_key: str, **options: Any) -> TrafficReport:
    """``replay_to`` for synchronous callers (a CLI command, a demo thread); not inside a running loop."""
    return asyncio.run(replay_to(base_url, api_key, **options))
