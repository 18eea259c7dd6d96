"""The promotion/rollback gate: Wilson bounds, thresholds met exactly, too few samples, drift, error bursts."""

from __future__ import annotations

import math
from typing import Any

import pytest

from gateway.store.models import Stage
from router.gate import PairSummary, evaluate_audit, evaluate_promotion, wilson_interval, z_one_sided
from router.policy import TaskPolicy


def policy(**override: Any) -> TaskPolicy:
    data: dict[str, Any] = {
        "promote": {"threshold": 0.9, "min_samples": 100, "confidence": 0.95},
        "audit": {
            "rollback_below": 0.8,
            "min_samples": 20,
            "error_burst": 5,
            "confidence": 0.95,
            "window": 200,
        },
        "canary": [0.05, 0.25, 1.0],
    }
    data.update(override)
    return TaskPolicy.model_validate(data)


def test_z_is_the_one_sided_normal_quantile() -> None:
    assert z_one_sided(0.95) == pytest.approx(1.644854, abs=1e-6)
    assert z_one_sided(0.975) == pytest.approx(1.959964, abs=1e-6)


def test_wilson_interval_matches_hand_computed_values() -> None:
    # 8/10 at z = 1.959964 (two-sided 95%, i.e. one-sided 97.5%): the textbook (0.4902, 0.9433).
    lower, upper = wilson_interval(8, 10, 0.975)
    assert (lower, upper) == (pytest.approx(0.4902, abs=5e-5), pytest.approx(0.9433, abs=5e-5))
    # All passed: the lower bound is n / (n + z²), the upper bound 1.
    z = z_one_sided(0.95)
    lower, upper = wilson_interval(200, 200, 0.95)
    assert lower == pytest.approx(200 / (200 + z * z), abs=1e-12)
    assert upper == pytest.approx(1.0)
    # None passed mirrors it.
    lower, upper = wilson_interval(0, 200, 0.95)
    assert lower == pytest.approx(0.0, abs=1e-12)
    assert upper == pytest.approx(z * z / (200 + z * z), abs=1e-12)


def test_wilson_interval_with_no_pairs_knows_nothing_and_rejects_impossible_counts() -> None:
    assert wilson_interval(0, 0, 0.95) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(11, 10, 0.95)


def test_more_evidence_narrows_the_interval_around_the_rate() -> None:
    small = wilson_interval(45, 50, 0.95)
    large = wilson_interval(900, 1000, 0.95)
    assert small[0] < large[0] < 0.9 < large[1] < small[1]


def test_too_few_pairs_hold_even_when_all_passed() -> None:
    v = evaluate_promotion(PairSummary(n=99, passed=99), policy(), Stage.shadow)
    assert v.action == "hold"
    assert "99/100" in v.reason
    assert v.evidence["n"] == 99 and v.evidence["min_samples"] == 100


def test_shadow_promotes_when_the_lower_bound_clears_the_threshold() -> None:
    v = evaluate_promotion(PairSummary(n=200, passed=198), policy(), Stage.shadow)
    assert v.action == "promote"
    assert v.evidence["lower"] >= 0.9 and v.evidence["threshold"] == 0.9
    assert set(v.evidence) >= {"n", "passed", "rate", "lower", "upper", "threshold", "confidence"}


def test_a_high_rate_with_a_low_lower_bound_holds() -> None:
    # 92/100 is above 0.9, but the lower bound (≈ 0.861) is not: not yet proven.
    v = evaluate_promotion(PairSummary(n=100, passed=92), policy(), Stage.shadow)
    assert v.action == "hold"
    assert v.evidence["rate"] == 0.92 and v.evidence["lower"] < 0.9


def test_threshold_exactly_met_counts_as_pass() -> None:
    lower, _ = wilson_interval(190, 200, 0.95)
    exact = policy(promote={"threshold": lower, "min_samples": 200, "confidence": 0.95})
    assert evaluate_promotion(PairSummary(n=200, passed=190), exact, Stage.shadow).action == "promote"
    above = policy(promote={"threshold": lower + 1e-6, "min_samples": 200, "confidence": 0.95})
    assert evaluate_promotion(PairSummary(n=200, passed=190), above, Stage.shadow).action == "hold"


def test_min_samples_exactly_met_is_enough() -> None:
    p = policy(promote={"threshold": 0.5, "min_samples": 50, "confidence": 0.95})
    assert evaluate_promotion(PairSummary(n=50, passed=50), p, Stage.shadow).action == "promote"
    assert evaluate_promotion(PairSummary(n=49, passed=49), p, Stage.shadow).action == "hold"


def test_a_failing_shadow_candidate_only_holds() -> None:
    v = evaluate_promotion(PairSummary(n=1000, passed=100), policy(), Stage.shadow)
    assert v.action == "hold"


def test_canary_steps_advance_then_the_last_promotes_to_serving() -> None:
    good = PairSummary(n=200, passed=200)
    first = evaluate_promotion(good, policy(), Stage.canary, canary_step=0)
    second = evaluate_promotion(good, policy(), Stage.canary, canary_step=1)
    last = evaluate_promotion(good, policy(), Stage.canary, canary_step=2)
    assert (first.action, second.action, last.action) == ("advance_canary", "advance_canary", "promote")
    assert last.evidence["canary_step"] == 2 and "last canary step" in last.reason


def test_a_canary_step_without_its_own_evidence_holds() -> None:
    v = evaluate_promotion(PairSummary(n=0, passed=0), policy(), Stage.canary, canary_step=1)
    assert v.action == "hold" and "0/100" in v.reason


def test_canary_evidence_significantly_below_the_line_rolls_back() -> None:
    v = evaluate_promotion(PairSummary(n=40, passed=20), policy(), Stage.canary, canary_step=0)
    assert v.action == "rollback"
    assert v.evidence["upper_rollback"] < 0.8


@pytest.mark.parametrize(
    "stage", [Stage.collecting, Stage.training, Stage.serving, Stage.rolled_back, Stage.paused]
)
def test_other_stages_are_not_promoted_by_the_gate(stage: Stage) -> None:
    assert evaluate_promotion(PairSummary(n=500, passed=500), policy(), stage).action == "hold"


def test_audit_holds_below_min_samples_even_when_all_fail() -> None:
    v = evaluate_audit(PairSummary(n=19, passed=0), policy())
    assert v.action == "hold" and "19/20" in v.reason


def test_audit_drift_rolls_back_when_the_upper_bound_falls_below_the_line() -> None:
    v = evaluate_audit(PairSummary(n=200, passed=140), policy())
    assert v.action == "rollback"
    assert v.evidence["upper"] < 0.8 and v.evidence["rollback_below"] == 0.8


def test_a_small_dip_that_is_not_significant_holds() -> None:
    # 15/20 = 0.75 is below 0.8, but with 20 pairs the upper bound (≈ 0.88) is not.
    v = evaluate_audit(PairSummary(n=20, passed=15), policy())
    assert v.action == "hold" and v.evidence["upper"] > 0.8


def test_audit_upper_bound_exactly_at_the_line_holds() -> None:
    _, upper = wilson_interval(150, 200, 0.95)
    at_line = policy(audit={"rollback_below": upper, "min_samples": 20, "confidence": 0.95})
    assert evaluate_audit(PairSummary(n=200, passed=150), at_line).action == "hold"
    above = policy(audit={"rollback_below": upper + 1e-6, "min_samples": 20, "confidence": 0.95})
    assert evaluate_audit(PairSummary(n=200, passed=150), above).action == "rollback"


def test_an_error_burst_rolls_back_at_once_whatever_the_window() -> None:
    v = evaluate_audit(PairSummary(n=3, passed=3, consecutive_errors=5), policy())
    assert v.action == "rollback" and "5 consecutive student errors" in v.reason
    assert evaluate_audit(PairSummary(n=3, passed=3, consecutive_errors=4), policy()).action == "hold"


def test_pair_summary_counts_the_trailing_error_streak() -> None:
    outcomes = [(True, False), (False, True), (False, True), (True, False), (False, True), (False, True)]
    s = PairSummary.from_outcomes(outcomes)
    assert (s.n, s.passed, s.consecutive_errors) == (6, 2, 2)
    assert s.rate == pytest.approx(2 / 6)
    assert PairSummary.from_outcomes([]).rate == 0.0


def test_lower_bound_is_conservative_against_simulated_truth() -> None:
    # A student whose true pass rate is just under the threshold promotes rarely: the bound's
    # one-sided 95% confidence means at most ~5% of evaluations (here: exactly computed with
    # the binomial distribution) clear it.
    n, p_true = 200, 0.9
    p = policy(promote={"threshold": 0.9, "min_samples": n, "confidence": 0.95})
    promote_prob = 0.0
    for passed in range(n + 1):
        if evaluate_promotion(PairSummary(n=n, passed=passed), p, Stage.shadow).action == "promote":
            promote_prob += math.comb(n, passed) * p_true**passed * (1 - p_true) ** (n - passed)
    assert 0.0 < promote_prob <= 0.06
