"""Rows sized by tokens: records end to end, never split, padding in short segments, loss targets exact."""

from __future__ import annotations

import itertools

import pytest
import torch

from trainer.collate import IGNORE_INDEX, TokenizedExample
from trainer.token_budget import PAD_SEGMENT, activation_bytes_per_token, pack_rows, row_width


def example(n: int, answer: int, start: int = 10) -> TokenizedExample:
    ids = list(range(start, start + n))
    return TokenizedExample(ids, [IGNORE_INDEX] * (n - answer) + ids[n - answer :])


def test_records_fill_fixed_width_rows_in_order_and_are_never_split() -> None:
    examples = [example(100, 10), example(200, 20), example(150, 5), example(400, 40)]
    rows = pack_rows(examples, 512, pad_id=0)
    assert [r.records for r in rows] == [3, 1]
    assert all(r.input_ids.shape == (1, 512) and r.position_ids.shape == (1, 512) for r in rows)
    assert [r.tokens for r in rows] == [450, 400]
    cu = rows[0].segments.cu_seqlens.tolist()
    assert cu[:4] == [0, 100, 300, 450] and cu[-1] == 512
    assert all(0 < b - a <= PAD_SEGMENT for a, b in itertools.pairwise(cu[3:]))
    assert rows[0].position_ids[0, 100:103].tolist() == [0, 1, 2]
    assert rows[0].segments.max_len >= 200
    assert rows[0].attention_tokens == 100**2 + 200**2 + 150**2
    with pytest.raises(ValueError, match="does not fit"):
        pack_rows([example(600, 1)], 512, pad_id=0)


def test_targets_are_the_positions_whose_next_token_is_labelled() -> None:
    first, second = example(6, 2, start=10), example(5, 5, start=50)  # the second is labelled from token 0
    (row,) = pack_rows([first, second], 16, pad_id=0)
    # first: tokens 4 and 5 are labelled, predicted from positions 3 and 4; second: token 0 is
    # never a target (the first record's last token must not predict it), tokens 1-4 are.
    assert row.targets.tolist() == [3, 4, 6, 7, 8, 9]
    assert row.target_ids.tolist() == [14, 15, 51, 52, 53, 54]
    assert row.labelled == 6
    assert torch.equal(row.input_ids[0, row.targets + 1], row.target_ids)


def test_a_bound_on_record_length_is_kept_for_the_kernel() -> None:
    (row,) = pack_rows([example(30, 3)], 64, pad_id=0, max_len=2048)
    assert row.segments.max_len == 2048
    kwargs = row.model_inputs()
    assert kwargs["max_length_q"] == 2048 and kwargs["cu_seq_lens_q"] is row.segments.cu_seqlens


def test_row_width_fills_a_share_of_free_memory_but_holds_the_longest_record() -> None:
    assert row_width(1e6, 80 * 10**9, longest_record=2048, share=0.5) == 39936
    assert row_width(1e9, 10**9, longest_record=2048) == 2048


def test_activation_estimate_matches_the_measured_architectures() -> None:
    assert activation_bytes_per_token(960, 2560, 32) == pytest.approx(1.066e6, rel=0.01)  # SmolLM2-360M
    assert activation_bytes_per_token(2048, 8192, 24) == pytest.approx(2.146e6, rel=0.01)  # SmolLM2-1.7B
