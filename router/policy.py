"""The routing policy: one YAML file, validated with errors that name the bad key.

Defaults apply to every task; ``tasks.<name>`` overrides any part of them, laid over the
defaults key by key when the file is read. ``Policy.for_task`` returns the fully-resolved
``TaskPolicy`` the rest of the code reads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.overlay import overlay

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``"1d"``, ``"30m"``, ``"10s"``, ``"250ms"`` or a number of seconds → seconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            return float(m.group(1)) * _UNIT_S[m.group(2)]
    raise ValueError(f"not a duration: {value!r} (use e.g. 30s, 10m, 1h, 1d)")


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written as a number or as ``"30s"``, ``"10m"``, ``"1h"``, ``"1d"``."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TeacherEndpoint(_Strict):
    """The large model the gateway forwards to and learns from."""

    base_url: str
    """OpenAI-compatible base URL ending in ``/v1``."""
    api_key_env: str | None = None
    """Name of the environment variable that holds the teacher's key (the key itself is never
    written in the policy, stored or logged)."""
    model: str | None = None
    """The teacher's main model: listed by ``GET /v1/models`` and used to price requests for models
    missing from ``prices``. Clients' ``model`` fields are always passed through unchanged."""
    models: list[str] = Field(default_factory=list)
    """Models listed by ``GET /v1/models`` and passed through as asked; empty means any."""
    timeout: Duration = 600.0
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers sent upstream (e.g. ``OpenAI-Organization``)."""

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class StudentEndpoint(_Strict):
    """The server that serves the student adapters (vLLM in production)."""

    base_url: str
    base_model: str
    """Hub id or local path of the base model adapters are trained on and loaded into."""
    engine: Literal["vllm", "embedded"] = "vllm"
    api_key_env: str | None = None
    timeout: Duration = 60.0
    """Student calls are bounded: on timeout the teacher answers instead."""
    max_context_tokens: int = 4096
    """Prompt plus completion tokens the student model can take; longer requests stay on the teacher."""
    max_logprobs: int = Field(20, ge=0)
    """Most ``top_logprobs`` the student server returns (vLLM's ``--max-logprobs``); requests asking
    for more stay on the teacher, and ``0`` keeps every request that asks for logprobs there."""
    adapter_root: str | None = None
    """Path prefix under which the student server sees the adapters directory (when it is
    mounted elsewhere than in the gateway/worker)."""

    def api_key(self) -> str | None:
        return os.environ.get(self.api_key_env) if self.api_key_env else None


class Price(_Strict):
    """USD per million tokens (or per GPU-hour for a self-hosted student)."""

    input: float = 0.0
    cached_input: float | None = None
    """Price of prompt tokens served from the provider's prompt cache; defaults to ``input``."""
    output: float = 0.0
    gpu_hour: float | None = None
    """For a self-hosted student: USD per GPU-hour, spread over the request's latency."""


def token_cost(
    price: Price | None, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0
) -> float:
    """USD for one exchange at per-million-token prices; cached prompt tokens at the cached price.

    Here, beside ``Price``, so every layer prices tokens the same way: the gateway's ledger
    (``gateway.cost``), the shadow pairs' audit and judge calls and the answer checks."""
    if price is None:
        return 0.0
    cached = min(cached_tokens, prompt_tokens)
    cached_price = price.input if price.cached_input is None else price.cached_input
    return (
        (prompt_tokens - cached) * price.input + cached * cached_price + completion_tokens * price.output
    ) / 1e6


class CachePolicy(_Strict):
    enabled: bool = True
    ttl: Duration = 86400.0
    """How long an answer stays fresh (``1d``, ``30m`` …)."""
    only_deterministic: bool = True
    """Cache only requests with temperature 0 or a fixed seed (never ``n > 1``). ``false`` caches all."""
    max_entries: int = 10_000
    """Entries kept in each replica's in-process tier."""
    max_entry_bytes: int = 1_048_576


class TrainPolicy(_Strict):
    enabled: bool = True
    min_new_records: int = 300
    """New usable records since the last run before training again."""
    max_records: int = 20_000
    holdout: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of records (by hash, stable) kept out of training for evaluation."""
    schedule: Duration = 3600.0
    """Least time between two runs for a task."""
    method: Literal["lora", "full"] = "lora"
    """``lora`` trains a low-rank adapter on a frozen base; ``full`` trains every weight (small models)."""
    epochs: float = 3.0
    """Passes over the training set (fractions stop part-way through the last one). A pretrained
    135M student needed 3 at ``learning_rate`` 1e-3: one pass reached 0.30 held-out agreement
    where three reached 1.0 (README, "Student training defaults")."""
    learning_rate: float = 1e-3
    """Peak learning rate (linear warmup, then linear decay to 0). 1e-3 suits LoRA on a small
    pretrained model; 2e-4 (the usual large-model value) left SmolLM2-135M far from the teacher."""
    batch_tokens: int = Field(1024, ge=16)
    """Tokens per micro-batch (packed records plus their padding): what bounds activation memory,
    whatever the records' lengths. The memory check before training may lower it."""
    max_seq_len: int = Field(1024, ge=16)
    """Longest record in tokens; longer ones are left out of training (and counted), never cut."""
    lora_rank: int = 16
    """Rank of the LoRA matrices; vLLM must run with ``--max-lora-rank`` at least this."""
    lora_alpha: int = 32
    """LoRA scaling numerator: updates are scaled by ``lora_alpha / lora_rank``."""
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the LoRA branch's input. 0: on a few hundred records of one task it only slowed
    learning down."""
    lora_targets: list[str] | str = "all-linear"
    """Modules that get adapters: ``all-linear`` (every linear layer but the output head) or names."""
    share_prefix: bool = False
    """CPU training: lay the tokens a packed sequence's records begin with (chat template header,
    system prompt) out once, every record attending to them; the same losses and gradients for
    a fraction of the tokens (SmolLM2-135M LoRA, extract-ade, 120 records x 3 epochs: 293 s ->
    138 s). More records then share an optimizer step, so a recipe tuned without it makes fewer
    steps per epoch: off by default, the demo turns it on."""
    cpu_threads: Annotated[int, Field(ge=1)] | Literal["auto"] | None = None
    """Torch threads of a CPU training; None keeps the process's count (all cores); ``auto``
    trains on the cores other processes leave free, checked between optimizer steps
    (``trainer.cpu_share``). SmolLM2-135M LoRA on a 2-core machine: two threads 202 tokens/s and
    one 137 while nothing else ran; with another process keeping a core busy (a student server
    answering) two threads fell to 60 and one held 124. ``auto`` is for a training that shares
    its machine with a student server or the gateway; a fixed count repeats bit for bit."""
    min_offline_score: float = 0.8
    """Offline agreement on held-out teacher answers needed to enter shadow."""
    max_completion_tokens: int = 512
    gpus: int = Field(1, ge=1)
    """GPUs of one node a run spreads over (data-parallel, ``torchrun``); 1 trains in one process."""


class ShadowPolicy(_Strict):
    rate: float = Field(0.2, ge=0.0, le=1.0)
    """Share of the task's teacher traffic mirrored to the candidate."""
    max_concurrency: int = Field(8, ge=1)
    """Shadow calls in flight at once; more are dropped (and counted), never queued behind clients."""


class PromotePolicy(_Strict):
    scorer: Literal["auto", "exact", "json_fields", "json_valid", "tool_call", "similarity", "judge"] = "auto"
    threshold: float = Field(0.95, ge=0.0, le=1.0)
    """Pass rate the lower confidence bound must clear."""
    pass_score: float = Field(0.9, ge=0.0, le=1.0)
    """A pair passes when its score is at least this (1.0 for exact-style scorers)."""
    min_samples: int = Field(200, ge=1)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)


class AuditPolicy(_Strict):
    rate: float = Field(0.02, ge=0.0, le=1.0)
    """Share of student-served traffic also sent to the teacher and scored."""
    rollback_below: float = Field(0.90, ge=0.0, le=1.0)
    """Roll back when the upper confidence bound of the audit pass rate falls below this."""
    window: int = Field(200, ge=1)
    """Most recent audit pairs considered."""
    min_samples: int = Field(20, ge=1)
    error_burst: int = Field(5, ge=1)
    """Consecutive student errors that roll a task back at once."""
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    """One-sided confidence of the upper bound that must fall below ``rollback_below``."""


class SoftLabelPolicy(_Strict):
    """Soft labels captured live: the teacher's top-k logprobs asked for on a sampled share of
    the requests that did not ask for them (stripped from what the client gets), and learnt from
    by a KD term in training."""

    rate: float = Field(0.0, ge=0.0, le=1.0)
    """Share of the task's teacher requests captured; 0 turns capture off."""
    top_k: int = Field(5, ge=1, le=20)
    """Alternatives per answer token (OpenAI allows up to 20)."""
    weight: float = Field(0.5, ge=0.0, le=1.0)
    """The KL term's share of the loss on tokens with soft labels (the rest is cross-entropy)."""


class ValidatePolicy(_Strict):
    """Teacher answers scored by a second model before they become training data."""

    model: str | None = None
    """The checking model; the teacher's own model when unset."""
    base_url: str | None = None
    """Its OpenAI-compatible endpoint; the teacher's when unset."""
    api_key_env: str | None = None
    """The environment variable holding its key; the teacher's key when unset."""
    rate: float = Field(1.0, ge=0.0, le=1.0)
    """Share of the task's records validated (the rest enter datasets unchecked)."""
    min_score: float = Field(0.5, ge=0.0, le=1.0)
    """Answers scored below this are kept, marked, and left out of training."""
    max_concurrency: int = Field(4, ge=1)


Detector = Literal["email", "phone", "card", "iban", "ip", "api_key"]
DETECTORS: tuple[Detector, ...] = ("email", "phone", "card", "iban", "ip", "api_key")
_PATTERN_NAME = re.compile(r"^[a-z][a-z0-9_]{0,39}$")


class RedactPolicy(_Strict):
    """What is removed from a task's stored records before they reach the database, the spool,
    the shared cache or a shadow pair (``gateway.redaction``). Clients still get answers as sent."""

    enabled: bool = False
    detectors: list[Detector] = Field(default_factory=lambda: list(DETECTORS))
    """Built-in detectors: emails, phone numbers (phonenumbers), card numbers (Luhn), IBANs
    (checksum), IP addresses, API-key-shaped tokens."""
    patterns: dict[str, str] = Field(default_factory=dict)
    """Extra patterns by name (RE2 syntax: linear time, no backreferences), e.g.
    ``patient_id: "PT-\\d{6}"``; a match is stored as ``[REDACTED:<name>]``."""
    phone_region: str | None = "US"
    """Region for phone numbers written without a country code; None: only ``+<country>`` ones."""
    train_on_redacted: bool = False
    """Train on records that had something redacted (they lack what the teacher saw)."""

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: dict[str, str]) -> dict[str, str]:
        import re2

        for name, pattern in v.items():
            if not _PATTERN_NAME.match(name):
                raise ValueError(f"pattern name {name!r}: use lower-case letters, digits and _")
            try:
                re2.compile(pattern)
            except Exception as exc:
                raise ValueError(f"pattern {name!r} is not a valid RE2 expression: {exc}") from None
        return v


class RetentionPolicy(_Strict):
    body_days: int | None = Field(None, ge=1)
    """Days a record keeps its request and answer; after that ``distillgate db prune`` (and the
    gateway's daily job) clears them unless a dataset snapshot holds the record. The metered row
    (tokens, cost, latency) stays for the ledger. None keeps bodies."""


class TaskPolicy(_Strict):
    """A task's resolved settings (defaults merged with its overrides)."""

    cache: CachePolicy = Field(default_factory=CachePolicy)
    train: TrainPolicy = Field(default_factory=TrainPolicy)
    shadow: ShadowPolicy = Field(default_factory=ShadowPolicy)
    promote: PromotePolicy = Field(default_factory=PromotePolicy)
    canary: list[float] = Field(default_factory=lambda: [0.05, 0.25, 1.0])
    audit: AuditPolicy = Field(default_factory=AuditPolicy)
    distill: bool = True
    """``false`` keeps the task on the teacher for good (it is still recorded and cached)."""
    soft_labels: SoftLabelPolicy = Field(default_factory=SoftLabelPolicy)
    validate_answers: ValidatePolicy | None = Field(None, alias="validate")
    """``validate:`` in the file; off when absent."""
    redact: RedactPolicy = Field(default_factory=RedactPolicy)
    retention: RetentionPolicy = Field(default_factory=RetentionPolicy)

    @field_validator("canary")
    @classmethod
    def _canary(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < x <= 1 for x in v) or v != sorted(v) or v[-1] != 1.0:
            raise ValueError("canary steps must be increasing shares in (0, 1] ending at 1.0")
        return v


class Policy(_Strict):
    """The whole policy file."""

    teacher: TeacherEndpoint
    student: StudentEndpoint | None = None
    prices: dict[str, Price] = Field(default_factory=dict)
    """Per model name; the key ``student`` prices the student."""
    defaults: TaskPolicy = Field(default_factory=TaskPolicy)
    """What every task gets unless ``tasks`` says otherwise."""
    tasks: dict[str, TaskPolicy] = Field(default_factory=dict)
    """Each named task's settings: what the file says for it laid over ``defaults`` (sections
    merge key by key), resolved when the file is read, so a bad key fails the load with its path."""

    @model_validator(mode="before")
    @classmethod
    def _overrides_over_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            return data
        defaults = data.get("defaults") or {}
        try:
            TaskPolicy.model_validate(defaults)
        except ValidationError:
            return data  # the defaults' own errors name the bad key once, not once per task
        tasks = {
            name: overlay(defaults, override or {})
            if override is None or isinstance(override, dict)
            else override
            for name, override in data["tasks"].items()
        }
        return {**data, "tasks": tasks}

    def for_task(self, task: str) -> TaskPolicy:
        return self.tasks.get(task, self.defaults)

    def price(self, model: str) -> Price | None:
        return self.prices.get(model)


class PolicyError(ValueError):
    """The policy file is not valid; the message names each bad key with its path."""


def _explain(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        lines.append(f"{path}: {msg}")
    return "invalid policy: " + "; ".join(lines)


def parse_policy(data: Any, source: str = "policy") -> Policy:
    if not isinstance(data, dict):
        raise PolicyError(f"invalid policy: {source} must be a YAML mapping")
    try:
        return Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(_explain(exc)) from None


def load_policy(path: str | Path) -> Policy:
    """Read and validate a policy file; raises ``PolicyError`` naming every bad key."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid policy: {path} is not valid YAML: {exc}") from None
    return parse_policy(data, str(path))


class TaskPolicyRow(msgspec.Struct, kw_only=True):
    """The resolved settings of one task (or of the defaults) that decide its path to the student."""

    task: str
    distill: bool
    scorer: str
    threshold: float
    min_samples: int
    shadow_rate: float
    canary: list[float]
    audit_rate: float
    rollback_below: float
    cache: bool


class TeacherSummary(msgspec.Struct, kw_only=True):
    base_url: str
    model: str | None


class StudentSummary(msgspec.Struct, kw_only=True):
    base_url: str
    base_model: str


class PolicySummary(msgspec.Struct, kw_only=True):
    """What a policy says, for people (``policy check``) and the admin API (``GET /admin/policy``)."""

    teacher: TeacherSummary
    student: StudentSummary | None
    tasks: list[TaskPolicyRow]
    """The defaults (as ``(defaults)``), then every task the policy names."""


def _summary_row(name: str, tp: TaskPolicy) -> TaskPolicyRow:
    return TaskPolicyRow(
        task=name,
        distill=tp.distill,
        scorer=tp.promote.scorer,
        threshold=tp.promote.threshold,
        min_samples=tp.promote.min_samples,
        shadow_rate=tp.shadow.rate,
        canary=list(tp.canary),
        audit_rate=tp.audit.rate,
        rollback_below=tp.audit.rollback_below,
        cache=tp.cache.enabled,
    )


def policy_summary(policy: Policy) -> PolicySummary:
    """The resolved settings of the defaults and of every task named in the policy."""
    rows = [_summary_row("(defaults)", policy.defaults)]
    rows += [_summary_row(name, policy.for_task(name)) for name in policy.tasks]
    student = policy.student
    return PolicySummary(
        teacher=TeacherSummary(base_url=policy.teacher.base_url, model=policy.teacher.model),
        student=StudentSummary(base_url=student.base_url, base_model=student.base_model) if student else None,
        tasks=rows,
    )
