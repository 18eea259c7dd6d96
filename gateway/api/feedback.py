"""``POST /v1/feedback``: a client rates one of its recorded exchanges (any valid key, its own
exchanges; the admin credential any). The trainer never trains on negatively rated answers."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import Request, post

from gateway.auth import KeyRing
from gateway.errors import NotFound
from gateway.protocol import decode_body, validate
from gateway.recorder import Recorder
from gateway.store.db import Database
from gateway.store.queries import attach_feedback


class FeedbackRequest(msgspec.Struct):
    request_id: str
    """The ``x-distillgate-request-id`` of the exchange."""
    score: float | None = None
    """Negative means the answer was bad; such records are never trained on."""
    label: str | None = None
    comment: str | None = None


class FeedbackReceipt(msgspec.Struct, kw_only=True):
    id: str
    object: str = "feedback"
    status: str = "recorded"


@post("/v1/feedback", status_code=200, summary="Attach feedback to a recorded exchange", tags=["feedback"])
async def feedback(
    request: Request[Any, Any, Any], keys: KeyRing, recorder: Recorder, db: Database
) -> FeedbackReceipt:
    """Any valid key may rate its exchanges; the trainer excludes negatively rated ones."""
    caller = await keys.caller(request.headers.get("authorization"))
    fb = validate(decode_body(await request.body()), FeedbackRequest)
    await asyncio.to_thread(recorder.flush)  # the exchange may still be queued
    values = {k: v for k, v in msgspec.structs.asdict(fb).items() if k != "request_id" and v is not None}
    attached = await asyncio.to_thread(
        attach_feedback, db, fb.request_id, values, key_id=caller.key_id, admin=caller.admin
    )
    if not attached:
        raise NotFound(f"No record with id '{fb.request_id}'.", param="request_id")
    return FeedbackReceipt(id=fb.request_id)


ROUTES = [feedback]
