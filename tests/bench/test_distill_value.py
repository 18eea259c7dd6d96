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
            *("--sizes", "4,8", "--held-out", "4", "--teacher-records", "24", "--teacher-epochs", "20"),
            *("--epochs", "2", "--json"),
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
