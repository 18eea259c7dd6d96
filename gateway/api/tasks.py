"""The task routes of the admin API (``/admin/tasks…``; the router in ``gateway.api.admin``
carries their guard, tag and error handlers).

Every route that names a task has two forms: ``/admin/tasks/{task}/…`` and, for a name a path
segment cannot carry (``a/b``), ``/admin/task/…?task=a%2Fb``.

Lists tasks with their stage, adapter, scores and traffic share, shows a task's transitions
and shadow pairs, and forces moves. A move is applied to the store and then to this process's
routing at once (``TaskTable.moved``); other replicas pick it up on their next task refresh.
"""

from __future__ import annotations

import asyncio
from typing import Literal

import msgspec
from litestar import get, post
from litestar.params import Parameter

from gateway.errors import Conflict, InvalidRequest
from gateway.store.db import Database
from gateway.store.models import Stage
from gateway.task_table import TaskTable
from router.policy_store import PolicyStore
from router.stages import DEFAULT_CANARY, TransitionError
from router.tasks import (
    ACTIONS,
    Action,
    PairView,
    TaskDetail,
    TaskRow,
    force_move,
    recent_pairs,
    task_detail,
    task_rows,
)

StageName = Literal["collecting", "training", "shadow", "canary", "serving", "rolled_back", "paused"]
"""The ``Stage`` names, spelled out so the schema lists them in place."""
PairKind = Literal["shadow", "canary", "audit"]
SOURCE = "admin API"


def stored_name(value: str, param: str = "task") -> str:
    """A name to look up in the store: any text but NUL (no task can hold one, and PostgreSQL
    refuses it in a query with an error that would be a 500)."""
    if "\x00" in value:
        raise InvalidRequest(f"'{param}' contains a NUL character.", param=param, code="invalid_value")
    return value


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


class TaskList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[TaskRow]


class PairList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[PairView]


@get("/tasks", summary="Tasks with stage, adapter, scores and traffic share")
async def list_tasks(db: Database) -> TaskList:
    """Every task: its stage (and canary step), adapter, the student's share of its traffic,
    and the pass rate and mean score of the current adapter's shadow pairs."""
    return TaskList(data=await asyncio.to_thread(task_rows, db))


@get(["/tasks/{task:str}", "/task"], summary="One task and its transitions")
async def get_task(
    db: Database,
    task: str,
    transitions: int = Parameter(default=100, ge=1, le=1000, description="Newest transitions shown."),
) -> TaskDetail:
    """The task's row, training envelope, pair counts by kind, and its transitions (newest
    first) with the reason and the numbers behind each."""
    return await asyncio.to_thread(task_detail, db, stored_name(task), transitions)


@get(["/tasks/{task:str}/pairs", "/task/pairs"], summary="A task's recent shadow pairs with scores")
async def list_pairs(
    db: Database,
    task: str,
    limit: int = Parameter(default=50, ge=1, le=1000, description="Most pairs returned, newest first."),
    kind: PairKind | None = Parameter(default=None, description="Only pairs of this kind."),
    adapter: str | None = Parameter(default=None, description="Only pairs of this adapter."),
) -> PairList:
    """Shadow, canary and audit pairs: scorer, score, pass, student error, and both answers."""
    pairs = await asyncio.to_thread(
        recent_pairs,
        db,
        stored_name(task),
        limit,
        kind=kind,
        adapter=adapter and stored_name(adapter, "adapter"),
    )
    return PairList(data=pairs)


async def move_task(
    db: Database,
    tasks: TaskTable,
    policy_store: PolicyStore | None,
    task: str,
    move: Action | Stage,
    reason: str | None,
    *,
    adapter: str | None = None,
    canary_step: int | None = None,
    source: str = SOURCE,
) -> TaskDetail:
    """An engineer's move, applied to the store and then to this process's routing; the admin API
    and the console (``source``) both move tasks through here. Raises ``Conflict`` for a move
    that makes no sense now, ``UnknownTask``/``UnknownAdapter`` for names that do not exist."""
    task = stored_name(task)
    canary = policy_store.policy.for_task(task).canary if policy_store is not None else list(DEFAULT_CANARY)
    text = f"forced through the {source}: {reason or move}"
    try:
        moved = await asyncio.to_thread(
            force_move,
            db,
            task,
            move,
            text,
            source=source,
            adapter=adapter,
            canary_step=canary_step,
            canary=canary,
        )
    except TransitionError as exc:  # unknown tasks and adapters are the router's 404s
        what = f"{move} task '{task}'" if move in ACTIONS else f"move task '{task}' to {move}"
        raise Conflict(f"Cannot {what}: {exc}.", code="illegal_transition") from None
    tasks.moved(moved, promoted=move == "promote")
    return await asyncio.to_thread(task_detail, db, task, 10)


@post(["/tasks/{task:str}/promote", "/task/promote"], status_code=200, summary="Promote a task one stage")
async def promote_task(
    db: Database,
    tasks: TaskTable,
    policy_store: PolicyStore | None,
    task: str,
    data: MoveRequest | None = None,
) -> TaskDetail:
    """To the next stage or canary step (training → shadow → canary steps → serving), now,
    without waiting for the gate's evidence."""
    return await move_task(db, tasks, policy_store, task, "promote", data.reason if data else None)


@post(
    ["/tasks/{task:str}/rollback", "/task/rollback"],
    status_code=200,
    summary="Roll a task back to the teacher",
)
async def rollback_task(
    db: Database,
    tasks: TaskTable,
    policy_store: PolicyStore | None,
    task: str,
    data: MoveRequest | None = None,
) -> TaskDetail:
    """The teacher answers all of the task's traffic from now on (stage ``rolled_back``)."""
    return await move_task(db, tasks, policy_store, task, "rollback", data.reason if data else None)


@post(["/tasks/{task:str}/pause", "/task/pause"], status_code=200, summary="Pause a task")
async def pause_task(
    db: Database,
    tasks: TaskTable,
    policy_store: PolicyStore | None,
    task: str,
    data: MoveRequest | None = None,
) -> TaskDetail:
    """The teacher answers everything and the gate leaves the task alone until it is resumed."""
    return await move_task(db, tasks, policy_store, task, "pause", data.reason if data else None)


@post(["/tasks/{task:str}/resume", "/task/resume"], status_code=200, summary="Resume a paused task")
async def resume_task(
    db: Database,
    tasks: TaskTable,
    policy_store: PolicyStore | None,
    task: str,
    data: MoveRequest | None = None,
) -> TaskDetail:
    """Back to the stage (and canary step) the task was paused in."""
    return await move_task(db, tasks, policy_store, task, "resume", data.reason if data else None)


@post(
    ["/tasks/{task:str}/transition", "/task/transition"],
    status_code=200,
    summary="Force a task into any stage",
)
async def transition(
    db: Database, tasks: TaskTable, policy_store: PolicyStore | None, task: str, data: TransitionRequest
) -> TaskDetail:
    """Any stage, optionally with another registered adapter; shadow, canary and serving need one."""
    return await move_task(
        db,
        tasks,
        policy_store,
        task,
        Stage(data.to),
        data.reason,
        adapter=data.adapter,
        canary_step=data.canary_step,
    )


ROUTES = [list_tasks, get_task, list_pairs, promote_task, rollback_task, pause_task, resume_task, transition]
