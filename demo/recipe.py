"""The offline demo's student recipe: a small model trained from scratch on CPU, and the policy
numbers that let the loop run in minutes (measurements: docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from demo import workload
from trainer.tinymodel import TinyModelSpec


@dataclass(frozen=True)
class DemoRecipe:
    """Everything the demo needs to size itself."""

    model: TinyModelSpec
    """The from-scratch student (no pretrained weights are available offline)."""
    policy_defaults: dict[str, Any]
    """The policy's ``defaults`` section (train, shadow, promote, canary, audit, cache)."""
    tokenizer_samples: int = 3000
    """Workload conversations the tokenizer is trained on (all task families)."""
    torch_threads: int = 1
    """Torch threads for training: on 2 contended cores one thread is 4 to 10 times faster than two."""
    round_size: int = 200
    """Requests per traffic round; each round uses new prompts."""
    concurrency: int = 4
    requests_per_s: float = 40.0
    """Traffic is paced: the gateway, teacher, client and training share two cores."""
    measure_requests: int = 300
    """Requests in the final measured round (student share, live agreement, p50s)."""
    families: tuple[str, ...] = workload.TASK_NAMES
    """The reference task families whose traffic the demo replays."""


def tokenizer_conversations(n: int, seed: int = 424242) -> Iterator[dict[str, Any]]:
    """OpenAI-format conversations (request + the teacher's answer) the tokenizer learns from."""
    for family, body in workload.traffic(seed, n):
        yield {"messages": [*body["messages"], family.answer(body)]}


def demo_recipe(*, quick: bool = False) -> DemoRecipe:
    """The recipe for ``distillgate demo``; ``quick`` trades margin for minutes (CI).

    Its numbers come from measured runs: docs/ARCHITECTURE.md, "The demo's student recipe".
    """
    model = TinyModelSpec(
        vocab_size=2048,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=256,
        max_position_embeddings=512,
    )
    train = {
        "method": "full",
        "min_new_records": 1800,
        "max_records": 1800,
        "holdout": 0.15,
        "schedule": "1h",  # one verdict per task within a demo; production retrains as data grows
        "epochs": 8.0,
        "learning_rate": 2e-3,
        "batch_tokens": 4096,
        "max_seq_len": 256,
        "min_offline_score": 0.9,
        "max_completion_tokens": 96,
    }
    defaults = {
        "cache": {"enabled": True, "only_deterministic": True},
        "train": train,
        "shadow": {"rate": 1.0, "max_concurrency": 4},
        "promote": {"threshold": 0.9, "min_samples": 30 if quick else 60, "confidence": 0.95},
        "canary": [0.5, 1.0] if quick else [0.1, 0.5, 1.0],
        "audit": {"rate": 0.1, "rollback_below": 0.8, "min_samples": 20},
    }
    return DemoRecipe(
        model=model,
        policy_defaults=defaults,
        round_size=200 if quick else 300,
        measure_requests=150 if quick else 300,
        # Quick: one task the small student learns and one it does not, in half the minutes.
        families=("classify-email", "extract-ade") if quick else workload.TASK_NAMES,
    )
