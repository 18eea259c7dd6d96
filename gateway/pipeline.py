"""The request pipeline for the OpenAI endpoints: auth → validate → task key → cache → route →
upstream → one finish step (record, observe, settle the cache, count the student's outcome, pair).

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
from typing import Any, Literal

import orjson

from gateway import soft_labels, sse
from gateway.auth import Caller, KeyRing
from gateway.cache import PromptCache, cache_directive, cache_key, is_cacheable
from gateway.errors import GatewayError, UpstreamError, error_bytes
from gateway.limits import Limiter
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
from gateway.task_limits import TaskCaps
from gateway.task_table import TaskTable
from gateway.upstream import Upstream, UpstreamAnswer, Upstreams
from router.decide import (
    PIN_HEADER,
    TEACHER_ONLY,
    RequestFeatures,
    RouteDecision,
    TaskState,
    decide,
    parse_pin,
)
from router.policy import Policy
from router.promotion import Promoter
from router.shadow import ShadowJob, ShadowMirror

JSON = "application/json"
SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}
SSE = "text/event-stream"
TASK_HEADER = "x-distillgate-task"


@dataclass(frozen=True, slots=True)
class Target:
    """Who answers a request: the teacher, the cache, or the student with its adapter."""

    kind: Literal["teacher", "cache", "student"]
    """The ``target`` label of the metrics."""
    name: str
    """``teacher``, ``cache`` or ``student:<adapter>``: the ``x-distillgate-target`` header and
    ``Record.target``."""
    adapter: str | None = None

    @classmethod
    def student(cls, adapter: str) -> Target:
        return cls("student", f"student:{adapter}", adapter)


TEACHER = Target("teacher", "teacher")
CACHE = Target("cache", "cache")


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
    soft_top_k: int | None = None
    """Top-k logprobs asked of the teacher for soft labels, stripped before the client sees them."""
    limit_headers: dict[str, str] | None = None
    """The caller's ``x-ratelimit-*`` headers, sent on every answer to it."""

    def to_exchange(
        self,
        target: Target,
        status: int,
        latency_s: float,
        *,
        body: bytes | None = None,
        response: dict[str, Any] | None = None,
        ttft_s: float | None = None,
        error: str | None = None,
        cache_hit: bool = False,
        sse: bool = False,
    ) -> Exchange:
        """What the recorder stores of this call's answer (``body``: its bytes, ``sse`` for a stream)."""
        return Exchange(
            id=self.id,
            task=self.task,
            model=self.model,
            target=target.name,
            request=self.body,
            status=status,
            latency_s=latency_s,
            endpoint=self.endpoint,
            api_key_id=self.key_id,
            stream=self.stream,
            stored=self.stored,
            body=body,
            response=response,
            error=error,
            ttft_s=ttft_s,
            cache_hit=cache_hit,
            sse=sse,
        )


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
        task_caps: TaskCaps,
        cache: PromptCache,
        upstreams: Upstreams,
        recorder: Recorder,
        shadow: ShadowMirror,
        promoter: Promoter,
        metrics: Metrics,
        max_body_bytes: int,
        limits: Limiter | None = None,
    ) -> None:
        self.keys = keys
        self.limits = limits
        self.policy = policy
        self.tasks = tasks
        self.task_caps = task_caps
        self.cache = cache
        self.upstreams = upstreams
        self.recorder = recorder
        self.shadow = shadow
        self.promoter = promoter
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self._students: dict[str, Target] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # -- endpoints ---------------------------------------------------------------------------
    async def chat(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        started = time.perf_counter()
        caller = await self.keys.caller(headers.get("authorization"))
        body = decode_body(raw)
        req: ChatCompletionRequest = check_chat(body)
        call = _call(
            "chat.completions",
            "/chat/completions",
            raw,
            body,
            headers,
            caller,
            started,
            task=self.task_caps.admit(task_key(req.metadata, headers.get(TASK_HEADER), req), caller.key_id),
            model=req.model,
            stream=bool(req.stream),
        )
        if self.limits is not None:
            self._admit(caller, call)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        hit = await self._consult_cache(call, req, headers)
        if hit is not None:
            return self._serve_cached(call, hit, include_usage)
        try:
            return await self._route_chat(call, headers, caller, include_usage)
        except BaseException:
            # Whatever broke, the requests waiting on this one's answer must not wait for ever.
            if call.cache_lead:
                self._settle_cache(call, 502, None)
            raise

    async def _route_chat(
        self, call: Call, headers: Mapping[str, str], caller: Caller, include_usage: bool
    ) -> Reply:
        teacher = self.upstreams.require_teacher()
        decision = self._decide(call, headers, caller.admin)
        if decision is not None and decision.target == "student" and decision.adapter:
            student = self.upstreams.student
            if student is not None:
                target = self._student(decision.adapter)
                answered = await self._try_student(call, student, target, include_usage=include_usage)
                if answered is not None:
                    return answered
            # The student failed before a byte reached the client: the teacher answers, and
            # no pair is made of this request.
            call.decision = None
        call.soft_top_k = self._soft_labels(call)
        return await self._forward(call, teacher, include_usage=include_usage)

    async def completions(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        return await self._simple(raw, headers, "completions", "/completions", CompletionRequest)

    async def embeddings(self, raw: bytes, headers: Mapping[str, str]) -> Reply:
        return await self._simple(raw, headers, "embeddings", "/embeddings", EmbeddingRequest)

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

    async def _simple(
        self,
        raw: bytes,
        headers: Mapping[str, str],
        endpoint: str,
        path: str,
        shape: type[CompletionRequest] | type[EmbeddingRequest],
    ) -> Reply:
        """Completions and embeddings: validated, passed through to the teacher, recorded."""
        started = time.perf_counter()
        caller = await self.keys.caller(headers.get("authorization"))
        body = decode_body(raw)
        req = validate(body, shape)
        check_metadata(req.metadata)
        call = _call(
            endpoint,
            path,
            raw,
            body,
            headers,
            caller,
            started,
            task=self.task_caps.admit(task_key(req.metadata, headers.get(TASK_HEADER), None), caller.key_id),
            model=req.model,
            stream=bool(getattr(req, "stream", False)),
        )
        if self.limits is not None:
            self._admit(caller, call)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._forward(call, self.upstreams.require_teacher(), include_usage=include_usage)

    def _admit(self, caller: Caller, call: Call) -> None:
        """The key's allow-list and limits (``gateway.limits``); a refusal is counted by reason."""
        assert self.limits is not None
        try:
            call.limit_headers = self.limits.admit(caller, call.task)
        except GatewayError as exc:
            reason = (
                "task_not_allowed"
                if exc.status == 403
                else "budget"
                if exc.type == "insufficient_quota"
                else exc.type
            )
            self.metrics.child(self.metrics.limited, reason).inc()
            raise

    # -- the route ---------------------------------------------------------------------------
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

    def _student(self, adapter: str) -> Target:
        """The student ``Target`` of an adapter, built once per adapter."""
        target = self._students.get(adapter)
        if target is None:
            if len(self._students) > 1000:
                self._students.clear()
            target = self._students[adapter] = Target.student(adapter)
        return target

    # -- the cache ---------------------------------------------------------------------------
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
                hit = await self._lead_or_wait(call, key)
            if hit is not None:
                self.metrics.child(self.metrics.cache_requests, call.task, "hit").inc()
                return hit
        if may_write:
            call.cache_key = key
            call.cache_ttl_s = task_policy.cache.ttl
            call.cache_max_bytes = task_policy.cache.max_entry_bytes
        self.metrics.child(self.metrics.cache_requests, call.task, "miss" if may_read else "bypass").inc()
        return None

    async def _lead_or_wait(self, call: Call, key: str) -> bytes | None:
        """Lead a coalesced miss (None: ``call.cache_lead`` set), or the leader's answer. A
        follower whose leader failed tries once more, leading if nobody else does; a second
        failure is its own, OpenAI-shaped, rather than a third call of an upstream that fails."""
        for _ in range(2):
            waiting = self.cache.lead_or_follow(key)
            if waiting is None:
                call.cache_lead = True
                return None
            # Shielded: a follower that leaves (client gone) must not cancel the others' future.
            answer = await asyncio.shield(waiting)
            if answer is not None:
                return answer
        raise UpstreamError(
            "The identical request this one waited for failed twice; try again.", code="coalesced_failure"
        )

    def _serve_cached(self, call: Call, hit: bytes, include_usage: bool) -> Reply:
        """Answer from the cache (no upstream call); replayed as SSE when the client streams."""
        headers = {**self.headers_for(call, CACHE), "x-distillgate-cache": "hit"}
        latency = time.perf_counter() - call.started
        if not call.stream:
            self._finish(call, CACHE, 200, latency, 0.0, answer=hit, cache_hit=True)
            return Reply(200, headers, hit)
        response = orjson.loads(hit)
        self._finish(call, CACHE, 200, latency, 0.0, response=response, ttft=latency, cache_hit=True)
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
        if status == 200 and answer is not None:
            if call.cache_key is not None:
                cache.put(call.cache_key, call.task, answer, call.cache_ttl_s, call.cache_max_bytes)
        else:
            answer = None
        if call.cache_lead:
            call.cache_lead = False
            cache.settle(call.cache_key or cache_key(call.task, call.body), answer)

    def _cache_stream(self, call: Call, raw: bytes) -> None:
        """Assemble a finished stream off the event loop, then cache it and release the waiters."""

        async def assemble() -> None:
            try:
                answer: bytes | None = await asyncio.to_thread(lambda: orjson.dumps(sse.assemble_chat(raw)))
            except Exception:
                answer = None
            self._settle_cache(call, 200 if answer else 502, answer)

        self._in_background(assemble())

    def _soft_labels(self, call: Call) -> int | None:
        """The top-k to capture on this teacher call (None: none), per the task's policy."""
        policy = self.policy()
        if policy is None or not call.stored:
            return None
        settings = policy.for_task(call.task).soft_labels
        top_k = soft_labels.capture_top_k(call.body, call.endpoint, settings.rate, settings.top_k)
        if top_k is not None:
            self.metrics.child(self.metrics.soft_label_captures, call.task).inc()
        return top_k

    # -- upstreams ---------------------------------------------------------------------------
    def headers_for(self, call: Call, target: Target) -> dict[str, str]:
        headers = {
            "x-distillgate-request-id": call.id,
            "x-distillgate-target": target.name,
            "x-distillgate-task": call.task,
        }
        if call.limit_headers is not None:
            headers.update(call.limit_headers)
        return headers

    def _payload(self, call: Call, include_usage: bool, model: str | None = None) -> tuple[bytes, bool]:
        """The body to send upstream, and whether to strip the usage chunk we asked for."""
        base = call.body if call.soft_top_k is None else soft_labels.with_logprobs(call.body, call.soft_top_k)
        if not call.stream or include_usage or call.endpoint == "embeddings":
            if model is None and call.soft_top_k is None:
                return call.raw, False
            return orjson.dumps(base if model is None else {**base, "model": model}), False
        # Ask for the usage chunk so cost is known, and drop it before the client sees it.
        body = {
            **base,
            "stream_options": {**(call.body.get("stream_options") or {}), "include_usage": True},
        }
        if model is not None:
            body["model"] = model
        return orjson.dumps(body), True

    async def _forward(self, call: Call, upstream: Upstream, *, include_usage: bool) -> Reply:
        """Send ``call`` to the teacher and answer the client; every outcome is finished."""
        payload, strip_usage = self._payload(call, include_usage)
        upstream_started = time.perf_counter()
        try:
            answer = await upstream.send(call.path, payload, whole=not call.stream)
            if call.stream and answer.status < 400 and "html" not in answer.content_type:
                return self._stream(call, answer, TEACHER, upstream_started, strip_usage)
            try:
                data = await answer.read()
            except OSError as exc:  # a cut or stalled error body (TimeoutError is an OSError)
                raise UpstreamError(
                    f"The teacher's answer broke off after its headers ({type(exc).__name__})."
                ) from None
            if answer.status < 400 and not _is_json_answer(data, answer.content_type):
                raise UpstreamError(
                    f"The teacher answered HTTP {answer.status} with a body that is not a JSON object"
                    f" ({answer.content_type or 'no content type'}).",
                    code="upstream_invalid_response",
                )
        except UpstreamError as exc:
            self.metrics.upstream_errors.labels("teacher", exc.code or "error").inc()
            latency = time.perf_counter() - call.started
            self._finish(call, TEACHER, exc.status, latency, latency, error=exc.message)
            raise
        if answer.status >= 400:
            data = _as_openai_error(data, answer.status, TEACHER)
            self.metrics.upstream_errors.labels("teacher", f"http_{answer.status}").inc()
        elif call.soft_top_k is not None:
            # The record keeps the teacher's logprobs; the client gets the answer it asked for.
            return self._whole(
                call, answer, TEACHER, upstream_started, soft_labels.strip_json(data), recorded=data
            )
        return self._whole(call, answer, TEACHER, upstream_started, data)

    async def _try_student(
        self, call: Call, upstream: Upstream, target: Target, *, include_usage: bool
    ) -> Reply | None:
        """Answer from the student, or None when it fails before any byte reached the client
        (error status, timeout, junk, an empty stream): the teacher answers instead."""
        assert target.adapter is not None
        payload, strip_usage = self._payload(call, include_usage, model=target.adapter)
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
                    return self._stream(
                        call, answer, target, upstream_started, strip_usage, chunks=chunks, first_chunk=first
                    )
                data = await answer.read()
                parsed = orjson.loads(data)
                if not isinstance(parsed, dict) or not parsed.get("choices"):
                    raise UpstreamError("The student answered without choices.", code="bad_answer")
                return self._whole(call, answer, target, upstream_started, data)
        except Exception as exc:  # any student failure: fall back, never fail the client
            if answer is not None:
                answer.close()
            kind = exc.code if isinstance(exc, UpstreamError) and exc.code else type(exc).__name__.lower()
            self.metrics.upstream_errors.labels("student", kind or "error").inc()
            self._student_outcome(call, target.adapter, ok=False)
            return None

    # -- answers -----------------------------------------------------------------------------
    def _reply_headers(self, call: Call, target: Target) -> dict[str, str]:
        headers = self.headers_for(call, target)
        if call.cache_key is not None or call.cache_lead:
            headers["x-distillgate-cache"] = "miss"
        return headers

    def _whole(
        self,
        call: Call,
        answer: UpstreamAnswer,
        target: Target,
        upstream_started: float,
        data: bytes,
        *,
        recorded: bytes | None = None,
    ) -> Reply:
        """A whole answer: finished at once, then sent as it came (``recorded``: what the record
        keeps when it differs from what the client gets)."""
        headers = self._reply_headers(call, target)  # before the finish step settles the cache
        if answer.status >= 429:
            _pass_retry_headers(answer, headers)
        now = time.perf_counter()
        self._finish(
            call,
            target,
            answer.status,
            now - call.started,
            now - upstream_started,
            answer=data,
            recorded=recorded,
        )
        return Reply(answer.status, headers, data)

    def _stream(
        self,
        call: Call,
        answer: UpstreamAnswer,
        target: Target,
        upstream_started: float,
        strip_usage: bool,
        *,
        chunks: AsyncIterator[bytes] | None = None,
        first_chunk: bytes | None = None,
    ) -> Reply:
        """A stream: relayed chunk by chunk as it arrives, finished once it ends (or breaks)."""
        relay = self._relay(
            call, answer, chunks or answer.iter_chunks(), first_chunk, target, upstream_started, strip_usage
        )
        return Reply(
            answer.status, {**self._reply_headers(call, target), **SSE_HEADERS}, chunks=relay, media_type=SSE
        )

    async def _relay(
        self,
        call: Call,
        answer: UpstreamAnswer,
        chunks: AsyncIterator[bytes],
        first_chunk: bytes | None,
        target: Target,
        upstream_started: float,
        strip_usage: bool,
    ) -> AsyncIterator[bytes]:
        """Pass the stream on (less the usage chunk asked for on the client's behalf), telling a
        complete stream from a cut one; ``_finish_stream`` runs when it ends, however it ends."""
        strip_logprobs = soft_labels.strip_sse if call.soft_top_k is not None else None
        received: list[bytes] = []
        first: float | None = time.perf_counter() if first_chunk is not None else None
        status, error = answer.status, None
        pending = b""
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
                if not strip_usage and strip_logprobs is None:
                    yield chunk
                    sent = (sent[1], chunk)
                    continue
                pending += chunk
                cut = pending.rfind(b"\n\n")
                if cut < 0:
                    continue
                ready, pending = pending[: cut + 2], pending[cut + 2 :]
                out = _drop_usage_events(ready) if strip_usage else ready
                if strip_logprobs is not None:
                    out = strip_logprobs(out)
                if out:
                    yield out
                    sent = (sent[1], out)
            if pending:
                yield pending
        except OSError as exc:  # the connection broke or went quiet (TimeoutError is an OSError)
            status, error = 502, f"The {target.kind} stream broke off ({type(exc).__name__})."
            self.metrics.upstream_errors.labels(target.kind, "stream_broken").inc()
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
            self._finish_stream(call, target, status, error, received, first, upstream_started)

    def _finish_stream(
        self,
        call: Call,
        target: Target,
        status: int,
        error: str | None,
        received: list[bytes],
        first: float | None,
        upstream_started: float,
    ) -> None:
        now = time.perf_counter()
        waited = (first or now) - upstream_started
        ttft = None if first is None else first - call.started
        raw = b"".join(received)
        # With soft labels captured the record keeps the teacher's stream; the cache and the pair
        # get what the client got.
        sent = soft_labels.strip_sse(raw) if call.soft_top_k is not None else raw
        self._finish(
            call,
            target,
            status,
            now - call.started,
            waited,
            answer=sent,
            recorded=None if sent is raw else raw,
            stream=True,
            ttft=ttft,
            error=error,
        )

    # -- the finish step ---------------------------------------------------------------------
    def _finish(
        self,
        call: Call,
        target: Target,
        status: int,
        latency: float,
        waited: float,
        *,
        answer: bytes | None = None,
        recorded: bytes | None = None,
        response: dict[str, Any] | None = None,
        stream: bool = False,
        ttft: float | None = None,
        error: str | None = None,
        cache_hit: bool = False,
    ) -> None:
        """Everything that follows an answer (or its failure), once: record it, observe it,
        settle the cache (store the answer, release the requests that waited for it), count the
        student's outcome, and hand the pair to the shadow mirror. ``answer``: the bytes sent
        (SSE when ``stream``); ``waited``: the time spent waiting for the upstream."""
        self.recorder.submit(
            call.to_exchange(
                target,
                status,
                latency,
                body=answer if recorded is None else recorded,
                response=response,
                ttft_s=ttft,
                error=error,
                cache_hit=cache_hit,
                sse=stream,
            )
        )
        self._observe(call, target, status, latency, waited, ttft)
        if call.cache_key is not None or call.cache_lead:
            if stream and status == 200 and answer is not None:
                self._cache_stream(call, answer)
            else:
                self._settle_cache(call, status, None if stream else answer)
        if target.adapter is not None and status != 499:
            self._student_outcome(call, target.adapter, ok=status == 200)
        if answer is not None and call.decision is not None:
            self._pair(call, target, status, answer, is_sse=stream, latency=latency)

    def _observe(
        self, call: Call, target: Target, status: int, latency: float, waited: float, ttft: float | None
    ) -> None:
        m = self.metrics
        m.child(m.requests, call.task, target.kind, str(status)).inc()
        m.child(m.request_duration, call.task, target.kind).observe(latency)
        if ttft is not None:
            m.child(m.ttft, call.task, target.kind).observe(ttft)
        m.overhead.observe(max(0.0, latency - waited))

    def _student_outcome(self, call: Call, adapter: str, *, ok: bool) -> None:
        if self.promoter.student_outcome(call.task, adapter, ok):
            self._in_background(asyncio.to_thread(self.promoter.rollback_for_errors, call.task, adapter))

    def _pair(
        self, call: Call, target: Target, status: int, data: bytes, *, is_sse: bool, latency: float
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
        student = target.kind == "student"
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
                api_key_id=call.key_id,
            )
        )

    def _in_background(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _call(
    endpoint: str,
    path: str,
    raw: bytes,
    body: dict[str, Any],
    headers: Mapping[str, str],
    caller: Caller,
    started: float,
    *,
    task: str,
    model: str,
    stream: bool,
) -> Call:
    return Call(
        id=new_id(),
        endpoint=endpoint,
        path=path,
        task=task,
        model=model,
        body=body,
        raw=raw,
        stream=stream,
        stored=not opted_out(body, headers),
        key_id=caller.key_id,
        started=started,
    )


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


def _is_json_answer(data: bytes, content_type: str) -> bool:
    """Whether a success body is what an OpenAI-compatible server answers: a JSON object."""
    if "html" in content_type:
        return False
    try:
        return isinstance(orjson.loads(data), dict)
    except orjson.JSONDecodeError:
        return False


def _pass_retry_headers(answer: UpstreamAnswer, headers: dict[str, str]) -> None:
    """The teacher's ``Retry-After`` reaches the client (a 429 says when to come back); after a
    5xx the gateway already retried within its budget, so SDKs are told not to multiply it
    (the OpenAI SDKs honour ``x-should-retry``)."""
    retry_after = answer.headers.get("retry-after")
    if retry_after is not None and retry_after.isprintable() and len(retry_after) <= 64:
        headers["retry-after"] = retry_after
    if answer.status >= 500:
        headers["x-should-retry"] = "false"


def _as_openai_error(data: bytes, status: int, target: Target) -> bytes:
    """Pass an upstream's OpenAI-shaped error through; wrap anything else so clients can parse it."""
    try:
        parsed = orjson.loads(data)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            return data
    except orjson.JSONDecodeError:
        pass
    snippet = data[:200].decode("utf-8", "replace").strip()
    kind = "invalid_request_error" if status < 500 else "upstream_error"
    return error_bytes(
        f"The {target.kind} answered HTTP {status}: {snippet}", kind, None, f"upstream_{status}"
    )
