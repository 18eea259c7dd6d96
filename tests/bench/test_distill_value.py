"""The distillation-value bench runs end to end at a tiny size and prints its table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_reports_agreement_per_configuration_and_size() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "distill_value.py"),
            *("--sizes", "4,8", "--seeds", "1", "--held-out", "4", "--teacher-records", "24"),
            *("--teacher-epochs", "20", "--teacher-rounds", "1", "--min-teacher-agreement", "0"),
            *("--pretrain-records", "40", "--pretrain-epochs", "1", "--min-passes", "16", "--json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert set(result["agreement"]) == {"sft", "kd", "sft+wrong", "sft+validated"}
    for config, by_size in result["agreement"].items():
        assert set(by_size) == {"4", "8"}, config
        assert all(0.0 <= value <= 1.0 for value in by_size.values())
    assert result["threshold"] == 0.8
    assert set(result["smallest_passing"]) == set(result["agreement"])
    # Validation went through AnswerChecker and the scripted teacher: one call per record, and
    # every injected wrong answer (every 4th of 8) failed its check and left the training set.
    checks = result["validation"]
    assert checks["checker_calls"] == checks["checked"] == 8
    assert checks["injected"] == checks["failed_injected"] == 2
    assert result["trained_on"]["sft+validated"]["8"] == 8 - checks["failed"]
    assert result["trained_on"]["sft+wrong"]["8"] == 8


def test_a_teacher_under_the_bar_stops_the_bench() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "distill_value.py"),
            *("--sizes", "4", "--seeds", "1", "--held-out", "4", "--teacher-records", "8"),
            *("--teacher-epochs", "1", "--teacher-rounds", "1", "--min-teacher-agreement", "1.01"),
            *(
                "--pretrain-records",
                "0",
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert "--min-teacher-agreement" in done.stderr
