"""The memory check before a training run: estimate its peak, pick settings that fit, or refuse.

A run that does not fit is stopped here with a reason, never by the kernel's OOM killer
halfway through (which also takes the gateway's training child and its task's progress with
it). The estimate is weights (and, for full fine-tuning, gradients and AdamW state) plus
activations per token of a micro-batch plus a fixed runtime; the per-token coefficients were
fitted to peak RSS measured on CPU (``bench/train_memory.py``). When the configured run does
not fit, gradient checkpointing goes on first (activations drop to one layer's), then the
micro-batch shrinks, halving down to the longest record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainer.loss import LOSS_CHUNK

if TYPE_CHECKING:
    from trainer.finetune import FinetuneConfig

RUNTIME_BYTES = 1100 * 2**20
"""Python, torch, transformers and peft imported, the tokenizer and the tokenized records."""
ACTIVATION_UNITS_PER_TOKEN = (34.0, 8.0)
"""Bytes each token keeps per (hidden unit, MLP unit) of every layer for the backward pass, at
fp32 (bf16 autocast halves most of them): fitted on CPU to SmolLM2-135M LoRA runs."""
SHARE = 0.8
"""Of the memory available when training starts, what the run may plan to use."""


class TrainingMemoryError(RuntimeError):
    """Even the smallest settings would not fit in the memory available: the run is refused."""


@dataclass(frozen=True)
class MemoryPlan:
    batch_tokens: int
    """Tokens per micro-batch (at most the configured ones)."""
    sequence_tokens: int
    """Width records are packed to: at most the micro-batch, at least the longest record."""
    gradient_checkpointing: bool
    estimated_peak_bytes: int
    limit_bytes: int | None
    """What the plan had to stay under (``None``: not checked, e.g. on a GPU)."""


def plan_memory(
    model_config: Any, config: FinetuneConfig, *, bf16: bool, device: str, longest_record: int
) -> MemoryPlan:
    """Settings for this run that fit, or ``TrainingMemoryError`` saying what was needed.

    On a GPU the configured settings are used as they are (the CUDA path sizes its own rows).
    """
    sequence = max(longest_record, min(config.max_seq_len, config.batch_tokens))
    budget = max(config.batch_tokens, sequence)
    checkpointing = config.gradient_checkpointing

    def estimate(tokens: int, ckpt: bool) -> int:
        return estimate_peak_bytes(model_config, config.method, tokens, bf16=bf16, checkpointing=ckpt)

    if not device.startswith("cpu"):
        return MemoryPlan(budget, sequence, checkpointing, estimate(budget, checkpointing), None)
    limit = config.memory_limit if config.memory_limit is not None else int(available_bytes() * SHARE)
    candidates = [(budget, checkpointing)]
    if not checkpointing:
        candidates.append((budget, True))
    smaller = budget // 2
    while smaller >= longest_record:
        candidates.append((smaller, True))
        smaller //= 2
    for tokens, ckpt in candidates:
        peak = estimate(tokens, ckpt)
        if peak <= limit:
            return MemoryPlan(tokens, max(longest_record, min(sequence, tokens)), ckpt, peak, limit)
    tokens, ckpt = candidates[-1]
    raise TrainingMemoryError(
        f"training needs about {_gb(estimate(tokens, ckpt))} even at batch_tokens={tokens} with "
        f"gradient checkpointing (the longest record has {longest_record} tokens); {_gb(limit)} is "
        "available. Lower train.max_seq_len, use method lora, or give the trainer more memory."
    )


def estimate_peak_bytes(
    model_config: Any, method: str, batch_tokens: int, *, bf16: bool, checkpointing: bool
) -> int:
    """Peak resident bytes of a run on CPU with micro-batches of ``batch_tokens``."""
    params = parameter_count(model_config)
    # Full fine-tuning holds fp32 weights, gradients and AdamW's two moments; LoRA the frozen base.
    weights = params * 16 if method == "full" else params * (2 if bf16 else 4)
    hidden, layers = model_config.hidden_size, model_config.num_hidden_layers
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    per_hidden, per_mlp = ACTIVATION_UNITS_PER_TOKEN
    layer_bytes = per_hidden * hidden + per_mlp * inter
    if bf16:
        layer_bytes /= 2
    kept_layers = 1 if checkpointing else layers
    # Checkpointing keeps each layer's input (fp32 hidden state) and recomputes one layer at a time.
    activations = batch_tokens * (kept_layers * layer_bytes + (layers * hidden * 4 if checkpointing else 0))
    loss = 3 * min(batch_tokens, LOSS_CHUNK) * model_config.vocab_size * 4
    return int(RUNTIME_BYTES + weights + activations + loss)


def parameter_count(model_config: Any) -> int:
    """Parameters of a decoder-only transformer from its config alone (before loading it)."""
    hidden = model_config.hidden_size
    layers = model_config.num_hidden_layers
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    inter = getattr(model_config, "intermediate_size", 4 * hidden)
    attention = hidden * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * hidden * inter
    embeddings = model_config.vocab_size * hidden
    tied = getattr(model_config, "tie_word_embeddings", False)
    return layers * (attention + mlp + 2 * hidden) + embeddings * (1 if tied else 2) + hidden


def available_bytes() -> int:
    """Memory this process can still take: the lower of the system's ``MemAvailable`` and what
    its cgroup (a container's limit) has left."""
    found = [_meminfo_available()]
    cgroup = _cgroup_left()
    if cgroup is not None:
        found.append(cgroup)
    return min(found)


def _meminfo_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def _cgroup_left() -> int | None:
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"
