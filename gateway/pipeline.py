"""The request pipeline for OpenAI endpoints: auth → validate → task key → upstream → record.

Bodies are forwarded as the bytes the client sent unless the gateway must change one field
(the student's adapter name, or asking for stream usage so cost is known); answers go back
as the bytes the upstream sent, stream chunks as they arrive.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import sse
from gateway.auth import KeyRing
from gateway.cache import PromptCache, cache_directive, cache_key, is_cacheable
from gateway.errors import UpstreamError, error_bytes
from gateway.metrics import Metrics
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    check_chat,
    check_metadata,
    decode_body,
    task_key,
    validate,
)
from gateway.recorder import Exchange, Recorder
from gateway.store.models import Stage, new_id
from gateway.task_table import TaskTable
from gateway.upstream import Upstream, UpstreamAnswer, Upstreams
from router.decide import PIN_HEADER, RequestFeatures, RouteDecision, TaskState, decide, parse_pin
from router.policy import Policy
from router.promotion import Promoter
from router.shadow import ShadowJob, ShadowMirror

JSON = "application/json"
TEACHER_ONLY = frozenset({Stage.collecting, Stage.training, Stage.paused, Stage.rolled_back})
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE = "text/event-stream"


@dataclass(slots=True)
class Reply:
    """What the pipeline answers: a whole body, or ``chunks`` to stream as they come.

    Framework-neutral, so the ``/v1`` routes send it as raw ASGI messages (``gateway.api.openai``).
    """

    status: int
    headers: dict[str, str]
    body: bytes = b""
    chunks: AsyncIterator[bytes] | Iterable[bytes] | None = None
    media_type: str = JSON


@dataclass(slots=True)
class Call:
    """One client request as the pipeline sees it."""

    id: str
    endpoint: str
    path: str
    task: str
    model: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    stored: bool
    key_id: int | None
    started: float
    cache_key: str | None = None
    """Set when the answer may be written to the cache."""
    cache_lead: bool = False
    """This request leads a coalesced miss: it must settle the waiters."""
    cache_ttl_s: float = 0.0
    cache_max_bytes: int = 0
    decision: RouteDecision | None = None


def opted_out(body: dict[str, Any], headers: Mapping[str, str]) -> bool:
    return body.get("store") is False or headers.get("x-distillgate-store", "").lower() in (
        "false",
        "0",
        "no",
    )


class Pipeline:
    """Serves the OpenAI endpoints, on the parts the process built in its lifespan."""

    def __init__(
        self,
        *,
        keys: KeyRing,
        policy: Callable[[], Policy | None],
        tasks: TaskTable,
        cache: PromptCache,
        upstreams: Upstreams,
        recorder: Recorder,
        shadow: ShadowMirror,
        promoter: Promoter,
        metrics: Metrics,
        max_body_bytes: int,
    ) -> None:
        self.keys = keys
        self.policy = policy
        self.tasks = tasks
        self.cache = cache
        self.upstreams = upstreams
        self.recorder = recorder
        self.shadow = shadow
        self.promoter = promoter
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._background: set[asyncio.Task[None]] = set()

    # -- endpoints ---------------------------------------------------------------------------
    async def chat(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        started = time.perf_counter()
        caller = await self.keys.caller(headers.get("authorization"))
        body = decode_body(raw)
        req: ChatCompletionRequest = check_chat(body)
        call = Call(
            id=new_id(),
            endpoint="chat.completions",
            path="/chat/completions",
            task=task_key(req.metadata, headers.get("x-distillgate-task"), req),
            model=req.model,
            body=body,
            raw=raw,
            stream=bool(req.stream),
            stored=not opted_out(body, headers),
            key_id=caller.key_id,
            started=started,
        )
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        hit = await self._consult_cache(call, req, headers)
        if hit is not None:
            return self._serve_cached(call, hit, include_usage)
        teacher = self.upstreams.require_teacher()
        decision = self._decide(call, headers, caller.admin)
        if decision is not None and decision.target == "student" and decision.adapter:
            if self.upstreams.student is not None:
                answered = await self._try_student(
                    call, self.upstreams.student, decision.adapter, include_usage=include_usage
                )
                if answered is not None:
                    return answered
            # The student failed before a byte reached the client: the teacher answers, and
            # no pair is made of this request.
            call.decision = None
        return await self._forward(call, teacher, "teacher", include_usage=include_usage)

    async def models(self, authorization: str | None) -> bytes:
        """``GET /v1/models``: the teacher's models, then each student adapter that serves a task."""
        await self.keys.caller(authorization)
        policy = self.policy()
        data: list[dict[str, Any]] = []
        if policy is not None:
            names = list(policy.teacher.models) or ([policy.teacher.model] if policy.teacher.model else [])
            teacher = self.upstreams.teacher
            if not names and teacher is not None:
                try:
                    status, raw = await teacher.get("/models")
                    if status == 200:
                        names = [m["id"] for m in orjson.loads(raw).get("data", []) if isinstance(m, dict)]
                except Exception:
                    names = []
            data = [{"id": name, "object": "model", "created": 0, "owned_by": "teacher"} for name in names]
        for adapter, task in self.tasks.serving_adapters():
            data.append(
                {
                    "id": adapter,
                    "object": "model",
                    "created": int(time.time()),
                    "owned_by": "distillgate",
                    "parent": policy.student.base_model if policy and policy.student else None,
                    "task": task,
                }
            )
        return orjson.dumps({"object": "list", "data": data})

    def _decide(self, call: Call, headers: Mapping[str, str], admin: bool) -> RouteDecision | None:
        """The route decision for a chat call; None for the common case of a teacher-only task."""
        policy = self.policy()
        state = self.tasks.task_states.get(call.task)
        pin = parse_pin(headers.get(PIN_HEADER)) if admin else None
        if policy is None or ((state is None or state.stage in TEACHER_ONLY) and pin is None):
            return None
        decision = decide(
            state or TaskState(Stage.collecting),
            policy.for_task(call.task),
            RequestFeatures.from_body(call.body),
            random.random(),
            pin=pin,
        )
        call.decision = decision
        return decision

    async def _consult_cache(
        self, call: Call, req: ChatCompletionRequest, headers: Mapping[str, str]
    ) -> bytes | None:
        """A cached answer, or None; marks ``call`` to store (and lead waiters) on a miss."""
        policy = self.policy()
        task_policy = policy.for_task(call.task) if policy is not None else None
        if task_policy is None or not is_cacheable(req, task_policy.cache):
            self.metrics.child(self.metrics.cache_requests, call.task, "bypass").inc()
            return None
        may_read, may_write = cache_directive(headers)
        key = cache_key(call.task, call.body)
        if may_read:
            hit = await self.cache.get(key)
            if hit is None:
                waiting = self.cache.lead_or_follow(key)
                if waiting is None:
                    call.cache_lead = True
                else:
                    hit = await waiting  # the leader's answer; None if it failed
            if hit is not None:
                self.metrics.child(self.metrics.cache_requests, call.task, "hit").inc()
                return hit
        if may_write:
            call.cache_key = key
            call.cache_ttl_s = task_policy.cache.ttl
            call.cache_max_bytes = task_policy.cache.max_entry_bytes
        self.metrics.child(self.metrics.cache_requests, call.task, "miss" if may_read else "bypass").inc()
        return None

    async def completions(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        return await self._simple(raw, headers, "completions", "/completions", CompletionRequest)

    async def embeddings(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        return await self._simple(raw, headers, "embeddings", "/embeddings", EmbeddingRequest)

    async def _simple(
        self,
        raw: bytes,
        headers: Mapping[str, str],
        endpoint: str,
        path: str,
        shape: type[CompletionRequest] | type[EmbeddingRequest],
    ) -> Reply:
        started = time.perf_counter()
        caller = await self.keys.caller(headers.get("authorization"))
        body = decode_body(raw)
        req = validate(body, shape)
        check_metadata(req.metadata)
        call = Call(
            id=new_id(),
            endpoint=endpoint,
            path=path,
            task=task_key(req.metadata, headers.get("x-distillgate-task"), None),
            model=req.model,
            body=body,
            raw=raw,
            stream=bool(getattr(req, "stream", False)),
            stored=not opted_out(body, headers),
            key_id=caller.key_id,
            started=started,
        )
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._forward(
            call, self.upstreams.require_teacher(), "teacher", include_usage=include_usage
        )

    def _serve_cached(self, call: Call, hit: bytes, include_usage: bool) -> Reply:
        """Answer from the cache (no upstream call); replayed as SSE when the client streams."""
        headers = {**self.headers_for(call, "cache"), "x-distillgate-cache": "hit"}
        latency = time.perf_counter() - call.started
        if not call.stream:
            self._record(call, "cache", 200, latency, data=hit, cache_hit=True)
            self._observe(call, "cache", 200, latency, 0.0)
            return Reply(200, headers, hit)
        response = orjson.loads(hit)
        self._record(call, "cache", 200, latency, response=response, cache_hit=True, ttft=latency)
        self._observe(call, "cache", 200, latency, 0.0, ttft=latency)
        return Reply(
            200,
            {**headers, **SSE_HEADERS},
            # One message: a replay has nothing to wait for, and each ASGI send costs.
            chunks=(b"".join(sse.chat_to_events(response, include_usage=include_usage)),),
            media_type=SSE,
        )

    def _settle_cache(self, call: Call, status: int, answer: bytes | None) -> None:
        """Store a fresh answer and release the requests that waited for it."""
        cache = self.cache
        ok = status == 200 and answer is not None
        if ok and call.cache_key is not None:
            cache.put(call.cache_key, call.task, answer, call.cache_ttl_s, call.cache_max_bytes)  # type: ignore[arg-type]
        if call.cache_lead:
            call.cache_lead = False
            cache.settle(call.cache_key or cache_key(call.task, call.body), answer if ok else None)

    # -- shared ------------------------------------------------------------------------------
    def headers_for(self, call: Call, target: str) -> dict[str, str]:
        return {
            "x-distillgate-request-id": call.id,
            "x-distillgate-target": target,
            "x-distillgate-task": call.task,
        }

    def _payload(self, call: Call, include_usage: bool, model: str | None = None) -> tuple[bytes, bool]:
        """The body to send upstream, and whether to strip the usage chunk we asked for."""
        if not call.stream or include_usage or call.endpoint == "embeddings":
            if model is None:
                return call.raw, False
            return orjson.dumps({**call.body, "model": model}), False
        # Ask for the usage chunk so cost is known, and drop it before the client sees it.
        body = {
            **call.body,
            "stream_options": {**(call.body.get("stream_options") or {}), "include_usage": True},
        }
        if model is not None:
            body["model"] = model
        return orjson.dumps(body), True

    async def _forward(self, call: Call, upstream: Upstream, target: str, *, include_usage: bool) -> Reply:
        """Send ``call`` to ``upstream`` (the teacher) and answer the client; records every outcome."""
        payload, strip_usage = self._payload(call, include_usage)
        upstream_started = time.perf_counter()
        try:
            answer = await upstream.send(call.path, payload)
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels(target, exc.code or "error").inc()
            latency = time.perf_counter() - call.started
            self._record(call, target, exc.status, latency, error=exc.message)
            self._observe(call, target, exc.status, latency, latency)
            self._settle_cache(call, exc.status, None)
            raise
        data = None
        if not call.stream or answer.status >= 400:
            data = await answer.read()
            if answer.status >= 400:
                data = _as_openai_error(data, answer.status, target)
                self.metrics.upstream_errors.labels(target, f"http_{answer.status}").inc()
        return self._respond(call, answer, target, upstream_started, strip_usage, data=data)

    async def _try_student(
        self, call: Call, upstream: Upstream, adapter: str, *, include_usage: bool
    ) -> Reply | None:
        """Answer from the student, or None when it fails before any byte reached the client
        (error status, timeout, junk, an empty stream): the teacher answers instead."""
        target = f"student:{adapter}"
        payload, strip_usage = self._payload(call, include_usage, model=adapter)
        policy = self.policy()
        timeout_s = policy.student.timeout if policy is not None and policy.student is not None else 60.0
        upstream_started = time.perf_counter()
        answer: UpstreamAnswer | None = None
        try:
            async with asyncio.timeout(timeout_s):
                answer = await upstream.send(call.path, payload, retries=0)
                if answer.status != 200:
                    await answer.read()
                    raise UpstreamError(
                        f"The student answered HTTP {answer.status}.", code=f"http_{answer.status}"
                    )
                if call.stream:
                    chunks = answer.iter_chunks()
                    first = await anext(chunks)
                    if _is_error_event(first):
                        raise UpstreamError("The student's stream began with an error.", code="stream_error")
                    response = self._respond(
                        call, answer, target, upstream_started, strip_usage, chunks=chunks, first_chunk=first
                    )
                else:
                    data = await answer.read()
                    parsed = orjson.loads(data)
                    if not isinstance(parsed, dict) or not parsed.get("choices"):
                        raise UpstreamError("The student answered without choices.", code="bad_answer")
                    response = self._respond(call, answer, target, upstream_started, strip_usage, data=data)
        except Exception as exc:  # any student failure: fall back, never fail the client
            if answer is not None:
                answer.close()
            kind = exc.code if isinstance(exc, UpstreamError) and exc.code else type(exc).__name__.lower()
            self.metrics.upstream_errors.labels("student", kind or "error").inc()
            self._student_outcome(call, adapter, ok=False)
            return None
        if not call.stream:
            self._student_outcome(call, adapter, ok=True)
        return response

    def _student_outcome(self, call: Call, adapter: str, *, ok: bool) -> None:
        if self.promoter.student_outcome(call.task, adapter, ok):
            rollback = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.promoter.rollback_for_errors, call.task, adapter)
            )
            self._background.add(rollback)  # type: ignore[arg-type]
            rollback.add_done_callback(self._background.discard)

    def _respond(
        self,
        call: Call,
        answer: UpstreamAnswer,
        target: str,
        upstream_started: float,
        strip_usage: bool,
        *,
        data: bytes | None = None,
        chunks: AsyncIterator[bytes] | None = None,
        first_chunk: bytes | None = None,
    ) -> Reply:
        headers = self.headers_for(call, target)
        if call.cache_key is not None or call.cache_lead:
            headers["x-distillgate-cache"] = "miss"
        if data is not None:
            waited = time.perf_counter() - upstream_started
            latency = time.perf_counter() - call.started
            self._record(call, target, answer.status, latency, data=data)
            self._observe(call, target, answer.status, latency, waited)
            self._settle_cache(call, answer.status, data)
            self._pair(call, target, answer.status, data, is_sse=False, latency=latency)
            return Reply(answer.status, headers, data)
        return Reply(
            answer.status,
            {**headers, **SSE_HEADERS},
            chunks=self._relay(
                call,
                answer,
                chunks or answer.iter_chunks(),
                first_chunk,
                target,
                upstream_started,
                strip_usage,
            ),
            media_type=SSE,
        )

    async def _relay(
        self,
        call: Call,
        answer: UpstreamAnswer,
        chunks: AsyncIterator[bytes],
        first_chunk: bytes | None,
        target: str,
        upstream_started: float,
        strip_usage: bool,
    ) -> AsyncIterator[bytes]:
        received: list[bytes] = []
        first: float | None = time.perf_counter() if first_chunk is not None else None
        status, error = answer.status, None
        pending = b""
        side = target.split(":", 1)[0]
        # The last two pieces the client has been sent (a yield resumes once its piece is sent):
        # references, not copies, kept to tell a complete stream from a cut one.
        sent = (b"", b"")

        async def source() -> AsyncIterator[bytes]:
            if first_chunk is not None:
                yield first_chunk
            async for piece in chunks:
                yield piece

        try:
            async for chunk in source():
                if first is None:
                    first = time.perf_counter()
                received.append(chunk)
                if not strip_usage:
                    yield chunk
                    sent = (sent[1], chunk)
                    continue
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                ready, pending = pending[: cut + 2], pending[cut + 2 :]
                out = _drop_usage_events(ready)
                if out:
                    yield out
                    sent = (sent[1], out)
            if pending:
                yield pending
        except OSError as exc:  # the connection broke or went quiet (TimeoutError is an OSError)
            status, error = 502, f"The {side} stream broke off ({type(exc).__name__})."
            self.metrics.upstream_errors.labels(side, "stream_broken").inc()
            yield b"data: " + error_bytes(error, "upstream_error", None, "stream_broken") + b"\n\n"
        except BaseException:
            # A client that leaves once it has the terminating "data: [DONE]" (the OpenAI SDKs
            # close the stream there) got the whole answer, whatever the upstream still sends.
            if _SSE_DONE not in sent[0][-len(_SSE_DONE) :] + sent[1][-64:]:
                status, error = (
                    499,
                    "The connection closed before the answer was complete (client disconnect or gateway shutdown).",
                )
            raise
        finally:
            answer.close()
            latency = time.perf_counter() - call.started
            ttft = None if first is None else first - call.started
            raw = b"".join(received)
            self._record(call, target, status, latency, data=raw, ttft=ttft, error=error, sse_body=True)
            if call.cache_key is not None or call.cache_lead:
                if status == 200:
                    self._cache_stream(call, raw)
                else:
                    self._settle_cache(call, status, None)
            waited = (first or time.perf_counter()) - upstream_started
            self._observe(call, target, status, latency, waited, ttft=ttft)
            if side == "student" and status != 499:
                self._student_outcome(call, target.split(":", 1)[1], ok=status == 200)
            self._pair(call, target, status, raw, is_sse=True, latency=latency)

    def _pair(
        self, call: Call, target: str, status: int, data: bytes, *, is_sse: bool, latency: float
    ) -> None:
        """Hand a finished answer to the shadow mirror when the route decision asked for a pair."""
        decision = call.decision
        if (
            decision is None
            or status != 200
            or not (decision.mirror or decision.audit)
            or not decision.adapter
        ):
            return
        try:
            response = sse.assemble_chat(data) if is_sse else orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        student = target.startswith("student:")
        state = self.tasks.task_states.get(call.task)
        self.shadow.submit(
            ShadowJob(
                record_id=call.id,
                task=call.task,
                adapter=decision.adapter,
                kind=decision.pair_kind or ("audit" if student else "shadow"),
                stage=state.stage if state is not None else Stage.shadow,
                request=call.body,
                teacher_response=None if student else response,
                student_response=response if student else None,
                student_latency_ms=latency * 1000 if student else None,
                stored=call.stored,
            )
        )

    def _record(
        self,
        call: Call,
        target: str,
        status: int,
        latency: float,
        *,
        data: bytes | None = None,
        response: dict[str, Any] | None = None,
        ttft: float | None = None,
        error: str | None = None,
        cache_hit: bool = False,
        sse_body: bool = False,
    ) -> None:
        self.recorder.submit(
            Exchange(
                id=call.id,
                task=call.task,
                model=call.model,
                target=target,
                request=call.body,
                status=status,
                latency_s=latency,
                endpoint=call.endpoint,
                api_key_id=call.key_id,
                stream=call.stream,
                stored=call.stored,
                body=data,
                response=response,
                error=error,
                ttft_s=ttft,
                cache_hit=cache_hit,
                sse=sse_body,
            )
        )

    def _cache_stream(self, call: Call, raw: bytes) -> None:
        """Assemble a finished stream off the event loop, then cache it and release the waiters."""

        async def assemble() -> None:
            try:
                answer: bytes | None = await asyncio.to_thread(lambda: orjson.dumps(sse.assemble_chat(raw)))
            except Exception:
                answer = None
            self._settle_cache(call, 200 if answer else 502, answer)

        task = asyncio.get_running_loop().create_task(assemble())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _observe(
        self, call: Call, target: str, status: int, latency: float, waited: float, ttft: float | None = None
    ) -> None:
        m = self.metrics
        label = "student" if target.startswith("student") else target
        m.child(m.requests, call.task, label, str(status)).inc()
        m.child(m.request_duration, call.task, label).observe(latency)
        if ttft is not None:
            m.child(m.ttft, call.task, label).observe(ttft)
        m.overhead.observe(max(0.0, latency - waited))


_SSE_DONE = b"data: [DONE]"


def _drop_usage_events(block: bytes) -> bytes:
    """Remove the usage-only chunk we asked for on the client's behalf (``choices: []``)."""
    if b'"usage"' not in block:
        return block
    kept = []
    for event in block.split(b"\n\n"):
        if event.startswith(b"data: {") and b'"choices":[]' in event.replace(b" ", b""):
            continue
        if event:
            kept.append(event + b"\n\n")
    return b"".join(kept)


def _is_error_event(chunk: bytes) -> bool:
    """Whether a stream's first bytes are an error event. Once a stream has started, vLLM and the
    embedded student report failures in band as ``data: {"error": …}`` after a 200 (the embedded
    student even a prompt longer than its context); none of it has reached the client yet."""
    event = chunk.lstrip().split(b"\n\n", 1)[0]
    if not event.startswith(b"data:"):
        return False
    try:
        parsed = orjson.loads(event[5:])
    except orjson.JSONDecodeError:
        return False
    return isinstance(parsed, dict) and "error" in parsed and "choices" not in parsed


def _as_openai_error(data: bytes, status: int, target: str) -> bytes:
    """Pass an upstream's OpenAI-shaped error through; wrap anything else so clients can parse it."""
    try:
        parsed = orjson.loads(data)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return data
    except orjson.JSONDecodeError:
        pass
    snippet = data[:200].decode("utf-8", "replace").strip()
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    return error_bytes(f"The {target} answered HTTP {status}: {snippet}", kind, None, f"upstream_{status}")
