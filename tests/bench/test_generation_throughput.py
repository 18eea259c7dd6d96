"""The generation-throughput bench runs at tiny size, and our decode loop answers exactly as
transformers' ``generate`` does, one at a time and batched."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_bench_prints_both_engines_single_and_batched_with_the_same_answers() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "generation_throughput.py"),
            *(
                "--model",
                "tiny",
                "--prompts",
                "6",
                "--answer-tokens",
                "8",
                "--threads",
                "1",
                "--rounds",
                "2",
                "--json",
            ),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "vs transformers" in done.stdout
    result = json.loads(done.stdout.splitlines()[-1])
    rows = {(r["mode"], r["engine"]): r for r in result["rows"]}
    assert set(rows) == {(m, e) for m in ("single", "batched") for e in ("transformers", "ours")}
    for r in rows.values():
        assert r["answers"] == 6 and r["tokens"] > 0 and r["tok_s"] > 0
        assert r["same"] == 6, r  # greedy: every engine gives transformers' one-at-a-time answers
    assert rows[("batched", "ours")]["mean_batch"] > 1
    assert rows[("single", "transformers")]["vs_transformers"] == 1.0
