"""Next-token cross-entropy at labelled positions only, in chunks, without the batch's logits.

A 49k-token vocabulary makes the output head the largest activation of a small student: full
logits of a 1,024-token micro-batch are 200 MB in fp32, and autograd keeps them (and their
softmax) until the backward pass. Here the head runs only on hidden states whose next token
carries a label (a record's answer, a fraction of its tokens), a chunk at a time, each chunk
recomputed in the backward pass instead of kept: memory stays one chunk's logits.

With soft labels (``soft_ids`` / ``soft_probs`` from the collator) and a KD weight, a chunk's
loss is ``trainer.kd.kd_chunk_loss``: the KL term mixed in where a position has soft targets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.collate import IGNORE_INDEX
from trainer.kd import kd_chunk_loss

if TYPE_CHECKING:
    import torch

LOSS_CHUNK = 1024
"""Labelled positions whose logits exist at once (1024 x 49k vocabulary: 200 MB in fp32)."""


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_loss_sum(
    model: Any,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    labels: torch.Tensor,
    soft_ids: torch.Tensor | None = None,
    soft_probs: torch.Tensor | None = None,
    kd_weight: float = 0.0,
    **forward: Any,
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``labels`` (``-100`` where none), position t predicting
    label t+1, as ``F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum")`` would give
    it; with soft targets and ``kd_weight`` > 0, the KD loss instead. ``forward`` goes to the
    decoder (attention keyword arguments)."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **forward)
    hidden = hidden.last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    soft = (
        (soft_ids, soft_probs) if soft_ids is not None and soft_probs is not None and kd_weight > 0 else None
    )
    return hidden_loss_sum(lm.get_output_embeddings(), hidden[keep], targets[keep], soft, kd_weight)


def hidden_loss_sum(
    head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    soft: tuple[torch.Tensor, torch.Tensor] | None = None,
    kd_weight: float = 0.0,
) -> torch.Tensor:
    """Summed loss of ``head(hidden)`` against ``targets`` (cross-entropy, or the KD loss with
    ``soft`` = (ids, probs) rows aligned with ``targets``), ``LOSS_CHUNK`` rows at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and the backward pass) well formed

    def chunk(start: int) -> tuple[Any, ...]:
        end = start + LOSS_CHUNK
        parts: tuple[Any, ...] = (head, hidden[start:end], targets[start:end])
        if soft is not None:
            parts += (soft[0][start:end], soft[1][start:end], kd_weight)
        return parts

    fn = _kd_chunk if soft is not None else _chunk_loss
    if hidden.shape[0] <= LOSS_CHUNK or not torch.is_grad_enabled():
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            total = total + fn(*chunk(start))
        return total
    parts = [
        checkpoint(fn, *chunk(start), use_reentrant=False) for start in range(0, hidden.shape[0], LOSS_CHUNK)
    ]
    return torch.stack(parts).sum()


def _chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def _kd_chunk(
    head: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    ids: torch.Tensor,
    probs: torch.Tensor,
    weight: float,
) -> torch.Tensor:
    return kd_chunk_loss(head(hidden), targets, ids, probs, weight)
