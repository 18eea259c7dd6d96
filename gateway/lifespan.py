"""The parts a process runs, each an async context manager for Litestar's ``lifespan``, and how
handlers get them (``Provide``). ``gateway.app`` and ``gateway.worker`` compose them into a frozen
record at ``app.state.parts``, entered in the order the parts need each other, closed in reverse."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from litestar import Litestar
from litestar.datastructures import State
from litestar.di import Provide

from gateway.metrics import Metrics
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.task_table import TaskTable
from router.policy import Policy
from router.policy_store import PolicyStore

if TYPE_CHECKING:
    from gateway.cache import PromptCache
    from gateway.recorder import Recorder
    from trainer.scheduler import Scheduler

log = logging.getLogger("distillgate")

PolicyReader = Callable[[], Policy | None]
"""The policy in force, read anew by each caller (``None`` while the settings name none)."""
SchedulerFactory = Callable[[Database, PolicyReader], "Scheduler"]
"""Builds the training scheduler on this process's database and policy."""
Lifespan = Callable[[Litestar], AbstractAsyncContextManager[None]]


# -- the parts, each an async context manager ----------------------------------------------------
class Startable(Protocol):
    async def start(self) -> None: ...
    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@asynccontextmanager
async def running(part: S) -> AsyncIterator[S]:
    """A part with ``start``/``stop`` (key ring, shadow mirror, loop-lag ticker, scheduler)."""
    await part.start()
    try:
        yield part
    finally:
        await part.stop()


@asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[Database]:
    """The engine, migrated first (``migrate_on_start``); a database that is away is no reason not
    to serve: the recorder spools until it is back."""
    db = Database(settings.database_url)
    try:
        if settings.migrate_on_start:
            try:
                await asyncio.to_thread(db.migrate)
            except Exception as exc:
                log.error("database migration failed (%s); serving with the spool", type(exc).__name__)
        yield db
    finally:
        db.dispose()


@asynccontextmanager
async def live_policy(settings: Settings, given: Policy | None) -> AsyncIterator[PolicyStore | None]:
    """The policy store: ``settings.policy_file`` watched (``given`` as its first version), or
    ``given`` alone, or none at all."""
    store: PolicyStore | None = None
    if settings.policy_file is not None:
        path = Path(settings.policy_file)
        store = (
            await asyncio.to_thread(PolicyStore, path) if given is None else PolicyStore(path, policy=given)
        )
    elif given is not None:
        store = PolicyStore(policy=given)
    if store is None:
        yield None
        return
    async with running(store):
        yield store


@asynccontextmanager
async def recording(recorder: Recorder) -> AsyncIterator[Recorder]:
    """The recorder's writer thread; leaving drains everything queued (into the database or the spool)."""
    recorder.start()
    try:
        yield recorder
    finally:
        await asyncio.to_thread(recorder.stop)


@asynccontextmanager
async def caching(cache: PromptCache) -> AsyncIterator[PromptCache]:
    """The prompt cache; leaving waits for its writes to the shared tier."""
    try:
        yield cache
    finally:
        await cache.drain()


@asynccontextmanager
async def training(
    scheduler: SchedulerFactory | None, db: Database, policy: PolicyReader, tasks: TaskTable, metrics: Metrics
) -> AsyncIterator[Scheduler | None]:
    """The scheduler the process passed in, if any: its moves are routed on at once, its runs counted."""
    if scheduler is None:
        yield None
        return
    trainer = scheduler(db, policy)
    trainer.on_task.append(tasks.apply)
    trainer.on_event.append(
        lambda e: (
            metrics.child(metrics.training_runs, e.task, e.outcome).inc() if e.outcome != "skipped" else None
        )
    )

    def checked(counts: Any) -> None:
        for verdict, n in (
            ("passed", counts.passed),
            ("failed", counts.failed),
            ("unscored", counts.unscored),
            ("error", counts.errors),
        ):
            if n:
                metrics.child(metrics.answer_checks, counts.task, verdict).inc(n)

    trainer.on_check.append(checked)
    async with running(trainer):
        yield trainer


def training_scheduler(settings: Settings) -> SchedulerFactory | None:
    """The training scheduler for a process that trains (``run_scheduler``, ``distillgate worker``).

    Imports the trainer lazily: without the train extra there is none, and the gateway stays light.
    """
    try:
        from trainer.scheduler import Scheduler
    except ImportError as exc:
        log.warning("training scheduler off: the train extra is not installed (%s)", exc.name)
        return None

    def build(db: Database, policy: PolicyReader) -> Scheduler:
        return Scheduler(
            db,
            policy,
            settings.adapters_dir,
            interval_s=settings.scheduler_interval_s,
            parallel=settings.scheduler_parallel,
        )

    return build


def policy_reader(store: PolicyStore | None) -> PolicyReader:
    """What parts call for the policy in force."""
    return store.current if store is not None else _no_policy


def _no_policy() -> Policy | None:
    return None


def settle(settings: Settings) -> None:
    """The last step of a lifespan's start: process-wide settings for a long-running server."""
    # Everything allocated so far lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise stalled requests for 60-130 ms under load.
    gc.collect()
    gc.freeze()
    if settings.gil_switch_interval_s is not None:
        sys.setswitchinterval(settings.gil_switch_interval_s)


# -- handing parts to handlers -------------------------------------------------------------------
def _provide(name: str) -> Provide:
    def part(state: State) -> Any:
        return getattr(state.parts, name)

    part.__name__ = f"provide_{name}"
    return Provide(part, sync_to_thread=False)


def dependencies(*names: str) -> Mapping[str, Provide]:
    """``Provide`` for each named part of ``app.state.parts``, by the name handlers ask for it."""
    return {name: _provide(name) for name in names}
