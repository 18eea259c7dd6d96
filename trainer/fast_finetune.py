"""``trainer.finetune`` on a CUDA GPU: LoRA in bf16 over fixed-width packed rows, through the
fast path's switches (``trainer.fast_path``), chosen automatically.

Why a separate step source: on a GPU the step is bound by the host unless each forward pass is
large and of one shape (docs/gpu-training.md measured 0.7-1.3x the plain loop for the CPU
path's small packed batches, 9.6x for rows of 16k-64k tokens). ``RowSteps`` lays each epoch's
shuffled records into rows (``trainer.token_budget``) whose width is sized from the GPU's free
memory and the data, so a small dataset still gets several optimizer steps an epoch; a step is
``gradient_accumulation_steps`` rows, at least one per rank. Everything else (learning-rate schedule, clipping, evaluation, early stopping,
saving) is ``trainer.finetune``'s own loop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from trainer.collate import TokenizedExample
from trainer.fast_path import FastPath, row_loss_sum
from trainer.token_budget import Row, activation_bytes_per_token, pack_rows, row_width

if TYPE_CHECKING:
    import torch

    from trainer.finetune import FinetuneConfig

MAX_ROW_TOKENS = 65536
"""Widest row: the measured best for SmolLM2-360M on an H200 (179k tok/s at 71 GB); wider rows
were not measured."""
MIN_STEPS_PER_EPOCH = 8
"""Rows are made narrower than memory allows when the data would otherwise fill fewer rows a
GPU than this: a few hundred records still train over several optimizer steps."""
DROPOUT_MEMORY_FACTOR = 1.5
"""With LoRA dropout each adapter input is kept twice (dropped and not) for the backward pass:
the measured activation footprint is for dropout 0; this is the margin for the rest."""


def applies(config: FinetuneConfig, device: str, bf16: bool) -> bool:
    """The fast path trains LoRA adapters in bf16 on CUDA; everything else takes the CPU path."""
    return config.method == "lora" and bf16 and device.startswith("cuda")


def fast_path(config: FinetuneConfig, device: str) -> FastPath:
    fast = FastPath.for_device(device)
    if config.gradient_checkpointing:  # recomputation inside compiled layers was not measured
        fast = replace(fast, compile_layers=False)
    return fast


def raise_compile_limits() -> None:
    """One compiled graph per layer kind, mode (train or eval) and row width: more than dynamo's
    default cache of 8 entries per code object once eval and training both run."""
    import torch

    for name in ("cache_size_limit", "recompile_limit"):
        if getattr(torch._dynamo.config, name, 64) < 64:
            setattr(torch._dynamo.config, name, 64)


def plan_width(
    model_config: Any,
    examples: Sequence[TokenizedExample],
    config: FinetuneConfig,
    free_bytes: int,
    ranks: int,
) -> int:
    """Row width in tokens: what memory allows, at most ``MAX_ROW_TOKENS``, narrower when the
    data is small, never narrower than the longest record ``config.max_seq_len`` allows."""
    if config.row_tokens:
        return max(config.row_tokens, _ceil_to(config.max_seq_len, 1024))
    per_token = activation_bytes_per_token(
        model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    )
    if config.lora_dropout > 0:
        per_token *= DROPOUT_MEMORY_FACTOR
    by_memory = row_width(per_token, free_bytes, longest_record=config.max_seq_len)
    tokens = sum(len(e) for e in examples)
    by_data = _ceil_to(math.ceil(tokens / (MIN_STEPS_PER_EPOCH * max(1, ranks))), 1024)
    return max(_ceil_to(config.max_seq_len, 1024), min(MAX_ROW_TOKENS, by_memory, by_data))


@dataclass
class RowSteps:
    """The CUDA step source of ``trainer.finetune``: rows of one width, one per rank a step."""

    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    width: int
    pad_id: int
    max_len: int
    device: str
    fast: FastPath
    rows_per_step: int = 1
    """Over all ranks: ``gradient_accumulation_steps``, at least one row per rank."""
    sequences: int = 0
    """Rows in the last epoch laid out."""
    kd_weight: float = 0.0
    """The KL term's share where a row has soft labels (``FinetuneConfig.kd_weight``)."""

    @property
    def units_per_step(self) -> int:
        return self.rows_per_step

    @property
    def has_eval(self) -> bool:
        return bool(self.eval)

    def epoch(self, rng: random.Random) -> list[Row]:
        """This epoch's rows: the records reshuffled, then laid end to end (the same on every
        rank: the order comes from the shared seed)."""
        order = list(self.train)
        rng.shuffle(order)
        rows = pack_rows(order, self.width, self.pad_id, max_len=self.max_len, pin_memory=True)
        self.sequences = len(rows)
        return rows

    def loss_sum(self, model: Any, row: Row) -> torch.Tensor:
        return row_loss_sum(model, row.to(self.device), self.fast, self.kd_weight)

    @staticmethod
    def labelled(row: Row) -> int:
        return row.labelled

    @staticmethod
    def tokens(row: Row) -> int:
        return row.tokens

    def held_out(self, model: Any, autocast: Any) -> float | None:
        """Mean loss per labelled token over the held-out records, in rows of the same width."""
        import torch

        if not self.eval:
            return None
        rows = pack_rows(self.eval, self.width, self.pad_id, max_len=self.max_len, pin_memory=True)
        model.eval()
        total = torch.zeros((), device=self.device)
        with torch.no_grad(), autocast():
            for row in rows:
                total += row_loss_sum(model, row.to(self.device), self.fast).float()
        return float(total) / max(1, sum(row.labelled for row in rows))


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
