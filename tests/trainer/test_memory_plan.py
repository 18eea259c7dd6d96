"""The memory check: the configured run when it fits, checkpointing then smaller micro-batches
when not, and a refusal naming what was needed when nothing fits."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from trainer.finetune import FinetuneConfig
from trainer.memory_plan import TrainingMemoryError, estimate_peak_bytes, plan_memory

SMOLLM2_135M = LlamaConfig(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    tie_word_embeddings=True,
)


def estimate(tokens: int, ckpt: bool) -> int:
    return estimate_peak_bytes(SMOLLM2_135M, "lora", tokens, bf16=True, checkpointing=ckpt)


def test_a_run_that_fits_keeps_its_settings() -> None:
    config = FinetuneConfig(batch_tokens=1024, memory_limit=estimate(1024, False))
    plan = plan_memory(SMOLLM2_135M, config, bf16=True, device="cpu", longest_record=300)
    assert (plan.batch_tokens, plan.gradient_checkpointing) == (1024, False)
    assert config.memory_limit is not None
    assert plan.sequence_tokens == 1024 and plan.estimated_peak_bytes <= config.memory_limit


def test_too_little_memory_turns_on_checkpointing_then_shrinks_the_micro_batch() -> None:
    config = FinetuneConfig(batch_tokens=4096, memory_limit=estimate(4096, True))
    plan = plan_memory(SMOLLM2_135M, config, bf16=True, device="cpu", longest_record=300)
    assert (plan.batch_tokens, plan.gradient_checkpointing) == (4096, True)

    config = FinetuneConfig(batch_tokens=4096, memory_limit=estimate(1024, True))
    plan = plan_memory(SMOLLM2_135M, config, bf16=True, device="cpu", longest_record=300)
    assert (plan.batch_tokens, plan.gradient_checkpointing) == (1024, True)
    assert plan.sequence_tokens == 1024  # records are packed to the smaller micro-batch


def test_nothing_fits_is_refused_with_the_numbers() -> None:
    config = FinetuneConfig(batch_tokens=1024, memory_limit=200 * 2**20)
    with pytest.raises(TrainingMemoryError, match=r"training needs about .* GB .* 0\.2 GB is available"):
        plan_memory(SMOLLM2_135M, config, bf16=True, device="cpu", longest_record=300)
