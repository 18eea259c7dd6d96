"""The promotion and rollback gate: pure verdicts from counts of scored shadow pairs.

Traffic moves to the student only when a Wilson lower bound clears the policy's threshold,
and moves back when a Wilson upper bound shows quality fell, or the student keeps failing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, Literal

from gateway.store.models import Stage
from router.policy import TaskPolicy

Action = Literal["hold", "promote", "advance_canary", "rollback"]

_EPS = 1e-12
"""Float slack so that a bound exactly equal to its threshold counts as meeting it."""


@dataclass(frozen=True)
class PairSummary:
    """Counts over a set of scored pairs (all since a stage began, or an audit window)."""

    n: int
    passed: int
    consecutive_errors: int = 0
    """Student errors at the newest end of the pairs, without a success in between."""

    @classmethod
    def from_outcomes(cls, outcomes: Iterable[tuple[bool, bool]]) -> PairSummary:
        """From ``(passed, student_error)`` per pair, oldest first."""
        n = passed = streak = 0
        for ok, error in outcomes:
            n += 1
            passed += bool(ok)
            streak = streak + 1 if error else 0
        return cls(n=n, passed=passed, consecutive_errors=streak)

    @property
    def rate(self) -> float:
        return self.passed / self.n if self.n else 0.0


@dataclass(frozen=True)
class GateVerdict:
    """What to do with a task now, why, and the numbers behind it (stored with the transition)."""

    action: Action
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


def z_one_sided(confidence: float) -> float:
    """The standard normal quantile ``z`` with ``P(Z <= z) = confidence`` (1.645 at 0.95)."""
    return NormalDist().inv_cdf(confidence)


def wilson_interval(passed: int, n: int, confidence: float) -> tuple[float, float]:
    """One-sided Wilson score bounds ``(lower, upper)`` of a pass rate at ``confidence``.

    With p̂ = passed/n and z = Φ⁻¹(confidence)::

        centre = (p̂ + z²/2n) / (1 + z²/n)
        half   = z · sqrt(p̂(1 - p̂)/n + z²/4n²) / (1 + z²/n)
        lower, upper = centre - half, centre + half

    Each bound is one-sided: the true rate is at least ``lower`` (at most ``upper``) with
    probability ``confidence``. Unlike the normal approximation it stays inside [0, 1] and
    behaves at p̂ = 0 or 1 and small n (Wilson 1927). With n = 0 nothing is known: (0, 1).
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= passed <= n:
        raise ValueError(f"passed must be between 0 and n={n}, got {passed}")
    z = z_one_sided(confidence)
    p = passed / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _numbers(summary: PairSummary, confidence: float, **extra: Any) -> dict[str, Any]:
    lower, upper = wilson_interval(summary.passed, summary.n, confidence)
    return {
        "n": summary.n,
        "passed": summary.passed,
        "rate": round(summary.rate, 6),
        "lower": round(lower, 6),
        "upper": round(upper, 6),
        "confidence": confidence,
        **extra,
    }


def evaluate_promotion(
    summary: PairSummary, policy: TaskPolicy, stage: Stage | str, canary_step: int = 0
) -> GateVerdict:
    """Decide whether a task in shadow or canary moves up, stays, or (canary) rolls back.

    ``summary`` counts only the pairs since the current stage, or canary step, began: each step
    earns its own evidence. With at least ``promote.min_samples`` pairs, a Wilson lower bound
    (``promote.confidence``) at or above ``promote.threshold`` promotes: shadow → canary
    (``promote``), canary step i → i+1 (``advance_canary``), the last step → serving
    (``promote``). A canary step whose evidence has an upper bound (``audit.confidence``)
    below ``audit.rollback_below`` over at least ``audit.min_samples`` pairs rolls back: the
    student already serves real traffic there. A shadow candidate that fails only holds, since
    it serves nobody.
    """
    stage = Stage(stage)
    promote = policy.promote
    evidence = _numbers(
        summary,
        promote.confidence,
        threshold=promote.threshold,
        min_samples=promote.min_samples,
        stage=stage,
        **({"canary_step": canary_step} if stage is Stage.canary else {}),
    )
    if stage not in (Stage.shadow, Stage.canary):
        return GateVerdict("hold", f"stage {stage} is not promoted by the gate", evidence)

    if stage is Stage.canary:
        audit = policy.audit
        _, upper = wilson_interval(summary.passed, summary.n, audit.confidence)
        if summary.n >= audit.min_samples and upper < audit.rollback_below - _EPS:
            evidence.update(
                rollback_below=audit.rollback_below,
                upper_rollback=round(upper, 6),
                rollback_confidence=audit.confidence,
            )
            return GateVerdict(
                "rollback",
                f"canary step {canary_step}: pass rate {summary.rate:.3f} over {summary.n} pairs, "
                f"upper bound {upper:.3f} < {audit.rollback_below}",
                evidence,
            )

    if summary.n < promote.min_samples:
        return GateVerdict("hold", f"{summary.n}/{promote.min_samples} pairs so far", evidence)
    lower = evidence["lower"]
    exact_lower, _ = wilson_interval(summary.passed, summary.n, promote.confidence)
    if exact_lower < promote.threshold - _EPS:
        return GateVerdict(
            "hold",
            f"lower bound {lower:.3f} of pass rate {summary.rate:.3f} over {summary.n} pairs is below "
            f"{promote.threshold}",
            evidence,
        )
    cleared = f"lower bound {lower:.3f} ≥ {promote.threshold} over {summary.n} pairs"
    if stage is Stage.shadow:
        return GateVerdict("promote", f"shadow: {cleared}", evidence)
    if canary_step + 1 < len(policy.canary):
        return GateVerdict("advance_canary", f"canary step {canary_step}: {cleared}", evidence)
    return GateVerdict("promote", f"last canary step {canary_step}: {cleared}", evidence)


def evaluate_audit(window: PairSummary, policy: TaskPolicy) -> GateVerdict:
    """Decide whether a task the student serves (canary or serving) must go back to the teacher.

    ``window`` covers the most recent ``audit.window`` pairs. A burst of
    ``audit.error_burst`` consecutive student errors rolls back at once, whatever the window.
    Otherwise, with at least ``audit.min_samples`` pairs, a Wilson upper bound
    (``audit.confidence``) strictly below ``audit.rollback_below`` rolls back: the drop is
    significant, not noise. An upper bound exactly at the line holds.
    """
    audit = policy.audit
    evidence = _numbers(
        window,
        audit.confidence,
        rollback_below=audit.rollback_below,
        min_samples=audit.min_samples,
        window=audit.window,
        consecutive_errors=window.consecutive_errors,
        error_burst=audit.error_burst,
    )
    if window.consecutive_errors >= audit.error_burst:
        return GateVerdict(
            "rollback",
            f"{window.consecutive_errors} consecutive student errors (burst limit {audit.error_burst})",
            evidence,
        )
    if window.n < audit.min_samples:
        return GateVerdict("hold", f"{window.n}/{audit.min_samples} audit pairs so far", evidence)
    _, upper = wilson_interval(window.passed, window.n, audit.confidence)
    if upper < audit.rollback_below - _EPS:
        return GateVerdict(
            "rollback",
            f"audit pass rate {window.rate:.3f} over {window.n} pairs, upper bound {upper:.3f} < "
            f"{audit.rollback_below}",
            evidence,
        )
    return GateVerdict(
        "hold", f"audit pass rate {window.rate:.3f} over {window.n} pairs (upper bound {upper:.3f})", evidence
    )
