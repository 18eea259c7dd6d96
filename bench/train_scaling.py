"""Data-parallel scaling of ``trainer.finetune`` (issue 21): the same records, model and optimizer
steps at 1, 2, 4, 8 ranks, each run a ``torchrun`` job started by ``trainer.distributed.Torchrun``
(the launcher ``distillgate train --gpus N`` uses).

Every world size makes the same optimizer steps: a step is ``--rows-per-step`` rows (default: the
largest world size asked for), shared out one or more per rank, so the loss curves must agree
(bf16 noise on a GPU, ~1e-5 in fp32 on a CPU) and tokens per step are equal. Columns: steady
tok/s (record tokens per second after the first two steps, which compile), scaling efficiency
(tok/s at N over N times tok/s at 1), MFU (as in bench/train_throughput.py), seconds of the
first two steps, and the largest loss difference against world size 1.

    python bench/train_scaling.py                                    # tiny model, 2 CPU ranks (gloo)
    python bench/train_scaling.py --device cuda --model smollm2-360m --gpus 1,2,4,8 --tokenizer DIR \
        --records 3000 --median 200 --max-len 2048 --steps 30
    # one GPU, two ranks sharing it over gloo: checks the DDP path on CUDA, not a scaling figure
    python bench/train_scaling.py --device cuda --model smollm2-360m --gpus 1,2 --backend gloo \
        --records 1500 --median 200 --max-len 2048 --row-tokens 16384 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import (
    ARCHITECTURES,
    LORA_ALPHA,
    LORA_RANK,
    Setup,
    build_model,
    load_tokenizer,
    make_records,
    peak_flops,
    tokenize_all,
)

from trainer.distributed import BACKEND_ENV, Torchrun
from trainer.finetune import FinetuneConfig, finetune


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny", help=f"one of {', '.join(ARCHITECTURES)}")
    parser.add_argument("--gpus", default="1,2", help="world sizes, comma-separated")
    parser.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda")
    parser.add_argument("--backend", help="process-group backend (default: nccl on cuda, gloo on cpu)")
    parser.add_argument("--tokenizer", help="tokenizer directory (default: SmolLM2's)")
    parser.add_argument("--records", type=int, default=64)
    parser.add_argument("--median", type=int, default=48)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rows-per-step", type=int, help="rows per optimizer step (default: largest --gpus)")
    parser.add_argument("--row-tokens", type=int, help="row width (default: the model's in train_throughput)")
    parser.add_argument("--batch-tokens", type=int, default=512, help="CPU path: tokens per pass")
    parser.add_argument("--holdout", type=int, default=8, help="records held out: rank 0 evaluates them")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="directory for scaling.json")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.backend:
        os.environ[BACKEND_ENV] = args.backend
    # The ranks unpickle this bench's records: they import its modules from the same place.
    here = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)

    import torch

    sizes = [int(n) for n in args.gpus.split(",")]
    cuda = args.device.startswith("cuda")
    available = torch.cuda.device_count() if cuda else None
    arch = ARCHITECTURES[args.model]
    tokenizer = load_tokenizer(args.tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    records = make_records(tokenizer, args.records, args.median, 0.75, args.max_len, args.seed)
    examples = tokenize_all(tokenizer, records, args.max_len)
    holdout, train = records[: args.holdout], records[args.holdout :]
    rows_per_step = args.rows_per_step or max(sizes)
    dtype = torch.bfloat16 if cuda else torch.float32
    setup = Setup(args.model, arch, examples, records, tokenizer, pad_id, "meta", dtype, args, None)
    flops = setup.flops
    peak = peak_flops(args.device, None) if cuda else None
    mean_square = sum(len(e) ** 2 for e in examples) / max(1, sum(len(e) for e in examples))
    labelled_share = sum(e.trained_tokens for e in examples) / max(1, sum(len(e) for e in examples))
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="dg-scaling-") as tmp:
        model_dir = Path(tmp) / "base"
        build_model(arch, len(tokenizer), pad_id, dtype, "cpu", args.seed).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        config = FinetuneConfig(
            method="lora",
            lora_rank=LORA_RANK,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,  # masks are drawn per rank: with dropout the curves differ by design
            learning_rate=args.lr,
            batch_tokens=args.batch_tokens,
            gradient_accumulation_steps=rows_per_step,
            max_seq_len=args.max_len,
            max_steps=args.steps,
            epochs=1000.0,
            eval_every=max(1, args.steps // 2),
            early_stopping_patience=0,
            device="cuda" if cuda else "cpu",
            seed=args.seed,
            row_tokens=(args.row_tokens or arch.row_tokens) if cuda else None,
        )
        for n in sizes:
            row: dict[str, Any] = {"ranks": n}
            if available is not None and n > available and os.environ.get(BACKEND_ENV) != "gloo":
                row["error"] = f"skipped: {available} GPU(s) here"
                rows.append(row)
                continue
            t0 = time.perf_counter()
            try:
                result = Torchrun(n).call(
                    finetune, model_dir, train, holdout, Path(tmp) / f"adapter-{n}", config
                )
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                rows.append(row)
                continue
            seconds = result.train_s - result.warmup_s
            tokens = result.tokens - result.warmup_tokens
            work = flops.step(tokens, round(tokens * labelled_share), int(mean_square * tokens))
            row |= {
                "fast_path": result.fast_path,
                "row_tokens": result.row_tokens,
                "steps": result.steps,
                "tokens_per_step": result.tokens / max(1, result.steps),
                "tok_s": result.steady_tokens_per_s,
                "mfu": work / seconds / peak if peak and seconds > 0 else None,
                "first_s": result.warmup_s,
                "job_s": time.perf_counter() - t0,
                "losses": [loss for _, loss in result.train_losses],
                "eval_losses": [loss for _, loss in result.eval_losses],
            }
            rows.append(row)
            print(
                f"[{time.perf_counter() - started:6.1f}s] {n} rank(s): {row['tok_s']:,.0f} tok/s",
                file=sys.stderr,
            )
    base = next((r for r in rows if r["ranks"] == 1 and "tok_s" in r), None)
    for r in rows:
        if base is None or "tok_s" not in r:
            continue
        r["efficiency"] = r["tok_s"] / (r["ranks"] * base["tok_s"]) if base["tok_s"] else None
        k = min(len(r["losses"]), len(base["losses"]))
        r["max_loss_delta"] = max(
            abs(a - b) for a, b in zip(r["losses"][:k], base["losses"][:k], strict=True)
        )
        r["eval_loss_delta"] = max(
            (abs(a - b) for a, b in zip(r["eval_losses"], base["eval_losses"], strict=False)), default=None
        )
    info = {
        "model": args.model,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo"),
        "records": len(examples),
        "rows_per_step": rows_per_step,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "scaling.json").write_text(
            json.dumps({"setup": info, "rows": rows}, indent=1) + "\n"
        )
    print_table(info, rows)


def print_table(info: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="data-parallel scaling · " + " · ".join(f"{k} {v}" for k, v in info.items()))
    columns = (
        "ranks",
        "path",
        "tok/step",
        "steady tok/s",
        "efficiency",
        "MFU",
        "first s",
        "max |Δ loss|",
        "held-out |Δ|",
        "note",
    )
    for column in columns:
        table.add_column(column, justify="left" if column in ("path", "note") else "right")
    for r in rows:
        if "error" in r:
            table.add_row(str(r["ranks"]), *([""] * (len(columns) - 2)), r["error"])
            continue
        table.add_row(
            str(r["ranks"]),
            f"fast, rows of {r['row_tokens']:,}" if r["fast_path"] else "CPU",
            f"{r['tokens_per_step']:,.0f}",
            f"{r['tok_s']:,.0f}",
            f"{r['efficiency']:.0%}" if r.get("efficiency") is not None else "-",
            f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-",
            f"{r['first_s']:.1f}",
            f"{r['max_loss_delta']:.1e}" if r.get("max_loss_delta") is not None else "-",
            f"{r['eval_loss_delta']:.1e}" if r.get("eval_loss_delta") is not None else "-",
            "",
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
