"""KD inside training: a real teacher's top-k logprobs (the embedded student server's decode path
on a fine-tuned tiny model) on records, a student trained on them with the KD loss against one
trained by hard-label SFT on the same records."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.trainer.conftest import INTENT_SYSTEM, chat_response, intent_email, make_record
from trainer.collate import IGNORE_INDEX, pack, tokenize_example
from trainer.dataset import DatasetOptions, Example, select_examples
from trainer.finetune import FinetuneConfig, finetune
from trainer.generation import SamplingParams, StudentModels
from trainer.kd import AlignStats, kd_loss_terms, soft_tensors, token_mapper

TOP_K = 5


def _intent_records(n: int, start: int) -> list[Any]:
    import random

    rng = random.Random(start)
    out = []
    for i in range(start, start + n):
        email, label = intent_email(i, rng)
        messages = [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}]
        out.append(make_record("intent", messages, chat_response(label)))
    return out


@pytest.fixture(scope="module")
def teacher(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model fully fine-tuned on the intent task: a teacher whose answers are right and
    whose distribution is not one-hot."""
    selection = select_examples(_intent_records(40, 0), DatasetOptions(holdout=0.0))
    out = tmp_path_factory.mktemp("kd-teacher")
    finetune(
        tiny_model,
        selection.train,
        [],
        out,
        FinetuneConfig(method="full", learning_rate=1e-2, max_seq_len=128, batch_tokens=512, epochs=30),
    )
    return out


def _teacher_records(teacher: Path, n: int, start: int) -> list[Any]:
    """Records whose answers and top-k are the teacher's own, through the server's decode loop."""
    params = SamplingParams(temperature=0.0, max_tokens=6, logprobs=True, top_logprobs=TOP_K)
    records = []
    with StudentModels(str(teacher), device="cpu") as models:
        for record in _intent_records(n, start):
            result = models.chat(str(teacher), record.request["messages"], None, params)
            choice = result.choices[0]
            response = chat_response(choice.text)
            response["choices"][0]["logprobs"] = {"content": choice.logprobs}
            records.append(make_record("intent", record.request["messages"], response))
    return records


def _held_out(student: Any, tokenizer: Any, examples: list[Example]) -> tuple[float, float]:
    """Mean KL(teacher || student) over the answer positions with soft labels, and the share of
    answers the student's greedy argmax reproduces token for token (teacher-forced: the same as
    its greedy answer being the teacher's)."""
    id_of = token_mapper(tokenizer)
    kl_sum, kl_n, agree = 0.0, 0, 0
    student.eval()
    for ex in examples:
        tok = tokenize_example(
            tokenizer, ex.messages, ex.tools, teacher=ex.teacher, id_of=id_of, stats=AlignStats()
        )
        assert tok.soft is not None and tok.soft.ids
        with torch.no_grad():
            logits = student(input_ids=torch.tensor([tok.input_ids])).logits[0]
        labelled = [j for j, label in enumerate(tok.labels) if j > 0 and label != IGNORE_INDEX]
        agree += all(int(logits[j - 1].argmax()) == tok.labels[j] for j in labelled)
        soft = sorted(tok.soft.ids)
        ids, probs = soft_tensors([tok.soft], [soft], TOP_K)
        kl, has = kd_loss_terms(logits[[j - 1 for j in soft]], torch.tensor(ids), torch.tensor(probs))
        assert bool(has.all())
        kl_sum += float(kl.sum())
        kl_n += len(soft)
    return kl_sum / kl_n, agree / len(examples)


def test_kd_student_matches_the_teacher_distribution_better_than_sft(
    tiny_model: Path, teacher: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_records = _teacher_records(teacher, 48, 1000)
    held_records = _teacher_records(teacher, 40, 2000)
    stored = train_records[0].response["choices"][0]["logprobs"]["content"]
    assert len(stored[0]["top_logprobs"]) == TOP_K  # genuine top-k from the teacher's forward pass
    assert math.fsum(math.exp(e["logprob"]) for e in stored[0]["top_logprobs"]) <= 1.0 + 1e-4

    train = select_examples(train_records, DatasetOptions(holdout=0.0)).train
    held = select_examples(held_records, DatasetOptions(holdout=0.0)).train
    assert all(ex.teacher for ex in train)
    assert "teacher" not in train[0].to_openai()

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    scores = {}
    for name, weight in (("kd", 0.5), ("sft", 0.0)):
        out = tmp_path / name
        result = finetune(
            tiny_model,
            train,
            [],
            out,
            FinetuneConfig(
                method="full",
                learning_rate=1e-2,
                max_seq_len=128,
                batch_tokens=256,
                epochs=12,
                seed=1,
                kd_weight=weight,
            ),
        )
        # Same tokenizer on both sides: every answer token aligns but the end-of-turn token (the
        # teacher reports its content's tokens only), every alternative maps.
        coverage = result.soft_labels["train"]
        assert coverage["examples_with_soft_labels"] == len(train)
        assert coverage["aligned_tokens"] == coverage["answer_tokens"] - len(train) > 0
        assert coverage["alternatives_mapped"] == 1.0
        assert result.metrics()["soft_labels"] == result.soft_labels
        scores[name] = _held_out(AutoModelForCausalLM.from_pretrained(out), tokenizer, held)
    (kd_kl, kd_agree), (sft_kl, sft_agree) = scores["kd"], scores["sft"]
    assert kd_kl < sft_kl, scores
    assert kd_agree >= sft_agree, scores


def test_packing_and_the_collator_carry_soft_targets_to_the_kd_loss(tiny_model: Path, teacher: Path) -> None:
    """The loss the training loop computes on a packed batch equals the KD loss computed by hand
    from each example alone (soft targets follow their positions through packing)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.collate import Collator
    from trainer.kd import kd_chunk_loss
    from trainer.loss import labelled_loss_sum

    examples = select_examples(_teacher_records(teacher, 3, 3000), DatasetOptions(holdout=0.0)).train
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    id_of = token_mapper(tokenizer)
    toks = [
        tokenize_example(tokenizer, e.messages, e.tools, teacher=e.teacher, id_of=id_of) for e in examples
    ]
    batch = Collator(tokenizer.pad_token_id or 0)(pack(toks, 512))
    with torch.no_grad():
        packed = float(labelled_loss_sum(model, **batch, kd_weight=0.7))
        alone = 0.0
        for tok in toks:
            logits = model(input_ids=torch.tensor([tok.input_ids])).logits[0]
            labelled = [j for j, label in enumerate(tok.labels) if j > 0 and label != IGNORE_INDEX]
            assert tok.soft is not None
            ids, probs = soft_tensors([tok.soft], [labelled], TOP_K)
            alone += float(
                kd_chunk_loss(
                    logits[[j - 1 for j in labelled]],
                    torch.tensor([tok.labels[j] for j in labelled]),
                    torch.tensor(ids),
                    torch.tensor(probs),
                    0.7,
                )
            )
        hard = float(labelled_loss_sum(model, **batch))
    assert packed == pytest.approx(alone, rel=1e-4)
    assert packed != pytest.approx(hard, rel=1e-3)  # the KL term is in it


def test_a_lora_run_trains_on_soft_labels(tiny_model: Path, teacher: Path, tmp_path: Path) -> None:
    examples = select_examples(_teacher_records(teacher, 8, 4000), DatasetOptions(holdout=0.0)).train
    config = FinetuneConfig(method="lora", lora_rank=4, max_seq_len=128, batch_tokens=256, max_steps=3)
    result = finetune(tiny_model, examples[:6], examples[6:], tmp_path / "lora", config)
    assert result.soft_labels["train"]["examples_with_soft_labels"] == 6
    assert result.soft_labels["eval"]["examples_with_soft_labels"] == 2
    assert all(math.isfinite(loss) for _, loss in result.train_losses)
    assert (tmp_path / "lora" / "adapter_config.json").exists()
