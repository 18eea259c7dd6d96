"""Loss masking (assistant tokens only, tool calls included), packing without cross-talk, padding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.conftest import INTENT_SYSTEM, WEATHER_TOOL, weather_call
from trainer.collate import IGNORE_INDEX, Collator, PackedSequence, TokenizedExample, pack, tokenize_example
from trainer.finetune import token_loss_sum

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer weather questions."},
    {"role": "user", "content": "What is the weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [weather_call("Oslo")]},
    {"role": "tool", "tool_call_id": "call_1", "content": "rain, 9 C"},
    {"role": "assistant", "content": "It rains in Oslo, 9 C."},
]
TOOL_BLOCK = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>'


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


def labelled_runs(tokenizer: Any, example: TokenizedExample) -> list[str]:
    """Decoded runs of consecutive labelled tokens."""
    runs: list[list[int]] = []
    previous = False
    for token, label in zip(example.input_ids, example.labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            if not previous:
                runs.append([])
            runs[-1].append(token)
        previous = label != IGNORE_INDEX
    return [tokenizer.decode(run) for run in runs]


def test_only_assistant_tokens_carry_labels_tool_calls_included(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, CONVERSATION, [WEATHER_TOOL], turns="all")
    assert labelled_runs(tokenizer, example) == [TOOL_BLOCK, "It rains in Oslo, 9 C.<|im_end|>"]
    # Everything else, system prompt, tool schema, user turn, tool result and role headers, is -100.
    unlabelled = tokenizer.decode(
        [t for t, lab in zip(example.input_ids, example.labels, strict=True) if lab == IGNORE_INDEX]
    )
    for text in (
        "You answer weather questions.",
        '"name": "get_weather", "description"',
        "What is the weather",
        "rain, 9 C",
        "<|im_start|>assistant\n",
    ):
        assert text in unlabelled


def test_last_turn_only_labels_the_records_answer(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, CONVERSATION, [WEATHER_TOOL])
    assert labelled_runs(tokenizer, example) == ["It rains in Oslo, 9 C.<|im_end|>"]


def test_a_tool_call_answer_is_labelled(tokenizer: Any) -> None:
    example = tokenize_example(tokenizer, CONVERSATION[:3], [WEATHER_TOOL])
    assert labelled_runs(tokenizer, example) == [TOOL_BLOCK]
    assert example.trained_tokens == len(tokenizer(TOOL_BLOCK, add_special_tokens=False)["input_ids"])


def test_labels_match_the_rendered_chat_token_for_token(tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": INTENT_SYSTEM},
        {"role": "user", "content": "refund my invoice"},
        {"role": "assistant", "content": "billing"},
    ]
    example = tokenize_example(tokenizer, messages)
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert example.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert labelled_runs(tokenizer, example) == ["billing<|im_end|>"]
    assert example.labels[-1] == IGNORE_INDEX  # the newline after <|im_end|> is template, not answer


def examples(tokenizer: Any) -> list[TokenizedExample]:
    out = []
    for i, label in enumerate(["billing", "support", "sales", "spam", "billing"]):
        messages = [
            {"role": "system", "content": INTENT_SYSTEM},
            {"role": "user", "content": f"Email {i}: " + "please help " * (i + 1)},
            {"role": "assistant", "content": label},
        ]
        out.append(tokenize_example(tokenizer, messages))
    return out


def test_packing_fills_sequences_and_restarts_positions(tokenizer: Any) -> None:
    items = examples(tokenizer)
    longest = max(len(e) for e in items)
    packed = pack(items, max_seq_len=2 * longest + 5)
    assert sum(len(seq.lengths) for seq in packed) == len(items)
    assert len(packed) < len(items)
    for seq in packed:
        assert len(seq) <= 2 * longest + 5
        offset = 0
        for length in seq.lengths:
            assert seq.position_ids[offset : offset + length] == list(range(length))
            assert seq.labels[offset] == IGNORE_INDEX  # never predicted from the previous example
            offset += length
    assert [len(s.lengths) for s in pack(items, max_seq_len=10_000, packing=False)] == [1] * len(items)
    with pytest.raises(ValueError, match="does not fit"):
        pack(items, max_seq_len=longest - 1)


def test_packed_examples_do_not_see_each_other(tokenizer: Any, tiny_model: Path) -> None:
    """Logits and loss of an example are the same alone and packed behind another one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    first, second = examples(tokenizer)[:2]
    packed = pack([first, second], max_seq_len=len(first) + len(second))
    assert len(packed) == 1
    collate = Collator(tokenizer.pad_token_id)
    together = collate(packed)
    alone = collate(pack([second], max_seq_len=len(second)))
    with torch.no_grad():
        logits_together = model(
            input_ids=together["input_ids"], position_ids=together["position_ids"], use_cache=False
        ).logits
        logits_alone = model(
            input_ids=alone["input_ids"], position_ids=alone["position_ids"], use_cache=False
        ).logits
        logits_first = model(
            **{k: v for k, v in collate(pack([first], len(first))).items() if k != "labels"}, use_cache=False
        ).logits
    assert torch.allclose(logits_together[0, len(first) :], logits_alone[0], atol=1e-5)
    loss_together = token_loss_sum(logits_together, together["labels"])
    loss_apart = token_loss_sum(logits_alone, alone["labels"]) + token_loss_sum(
        logits_first, collate(pack([first], len(first)))["labels"]
    )
    assert torch.allclose(loss_together, loss_apart, atol=1e-4)


def test_collator_pads_with_ignored_labels_and_a_separate_segment() -> None:
    short = PackedSequence([5, 6], [IGNORE_INDEX, 6], [0, 1], [2])
    long = PackedSequence([7, 8, 9, 10], [IGNORE_INDEX, 8, 9, 10], [0, 1, 2, 3], [4])
    batch = Collator(pad_token_id=0)([short, long])
    assert batch["input_ids"].tolist() == [[5, 6, 0, 0], [7, 8, 9, 10]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 6, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 8, 9, 10],
    ]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1], [0, 1, 2, 3]]


def test_a_shared_prefix_is_laid_out_once_and_changes_no_loss_nor_gradient(
    tokenizer: Any, tiny_model: Path
) -> None:
    """Examples that begin alike (template header, system prompt) share those tokens once per
    sequence; every example's loss and the gradients are those of the examples trained apart."""
    from trainer.loss import labelled_loss_sum

    items = examples(tokenizer)
    total = sum(len(e) for e in items)
    shared = pack(items, max_seq_len=total, share_prefix=True)
    assert len(shared) == 1 and shared[0].prefix > 0
    assert len(shared[0]) == shared[0].prefix + sum(shared[0].lengths) < total
    assert sum(e.trained_tokens for e in items) == sum(1 for x in shared[0].labels if x != IGNORE_INDEX)
    # The prefix stops before every example's last prompt token.
    first_labels = [next(j for j, x in enumerate(e.labels) if x != IGNORE_INDEX) for e in items]
    assert shared[0].prefix <= min(first_labels) - 1

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    collate = Collator(tokenizer.pad_token_id)

    def loss_and_grads(sequences: list[PackedSequence]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        total_loss = torch.zeros(())
        for seq in sequences:
            total_loss = total_loss + labelled_loss_sum(model, **collate([seq]))
        total_loss.backward()
        return float(total_loss.detach()), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    apart_loss, apart_grads = loss_and_grads([pack([e], len(e))[0] for e in items])
    shared_loss, shared_grads = loss_and_grads(shared)
    assert shared_loss == pytest.approx(apart_loss, rel=1e-5)
    assert len(shared_grads) == len(apart_grads)
    for a, b in zip(apart_grads, shared_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)

    # A batch mixing a shared-prefix sequence, a plain one and padding: the same losses too.
    plain = pack(items[:2], max_seq_len=total)[0]
    batch = collate([shared[0], plain])
    assert batch["attention_mask"].shape == (2, 1, len(shared[0]), len(shared[0]))
    with torch.no_grad():
        together = float(labelled_loss_sum(model, **batch))
        alone = float(labelled_loss_sum(model, **collate([shared[0]]))) + float(
            labelled_loss_sum(model, **collate([plain]))
        )
    assert together == pytest.approx(alone, rel=1e-5)


def test_examples_with_different_prompts_share_nothing(tokenizer: Any) -> None:
    a = tokenize_example(
        tokenizer, [{"role": "user", "content": "alpha"}, {"role": "assistant", "content": "one"}]
    )
    b = tokenize_example(
        tokenizer,
        [
            {"role": "system", "content": "Answer tersely."},
            {"role": "user", "content": "beta"},
            {"role": "assistant", "content": "two"},
        ],
    )
    (seq,) = pack([a, b], max_seq_len=len(a) + len(b), share_prefix=True)
    common = next(j for j, (x, y) in enumerate(zip(a.input_ids, b.input_ids, strict=False)) if x != y)
    assert seq.prefix == common
    assert seq.position_ids[: seq.prefix] == list(range(seq.prefix))
    assert seq.position_ids[seq.prefix : seq.prefix + seq.lengths[0]] == list(range(seq.prefix, len(a)))
