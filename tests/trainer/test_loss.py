"""The chunked labelled-only loss is the plain cross-entropy over full logits, value and gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.trainer.conftest import intent_records
from trainer import loss
from trainer.collate import Collator, pack, tokenize_example
from trainer.dataset import DatasetOptions, select_examples
from trainer.finetune import token_loss_sum


@pytest.mark.parametrize("chunk", [4096, 7])
def test_labelled_loss_matches_full_logits_cross_entropy(
    tiny_model: Path, chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loss, "LOSS_CHUNK", chunk)  # 7: many chunks, each recomputed in backward
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    examples = select_examples(intent_records("t", 12), DatasetOptions(holdout=0.0)).train
    tokenized = [tokenize_example(tokenizer, e.messages, e.tools) for e in examples]
    batch = Collator(tokenizer.pad_token_id or 0)(pack(tokenized, 200))
    model = AutoModelForCausalLM.from_pretrained(tiny_model)

    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    full = token_loss_sum(logits, batch["labels"])
    full.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    chunked = loss.labelled_loss_sum(model, **batch)
    chunked.backward()

    assert torch.allclose(chunked, full, rtol=1e-5)
    for name, grad in expected.items():
        got = dict(model.named_parameters())[name].grad
        assert got is not None and torch.allclose(got, grad, rtol=1e-4, atol=1e-6), name
