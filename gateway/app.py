"""The gateway's Litestar app, built by a factory from explicit pieces: its routes, its error
handlers, and the parts its lifespan builds (``ServingParts``); no import-time side effects."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from litestar import Litestar, Response, get
from litestar.openapi import OpenAPIConfig

from gateway import __version__
from gateway.api import admin, errors, feedback, health, openai
from gateway.api.openai_schema import document_openai_routes
from gateway.auth import KeyRing
from gateway.cache import PromptCache
from gateway.console import console_router
from gateway.lifespan import (
    Lifespan,
    PolicyReader,
    SchedulerFactory,
    caching,
    database,
    dependencies,
    live_policy,
    policy_reader,
    recording,
    running,
    settle,
    training,
    training_scheduler,
)
from gateway.limits import Limiter
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.pipeline import Pipeline
from gateway.recorder import Recorder
from gateway.redaction import Redactor
from gateway.retention import Pruner
from gateway.settings import Settings
from gateway.shedding import Admission, LoopLag
from gateway.store.db import Database
from gateway.task_limits import TaskCaps
from gateway.task_table import TaskTable
from gateway.upstream import Upstreams
from router.policy import Policy
from router.policy_store import PolicyStore
from router.promotion import Promoter
from router.shadow import ScoredPair, ShadowMirror

if TYPE_CHECKING:
    from trainer.scheduler import Scheduler


@dataclass(frozen=True, slots=True)
class ServingParts:
    """What a gateway process runs."""

    settings: Settings
    db: Database
    metrics: Metrics
    policy_store: PolicyStore | None
    policy: PolicyReader
    upstreams: Upstreams
    recorder: Recorder
    cache: PromptCache
    tasks: TaskTable
    promoter: Promoter
    shadow: ShadowMirror
    scheduler: Scheduler | None
    keys: KeyRing
    limits: Limiter
    pruner: Pruner
    loop_lag: LoopLag
    admission: Admission
    pipeline: Pipeline


def serving(
    settings: Settings, *, policy: Policy | None = None, scheduler: SchedulerFactory | None = None
) -> Lifespan:
    """The gateway's lifespan: builds ``ServingParts`` into ``app.state.parts``."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            parts = await _serving_parts(stack, settings, policy, scheduler)
            app.state.parts = parts
            app.state.pipeline = parts.pipeline
            app.state.admission = parts.admission
            settle(settings)
            yield

    return lifespan


async def _serving_parts(
    stack: AsyncExitStack, settings: Settings, given: Policy | None, scheduler: SchedulerFactory | None
) -> ServingParts:
    enter = stack.enter_async_context
    db = await enter(database(settings))
    store = await enter(live_policy(settings, given))
    policy = policy_reader(store)
    metrics = Metrics(max_task_labels=settings.tasks.max_task_labels)
    redactor = Redactor(policy, metrics)
    upstreams = await enter(Upstreams(settings.upstream))
    if store is not None:
        upstreams.apply(store.policy)
        store.on_reload(upstreams.apply)
    recorder = await enter(recording(Recorder(db, settings.recorder, metrics, policy, redact=redactor.row)))
    cache = await enter(caching(PromptCache(db)))
    cache.keeps_out = redactor.finds
    tasks = await enter(TaskTable(db, metrics, policy))
    task_caps = TaskCaps(settings.tasks, lambda: tasks.rows, db)
    promoter = Promoter(db, policy)
    promoter.on_transition.append(tasks.gate_moved)
    shadow = ShadowMirror(db, policy, upstreams.ask_student, upstreams.ask_teacher)
    shadow.redact = redactor.value
    shadow.on_pair.append(
        lambda p: metrics.child(metrics.shadow_score, p.job.task, p.job.adapter, p.scorer).observe(p.score)
    )
    shadow.on_drop.append(lambda job: metrics.child(metrics.shadow_dropped, job.task).inc())

    def gate(batch: list[ScoredPair]) -> None:
        """After shadow pairs are stored: run the gate for the tasks they belong to."""
        promoter.check_many({pair.job.task for pair in batch})

    shadow.on_stored.append(gate)
    await enter(running(shadow))
    trainer = await enter(training(scheduler, db, policy, tasks, metrics))
    admin_key = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
    keys = await enter(running(KeyRing(db, admin_key=admin_key, required=settings.auth.required)))
    limits = await enter(running(Limiter(db)))
    recorder.listeners.append(limits.charge_rows)
    pruner = await enter(running(Pruner(db, policy, settings.retention)))
    loop_lag = await enter(running(LoopLag()))
    admission = await enter(
        Admission(
            loop_lag,
            metrics,
            max_in_flight=settings.max_in_flight,
            max_loop_lag_s=settings.shed_loop_lag_s,
        )
    )
    pipeline = Pipeline(
        keys=keys,
        policy=policy,
        tasks=tasks,
        task_caps=task_caps,
        cache=cache,
        upstreams=upstreams,
        recorder=recorder,
        shadow=shadow,
        promoter=promoter,
        metrics=metrics,
        max_body_bytes=settings.max_body_bytes,
        limits=limits,
    )
    return ServingParts(
        settings=settings,
        db=db,
        metrics=metrics,
        policy_store=store,
        policy=policy,
        upstreams=upstreams,
        recorder=recorder,
        cache=cache,
        tasks=tasks,
        promoter=promoter,
        shadow=shadow,
        scheduler=trainer,
        keys=keys,
        limits=limits,
        pruner=pruner,
        loop_lag=loop_lag,
        admission=admission,
        pipeline=pipeline,
    )


@get("/metrics", include_in_schema=False)
async def metrics_endpoint(metrics: Metrics, recorder: Recorder, admission: Admission) -> Response[bytes]:
    metrics.recorder_queue.set(recorder.depth)
    admission.report()
    return Response(content=metrics.render(), media_type=CONTENT_TYPE)


PARTS = (
    "db",
    "metrics",
    "policy_store",
    "upstreams",
    "recorder",
    "tasks",
    "keys",
    "limits",
    "admission",
    "pipeline",
)
"""The parts handlers may ask for by name (``gateway.lifespan.ServingParts``)."""


def create_app(
    settings: Settings | None = None,
    *,
    policy: Policy | None = None,
    scheduler: SchedulerFactory | None = None,
) -> Litestar:
    """Build a gateway app. ``policy`` overrides ``settings.policy_file`` (tests, embedding);
    ``scheduler`` trains in this process (the caller decides: ``app_from_environment`` passes one
    when ``run_scheduler`` is on)."""
    settings = settings or Settings()
    admin_key = settings.auth.admin_key.get_secret_value() if settings.auth.admin_key else None
    return Litestar(
        route_handlers=[
            *openai.ROUTES,
            *feedback.ROUTES,
            *health.ROUTES,
            admin.router,
            console_router(admin_key),
            metrics_endpoint,
        ],
        lifespan=[serving(settings, policy=policy, scheduler=scheduler)],
        dependencies=dependencies(*PARTS),
        exception_handlers=errors.HANDLERS,
        openapi_config=OpenAPIConfig(title="distillgate", version=__version__, path="/docs"),
        on_startup=[document_openai_routes],
        request_max_body_size=settings.max_body_bytes,
        logging_config=None,
    )


def app_from_environment() -> Litestar:
    """Factory for ``uvicorn --factory`` (each worker builds its app from ``DISTILLGATE_CONFIG``)."""
    from gateway.logs import configure_logging
    from gateway.settings import load_settings

    settings = load_settings(os.environ.get("DISTILLGATE_CONFIG"))
    configure_logging(settings.log_level, settings.log_format)  # each worker process, too
    return create_app(settings, scheduler=training_scheduler(settings) if settings.run_scheduler else None)
