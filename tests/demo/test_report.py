"""The demo's closing report as a log or a pipe shows it: one line per task, never wrapped."""

from __future__ import annotations

import pytest

from demo.run import NONE, final_report, report_console


def _row(stage: str, **values: object) -> dict[str, object]:
    row: dict[str, object] = {
        "stage": stage,
        "base_agreement": None,
        "agreement": None,
        "teacher_agreement": None,
        "live_agreement": None,
        "student_share": 0.0,
        "cost_cut": None,
        "teacher_p50_ms": 12.5,
        "student_p50_ms": None,
        "train_s": None,
        "tokens_per_s": None,
        "train_peak_rss_mb": None,
        "reason": None,
    }
    return row | values


def test_the_final_table_keeps_one_line_per_task_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    summary = {
        "wall_s": 812.4,
        "requests": 4321,
        "failed_requests": 0,
        "peak_rss_mb": {"gateway": 812.0, "largest_child": 2900.0, "student_server": 1100.0},
        "tasks": {
            "classify-email": _row(
                "serving",
                base_agreement=0.0,
                agreement=0.975,
                teacher_agreement=1.0,
                live_agreement=0.99,
                student_share=1.0,
                cost_cut=0.982,
                student_p50_ms=250.0,
                train_s=171.0,
                tokens_per_s=269.0,
                train_peak_rss_mb=2650.0,
                reason="last canary step 1: lower bound 0.917 ≥ 0.9 over 30 pairs",
            ),
            "extract-ade": _row(
                "collecting",
                reason="offline agreement on 40 held-out teacher answers: base 0.000 → fine-tuned 0.500"
                " → teacher 1.000 (bar 0.90): stays on the teacher, and this reason is long on purpose",
            ),
        },
    }
    console = report_console()  # stderr is captured: not a terminal
    assert not console.is_terminal
    final_report(console, summary)
    err = capsys.readouterr().err
    lines = err.splitlines()
    served = [line for line in lines if "classify-email" in line and "serving" in line]
    assert len(served) == 1
    assert "classify-email: last canary step 1: lower bound 0.917 ≥ 0.9 over 30 pairs" in lines
    row = served[0]
    for cell in ("0.000 → 0.975 → 1.000", "0.990", "100%", "98.2%", "250.0", "171", "269", "2650"):
        assert cell in row, (cell, row)
    untrained = next(line for line in lines if "extract-ade" in line and "collecting" in line)
    # No student answers yet: no live agreement, no cost cut, no offline numbers — not 1.0, not 0.
    assert untrained.count(NONE) >= 5 and "1.000" not in untrained
    assert any(
        line.startswith("extract-ade: offline agreement") and line.endswith("on purpose") for line in lines
    )
    assert "largest child 2900 MB" in err
