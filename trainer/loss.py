"""Next-token cross-entropy at labelled positions only, in chunks, without the batch's logits.

A 49k-token vocabulary makes the output head the largest activation of a small student: full
logits of a 1,024-token micro-batch are 200 MB in fp32, and autograd keeps them (and their
softmax) until the backward pass. Here the head runs only on hidden states whose next token
carries a label (a record's answer, a fraction of its tokens), a chunk at a time, each chunk
recomputed in the backward pass instead of kept: memory stays one chunk's logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from trainer.collate import IGNORE_INDEX

if TYPE_CHECKING:
    import torch

LOSS_CHUNK = 1024
"""Labelled positions whose logits exist at once (1024 x 49k vocabulary: 200 MB in fp32)."""


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def labelled_loss_sum(
    model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor, **forward: Any
) -> torch.Tensor:
    """Summed next-token cross-entropy of ``labels`` (``-100`` where none), position t predicting
    label t+1, as ``F.cross_entropy(logits[:, :-1], labels[:, 1:], reduction="sum")`` would give
    it. ``forward`` goes to the decoder (attention keyword arguments)."""
    lm = causal_lm(model)
    hidden = lm.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **forward)
    hidden = hidden.last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return hidden_loss_sum(lm.get_output_embeddings(), hidden[keep], targets[keep])


def hidden_loss_sum(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden)`` against ``targets``, ``LOSS_CHUNK`` rows at a time."""
    import torch
    from torch.utils.checkpoint import checkpoint

    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # keeps the graph (and the backward pass) well formed
    if hidden.shape[0] <= LOSS_CHUNK or not torch.is_grad_enabled():
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], LOSS_CHUNK):
            end = start + LOSS_CHUNK
            total = total + _chunk_loss(head, hidden[start:end], targets[start:end])
        return total
    parts = [
        checkpoint(
            _chunk_loss,
            head,
            hidden[start : start + LOSS_CHUNK],
            targets[start : start + LOSS_CHUNK],
            use_reentrant=False,
        )
        for start in range(0, hidden.shape[0], LOSS_CHUNK)
    ]
    return torch.stack(parts).sum()


def _chunk_loss(head: Any, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")
