"""``distillgate worker``: the training scheduler in its own process, with /metrics and /healthz.

It builds only what it runs (``WorkerParts``): the database, the policy, the task table, the
scheduler and the metrics; no recorder, cache, upstreams, shadow mirror or pipeline (this module
does not even import them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from litestar import Litestar, Response, get

from gateway.lifespan import (
    Lifespan,
    SchedulerFactory,
    database,
    dependencies,
    live_policy,
    policy_reader,
    settle,
    training,
    training_scheduler,
)
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.settings import Settings
from gateway.store.db import Database
from gateway.task_table import TaskTable
from router.policy_store import PolicyStore

if TYPE_CHECKING:
    from trainer.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class WorkerParts:
    """What ``distillgate worker`` runs."""

    settings: Settings
    db: Database
    metrics: Metrics
    policy_store: PolicyStore | None
    tasks: TaskTable
    scheduler: Scheduler | None


def working(settings: Settings, scheduler: SchedulerFactory | None) -> Lifespan:
    """The worker's lifespan: builds ``WorkerParts`` into ``app.state.parts``."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            enter = stack.enter_async_context
            db = await enter(database(settings))
            store = await enter(live_policy(settings, None))
            policy = policy_reader(store)
            metrics = Metrics()
            tasks = await enter(TaskTable(db, metrics, policy))
            trainer = await enter(training(scheduler, db, policy, tasks, metrics))
            app.state.parts = WorkerParts(
                settings=settings, db=db, metrics=metrics, policy_store=store, tasks=tasks, scheduler=trainer
            )
            settle(settings)
            yield

    return lifespan


@get(["/healthz", "/health"])
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/metrics")
async def metrics_endpoint(metrics: Metrics) -> Response[bytes]:
    return Response(content=metrics.render(), media_type=CONTENT_TYPE)


def create_worker_app(settings: Settings) -> Litestar:
    """The worker's app; the scheduler is built here, by the process that runs it."""
    return Litestar(
        [healthz, metrics_endpoint],
        lifespan=[working(settings, training_scheduler(settings))],
        dependencies=dependencies("metrics"),
        openapi_config=None,
    )
