"""The CUDA training fast path: the switches a LoRA run turns on when it trains on a GPU.

The switches: records packed end to end into fixed-width rows attended per record
(``trainer.attention``, no dense mask), LoRA inputs left in bf16, fused AdamW, every decoder
layer compiled, logits only where a label is. ``bench/train_throughput.py`` measures them
together, compiled and not, against the plain loop (docs/gpu-training.md has the H200 tables).
``FastPath.for_device`` turns them all on for CUDA and all off elsewhere (the CPU path is
``trainer.finetune``'s own).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from trainer.attention import PACKED_ATTENTION, register
from trainer.kd import kd_chunk_loss
from trainer.token_budget import Row

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class FastPath:
    """Which speed-ups a run uses; the defaults are the plain path."""

    packed_attention: bool = False
    """Attend per record through cumulative lengths (``trainer.attention``) instead of a mask."""
    bf16_lora_inputs: bool = False
    """peft casts every LoRA input to the adapter's dtype (fp32, its master copy); under bf16
    autocast the LoRA matmuls run in bf16 anyway, so skipping the cast saves a full fp32 copy of
    each activation, seven per decoder layer. The adapter weights and optimizer stay fp32."""
    fused_adamw: bool = False
    """One fused kernel for the AdamW update of all adapter tensors."""
    compile_layers: bool = False
    """``torch.compile`` each decoder layer (one compilation serves them all: same code, same
    shapes thanks to fixed-width rows); fuses the elementwise work eager LoRA launches by the
    thousand."""
    labelled_logits_only: bool = False
    """Compute the output head and cross-entropy only at positions whose next token is labelled
    (a record's answer), not over the whole vocabulary at every position."""
    attention_in_graph: bool = True
    """With ``compile_layers``: trace the attention kernel into each layer's graph (False: a graph
    break around it, for a torch that cannot trace it)."""

    @classmethod
    def for_device(cls, device: str) -> FastPath:
        if device.startswith("cuda"):
            return cls(True, True, True, True, True, True)
        return cls()


def prepare_model(model: Any, fast: FastPath) -> Any:
    """Apply ``fast``'s model switches to a (peft-wrapped) causal LM, in place; returns it."""
    if fast.packed_attention:
        register(in_graph=fast.attention_in_graph or not fast.compile_layers)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_attn_implementation(PACKED_ATTENTION)
    if fast.bf16_lora_inputs:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False  # type: ignore[attr-defined]
    if fast.compile_layers:
        for layer in decoder_layers(model):
            layer.compile()
    return model


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a transformers causal LM (peft-wrapped or not)."""
    import torch

    for module in model.modules():
        if (
            isinstance(module, torch.nn.ModuleList)
            and module
            and type(module[0]).__name__.endswith("DecoderLayer")
        ):
            return list(module)
    raise ValueError(f"no decoder layers found in {type(model).__name__}")


def make_optimizer(
    params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float, fast: FastPath
) -> Any:
    import torch

    return torch.optim.AdamW(
        params, lr=lr, weight_decay=weight_decay, fused=True if fast.fused_adamw else None
    )


def row_loss_sum(model: Any, row: Row, fast: FastPath, kd_weight: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy over one row's labelled positions (the KD loss of
    ``trainer.kd`` where the row has soft targets and ``kd_weight`` > 0)."""
    import torch.nn.functional as F

    keep = row.targets if fast.labelled_logits_only else 0
    logits = model(**row.model_inputs(), logits_to_keep=keep).logits[0]
    if not fast.labelled_logits_only:
        logits = logits[row.targets]
    if kd_weight > 0 and row.soft_ids is not None and row.soft_probs is not None:
        return kd_chunk_loss(logits, row.target_ids, row.soft_ids, row.soft_probs, kd_weight)
    return F.cross_entropy(logits.float(), row.target_ids, reduction="sum")


def train_step(
    model: Any,
    optimizer: Any,
    rows: Sequence[Row],
    fast: FastPath,
    *,
    params: Sequence[torch.nn.Parameter],
    max_grad_norm: float = 1.0,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> torch.Tensor:
    """One optimizer step over ``rows`` (already on the device); every labelled token weighs the
    same whichever row holds it. Returns the step's mean loss as a device tensor, so the loop
    never waits for the GPU."""
    labelled = max(1, sum(row.labelled for row in rows))
    total: torch.Tensor | None = None
    for row in rows:
        with autocast():
            summed = row_loss_sum(model, row, fast)
        (summed / labelled).backward()
        total = summed.detach() if total is None else total + summed.detach()
    if max_grad_norm > 0:
        import torch

        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    assert total is not None, "a step needs at least one row"
    return total / labelled
