"""The route decision: which model answers a request, and whether the other one answers too.

A pure function of (task state, task policy, request features, one random draw), so every
branch is testable without a server. The gateway builds the inputs and acts on the result.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.store.models import Stage, Task
from router.policy import StudentEndpoint, TaskPolicy

Target = Literal["teacher", "student"]
PairKind = Literal["shadow", "canary", "audit"]

PIN_HEADER = "x-distillgate-target"
"""Request header naming a target (``teacher`` | ``student``); honoured for admin keys only."""

CHARS_PER_TOKEN = 4
"""The prompt-length estimate's ratio. The trainer records ``max_prompt_tokens`` with the same
estimate (``estimate_prompt_tokens``), so the two sides of the comparison agree."""

TEACHER_STAGES: Final[Mapping[Stage, str]] = {
    Stage.collecting: "the task is collecting teacher answers",
    Stage.training: "the task's student is training",
    Stage.paused: "the task is paused",
    Stage.rolled_back: "the task was rolled back to the teacher",
}
"""The stages in which the teacher answers everything, with the reason ``decide`` gives."""
TEACHER_ONLY: Final = frozenset(TEACHER_STAGES)
"""The same stages as a set: the gateway skips the decision for them (the common case)."""


@dataclass(frozen=True)
class StudentEnvelope:
    """What the task's student was trained on; requests outside it stay on the teacher.

    Stored in ``Task.features`` as ``{"models": [...], "tools": bool, "response_format": bool,
    "max_prompt_tokens": int}`` by the trainer.
    """

    models: frozenset[str] | None = None
    """Requested model names seen in the training records; ``None`` accepts any."""
    tools: bool = False
    """Some training records carried tool definitions."""
    response_format: bool = False
    """Some training records asked for JSON output (``response_format`` json_object/json_schema)."""
    max_prompt_tokens: int | None = None
    """The longest training prompt (``estimate_prompt_tokens``); ``None`` sets no bound."""

    @classmethod
    def from_features(cls, features: Mapping[str, Any] | None) -> StudentEnvelope | None:
        """Read ``Task.features``; ``None`` (nothing recorded) means the envelope is unknown."""
        if features is None:
            return None
        models = features.get("models")
        max_prompt = features.get("max_prompt_tokens")
        return cls(
            models=frozenset(str(m) for m in models) if isinstance(models, list | tuple) else None,
            tools=bool(features.get("tools", False)),
            response_format=bool(features.get("response_format", False)),
            max_prompt_tokens=int(max_prompt) if isinstance(max_prompt, int | float) else None,
        )

    @classmethod
    def from_requests(cls, bodies: Iterable[Mapping[str, Any]]) -> StudentEnvelope:
        """The envelope of a training set: every request body the student is trained on.

        The trainer stores ``envelope.to_features()`` in ``Task.features`` when it publishes
        an adapter, so routing and training read prompt lengths with the same estimate.
        """
        models: set[str] = set()
        tools = response_format = False
        max_prompt = 0
        for body in bodies:
            features = RequestFeatures.from_body(body)
            models.add(features.model)
            tools = tools or features.has_tools
            response_format = response_format or features.json_output
            max_prompt = max(max_prompt, features.prompt_tokens)
        return cls(
            models=frozenset(models),
            tools=tools,
            response_format=response_format,
            max_prompt_tokens=max_prompt,
        )

    def to_features(self) -> dict[str, Any]:
        """The ``Task.features`` form of this envelope."""
        return {
            "models": sorted(self.models) if self.models is not None else None,
            "tools": self.tools,
            "response_format": self.response_format,
            "max_prompt_tokens": self.max_prompt_tokens,
        }


@dataclass(frozen=True)
class TaskState:
    """The task as the decision sees it: its stage and what its student can serve."""

    stage: Stage
    adapter: str | None = None
    """The candidate (shadow, canary) or serving adapter; the student server's model name."""
    student_ratio: float = 0.0
    """Share the student serves, as recorded at the last transition (reported, not routed on:
    canary routing reads the share of ``canary_step`` from the current policy)."""
    canary_step: int = 0
    envelope: StudentEnvelope | None = None
    max_context_tokens: int | None = None
    """The student model's context; ``None`` sets no bound."""
    max_logprobs: int = 20
    """Most ``top_logprobs`` the student server returns; 0: none at all."""

    @classmethod
    def from_task(cls, task: Task, student: StudentEndpoint | None) -> TaskState:
        """Build the state from the stored task and the policy's student endpoint.

        Without a student endpoint there is nothing to route to, so the adapter is dropped and
        every request stays on the teacher.
        """
        stage = Stage.paused if task.paused else Stage(task.stage)
        return cls(
            stage=stage,
            adapter=task.adapter if student is not None else None,
            student_ratio=task.student_ratio,
            canary_step=task.canary_step,
            envelope=StudentEnvelope.from_features(task.features),
            max_context_tokens=student.max_context_tokens if student is not None else None,
            max_logprobs=student.max_logprobs if student is not None else 0,
        )


@dataclass(frozen=True)
class RequestFeatures:
    """The parts of a request that decide whether a student can answer it."""

    model: str
    has_tools: bool = False
    json_output: bool = False
    """``response_format`` asks for ``json_object`` or ``json_schema``."""
    n: int = 1
    prompt_tokens: int = 0
    """Estimated with ``estimate_prompt_tokens``."""
    max_tokens: int | None = None
    stream: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> RequestFeatures:
        """Read a chat completions body the gateway has already validated."""
        fmt = body.get("response_format")
        fmt_type = fmt.get("type") if isinstance(fmt, Mapping) else None
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        messages = body.get("messages")
        tools = body.get("tools") or body.get("functions")
        return cls(
            model=str(body.get("model", "")),
            has_tools=bool(tools),
            json_output=fmt_type in ("json_object", "json_schema"),
            n=int(body.get("n") or 1),
            prompt_tokens=estimate_prompt_tokens(messages if isinstance(messages, list) else [], tools),
            max_tokens=int(max_tokens) if isinstance(max_tokens, int) else None,
            stream=bool(body.get("stream")),
            logprobs=bool(body.get("logprobs")),
            top_logprobs=int(body.get("top_logprobs") or 0),
        )


def estimate_prompt_tokens(messages: list[Any], tools: Any = None) -> int:
    """A tokenizer-free prompt length: characters / ``CHARS_PER_TOKEN`` plus 4 per message.

    Cheap enough for the hot path; used both here and by the trainer for ``max_prompt_tokens``.
    """
    chars = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, Mapping))
        if message.get("tool_calls"):
            chars += len(json.dumps(message["tool_calls"]))
    if tools:
        chars += len(json.dumps(tools))
    return math.ceil(chars / CHARS_PER_TOKEN) + 4 * len(messages)


@dataclass(frozen=True)
class RouteDecision:
    """Where a request goes, and which second answer (if any) is fetched in the background."""

    target: Target
    adapter: str | None
    """The student model name when the student serves or is mirrored; else ``None``."""
    reason: str
    mirror: bool = False
    """The teacher serves; the adapter answers the same request in the background (scored)."""
    audit: bool = False
    """The student serves; the teacher answers the same request in the background (scored)."""
    pair_kind: PairKind | None = None
    """``ShadowPair.kind`` of the pair that ``mirror``/``audit`` produces."""
    pinned: bool = False


def parse_pin(value: str | None) -> Target | None:
    """The pin header's value as a target; anything else (or nothing) is no pin."""
    if value is None:
        return None
    value = value.strip().lower()
    if value == "teacher":
        return "teacher"
    if value == "student":
        return "student"
    return None


def unsupported_reason(state: TaskState, features: RequestFeatures) -> str | None:
    """Why the student cannot serve this request, or ``None`` when it can.

    Logprobs: vLLM returns up to ``--max-logprobs`` alternatives, so a request within that
    (``StudentEndpoint.max_logprobs``) goes to the student; more, or any when it is 0, stays.
    """
    envelope = state.envelope
    if envelope is None:
        return "the student's training envelope is unknown"
    if envelope.models is not None and features.model not in envelope.models:
        return f"model {features.model!r} never appeared in this task's training data"
    if features.has_tools and not envelope.tools:
        return "the request has tools and the student was trained without them"
    if features.json_output and not envelope.response_format:
        return "the request asks for JSON output and the student was trained without response_format"
    if features.n > 1:
        return "n > 1"
    if features.logprobs or features.top_logprobs:
        if state.max_logprobs <= 0:
            return "the student server returns no logprobs"
        if features.top_logprobs > state.max_logprobs:
            return f"top_logprobs {features.top_logprobs} > the student's {state.max_logprobs}"
    if envelope.max_prompt_tokens is not None and features.prompt_tokens > envelope.max_prompt_tokens:
        return (
            f"prompt (~{features.prompt_tokens} tokens) longer than any the student was trained on "
            f"(~{envelope.max_prompt_tokens})"
        )
    if state.max_context_tokens is not None:
        needed = features.prompt_tokens + (features.max_tokens or 0)
        if needed > state.max_context_tokens:
            return (
                f"prompt + max_tokens (~{needed} tokens) exceed the student's context "
                f"{state.max_context_tokens}"
            )
    return None


def canary_share(policy: TaskPolicy, step: int) -> float:
    """The student's share at canary ``step``; a step past the policy's list reads its last share."""
    steps = policy.canary
    return steps[min(max(step, 0), len(steps) - 1)]


def decide(
    state: TaskState,
    policy: TaskPolicy,
    features: RequestFeatures,
    draw: float,
    *,
    pin: Target | None = None,
) -> RouteDecision:
    """Route one request.

    ``draw`` is one uniform number in [0, 1). Where two random choices are made (canary: which
    target, then whether to pair), the second reuses the draw rescaled inside the chosen
    interval: ``draw / ratio`` under the student, ``(draw - ratio) / (1 - ratio)`` under the
    teacher. Given the first outcome that rescaled value is again uniform on [0, 1), so each
    choice has exactly its configured probability and the whole decision is reproducible from
    one number.

    Order of precedence: a pin (admin keys only) wins over everything; a pin to the student
    bypasses the stage and the envelope (for debugging) but still needs an adapter. Then
    ``distill: false``, the stage, a missing adapter, and requests outside the student's
    envelope keep the teacher (with no mirror: such pairs would not be evidence of anything
    the student will be asked to do).
    """
    if pin == "teacher":
        return RouteDecision("teacher", None, "pinned to the teacher", pinned=True)
    if pin == "student":
        if state.adapter is None:
            return RouteDecision(
                "teacher", None, "pinned to the student, but the task has no adapter", pinned=True
            )
        return RouteDecision("student", state.adapter, "pinned to the student", pinned=True)

    if not policy.distill:
        return RouteDecision("teacher", None, "distillation is off for this task (distill: false)")
    if state.stage in TEACHER_STAGES:
        return RouteDecision("teacher", None, TEACHER_STAGES[state.stage])
    if state.adapter is None:
        return RouteDecision("teacher", None, f"stage {state.stage} without an adapter")
    unsupported = unsupported_reason(state, features)
    if unsupported is not None:
        return RouteDecision("teacher", None, f"student cannot serve: {unsupported}")

    adapter = state.adapter
    if state.stage is Stage.shadow:
        if draw < policy.shadow.rate:
            return RouteDecision(
                "teacher", adapter, "shadow: mirrored to the candidate", mirror=True, pair_kind="shadow"
            )
        return RouteDecision("teacher", None, "shadow: not sampled")

    if state.stage is Stage.canary:
        ratio = canary_share(policy, state.canary_step)
        step = f"canary step {state.canary_step} ({ratio:.0%})"
        if draw < ratio:
            paired = draw / ratio < policy.shadow.rate
            return RouteDecision(
                "student", adapter, f"{step}: student", audit=paired, pair_kind="canary" if paired else None
            )
        paired = (draw - ratio) / (1.0 - ratio) < policy.shadow.rate
        return RouteDecision(
            "teacher",
            adapter if paired else None,
            f"{step}: teacher",
            mirror=paired,
            pair_kind="canary" if paired else None,
        )

    if state.stage is Stage.serving:
        if draw < policy.audit.rate:
            return RouteDecision(
                "student", adapter, "serving: audited by the teacher", audit=True, pair_kind="audit"
            )
        return RouteDecision("student", adapter, "serving")

    return RouteDecision("teacher", None, f"unknown stage {state.stage!r}")
