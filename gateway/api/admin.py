"""The admin API: one Litestar ``Router`` at ``/admin`` whose guard, tag and error handlers every
admin route shares. The recorder, records and policy routes live here, the task routes in
``gateway.api.tasks``; every route answers a typed struct, so ``/docs`` shows each response.
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import msgspec
from litestar import Request, Response, Router, get, patch, post
from litestar.connection import ASGIConnection
from litestar.exceptions import ValidationException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import Parameter
from litestar.types import ExceptionHandlersMap
from sqlalchemy.exc import StatementError

from gateway.api import tasks
from gateway.auth import KeyRing, require_admin
from gateway.errors import GatewayError, InvalidRequest, NotFound, error_bytes
from gateway.keys import (
    CreatedKey,
    KeySettings,
    KeyView,
    NewKey,
    create_key,
    get_key,
    list_keys,
    revoke_key,
    update_key,
)
from gateway.recorder import Recorder
from gateway.store.db import Database
from gateway.store.queries import RecordView, recent_records, record
from router.policy_store import PolicyStatus, PolicyStore
from router.stages import UnknownTask
from router.tasks import UnknownAdapter

log = logging.getLogger("distillgate.admin")

JSON = "application/json"
_FIELD = re.compile(r"`([^`]+)`")


async def admin_only(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    """The guard of every admin route: the admin credential. It runs before the body is read, so a
    caller without it learns nothing about what the body should have been."""
    keys: KeyRing = connection.app.state.parts.keys
    require_admin(await keys.authenticate(connection.headers.get("authorization")))


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
    return Response(content=body, status_code=400, media_type=JSON)


def _error(exc: GatewayError) -> Response[bytes]:
    return Response(content=exc.to_bytes(), status_code=exc.status, media_type=JSON)


def _unknown_task(request: Request[Any, Any, Any], _: UnknownTask) -> Response[bytes]:
    name = request.path_params.get("task") or request.query_params.get("task")
    return _error(NotFound(f"No task '{name}'.", param="task"))


def _unknown_adapter(_: Request[Any, Any, Any], exc: UnknownAdapter) -> Response[bytes]:
    return _error(NotFound(f"{str(exc).capitalize()}.", param="adapter"))


ERRORS: ExceptionHandlersMap = {
    ValidationException: _invalid,
    UnknownTask: _unknown_task,
    UnknownAdapter: _unknown_adapter,
}


class FlushResult(msgspec.Struct, kw_only=True):
    flushed: bool
    """Everything queued before the call is written (or spooled)."""
    written: int
    spooled: int
    queue_depth: int


class RecordList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[RecordView]


@post("/recorder/flush", status_code=200, summary="Write every queued record now")
async def flush_recorder(recorder: Recorder) -> FlushResult:
    done = await asyncio.to_thread(recorder.flush)
    return FlushResult(
        flushed=done, written=recorder.written, spooled=recorder.spooled, queue_depth=recorder.depth
    )


@get("/records", summary="Recent records")
async def list_records(
    db: Database, task: str | None = None, limit: int = Parameter(default=50, ge=1, le=1000)
) -> RecordList:
    task = tasks.stored_name(task) if task is not None else None
    return RecordList(data=await asyncio.to_thread(recent_records, db, task=task, limit=limit))


@get("/records/{record_id:str}", summary="One record")
async def get_record(db: Database, record_id: str) -> RecordView:
    found = await asyncio.to_thread(record, db, tasks.stored_name(record_id, "record_id"))
    if found is None:
        raise NotFound(f"No record with id '{record_id}'.", param="record_id")
    return found


class KeyList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[KeyView]


def _no_key(key_id: int) -> NotFound:
    return NotFound(f"No key with id {key_id}.", param="key_id")


def _key_id(key_id: int) -> int:
    """An id that can name a stored key: past the column's 32 bits PostgreSQL would refuse the
    query itself (a 500, found by tests/faults/test_schemathesis.py), so it is simply no key."""
    if not 1 <= key_id < 2**31:
        raise _no_key(key_id)
    return key_id


@get("/keys", summary="Every key (prefixes, limits; never secrets)")
async def keys_list(db: Database) -> KeyList:
    return KeyList(data=[KeyView.of(row) for row in await asyncio.to_thread(list_keys, db)])


@post("/keys", status_code=201, summary="Create a key with its limits (the secret is shown once)")
async def keys_create(db: Database, data: NewKey) -> CreatedKey:
    settings = msgspec.convert(
        {name: getattr(data, name) for name in KeySettings.__struct_fields__},
        KeySettings,
        from_attributes=True,
    )
    try:
        row, secret = await asyncio.to_thread(create_key, db, data.name, admin=data.admin, settings=settings)
    except GatewayError:
        raise
    except (StatementError, ValueError, TypeError, OverflowError) as exc:
        # A value the checks let through but storing refuses is the request's fault: a 400 naming
        # the kind of refusal (logged with its traceback for whoever tightens the checks).
        log.exception("key not created: its settings could not be stored")
        cause = exc.orig if isinstance(exc, StatementError) and exc.orig is not None else exc
        raise InvalidRequest(
            f"The key's settings could not be stored ({type(cause).__name__}); check the values' ranges."
        ) from None
    return CreatedKey(**msgspec.structs.asdict(KeyView.of(row)), key=secret)


@get("/keys/{key_id:int}", summary="One key")
async def keys_show(db: Database, key_id: int) -> KeyView:
    row = await asyncio.to_thread(get_key, db, _key_id(key_id))
    if row is None:
        raise _no_key(key_id)
    return KeyView.of(row)


@patch("/keys/{key_id:int}", summary="Change a key's expiry, allow-list or limits (fields given only)")
async def keys_update(db: Database, keys: KeyRing, key_id: int, data: dict[str, Any]) -> KeyView:
    try:
        row = await asyncio.to_thread(update_key, db, _key_id(key_id), data)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid key settings: {exc}") from None
    if row is None:
        raise _no_key(key_id)
    await asyncio.to_thread(keys.refresh)  # this replica applies the change at once
    return KeyView.of(row)


@post("/keys/{key_id:int}/revoke", status_code=200, summary="Revoke a key")
async def keys_revoke(db: Database, keys: KeyRing, key_id: int) -> KeyView:
    """Refused from the next request on this replica; on the others within their key ring's
    refresh (1 s)."""
    if not await asyncio.to_thread(revoke_key, db, _key_id(key_id)):
        raise NotFound(f"No active key with id {key_id}.", param="key_id")
    keys.evict(key_id)
    row = await asyncio.to_thread(get_key, db, key_id)
    assert row is not None
    return KeyView.of(row)


@get("/policy", summary="The routing policy in force")
async def get_policy(policy_store: PolicyStore | None) -> PolicyStatus:
    """Its version (1 at start, +1 per applied edit), when it was loaded, and the last refused
    edit's error naming the bad key (cleared by the next good one)."""
    return PolicyStatus.of(policy_store)


router = Router(
    "/admin",
    route_handlers=[
        flush_recorder,
        list_records,
        get_record,
        *tasks.ROUTES,
        get_policy,
        keys_list,
        keys_create,
        keys_show,
        keys_update,
        keys_revoke,
    ],
    guards=[admin_only],
    tags=["admin"],
    exception_handlers=ERRORS,
)
