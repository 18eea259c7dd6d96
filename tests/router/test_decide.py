"""The route decision: every stage, the student's envelope, pins, and traffic shares over many draws."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from gateway.store.models import Stage, Task
from router.decide import (
    RequestFeatures,
    StudentEnvelope,
    TaskState,
    decide,
    estimate_prompt_tokens,
    parse_pin,
)
from router.policy import TaskPolicy, parse_policy

ENVELOPE = StudentEnvelope(
    models=frozenset({"gpt-big"}), tools=False, response_format=True, max_prompt_tokens=500
)
PLAIN = RequestFeatures(model="gpt-big", prompt_tokens=50)


def policy(**override: Any) -> TaskPolicy:
    data: dict[str, Any] = {"shadow": {"rate": 0.2}, "audit": {"rate": 0.02}, "canary": [0.05, 0.25, 1.0]}
    data.update(override)
    return TaskPolicy.model_validate(data)


def state(stage: Stage, **kw: Any) -> TaskState:
    kw.setdefault("adapter", "classify@v1")
    kw.setdefault("envelope", ENVELOPE)
    kw.setdefault("max_context_tokens", 2048)
    return TaskState(stage=stage, **kw)


@pytest.mark.parametrize("stage", [Stage.collecting, Stage.training, Stage.paused, Stage.rolled_back])
@pytest.mark.parametrize("draw", [0.0, 0.01, 0.5, 0.999])
def test_stages_before_and_after_the_student_keep_the_teacher_without_pairs(
    stage: Stage, draw: float
) -> None:
    d = decide(state(stage), policy(), PLAIN, draw)
    assert (d.target, d.mirror, d.audit, d.adapter) == ("teacher", False, False, None)
    assert stage.value.replace("_", " ") in d.reason or "paused" in d.reason


def test_shadow_serves_teacher_and_mirrors_below_the_rate() -> None:
    p = policy(shadow={"rate": 0.2})
    mirrored = decide(state(Stage.shadow), p, PLAIN, 0.19)
    assert (mirrored.target, mirrored.mirror, mirrored.adapter, mirrored.pair_kind) == (
        "teacher",
        True,
        "classify@v1",
        "shadow",
    )
    assert not mirrored.audit
    plain = decide(state(Stage.shadow), p, PLAIN, 0.2)
    assert (plain.target, plain.mirror, plain.adapter, plain.pair_kind) == ("teacher", False, None, None)


@pytest.mark.parametrize(("step", "share"), [(0, 0.05), (1, 0.25), (2, 1.0)])
def test_canary_sends_the_step_share_to_the_student(step: int, share: float) -> None:
    s = state(Stage.canary, canary_step=step)
    assert decide(s, policy(), PLAIN, share - 1e-9).target == "student"
    if share < 1.0:
        assert decide(s, policy(), PLAIN, share).target == "teacher"


def test_canary_step_past_the_policy_list_reads_the_last_share() -> None:
    s = state(Stage.canary, canary_step=7)
    assert decide(s, policy(canary=[0.5, 1.0]), PLAIN, 0.99).target == "student"


def test_canary_pairs_both_sides_at_the_shadow_rate_as_canary_evidence() -> None:
    p = policy(shadow={"rate": 0.5})
    s = state(Stage.canary, canary_step=1)  # 25% student
    # Student side: draw / 0.25 < 0.5  ⇔  draw < 0.125.
    audited = decide(s, p, PLAIN, 0.12)
    assert (audited.target, audited.audit, audited.mirror, audited.pair_kind) == (
        "student",
        True,
        False,
        "canary",
    )
    assert not decide(s, p, PLAIN, 0.13).audit
    # Teacher side: (draw - 0.25) / 0.75 < 0.5  ⇔  draw < 0.625.
    mirrored = decide(s, p, PLAIN, 0.62)
    assert (mirrored.target, mirrored.mirror, mirrored.adapter, mirrored.pair_kind) == (
        "teacher",
        True,
        "classify@v1",
        "canary",
    )
    unpaired = decide(s, p, PLAIN, 0.63)
    assert (unpaired.mirror, unpaired.adapter, unpaired.pair_kind) == (False, None, None)


def test_serving_sends_everything_to_the_student_and_audits_at_the_audit_rate() -> None:
    p = policy(audit={"rate": 0.02})
    s = state(Stage.serving)
    audited = decide(s, p, PLAIN, 0.019)
    assert (audited.target, audited.audit, audited.pair_kind, audited.adapter) == (
        "student",
        True,
        "audit",
        "classify@v1",
    )
    for draw in (0.02, 0.5, 0.999999):
        d = decide(s, p, PLAIN, draw)
        assert (d.target, d.audit, d.mirror) == ("student", False, False)


def _wilson_tolerance(p: float, n: int) -> float:
    # Five standard deviations: a flaky failure would need a one-in-three-million draw sequence.
    return 5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize(("step", "share"), [(0, 0.05), (1, 0.25)])
def test_canary_traffic_and_pairing_rates_match_the_policy_over_many_draws(step: int, share: float) -> None:
    rng = random.Random(1234 + step)
    p = policy(shadow={"rate": 0.2})
    s = state(Stage.canary, canary_step=step)
    n = 40_000
    decisions = [decide(s, p, PLAIN, rng.random()) for _ in range(n)]
    student = [d for d in decisions if d.target == "student"]
    teacher = [d for d in decisions if d.target == "teacher"]
    assert abs(len(student) / n - share) < _wilson_tolerance(share, n)
    assert abs(sum(d.audit for d in student) / len(student) - 0.2) < _wilson_tolerance(0.2, len(student))
    assert abs(sum(d.mirror for d in teacher) / len(teacher) - 0.2) < _wilson_tolerance(0.2, len(teacher))


def test_shadow_and_audit_rates_match_the_policy_over_many_draws() -> None:
    rng = random.Random(99)
    n = 40_000
    shadow = sum(
        decide(state(Stage.shadow), policy(shadow={"rate": 0.3}), PLAIN, rng.random()).mirror
        for _ in range(n)
    )
    assert abs(shadow / n - 0.3) < _wilson_tolerance(0.3, n)
    audit = sum(
        decide(state(Stage.serving), policy(audit={"rate": 0.05}), PLAIN, rng.random()).audit
        for _ in range(n)
    )
    assert abs(audit / n - 0.05) < _wilson_tolerance(0.05, n)


UNSUPPORTED = [
    (RequestFeatures(model="gpt-other", prompt_tokens=50), "never appeared"),
    (RequestFeatures(model="gpt-big", has_tools=True, prompt_tokens=50), "tools"),
    (RequestFeatures(model="gpt-big", n=2, prompt_tokens=50), "n > 1"),
    (RequestFeatures(model="gpt-big", prompt_tokens=501), "longer than any"),
    (RequestFeatures(model="gpt-big", prompt_tokens=400, max_tokens=1700), "context"),
    (RequestFeatures(model="gpt-big", logprobs=True, top_logprobs=21, prompt_tokens=50), "top_logprobs"),
]


@pytest.mark.parametrize("stage", [Stage.shadow, Stage.canary, Stage.serving])
@pytest.mark.parametrize(("features", "why"), UNSUPPORTED)
def test_requests_the_student_cannot_serve_stay_on_the_teacher_unpaired(
    stage: Stage, features: RequestFeatures, why: str
) -> None:
    for draw in (0.0, 0.5, 0.999):
        d = decide(state(stage), policy(), features, draw)
        assert (d.target, d.mirror, d.audit, d.adapter) == ("teacher", False, False, None)
        assert why in d.reason


def test_json_output_needs_a_student_trained_with_response_format() -> None:
    features = RequestFeatures(model="gpt-big", json_output=True, prompt_tokens=10)
    assert decide(state(Stage.serving), policy(), features, 0.5).target == "student"
    no_json = StudentEnvelope(models=None, response_format=False)
    d = decide(state(Stage.serving, envelope=no_json), policy(), features, 0.5)
    assert d.target == "teacher" and "JSON" in d.reason


def test_tools_go_to_a_student_trained_with_tools() -> None:
    with_tools = StudentEnvelope(models=None, tools=True)
    features = RequestFeatures(model="anything", has_tools=True, prompt_tokens=10)
    assert decide(state(Stage.serving, envelope=with_tools), policy(), features, 0.5).target == "student"


def test_logprobs_within_the_student_servers_limit_go_to_the_student() -> None:
    features = RequestFeatures(model="gpt-big", logprobs=True, top_logprobs=5, prompt_tokens=10)
    assert decide(state(Stage.serving, max_logprobs=20), policy(), features, 0.5).target == "student"
    d = decide(state(Stage.serving, max_logprobs=0), policy(), features, 0.5)
    assert d.target == "teacher" and "no logprobs" in d.reason


def test_unknown_envelope_or_missing_adapter_keeps_the_teacher() -> None:
    unknown = decide(state(Stage.serving, envelope=None), policy(), PLAIN, 0.5)
    assert unknown.target == "teacher" and "envelope is unknown" in unknown.reason
    no_adapter = decide(state(Stage.serving, adapter=None), policy(), PLAIN, 0.5)
    assert no_adapter.target == "teacher" and "without an adapter" in no_adapter.reason


def test_distill_false_keeps_the_teacher_in_every_stage() -> None:
    for stage in Stage:
        d = decide(state(stage), policy(distill=False), PLAIN, 0.0)
        assert (d.target, d.mirror, d.audit) == ("teacher", False, False)
        assert "distill" in d.reason


def test_pin_to_teacher_wins_over_a_serving_stage() -> None:
    d = decide(state(Stage.serving), policy(), PLAIN, 0.0, pin="teacher")
    assert (d.target, d.pinned, d.audit) == ("teacher", True, False)


def test_pin_to_student_bypasses_stage_and_envelope_but_needs_an_adapter() -> None:
    outside = RequestFeatures(model="gpt-other", has_tools=True, n=3, prompt_tokens=10_000)
    d = decide(state(Stage.collecting), policy(distill=False), outside, 0.99, pin="student")
    assert (d.target, d.adapter, d.pinned, d.mirror, d.audit) == (
        "student",
        "classify@v1",
        True,
        False,
        False,
    )
    none = decide(state(Stage.collecting, adapter=None), policy(), PLAIN, 0.5, pin="student")
    assert none.target == "teacher" and none.pinned and "no adapter" in none.reason


@pytest.mark.parametrize(
    ("value", "pin"),
    [("teacher", "teacher"), (" Student ", "student"), ("vllm", None), ("", None), (None, None)],
)
def test_parse_pin_accepts_only_the_two_targets(value: str | None, pin: str | None) -> None:
    assert parse_pin(value) == pin


def test_request_features_are_read_from_a_chat_body() -> None:
    body: dict[str, Any] = {
        "model": "gpt-big",
        "messages": [{"role": "system", "content": "x" * 400}, {"role": "user", "content": "hello"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": {}}},
        "n": 2,
        "max_completion_tokens": 64,
        "stream": True,
        "logprobs": True,
        "top_logprobs": 3,
    }
    f = RequestFeatures.from_body(body)
    assert (f.model, f.has_tools, f.json_output, f.n, f.max_tokens, f.stream, f.logprobs, f.top_logprobs) == (
        "gpt-big",
        True,
        True,
        2,
        64,
        True,
        True,
        3,
    )
    assert f.prompt_tokens == estimate_prompt_tokens(body["messages"], body["tools"]) > 100
    plain = RequestFeatures.from_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert (plain.has_tools, plain.json_output, plain.n, plain.max_tokens, plain.prompt_tokens) == (
        False,
        False,
        1,
        None,
        5,
    )
    assert not RequestFeatures.from_body(
        {"model": "m", "messages": [], "response_format": {"type": "text"}}
    ).json_output


def test_the_envelope_of_a_training_set_covers_exactly_its_requests() -> None:
    bodies: list[dict[str, Any]] = [
        {"model": "gpt-big", "messages": [{"role": "user", "content": "x" * 400}]},
        {
            "model": "gpt-mini",
            "messages": [{"role": "user", "content": "short"}],
            "response_format": {"type": "json_object"},
        },
    ]
    envelope = StudentEnvelope.from_requests(bodies)
    assert envelope == StudentEnvelope(
        models=frozenset({"gpt-big", "gpt-mini"}), tools=False, response_format=True, max_prompt_tokens=104
    )
    assert StudentEnvelope.from_features(envelope.to_features()) == envelope
    s = state(Stage.serving, envelope=envelope)
    for body in bodies:
        assert decide(s, policy(), RequestFeatures.from_body(body), 0.5).target == "student"
    longer = {"model": "gpt-big", "messages": [{"role": "user", "content": "x" * 404}]}
    assert decide(s, policy(), RequestFeatures.from_body(longer), 0.5).target == "teacher"


def test_task_state_from_a_stored_task_and_the_policys_student() -> None:
    pol = parse_policy(
        {
            "teacher": {"base_url": "http://t/v1"},
            "student": {
                "base_url": "http://s/v1",
                "base_model": "tiny",
                "max_context_tokens": 1024,
                "max_logprobs": 5,
            },
        }
    )
    envelope = StudentEnvelope(
        models=frozenset({"a", "b"}), tools=True, response_format=False, max_prompt_tokens=90
    )
    task = Task(
        key="t",
        stage=Stage.canary,
        adapter="t@v2",
        canary_step=1,
        student_ratio=0.25,
        features=envelope.to_features(),
    )
    s = TaskState.from_task(task, pol.student)
    assert (s.stage, s.adapter, s.canary_step, s.max_context_tokens, s.max_logprobs) == (
        Stage.canary,
        "t@v2",
        1,
        1024,
        5,
    )
    assert s.envelope == envelope
    assert (
        TaskState.from_task(Task(key="t", stage=Stage.serving, paused=True), pol.student).stage
        is Stage.paused
    )
    assert TaskState.from_task(task, None).adapter is None
    assert TaskState.from_task(Task(key="t", features=None), pol.student).envelope is None
