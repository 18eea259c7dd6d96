"""The fast path's switches: off on a CPU, and a step on packed rows equals the plain padded loss."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from trainer.attention import PACKED_ATTENTION
from trainer.collate import IGNORE_INDEX, TokenizedExample
from trainer.fast_path import (
    FastPath,
    decoder_layers,
    make_optimizer,
    prepare_model,
    row_loss_sum,
    train_step,
)
from trainer.token_budget import pack_rows


def lora_model() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=101,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = get_peft_model(
        LlamaForCausalLM(config),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    return model


def records() -> list[TokenizedExample]:
    g = torch.Generator().manual_seed(1)
    out = []
    for n, answer in ((20, 5), (7, 3), (33, 10)):
        ids = torch.randint(0, 101, (n,), generator=g).tolist()
        out.append(TokenizedExample(ids, [IGNORE_INDEX] * (n - answer) + ids[n - answer :]))
    return out


def test_every_switch_is_on_for_cuda_and_off_for_cpu() -> None:
    on, off = FastPath.for_device("cuda:0"), FastPath.for_device("cpu")
    assert all(vars(on).values())
    assert not any(v for k, v in vars(off).items() if k != "attention_in_graph")


def test_prepare_sets_packed_attention_and_leaves_lora_inputs_uncast() -> None:
    model = prepare_model(lora_model(), FastPath(packed_attention=True, bf16_lora_inputs=True))
    assert model.get_base_model().config._attn_implementation == PACKED_ATTENTION
    assert all(
        not m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")
    )
    assert len(decoder_layers(model)) == 2


def test_loss_on_packed_rows_equals_the_padded_batch_loss() -> None:
    model = lora_model()
    examples = records()
    width = max(len(e) for e in examples)
    ids = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), IGNORE_INDEX)
    mask = torch.zeros(3, width, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e)], labels[i, : len(e)], mask[i, : len(e)] = (
            torch.tensor(e.input_ids),
            torch.tensor(e.labels),
            1,
        )
    padded = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    fast = FastPath(packed_attention=True, labelled_logits_only=True)
    prepare_model(model, fast)
    rows = pack_rows(examples, 40, pad_id=0)  # two rows: a step accumulates over both
    assert len(rows) == 2
    labelled = sum(r.labelled for r in rows)
    summed = torch.stack([row_loss_sum(model, r, fast) for r in rows]).sum()
    all_logits = torch.stack([row_loss_sum(model, r, FastPath(packed_attention=True)) for r in rows]).sum()
    assert torch.allclose(summed / labelled, padded, atol=1e-5)
    assert torch.allclose(all_logits, summed, atol=1e-4)

    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    step_loss = train_step(model, make_optimizer(params, 1e-2, 0.0, fast), rows, fast, params=params)
    assert torch.allclose(step_loss, padded, atol=1e-5)
    assert all(p.grad is None for p in params)
    assert any(not torch.equal(a, b) for a, b in zip(before, params, strict=True))
