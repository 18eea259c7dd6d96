"""Packed attention: records laid end to end in one row attend only to themselves, with no mask."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.attention import PACKED_ATTENTION, Segments, attend, reference_attention, register


def tiny_llama(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    model.set_attn_implementation(attn)
    return model


def test_segments_come_from_lengths_or_restarting_positions() -> None:
    by_lengths = Segments.from_lengths([3, 1, 4])
    by_positions = Segments.from_position_ids(torch.tensor([[0, 1, 2, 0, 0, 1, 2, 3]]))
    assert by_lengths.cu_seqlens.tolist() == by_positions.cu_seqlens.tolist() == [0, 3, 4, 8]
    assert by_lengths.cu_seqlens.dtype == torch.int32
    assert by_lengths.max_len == by_positions.max_len == 4
    assert Segments.from_lengths([3, 1], max_len=64).max_len == 64
    with pytest.raises(ValueError):
        Segments.from_lengths([300], max_len=64)
    with pytest.raises(ValueError):
        Segments.from_position_ids(torch.tensor([[1, 2, 0]]))


def test_each_record_attends_only_to_itself_with_grouped_kv_heads() -> None:
    torch.manual_seed(1)
    lengths = [5, 1, 9, 3]
    q = torch.randn(sum(lengths), 4, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(sum(lengths), 2, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(sum(lengths), 2, 8, dtype=torch.float64, requires_grad=True)
    out = attend(q, k, v, Segments.from_lengths(lengths))
    start = 0
    for n in lengths:
        alone = reference_attention(q[start : start + n], k[start : start + n], v[start : start + n], [0, n])
        assert torch.allclose(out[start : start + n], alone)
        start += n
    # Changing a record changes nothing in the others.
    v2 = v.detach().clone()
    v2[5:6] += 1.0
    moved = attend(q, k, v2, Segments.from_lengths(lengths))
    assert torch.allclose(moved[:5], out[:5]) and torch.allclose(moved[6:], out[6:])
    assert not torch.allclose(moved[5:6], out[5:6])


def test_a_packed_row_gives_each_record_the_logits_and_gradients_it_has_alone() -> None:
    register()
    packed_model, alone_model = tiny_llama(PACKED_ATTENTION), tiny_llama("sdpa")
    torch.manual_seed(2)
    records = [torch.randint(0, 97, (n,)) for n in (7, 3, 12)]
    row = torch.cat(records).unsqueeze(0)
    segments = Segments.from_lengths([len(r) for r in records])
    positions = torch.cat([torch.arange(len(r)) for r in records]).unsqueeze(0)
    packed = packed_model(input_ids=row, position_ids=positions, **segments.attention_kwargs()).logits[0]
    packed.sum().backward()
    start = 0
    for record in records:
        alone = alone_model(input_ids=record.unsqueeze(0)).logits[0]
        alone.sum().backward()
        assert torch.allclose(packed[start : start + len(record)], alone, atol=1e-5)
        start += len(record)
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters(), strict=True):
        assert p.grad is not None and q.grad is not None
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name


def test_boundaries_are_read_from_position_ids_when_none_are_passed() -> None:
    register()
    model = tiny_llama(PACKED_ATTENTION)
    row = torch.randint(0, 97, (1, 10))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    implicit = model(input_ids=row, position_ids=positions).logits
    explicit = model(
        input_ids=row, position_ids=positions, **Segments.from_lengths([4, 3, 3]).attention_kwargs()
    ).logits
    assert torch.allclose(implicit, explicit)


def test_a_mask_or_a_batch_of_rows_is_refused() -> None:
    register()
    model = tiny_llama(PACKED_ATTENTION)
    with pytest.raises(ValueError, match="one row"):
        model(input_ids=torch.randint(0, 97, (2, 6)))
    q = torch.randn(1, 4, 6, 8)
    from trainer.attention import packed_attention_forward

    with pytest.raises(ValueError, match="mask"):
        packed_attention_forward(None, q, q, q, torch.ones(1, 1, 6, 6, dtype=torch.bool))
