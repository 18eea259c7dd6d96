"""The admin API (``/admin``, admin credential only) and feedback on recorded exchanges."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import msgspec
from litestar import Request, get, post
from litestar.params import Parameter
from sqlmodel import col, select

from gateway.auth import require_admin
from gateway.errors import NotFound

if TYPE_CHECKING:
    from gateway.app import ServingParts
from gateway.protocol import decode_body, validate
from gateway.store.models import Record


async def admin_caller(request: Request[Any, Any, Any]) -> ServingParts:
    gw: ServingParts = request.app.state.parts
    caller = await gw.keys.authenticate(request.headers.get("authorization"))
    require_admin(caller)
    return gw


@post("/admin/recorder/flush", status_code=200, summary="Write every queued record now", tags=["admin"])
async def flush_recorder(request: Request[Any, Any, Any]) -> dict[str, Any]:
    gw = await admin_caller(request)
    done = await asyncio.to_thread(gw.recorder.flush)
    return {
        "flushed": done,
        "written": gw.recorder.written,
        "spooled": gw.recorder.spooled,
        "queue_depth": gw.recorder.depth,
    }


@get("/admin/records", summary="Recent records", tags=["admin"])
async def list_records(
    request: Request[Any, Any, Any],
    task: str | None = None,
    limit: int = Parameter(default=50, ge=1, le=1000),
) -> dict[str, Any]:
    gw = await admin_caller(request)

    def query() -> list[dict[str, Any]]:
        with gw.db.session() as session:
            stmt = select(Record).order_by(col(Record.created_at).desc()).limit(limit)
            if task is not None:
                stmt = stmt.where(Record.task == task)
            return [row.model_dump(mode="json") for row in session.exec(stmt)]

    return {"object": "list", "data": await asyncio.to_thread(query)}


@get("/admin/records/{record_id:str}", summary="One record", tags=["admin"])
async def get_record(request: Request[Any, Any, Any], record_id: str) -> dict[str, Any]:
    gw = await admin_caller(request)

    def query() -> dict[str, Any] | None:
        with gw.db.session() as session:
            row = session.get(Record, record_id)
            return None if row is None else row.model_dump(mode="json")

    row = await asyncio.to_thread(query)
    if row is None:
        raise NotFound(f"No record with id '{record_id}'.", param="record_id")
    return row


class FeedbackRequest(msgspec.Struct):
    request_id: str
    """The ``x-distillgate-request-id`` of the exchange."""
    score: float | None = None
    """Negative means the answer was bad; such records are never trained on."""
    label: str | None = None
    comment: str | None = None


@post("/v1/feedback", status_code=200, summary="Attach feedback to a recorded exchange", tags=["feedback"])
async def feedback(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Any valid key may rate its exchanges; the trainer excludes negatively rated ones."""
    gw: ServingParts = request.app.state.parts
    caller = await gw.keys.caller(request.headers.get("authorization"))
    fb = validate(decode_body(await request.body()), FeedbackRequest)
    await asyncio.to_thread(gw.recorder.flush)

    def attach() -> bool:
        with gw.db.session() as session:
            row = session.get(Record, fb.request_id)
            if row is None or (
                row.api_key_id is not None and not caller.admin and row.api_key_id != caller.key_id
            ):
                return False
            row.feedback = {
                k: v for k, v in msgspec.structs.asdict(fb).items() if k != "request_id" and v is not None
            }
            session.add(row)
            session.commit()
            return True

    if not await asyncio.to_thread(attach):
        raise NotFound(f"No record with id '{fb.request_id}'.", param="request_id")
    return {"id": fb.request_id, "object": "feedback", "status": "recorded"}


ROUTES = [flush_recorder, list_records, get_record, feedback]
