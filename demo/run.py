"""``distillgate demo``: the whole loop on one machine, unattended, with no GPU, key or internet.

A scripted stand-in teacher (or a real one with ``--teacher-url``), the gateway on SQLite with
its in-process scheduler, and the embedded student server. Traffic from the reference workload
flows in; tasks train, are evaluated offline, shadowed, canaried and promoted by themselves.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Annotated, Any

import httpx
import typer
import uvicorn
from rich.console import Console
from rich.live import Live
from rich.table import Table
from sqlmodel import col, select

from demo import workload
from demo.recipe import DemoRecipe, demo_recipe, tokenizer_conversations
from demo.traffic import TrafficReport, replay_to
from gateway.store.models import Record, Stage, Task

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
    base_model: Path,
) -> dict[str, Any]:
    tasks: dict[str, Any] = {}
    for family in workload.FAMILIES:
        tasks[family.task_key] = {"promote": {"scorer": family.scorer}}
    return {
        "teacher": {"base_url": teacher_url, "api_key_env": key_env, "model": teacher_model},
        "student": {
            "base_url": student_url + "/v1",
            "base_model": str(base_model),
            "engine": "embedded",
            "timeout": "30s",
        },
        "prices": {
            teacher_model: {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "student": {"input": 0.05, "output": 0.10},
        },
        "defaults": recipe.policy_defaults,
        "tasks": tasks,
    }


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
    """Run the loop until every task is settled or time is up; return the final summary."""
    import torch

    from demo.teacher import ScriptedTeacher, create_teacher_app
    from gateway.app import ServingParts, create_app
    from gateway.keys import create_key
    from gateway.settings import RecorderSettings, Settings
    from gateway.store.db import Database
    from router.policy import Policy, parse_policy
    from trainer.scheduler import Scheduler
    from trainer.tinymodel import build_tiny_model, conversation_texts

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
    try:
        state.phase = "building the base student"
        texts = list(conversation_texts(tokenizer_conversations(recipe.tokenizer_samples)))
        base_model = build_tiny_model(workdir / "base-model", texts, recipe.model)
        if teacher_url is None:
            teacher = BackgroundServer(
                create_teacher_app(ScriptedTeacher(answer_fn=workload.answer)), free_port()
            )
            servers.append(teacher.start())
            teacher_url = teacher.url + "/v1"
        state.phase = "starting the student server"
        student_port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DISTILLGATE_TORCH_THREADS": "1"}
        student_log = open(workdir / "student.log", "wb")  # noqa: SIM115 (closed with the process)
        student_proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway",
                "student",
                "serve",
                "--base-model",
                str(base_model),
                "--port",
                str(student_port),
                "--device",
                "cpu",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=student_log,
        )
        _wait_http(f"http://127.0.0.1:{student_port}/health", 120, student_proc)
        policy = parse_policy(
            demo_policy(
                recipe,
                teacher_url,
                teacher_model,
                teacher_key_env,
                f"http://127.0.0.1:{student_port}",
                base_model,
            )
        )
        settings = Settings(
            database_url=f"sqlite:///{workdir / 'distillgate.db'}",
            adapters_dir=workdir / "adapters",
            recorder=RecorderSettings(spool_dir=workdir / "spool"),
        )

        def scheduler(db: Database, policy: Callable[[], Policy | None]) -> Scheduler:
            """The demo trains in the gateway's process, and shows what each pass did."""
            trainer = Scheduler(db, policy, settings.adapters_dir, interval_s=2.0)
            trainer.on_event.append(lambda e: state.events.append(f"{e.task}: {e.outcome} — {e.reason}"))
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
                round_started = time.perf_counter()
                report = asyncio.run(
                    replay_to(
                        base_url,
                        key,
                        families=families,
                        n=recipe.round_size,
                        seed=seed,
                        concurrency=recipe.concurrency,
                        model=teacher_model,
                    )
                )
                state.traffic.append(report)
                seed += 1
                pause = recipe.round_size / recipe.requests_per_s - (time.perf_counter() - round_started)
                traffic_done.wait(max(0.0, pause))

        state.phase = "collecting → training → shadow → canary → serving"
        pumper = threading.Thread(target=pump, daemon=True)
        pumper.start()
        deadline = time.perf_counter() + max_minutes * 60
        view = Live(console=console, refresh_per_second=2, transient=False) if live else None
        if view is not None:
            view.start()
        try:
            while time.perf_counter() < deadline:
                tasks = _tasks(db)
                if view is not None:
                    view.update(_live_table(state, tasks, db))
                if _all_settled(db, tasks, recipe):
                    break
                time.sleep(1.0)
            traffic_done.set()
            pumper.join(120)
            state.phase = "measuring"
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
            summary = _summary(db, state, measured)
            if view is not None:
                view.update(_live_table(state, _tasks(db), db))
        finally:
            if view is not None:
                view.stop()
        return summary
    finally:
        for server in reversed(servers):
            server.stop()
        if student_proc is not None:
            student_proc.terminate()
            try:
                student_proc.wait(15)
            except subprocess.TimeoutExpired:
                student_proc.kill()


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
    from gateway.store.models import TrainingRun

    with db.session() as session:
        runs = session.exec(select(TrainingRun).where(TrainingRun.task == task.key)).all()
    return bool(runs) and task.stage == Stage.collecting and all(r.status != "running" for r in runs)


def _all_settled(db: Any, tasks: list[Task], recipe: DemoRecipe) -> bool:
    known = [t for t in tasks if _family_name(t.key) in recipe.families]
    if len(known) < len(recipe.families):
        return False
    return all(t.stage in SETTLED or _trained_and_judged(db, t) for t in known)


def _offline_agreement(db: Any, task: Task) -> float | None:
    from gateway.store.models import Adapter

    with db.session() as session:
        rows = session.exec(
            select(Adapter).where(Adapter.task == task.key).order_by(col(Adapter.version).desc())
        ).all()
    for adapter in rows:
        if task.adapter is not None and adapter.name != task.adapter:
            continue
        evaluation = (adapter.metrics or {}).get("eval") or {}
        if "finetuned" in evaluation:
            return float(evaluation["finetuned"])
    return None


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


def _summary(db: Any, state: DemoState, measured: TrafficReport) -> dict[str, Any]:
    from gateway.report import ledger

    spend: dict[str, tuple[float, float]] = {}
    for row in ledger(db):
        s, t = spend.get(row.task, (0.0, 0.0))
        spend[row.task] = (s + row.spend_usd, t + row.teacher_usd)
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
        out[name] = {
            "stage": task.stage,
            "agreement": _offline_agreement(db, task),
            "live_agreement": None
            if traffic is None or traffic.agreement is None
            else round(traffic.agreement, 4),
            "student_share": round(student / served, 4) if served else 0.0,
            "spend_usd": round(s, 6),
            "savings_usd": round(t - s, 6),
            "teacher_p50_ms": _latency_p50(db, task.key, student=False),
            "student_p50_ms": _latency_p50(db, task.key, student=True),
            "reason": task.reason,
        }
    return {
        "tasks": out,
        "wall_s": round(time.perf_counter() - state.started, 1),
        "failed_requests": state.failed_requests,
        "requests": state.sent,
    }


def _live_table(state: DemoState, tasks: list[Task], db: Any) -> Table:
    elapsed = time.perf_counter() - state.started
    table = Table(
        title=f"distillgate demo — {state.phase} — {elapsed:,.0f} s, {state.sent:,} requests, "
        f"{state.failed_requests} failed"
    )
    for column in ("task", "stage", "adapter", "student share", "reason"):
        table.add_column(column)
    for task in tasks:
        name = _family_name(task.key)
        if name not in workload.TASK_NAMES:
            continue
        table.add_row(
            name, task.stage, task.adapter or "", f"{task.student_ratio:.0%}", (task.reason or "")[:90]
        )
    return table


def final_table(summary: dict[str, Any]) -> Table:
    table = Table(
        title=f"distillgate demo: {summary['wall_s']:.0f} s wall, {summary['requests']:,} requests, "
        f"{summary['failed_requests']} failed"
    )
    for column in (
        "task",
        "stage",
        "agreement",
        "student share",
        "spend $",
        "saved $",
        "teacher p50 ms",
        "student p50 ms",
        "reason",
    ):
        table.add_column(column)
    for name, row in summary["tasks"].items():
        agreement = "" if row["agreement"] is None else f"{row['agreement']:.3f}"
        table.add_row(
            name,
            row["stage"],
            agreement,
            f"{row['student_share']:.0%}",
            f"{row['spend_usd']:.4f}",
            f"{row['savings_usd']:.4f}",
            str(row["teacher_p50_ms"] or ""),
            str(row["student_p50_ms"] or ""),
            row["reason"] or "",
        )
    return table


def demo_command(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final table as one JSON line on stdout.")
    ] = False,
    teacher_url: Annotated[str | None, typer.Option(help="A real OpenAI-compatible teacher (…/v1).")] = None,
    teacher_model: Annotated[str, typer.Option(help="The teacher's model name.")] = "teacher-large",
    teacher_key_env: Annotated[str | None, typer.Option(help="Env var holding the teacher's key.")] = None,
    workdir: Annotated[Path, typer.Option(help="Where the demo keeps its database and adapters.")] = Path(
        ".demo"
    ),
    max_minutes: Annotated[
        float, typer.Option(help="Give up waiting for tasks to settle after this long.")
    ] = 25.0,
    quick: Annotated[
        bool, typer.Option(help="Smaller traffic and training (CI): same loop, fewer minutes.")
    ] = False,
) -> None:
    """Run the whole loop offline: teacher → gateway → recorded traffic → training → shadow → canary → serving."""
    console = Console(stderr=True)
    recipe = demo_recipe(quick=quick)
    if teacher_url is not None and teacher_key_env is not None and not os.environ.get(teacher_key_env):
        console.print(f"[red]{teacher_key_env} is not set[/red]")
        raise typer.Exit(2)
    summary = run_demo(
        workdir=workdir,
        recipe=recipe,
        teacher_url=teacher_url,
        teacher_model=teacher_model,
        teacher_key_env=teacher_key_env,
        max_minutes=max_minutes,
        console=console,
        live=not as_json and console.is_terminal,
    )
    console.print(final_table(summary))
    if as_json:
        typer.echo(json.dumps(summary))
