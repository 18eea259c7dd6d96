"""Micro-batches sized by tokens for the packed-attention path: records laid end to end in one
row of a fixed width (never split; the rest of the row is padding, in short segments of its
own), built once on the host so a training step only copies them to the GPU.

A fixed width gives every forward pass the same shapes, so a compiled model compiles once; the
row's record boundaries travel as ``trainer.attention.Segments``. Loss is taken only where a
label is: ``targets`` are the positions whose next token is labelled, the first token of a
record is never a target (nothing of its own precedes it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from trainer.attention import Segments
from trainer.collate import IGNORE_INDEX, TokenizedExample

if TYPE_CHECKING:
    import torch

PAD_SEGMENT = 128
"""Padding is cut into segments of at most this many tokens: attention over padding stays
negligible (a 12k-token pad segment would cost more attention than the records)."""


@dataclass(frozen=True)
class Row:
    """One forward/backward pass: ``(1, width)`` tensors and what the step needs to know of them."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    """Restarting at 0 at every record and padding segment (RoPE sees each record from 0)."""
    targets: torch.Tensor
    """Positions whose next token carries loss, ``(labelled,)``."""
    target_ids: torch.Tensor
    """The token each target position must predict."""
    segments: Segments
    tokens: int
    """Record tokens in the row (padding excluded)."""
    records: int
    attention_tokens: int
    """Sum over the records of length squared: what causal attention costs, up to a constant."""
    soft_ids: torch.Tensor | None = None
    """Soft targets (``trainer.kd``) per target position, ``(labelled, k)``, -1 where none; None
    when no record of the row has any."""
    soft_probs: torch.Tensor | None = None

    @property
    def labelled(self) -> int:
        return int(self.targets.shape[0])

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    def to(self, device: Any) -> Row:
        """The same row on ``device`` (asynchronous copies from pinned memory where possible)."""
        import torch

        cu = self.segments.cu_seqlens.to(device, non_blocking=True)
        # Rows hold different numbers of records: a compiled model takes that length as a
        # symbol from the first call, instead of compiling again at the second row.
        torch._dynamo.maybe_mark_dynamic(cu, 0)
        return replace(
            self,
            input_ids=self.input_ids.to(device, non_blocking=True),
            position_ids=self.position_ids.to(device, non_blocking=True),
            targets=self.targets.to(device, non_blocking=True),
            target_ids=self.target_ids.to(device, non_blocking=True),
            segments=Segments(cu, self.segments.max_len),
            soft_ids=None if self.soft_ids is None else self.soft_ids.to(device, non_blocking=True),
            soft_probs=None if self.soft_probs is None else self.soft_probs.to(device, non_blocking=True),
        )

    def model_inputs(self) -> dict[str, Any]:
        """Keyword arguments of the model's forward for this row (logits are the caller's choice)."""
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "use_cache": False,
            **self.segments.attention_kwargs(),
        }


def pack_rows(
    examples: Sequence[TokenizedExample],
    width: int,
    pad_id: int,
    *,
    max_len: int | None = None,
    pin_memory: bool = False,
) -> list[Row]:
    """Fill rows of ``width`` tokens with ``examples`` in order (a record that does not fit
    starts the next row). ``max_len`` is the bound handed to the attention kernel (default: the
    longest record in each row)."""
    rows: list[Row] = []
    current: list[TokenizedExample] = []
    used = 0
    for example in examples:
        if len(example) > width:
            raise ValueError(f"a record of {len(example)} tokens does not fit rows of {width}")
        if current and used + len(example) > width:
            rows.append(_row(current, width, pad_id, max_len, pin_memory))
            current, used = [], 0
        current.append(example)
        used += len(example)
    if current:
        rows.append(_row(current, width, pad_id, max_len, pin_memory))
    return rows


def activation_bytes_per_token(hidden_size: int, intermediate_size: int, num_layers: int) -> float:
    """GPU memory one token of a row holds while it trains on the compiled fast path (bf16 base,
    LoRA on every linear layer, logits only where labelled): a fit of two H200 measurements
    (bench/train_throughput.py: SmolLM2-360M 1.07 MB, SmolLM2-1.7B 2.15 MB a token), about
    16.8 bytes per hidden unit and 6.7 per MLP unit in each layer. Uncompiled it is ~1.3x more."""
    return num_layers * (16.8 * hidden_size + 6.7 * intermediate_size)


def row_width(
    bytes_per_token: float, free_bytes: int, *, longest_record: int, share: float = 0.7, multiple: int = 1024
) -> int:
    """The widest row whose activations fill at most ``share`` of ``free_bytes``, in multiples of
    ``multiple`` tokens and never narrower than the longest record."""
    fits = int(free_bytes * share / max(bytes_per_token, 1.0)) // multiple * multiple
    at_least = -(-longest_record // multiple) * multiple
    return max(fits, at_least)


def _row(
    examples: Sequence[TokenizedExample], width: int, pad_id: int, max_len: int | None, pin_memory: bool
) -> Row:
    import torch

    ids: list[int] = []
    positions: list[int] = []
    targets: list[int] = []
    target_ids: list[int] = []
    lengths: list[int] = []
    soft: list[tuple[list[int], list[float]]] = []
    for example in examples:
        offset = len(ids)
        ids.extend(example.input_ids)
        positions.extend(range(len(example)))
        lengths.append(len(example))
        for j, label in enumerate(example.labels):
            if j > 0 and label != IGNORE_INDEX:
                targets.append(offset + j - 1)
                target_ids.append(label)
                got = example.soft
                soft.append((got.ids.get(j, []), got.probs.get(j, [])) if got is not None else ([], []))
    tokens = len(ids)
    longest = max(lengths)
    while len(ids) < width:
        n = min(PAD_SEGMENT, width - len(ids))
        ids.extend([pad_id] * n)
        positions.extend(range(n))
        lengths.append(n)

    def tensor(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        out = torch.tensor(values, dtype=dtype)
        return out.pin_memory() if pin_memory else out

    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    k = max((len(i) for i, _ in soft), default=0)
    soft_ids = soft_probs = None
    if k:
        soft_ids = tensor([x for i, _ in soft for x in i + [-1] * (k - len(i))]).reshape(-1, k)
        probs = torch.tensor([x for _, p in soft for x in p + [0.0] * (k - len(p))], dtype=torch.float32)
        soft_probs = (probs.pin_memory() if pin_memory else probs).reshape(-1, k)
    return Row(
        input_ids=tensor(ids).unsqueeze(0),
        position_ids=tensor(positions).unsqueeze(0),
        targets=tensor(targets),
        target_ids=tensor(target_ids),
        segments=Segments(tensor(cu, torch.int32), max(max_len or longest, longest, PAD_SEGMENT)),
        tokens=tokens,
        records=len(examples),
        attention_tokens=sum(len(e) ** 2 for e in examples),
        soft_ids=soft_ids,
        soft_probs=soft_probs,
    )
