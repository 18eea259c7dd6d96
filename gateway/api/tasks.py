"""The task admin API (``/admin/tasks``, ``/admin/policy``; admin credential only).

Lists tasks with their stage, adapter, scores and traffic share, shows a task's transitions
and shadow pairs, and forces moves. A move is applied to the store and then to this process's
routing at once; other replicas pick it up on their next task refresh.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, Literal

import msgspec
from litestar import Request, Response, get, post
from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Parameter
from litestar.types import ExceptionHandlersMap

from gateway.api.admin import admin_caller
from gateway.errors import Conflict, NotFound, error_bytes
from gateway.store.models import Stage, Task
from router.policy import policy_summary
from router.stages import DEFAULT_CANARY, TransitionError, UnknownTask

if TYPE_CHECKING:
    from gateway.app import ServingParts
from router.tasks import ACTIONS, Action, UnknownAdapter, force_move, recent_pairs, task_detail, task_rows

StageName = Literal["collecting", "training", "shadow", "canary", "serving", "rolled_back", "paused"]
PairKind = Literal["shadow", "canary", "audit"]
SOURCE = "admin API"
_FIELD = re.compile(r"`([^`]+)`")


async def _admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    # A guard: it runs before the body is read, so a caller without the admin credential
    # learns nothing about what the body should have been.
    await admin_caller(connection)  # type: ignore[arg-type]


GUARDS = [_admin]


def _invalid(_: Request[Any, Any, Any], exc: ValidationException) -> Response[bytes]:
    """A body or query the route cannot read: 400 naming each bad field (``param``: the first)."""
    problems = [p for p in exc.extra if isinstance(p, dict)] if isinstance(exc.extra, list) else []
    fields, details = [], []
    for problem in problems:
        message, key = str(problem.get("message", "")), problem.get("key")
        if key == "data":  # the body as a whole: the message names the field, e.g. "missing … `to`"
            named = _FIELD.search(message)
            key = named.group(1) if named else None
        if key:
            fields.append(str(key))
        details.append(f"{key}: {message}" if key else message)
    message = "Invalid request: " + ("; ".join(details) or str(exc.detail))
    body = error_bytes(message, "invalid_request_error", fields[0] if fields else None, "invalid_value")
    return Response(content=body, status_code=400, media_type="application/json")


ERRORS: ExceptionHandlersMap = {ValidationException: _invalid}


class MoveRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of promote / rollback / pause / resume (optional)."""

    reason: str | None = None
    """Why; stored with the transition."""


class TransitionRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of a forced transition to any stage."""

    to: StageName
    """The stage to move the task to."""
    reason: str | None = None
    """Why; stored with the transition."""
    adapter: str | None = None
    """Another registered adapter of the task to use from now on (default: keep the current one)."""
    canary_step: int | None = None
    """For ``to: canary``: the step (default: the next one from canary, else 0)."""


def _gateway(request: Request[Any, Any, Any]) -> ServingParts:
    return request.app.state.parts


@get(
    "/admin/tasks",
    summary="Tasks with stage, adapter, scores and traffic share",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def list_tasks(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Every task: its stage (and canary step), adapter, the student's share of its traffic,
    and the pass rate and mean score of the current adapter's shadow pairs."""
    gw = _gateway(request)
    return {"object": "list", "data": await asyncio.to_thread(task_rows, gw.db)}


@get(
    "/admin/tasks/{task:str}",
    summary="One task and its transitions",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def get_task(
    request: Request[Any, Any, Any],
    task: str,
    transitions: int = Parameter(default=100, ge=1, le=1000, description="Newest transitions shown."),
) -> dict[str, Any]:
    """The task's row, training envelope, pair counts by kind, and its transitions (newest
    first) with the reason and the numbers behind each."""
    gw = _gateway(request)
    try:
        return await asyncio.to_thread(task_detail, gw.db, task, transitions)
    except UnknownTask:
        raise NotFound(f"No task '{task}'.", param="task") from None


@get(
    "/admin/tasks/{task:str}/pairs",
    summary="A task's recent shadow pairs with scores",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def list_pairs(
    request: Request[Any, Any, Any],
    task: str,
    limit: int = Parameter(default=50, ge=1, le=1000, description="Most pairs returned, newest first."),
    kind: PairKind | None = Parameter(default=None, description="Only pairs of this kind."),
    adapter: str | None = Parameter(default=None, description="Only pairs of this adapter."),
) -> dict[str, Any]:
    """Shadow, canary and audit pairs: scorer, score, pass, student error, and both answers."""
    gw = _gateway(request)
    try:
        pairs = await asyncio.to_thread(recent_pairs, gw.db, task, limit, kind=kind, adapter=adapter)
    except UnknownTask:
        raise NotFound(f"No task '{task}'.", param="task") from None
    return {"object": "list", "data": pairs}


async def _move(
    request: Request[Any, Any, Any],
    task: str,
    move: Action | Stage,
    reason: str | None,
    *,
    adapter: str | None = None,
    canary_step: int | None = None,
) -> dict[str, Any]:
    gw = _gateway(request)
    policy = gw.policy()
    canary = policy.for_task(task).canary if policy is not None else list(DEFAULT_CANARY)
    text = f"forced through the admin API: {reason or move}"
    try:
        moved: Task = await asyncio.to_thread(
            force_move,
            gw.db,
            task,
            move,
            text,
            source=SOURCE,
            adapter=adapter,
            canary_step=canary_step,
            canary=canary,
        )
    except UnknownTask:
        raise NotFound(f"No task '{task}'.", param="task") from None
    except UnknownAdapter as exc:
        raise NotFound(f"{str(exc).capitalize()}.", param="adapter") from None
    except TransitionError as exc:
        what = f"{move} task '{task}'" if move in ACTIONS else f"move task '{task}' to {move}"
        raise Conflict(f"Cannot {what}: {exc}.", code="illegal_transition") from None
    gw.tasks.moved(moved, promoted=move == "promote")
    return await asyncio.to_thread(task_detail, gw.db, task, 10)


@post(
    "/admin/tasks/{task:str}/promote",
    status_code=200,
    summary="Promote a task one stage",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def promote_task(
    request: Request[Any, Any, Any], task: str, data: MoveRequest | None = None
) -> dict[str, Any]:
    """To the next stage or canary step (training → shadow → canary steps → serving), now,
    without waiting for the gate's evidence."""
    return await _move(request, task, "promote", data.reason if data else None)


@post(
    "/admin/tasks/{task:str}/rollback",
    status_code=200,
    summary="Roll a task back to the teacher",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def rollback_task(
    request: Request[Any, Any, Any], task: str, data: MoveRequest | None = None
) -> dict[str, Any]:
    """The teacher answers all of the task's traffic from now on (stage ``rolled_back``)."""
    return await _move(request, task, "rollback", data.reason if data else None)


@post(
    "/admin/tasks/{task:str}/pause",
    status_code=200,
    summary="Pause a task",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def pause_task(
    request: Request[Any, Any, Any], task: str, data: MoveRequest | None = None
) -> dict[str, Any]:
    """The teacher answers everything and the gate leaves the task alone until it is resumed."""
    return await _move(request, task, "pause", data.reason if data else None)


@post(
    "/admin/tasks/{task:str}/resume",
    status_code=200,
    summary="Resume a paused task",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def resume_task(
    request: Request[Any, Any, Any], task: str, data: MoveRequest | None = None
) -> dict[str, Any]:
    """Back to the stage (and canary step) the task was paused in."""
    return await _move(request, task, "resume", data.reason if data else None)


@post(
    "/admin/tasks/{task:str}/transition",
    status_code=200,
    summary="Force a task into any stage",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def transition(request: Request[Any, Any, Any], task: str, data: TransitionRequest) -> dict[str, Any]:
    """Any stage, optionally with another registered adapter; shadow, canary and serving need one."""
    return await _move(
        request, task, Stage(data.to), data.reason, adapter=data.adapter, canary_step=data.canary_step
    )


@get(
    "/admin/policy",
    summary="The routing policy in force",
    tags=["admin"],
    guards=GUARDS,
    exception_handlers=ERRORS,
)
async def get_policy(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Its version (1 at start, +1 per applied edit), when it was loaded, and the last refused
    edit's error naming the bad key (cleared by the next good one)."""
    gw = _gateway(request)
    store = gw.policy_store
    policy = gw.policy()
    return {
        "file": str(store.path) if store is not None and store.path is not None else None,
        "version": store.version if store is not None else 0,
        "loaded_at": store.loaded_at.isoformat() if store is not None else None,
        "last_error": store.last_error if store is not None else None,
        "last_error_at": store.last_error_at.isoformat() if store and store.last_error_at else None,
        "policy": policy_summary(policy) if policy is not None else None,
    }


ROUTES = [
    list_tasks,
    get_task,
    list_pairs,
    promote_task,
    rollback_task,
    pause_task,
    resume_task,
    transition,
    get_policy,
]
