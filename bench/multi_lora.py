"""Multi-LoRA decode batches (``trainer.generation``): requests for several LoRA adapters of one
base decoded in one batch (one forward of the base weights per step, each row through its own
adapter, peft's ``adapter_names``) against the same requests one adapter at a time (what a loop
with a batch per adapter costs: one forward per adapter per step).

The adapters are random LoRA weights (rank 16, all linear layers) on the base, so answers are
the base's, nudged; tok/s counts answer tokens, greedy, at most --answer-tokens each. "same"
counts answers identical between the two modes.

    python bench/multi_lora.py                    # SmolLM2-135M-Instruct (the package GGUF), 3 adapters
    python bench/multi_lora.py --model tiny       # a tiny random model, seconds
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from generation_throughput import QUESTIONS, SMOLLM2, tiny_model

from trainer.base_model import resolve_base_model
from trainer.generation import SamplingParams, StudentModels


def make_adapters(base: str, n: int, where: Path) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    names = []
    for i in range(n):
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, weight in model.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0.0, 0.01, generator=generator)
        model.save_pretrained(str(where / f"a{i}"))
        names.append(f"a{i}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=SMOLLM2, help=f"'tiny', a hub id, a local dir or a .gguf (default {SMOLLM2})"
    )
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--per-adapter", type=int, default=3, help="requests per adapter")
    parser.add_argument("--answer-tokens", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is shown")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        where = Path(scratch)
        base = tiny_model(where / "tiny") if args.model == "tiny" else resolve_base_model(args.model).path
        names = make_adapters(str(base), args.adapters, where)
        params = SamplingParams(temperature=0.0, max_tokens=args.answer_tokens)
        jobs = [(n, [{"role": "user", "content": q}]) for n in names for q in QUESTIONS[: args.per_adapter]]
        with StudentModels(str(base), served_name="base", dtype=args.dtype) as models:
            for name in names:
                models.load(name, str(where / name))
            models.chat(names[0], jobs[0][1], None, SamplingParams(temperature=0.0, max_tokens=2))

            def run(groups: list[list[tuple[str, Any]]]) -> tuple[float, list[str], int]:
                started, texts, tokens = time.perf_counter(), [], 0
                for group in groups:
                    with models.lock:  # queued together: admitted into one step
                        futures = [models.submit(n, m, None, params) for n, m in group]
                    for future in futures:
                        (choice,) = future.result().choices
                        texts.append(choice.text)
                        tokens += choice.completion_tokens
                return tokens / (time.perf_counter() - started), texts, tokens

            by_adapter = [[j for j in jobs if j[0] == n] for n in names]
            rates: dict[str, list[float]] = {"one adapter at a time": [], "all adapters in one batch": []}
            texts: dict[str, list[str]] = {}
            for r in range(args.rounds):
                order = list(rates) if r % 2 == 0 else list(reversed(rates))
                for mode in order:
                    rate, answers, _ = run(by_adapter if mode.startswith("one") else [jobs])
                    rates[mode].append(rate)
                    texts[mode] = answers
            weights = str(models.dtype).removeprefix("torch.")
    first = statistics.median(rates["one adapter at a time"])
    same = sum(a == b for a, b in zip(*texts.values(), strict=True))
    print(
        f"\n{args.model}: {args.adapters} LoRA adapters x {args.per_adapter} requests, answers <= "
        f"{args.answer_tokens} tokens, {args.threads} threads, {weights} weights, greedy, median of {args.rounds}"
    )
    head = f"{'mode':<26} {'tok/s':>7} {'vs one at a time':>16} {'same':>9}"
    print(head)
    print("-" * len(head))
    for mode, values in rates.items():
        rate = statistics.median(values)
        print(f"{mode:<26} {rate:>7.1f} {rate / first:>15.2f}x {same:>4}/{len(jobs)}")


if __name__ == "__main__":
    main()
