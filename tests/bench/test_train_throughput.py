"""The training-throughput bench runs on a CPU at tiny sizes, and its fast path trains like the plain loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from trainer.tinymodel import train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORDS = [
    "river",
    "stone",
    "cloud",
    "lamp",
    "market",
    "garden",
    "window",
    "orange",
    "silver",
    "travel",
    "winter",
    "paper",
    "engine",
]


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    tokenizer = train_tokenizer([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 20, 400)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "train_throughput.py"),
            "--json",
            "--tokenizer",
            str(tmp_path / "tokenizer"),
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_every_variant_runs_and_the_fast_path_follows_the_plain_loops_loss_curve(tmp_path: Path) -> None:
    out = run_bench(
        tmp_path,
        *("--records", "40", "--median", "40", "--max-len", "128", "--steps", "3", "--budget-steps", "3"),
        *("--plain-batch", "8", "--finetune-records", "40", "--rows", "256x2,512x1"),
        "--check",
    )
    results = {r["variant"]: r for r in out["results"]}
    assert set(results) == {
        "plain",
        "finetune",
        "fast-eager 256 x 2",
        "fast 256 x 2",
        "fast-eager 512 x 1",
        "fast 512 x 1",
        "fast-same",
    }
    for r in results.values():
        assert r["error"] is None, r
        assert r["useful_tok_s"] > 0 and r["labelled_tok_s"] > 0
        assert len(r["losses"]) == 3 and all(9 > loss > 1 for loss in r["losses"])
    # Same records in the same steps: packed rows with per-record attention and logits only at
    # labelled positions give the padded loop's losses (fp32 on a CPU: to rounding).
    assert results["fast-same"]["reference"] == "plain"
    assert results["fast-same"]["max_loss_delta"] < 1e-4
    assert results["fast 256 x 2"]["reference"] == "fast-eager 256 x 2"
    assert results["fast 512 x 1"]["real_share"] > results["plain"]["real_share"]
    assert all(c[k] < 1e-6 for c in out["checks"] for k in ("out", "dq", "dk", "dv"))
