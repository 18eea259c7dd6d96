"""Soft labels aligned by text to the student's tokens, and the KD loss with its explicit tail."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from trainer.kd import (
    AlignStats,
    TeacherToken,
    align,
    kd_chunk_loss,
    kd_loss_terms,
    soft_tensors,
    teacher_tokens,
    token_mapper,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Any) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


def stored_answer(pieces: list[tuple[str, list[tuple[str, float]]]]) -> dict[str, Any]:
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": "".join(p for p, _ in pieces)},
                "logprobs": {
                    "content": [
                        {
                            "token": tok,
                            "logprob": alts[0][1],
                            "bytes": None,
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in alts],
                        }
                        for tok, alts in pieces
                    ]
                },
            }
        ]
    }


def test_same_tokenizer_soft_labels_cover_every_answer_token(tokenizer: Any) -> None:
    answer = "billing refund"
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    pieces = []
    for tid, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
        text = answer[s:e]
        other = tokenizer.decode([(tid + 1) % tokenizer.vocab_size])
        pieces.append((text, [(text, math.log(0.7)), (other, math.log(0.2))]))
    tokens = teacher_tokens(stored_answer(pieces))
    assert tokens is not None and len(tokens) == len(enc["input_ids"])
    stats = AlignStats()
    # The rendered text puts the answer after a 7-character prefix.
    offsets = [(0, 7)] + [(s + 7, e + 7) for s, e in enc["offset_mapping"]]
    labelled = [False] + [True] * len(enc["input_ids"])
    soft = align(offsets, labelled, 7, tokens, token_mapper(tokenizer), stats)
    assert stats.coverage == 1.0
    for pos, tid in enumerate(enc["input_ids"], start=1):
        assert soft.ids[pos][0] == tid
        assert soft.probs[pos][0] == pytest.approx(0.7)
    assert 0 not in soft.ids


def test_tokens_of_another_tokenizer_align_only_where_spans_match(tokenizer: Any) -> None:
    # A teacher that split the answer differently: one token covering two student tokens.
    answer = "refund invoice"
    enc = tokenizer(answer, add_special_tokens=False, return_offsets_mapping=True)
    assert len(enc["input_ids"]) >= 2
    first_end = enc["offset_mapping"][0][1]
    merged = answer[: enc["offset_mapping"][1][1]]
    rest = answer[len(merged) :]
    tokens = [
        TeacherToken(merged, ((merged, -0.1),)),
        TeacherToken(rest, ((rest, -0.1), ("§§never-a-token§§", -3.0))),
    ]
    stats = AlignStats()
    soft = align(
        list(enc["offset_mapping"]), [True] * len(enc["input_ids"]), 0, tokens, token_mapper(tokenizer), stats
    )
    assert 0 not in soft.ids and 1 not in soft.ids  # covered by one teacher token: hard labels only
    assert first_end < len(merged)
    assert stats.aligned_tokens == len(soft.ids)
    assert stats.coverage < 1.0


def test_kl_is_exact_over_the_mapped_tokens_and_the_tail() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 11)
    ids = torch.tensor([[2, 5, -1], [0, 1, 2], [-1, -1, -1]])
    probs = torch.tensor([[0.6, 0.3, 0.0], [0.5, 0.25, 0.25], [0.0, 0.0, 0.0]])
    kl, has = kd_loss_terms(logits, ids, probs)
    q = logits.softmax(-1)
    # Row 0: outcomes {2, 5, other}, teacher (0.6, 0.3, 0.1).
    s = [q[0, 2], q[0, 5], 1 - q[0, 2] - q[0, 5]]
    expect0 = sum(p * math.log(p / float(si)) for p, si in zip([0.6, 0.3, 0.1], s, strict=True))
    assert float(kl[0]) == pytest.approx(expect0, rel=1e-5)
    # Row 1: the teacher's whole mass on the mapped ids (no tail term).
    s1 = [q[1, 0], q[1, 1], q[1, 2]]
    expect1 = sum(p * math.log(p / float(si)) for p, si in zip([0.5, 0.25, 0.25], s1, strict=True))
    assert float(kl[1]) == pytest.approx(expect1, rel=1e-5)
    assert has.tolist() == [True, True, False]


def test_kd_loss_is_ce_without_soft_labels_and_mixes_with_them() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, 9, requires_grad=True)
    targets = torch.tensor([1, 2, 3, 4])
    none = torch.full((4, 2), -1)
    zeros = torch.zeros(4, 2)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    assert float(kd_chunk_loss(logits, targets, none, zeros, 0.5).detach()) == pytest.approx(
        float(ce.detach()), rel=1e-6
    )
    ids = torch.tensor([[1, 0], [2, 0], [3, 0], [4, 0]])
    probs = torch.tensor([[0.9, 0.05]] * 4)
    loss = kd_chunk_loss(logits, targets, ids, probs, 0.5)
    kl, _ = kd_loss_terms(logits, ids, probs)
    ce_rows = F.cross_entropy(logits, targets, reduction="none")
    assert float(loss.detach()) == pytest.approx(float((0.5 * ce_rows + 0.5 * kl).sum().detach()), rel=1e-6)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    # A student that already matches the teacher on the mapped ids and the tail has zero KL.
    matched = torch.log(torch.tensor([[0.9, 0.05, 0.05 / 7] + [0.05 / 7] * 6]))
    kl_m, _ = kd_loss_terms(matched, torch.tensor([[0, 1]]), torch.tensor([[0.9, 0.05]]))
    assert float(kl_m[0]) == pytest.approx(0.0, abs=1e-6)


def test_soft_rows_are_padded_per_position() -> None:
    from trainer.kd import SoftTargets

    row = SoftTargets(ids={2: [7, 8, 9]}, probs={2: [0.5, 0.2, 0.1]})
    ids, probs = soft_tensors([row], [[1, 2]], k=2)
    assert ids == [[-1, -1], [7, 8]]
    assert probs == [[0.0, 0.0], [0.5, 0.2]]


def test_answers_without_logprobs_have_no_soft_labels() -> None:
    assert teacher_tokens({"choices": [{"message": {"content": "x"}, "logprobs": None}]}) is None
    assert teacher_tokens(None) is None
    bad = stored_answer([("a", [("a", float("nan"))])])
    tokens = teacher_tokens(bad)
    assert tokens is not None and tokens[0].alternatives == ()
