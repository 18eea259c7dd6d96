"""Attention over packed rows with no dense mask: each record in a row attends only to itself.

Records laid end to end in one row are told apart by cumulative sequence lengths
(``cu_seqlens``), never by a [T, T] mask. On CUDA the kernel is flash-attention's varlen path as
stock torch ships it (``torch.nn.attention.varlen.varlen_attn``, torch >= 2.10); elsewhere (CPU,
fp32, older torch) each record goes through SDPA on its own, which is also the reference the
kernel is checked against. ``register()`` makes it a transformers attention implementation, so a
model set to ``PACKED_ATTENTION`` builds no mask at all (transformers skips mask creation for
implementations it has no mask function for) and reads the boundaries from the
``cu_seq_lens_q``/``max_length_q`` keyword arguments its forward passes down to attention.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

PACKED_ATTENTION = "distillgate_packed"
"""The ``attn_implementation`` name this module registers with transformers."""


@dataclass(frozen=True)
class Segments:
    """Where the records of one packed row start and end."""

    cu_seqlens: torch.Tensor
    """int32 ``(n + 1,)``: 0, then the running sum of the record lengths (on the row's device)."""
    max_len: int
    """An upper bound on the longest record: the kernel sizes its grid by it. A fixed bound
    (the longest record a run allows) keeps it one constant under ``torch.compile``."""

    @classmethod
    def from_lengths(
        cls, lengths: Sequence[int], device: Any = "cpu", max_len: int | None = None
    ) -> Segments:
        import torch

        if not lengths or min(lengths) < 0:
            raise ValueError("a packed row needs at least one record and no negative lengths")
        longest = max(lengths)
        if max_len is not None and max_len < longest:
            raise ValueError(f"max_len={max_len} is shorter than a record of {longest} tokens")
        cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(list(lengths), dtype=torch.int32).cumsum(0)
        return cls(cu.to(device), longest if max_len is None else max_len)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor) -> Segments:
        """From one row's positions restarting at 0 at each record (the collators' convention).

        Reads the positions on the host, which waits for the GPU: the fast path builds its
        segments from known lengths instead.
        """
        positions = position_ids.reshape(-1).tolist()
        starts = [i for i, p in enumerate(positions) if p == 0]
        if not starts or starts[0] != 0:
            raise ValueError("packed position ids must start each record at 0")
        lengths = [b - a for a, b in zip(starts, [*starts[1:], len(positions)], strict=True)]
        return cls.from_lengths(lengths, position_ids.device)

    def attention_kwargs(self) -> dict[str, Any]:
        """What a transformers model's forward passes down to its attention function."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
        }


def register(*, in_graph: bool = True) -> str:
    """Make ``PACKED_ATTENTION`` a transformers attention implementation (idempotent).

    ``in_graph=False`` keeps the attention call out of ``torch.compile``'s graphs (a graph break
    at each layer's attention): slower, for a torch whose compiler cannot trace the kernel.
    """
    from transformers import AttentionInterface

    _load_kernel()
    forward: Callable[..., Any] = packed_attention_forward
    if not in_graph:
        import torch

        forward = torch.compiler.disable(packed_attention_forward)
    AttentionInterface.register(PACKED_ATTENTION, forward)
    return PACKED_ATTENTION


def packed_attention_forward(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: ``(batch, heads, T, head_dim)`` in, one row of
    packed records; ``(batch, T, heads, head_dim)`` out."""
    if attention_mask is not None:
        raise ValueError("packed attention takes record boundaries, not a mask: pad with segments of its own")
    if dropout:
        raise ValueError("packed attention has no attention dropout")
    if query.shape[0] != 1:
        raise ValueError(f"packed attention takes one row of records, got a batch of {query.shape[0]}")
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        segments = Segments(cu, int(kwargs.get("max_length_q") or query.shape[2]))
    elif kwargs.get("position_ids") is not None:
        segments = Segments.from_position_ids(kwargs["position_ids"])
    else:
        segments = Segments.from_lengths([query.shape[2]], query.device)
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, head_dim)
    return attend(q, k, v, segments, scaling).unsqueeze(0), None


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float | None = None
) -> torch.Tensor:
    """Causal attention of each record to itself; ``(T, heads, head_dim)`` tensors, kv heads may
    be fewer than query heads (grouped-query attention)."""
    if kernel_usable(q):
        return _varlen_kernel(q, k, v, segments, scale)
    return reference_attention(q, k, v, segments.cu_seqlens.tolist(), scale)


def kernel_usable(q: torch.Tensor) -> bool:
    """Whether flash-attention's varlen kernel takes these queries (CUDA, 16-bit, stock torch has it)."""
    import torch

    return (
        _load_kernel() is not None
        and q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Sequence[int], scale: float | None = None
) -> torch.Tensor:
    """Each record through SDPA on its own: the CPU path, and what the kernel must equal."""
    import torch
    import torch.nn.functional as F

    groups = q.shape[1] // k.shape[1]
    outputs = []
    for start, end in itertools.pairwise(cu_seqlens):
        if end == start:
            continue
        qs = q[start:end].transpose(0, 1)
        ks = k[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        vs = v[start:end].transpose(0, 1).repeat_interleave(groups, dim=0)
        outputs.append(
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
        )
    if cu_seqlens[-1] != q.shape[0]:
        raise ValueError(f"segments cover {cu_seqlens[-1]} tokens of a row of {q.shape[0]}")
    return torch.cat(outputs)


def _varlen_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segments: Segments, scale: float | None
) -> torch.Tensor:
    kernel, params = _load_kernel() or (None, frozenset())
    assert kernel is not None
    # The signature moved between torch releases: is_causal (2.10), window_size (2.11 on),
    # enable_gqa (later; before it, grouped kv heads went to the kernel as they are).
    options: dict[str, Any] = {}
    if "window_size" in params:
        options["window_size"] = (-1, 0)
    else:
        options["is_causal"] = True
    if "scale" in params:
        options["scale"] = scale
    if "enable_gqa" in params and q.shape[1] != k.shape[1]:
        options["enable_gqa"] = True
    cu = segments.cu_seqlens
    out = kernel(q, k, v, cu, cu, segments.max_len, segments.max_len, **options)
    assert not isinstance(out, tuple)
    return out


_KERNEL: list[tuple[Callable[..., Any], frozenset[str]] | None] = []


def _load_kernel() -> tuple[Callable[..., Any], frozenset[str]] | None:
    """This torch's ``varlen_attn`` and its parameter names, or None where it has none. Looked up
    once (``register()`` does it before any compilation traces through here)."""
    if not _KERNEL:
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            _KERNEL.append(None)
        else:
            _KERNEL.append((varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)))
    return _KERNEL[0]
