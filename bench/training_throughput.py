"""Training throughput of ``trainer.finetune`` (LoRA and full) against a bare torch loop.

Builds a tiny model from scratch (tokenizer trained on the spot), makes a synthetic
classification + tool-call workload, and times, in one process on the same packed batches:

- baseline: forward + backward + AdamW on the bare transformers model, nothing else;
- full:     ``finetune(method="full")``;
- lora:     ``finetune(method="lora")``.

tokens/s counts non-padding tokens through forward and backward (evaluation excluded).
Runs on CPU or, with ``--device cuda``, a GPU (bf16 autocast there).

    python bench/training_throughput.py                      # the test model, this machine
    python bench/training_throughput.py --size small --steps 50 --device cuda
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

SIZES = {
    # name: (hidden, layers, heads, kv heads, intermediate, vocab)
    "tiny": (64, 2, 4, 2, 128, 512),  # the model tests/trainer uses
    "small": (256, 4, 8, 4, 768, 2048),
    "medium": (768, 12, 12, 4, 2048, 8192),
}
LABELS = {
    "billing": ["invoice", "refund", "charge"],
    "support": ["broken", "error", "login"],
    "sales": ["pricing", "quote", "demo"],
    "spam": ["winner", "prize", "free"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@dataclass(frozen=True)
class Demo:
    """A training conversation (what ``finetune`` reads; the store is not needed here)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


def workload(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """OpenAI-format conversations: three email classifications for every weather tool call."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 4 == 3:
            city = rng.choice(["Paris", "Oslo", "Lima", "Rome", "Cairo"])
            call = {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
            }
            out.append(
                {
                    "tools": [TOOL],
                    "messages": [
                        {"role": "user", "content": f"Weather in {city} please (#{i})"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                    ],
                }
            )
        else:
            label = list(LABELS)[i % 4]
            words = [rng.choice(["please", "hello", "account", "today", "my"]) for _ in range(8)]
            words += [rng.choice(LABELS[label]) for _ in range(2)]
            rng.shuffle(words)
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "Classify the email: billing, support, sales or spam."},
                        {"role": "user", "content": f"Email {i}: " + " ".join(words)},
                        {"role": "assistant", "content": label},
                    ]
                }
            )
    return out


def baseline(model_dir: Path, train: list[Any], cfg: Any, device: str, bf16: bool) -> dict[str, Any]:
    """The same packed batches through a bare forward/backward/AdamW loop."""
    import contextlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.collate import Collator, pack, tokenize_example
    from trainer.finetune import token_loss_sum

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenized = [tokenize_example(tokenizer, ex.messages, ex.tools) for ex in train]
    random.Random(cfg.seed).shuffle(tokenized)
    sequences = pack([t for t in tokenized if len(t) <= cfg.max_seq_len], cfg.max_seq_len)
    collate = Collator(tokenizer.pad_token_id)
    batches = [collate(sequences[k : k + cfg.batch_size]) for k in range(0, len(sequences), cfg.batch_size)]
    torch.manual_seed(cfg.seed)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    tokens = steps = 0
    elapsed = 0.0
    while steps < cfg.max_steps:
        for batch in batches:
            if steps >= cfg.max_steps:
                break
            t0 = time.perf_counter()
            inputs = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                logits = model(
                    input_ids=inputs["input_ids"], position_ids=inputs["position_ids"], use_cache=False
                ).logits
            loss = token_loss_sum(logits, inputs["labels"]) / max(1, int((inputs["labels"] != -100).sum()))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            elapsed += time.perf_counter() - t0
            tokens += int((inputs["input_ids"] != tokenizer.pad_token_id).sum())
            steps += 1
    params = sum(p.numel() for p in model.parameters())
    return {
        "method": "baseline (bare loop)",
        "steps": steps,
        "tokens": tokens,
        "train_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed else 0.0,
        "trainable": params,
        "total": params,
        "loss": "-",
        "wall_s": elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per method")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args()

    import torch

    from trainer.finetune import FinetuneConfig, finetune, pick_device, use_bf16
    from trainer.tinymodel import TinyModelSpec, build_tiny_model, conversation_texts

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    bf16 = use_bf16("auto", device)
    hidden, layers, heads, kv, inter, vocab = SIZES[args.size]
    conversations = workload(args.examples)
    examples = [Demo(c["messages"], c.get("tools")) for c in conversations]
    holdout, train = examples[: len(examples) // 10], examples[len(examples) // 10 :]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        spec = TinyModelSpec(
            vocab_size=vocab,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=kv,
            intermediate_size=inter,
            max_position_embeddings=2048,
        )
        model_dir = build_tiny_model(Path(tmp) / "model", conversation_texts(conversations), spec)
        common = {
            "max_steps": args.steps,
            "epochs": 1000.0,
            "batch_size": args.batch_size,
            "max_seq_len": args.max_seq_len,
            "eval_every": 10**9,
            "early_stopping_patience": 0,
        }
        full_cfg = FinetuneConfig(method="full", learning_rate=3e-3, **common)
        # Untimed warm-up (CUDA context, kernels, allocator), so the first timed row does not pay for it.
        baseline(model_dir, train, replace(full_cfg, max_steps=3), device, bf16)
        rows.append(baseline(model_dir, train, full_cfg, device, bf16))
        methods: tuple[tuple[Literal["full", "lora"], float], ...] = (("full", 3e-3), ("lora", 2e-2))
        for method, lr in methods:
            cfg = FinetuneConfig(method=method, learning_rate=lr, lora_rank=16, lora_alpha=32, **common)
            result = finetune(model_dir, train, holdout, Path(tmp) / method, cfg)
            rows.append(
                {
                    "method": method,
                    "steps": result.steps,
                    "tokens": result.tokens,
                    "train_s": result.train_s,
                    "tokens_per_s": result.tokens_per_s,
                    "trainable": result.trainable_parameters,
                    "total": result.total_parameters,
                    "loss": f"{result.eval_loss_before:.3f} → {result.eval_loss_after:.3f}",
                    "wall_s": result.wall_s,
                }
            )
    info = {
        "size": args.size,
        "device": device,
        "precision": "bf16" if bf16 else "fp32",
        "threads": torch.get_num_threads(),
        "examples": len(train),
        "batch_size": args.batch_size,
        "max_seq_len": args.max_seq_len,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps({"setup": info, "rows": rows}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="training throughput · " + " · ".join(f"{k} {v}" for k, v in info.items()))
    for column in (
        "method",
        "steps",
        "tokens",
        "train s",
        "tokens/s",
        "vs baseline",
        "trainable / total params",
        "held-out loss",
        "wall s",
    ):
        table.add_column(column, justify="left" if column in ("method", "held-out loss") else "right")
    base = rows[0]["tokens_per_s"] or 1.0
    for row in rows:
        table.add_row(
            row["method"],
            str(row["steps"]),
            f"{row['tokens']:,}",
            f"{row['train_s']:.2f}",
            f"{row['tokens_per_s']:,.0f}",
            f"{row['tokens_per_s'] / base:.2f}x",
            f"{row['trainable']:,} / {row['total']:,}",
            row["loss"],
            f"{row['wall_s']:.2f}",
        )
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
