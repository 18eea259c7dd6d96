"""The whole loop, unattended, as a new user runs it: ``distillgate demo --quick --json``.

Scripted teacher + gateway (SQLite) + embedded student in a subprocess; traffic flows, the
scheduler trains a from-scratch student, evaluates it offline, shadows, canaries and promotes.
Minutes, not seconds: this is the one end-to-end test of the product promise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIELDS = {
    "stage",
    "agreement",
    "student_share",
    "spend_usd",
    "savings_usd",
    "teacher_p50_ms",
    "student_p50_ms",
    "reason",
}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_promotes_a_task_that_the_student_learned_and_keeps_the_rest_on_the_teacher(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "demo",
            "--quick",
            "--json",
            "--workdir",
            str(tmp_path / "demo"),
            "--max-minutes",
            "20",
        ],
        capture_output=True,
        text=True,
        timeout=1450,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary) >= {"tasks", "wall_s", "failed_requests"}
    assert summary["failed_requests"] == 0
    tasks = summary["tasks"]
    assert set(tasks) == {"classify-email", "extract-ade"}
    for row in tasks.values():
        assert set(row) >= FIELDS
    serving = {name: row for name, row in tasks.items() if row["stage"] == "serving"}
    assert serving, json.dumps(tasks, indent=1)
    for name, row in serving.items():
        assert row["agreement"] >= 0.95, (name, row)
        assert row["student_share"] > 0.9, (name, row)
        assert row["savings_usd"] > 0 and row["student_p50_ms"] is not None
    for name, row in tasks.items():
        if name not in serving:
            assert row["student_share"] == 0.0, (name, row)
            assert row["reason"], (name, row)  # why it stays on the teacher is shown
    # The human-readable table goes to stderr, the JSON alone to stdout's last line.
    assert "distillgate demo" in done.stderr
