"""The cost ledger's arithmetic: USD for an exchange from its usage and the policy's price table
(tokens are priced by ``router.policy.token_cost``, which every layer shares)."""

from __future__ import annotations

from dataclasses import dataclass

from router.policy import Policy, token_cost

STUDENT_PRICE_KEY = "student"


@dataclass(frozen=True, slots=True)
class Cost:
    usd: float
    """What this exchange cost on the target that served it."""
    teacher_usd: float
    """What the teacher would have charged for the same tokens."""

    @property
    def savings_usd(self) -> float:
        return self.teacher_usd - self.usd


def exchange_cost(
    policy: Policy | None,
    *,
    target: str,
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    latency_s: float = 0.0,
) -> Cost:
    """Cost of an exchange served by ``target`` (teacher | student:<adapter> | cache).

    The teacher-equivalent cost prices the same tokens at the requested model's teacher price
    (falling back to the policy's teacher model), so savings = teacher-equivalent - actual.
    A cache hit costs nothing; a student costs its token price plus its GPU-hour price
    spread over the time it spent on this request.
    """
    if policy is None:
        return Cost(0.0, 0.0)
    teacher_price = policy.price(model) or (
        policy.price(policy.teacher.model) if policy.teacher.model else None
    )
    teacher_usd = token_cost(teacher_price, prompt_tokens, completion_tokens, cached_tokens)
    if target == "teacher":
        return Cost(teacher_usd, teacher_usd)
    if target == "cache":
        return Cost(0.0, teacher_usd)
    student = policy.price(STUDENT_PRICE_KEY)
    usd = token_cost(student, prompt_tokens, completion_tokens)
    if student is not None and student.gpu_hour:
        usd += student.gpu_hour * latency_s / 3600.0
    return Cost(usd, teacher_usd)
