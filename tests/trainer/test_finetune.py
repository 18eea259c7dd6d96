"""Fine-tuning a tiny model on CPU: held-out loss falls (LoRA and full), files vLLM loads, seeds, early stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from router.policy import TrainPolicy
from tests.trainer.conftest import intent_records, weather_records
from trainer.dataset import DatasetOptions, Example, select_examples
from trainer.finetune import (
    CPU_BF16_MIN_HIDDEN,
    FinetuneConfig,
    FinetuneProgress,
    cpu_has_bf16,
    finetune,
    use_bf16,
)


@pytest.fixture(scope="module")
def split() -> tuple[list[Example], list[Example]]:
    records = list(reversed(intent_records("intent", 100) + weather_records("weather", 16)))
    selection = select_examples(records, DatasetOptions(holdout=0.2))
    assert len(selection.holdout) >= 10
    return selection.train, selection.holdout


def config(method: str, **overrides: object) -> FinetuneConfig:
    values: dict[str, object] = {
        "method": method,
        "epochs": 3,
        "batch_tokens": 1280,
        "max_seq_len": 320,
        "learning_rate": 2e-2 if method == "lora" else 3e-3,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
    }
    values.update(overrides)
    return FinetuneConfig(**values)  # type: ignore[arg-type]


def test_lora_lowers_held_out_loss_and_saves_an_adapter_vllm_loads(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    seen: list[FinetuneProgress] = []
    result = finetune(tiny_model, train, holdout, tmp_path / "lora", config("lora"), progress=seen.append)
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before - 0.5
    assert result.train_examples == len(train) and result.dropped_too_long == 0
    assert result.steps == result.total_steps == len(seen) and seen[-1].step == result.steps
    assert result.tokens > 0 and result.trained_tokens > 0 and result.tokens_per_s > 0
    assert result.trainable_parameters < result.total_parameters / 2

    files = {p.name for p in (tmp_path / "lora").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files  # the base weights are not copied
    adapter_config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert adapter_config["peft_type"] == "LORA" and adapter_config["base_model_name_or_path"] == str(
        tiny_model
    )
    with safe_open(tmp_path / "lora" / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
    # vLLM reads PEFT's key layout: base_model.model.<module>.lora_A.weight / lora_B.weight
    assert names and all(n.startswith("base_model.model.") and ".lora_" in n for n in names)
    assert any("q_proj" in n for n in names) and any("down_proj" in n for n in names)


def test_full_fine_tune_lowers_held_out_loss_and_saves_a_loadable_model(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    result = finetune(tiny_model, train, holdout, tmp_path / "full", config("full"))
    assert result.eval_loss_before is not None and result.eval_loss_after is not None
    assert result.eval_loss_after < result.eval_loss_before * 0.6
    assert result.trainable_parameters == result.total_parameters
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    assert model.config.vocab_size == AutoModelForCausalLM.from_pretrained(tiny_model).config.vocab_size
    assert (tmp_path / "full" / "tokenizer.json").is_file() and (
        tmp_path / "full" / "chat_template.jinja"
    ).is_file()
    meta = json.loads((tmp_path / "full" / "distillgate_training.json").read_text())
    assert meta["config"]["method"] == "full" and meta["metrics"]["steps"] == result.steps


def test_same_seed_same_run(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    short = config("lora", max_steps=4, lora_dropout=0.1)
    a = finetune(tiny_model, train, holdout, tmp_path / "a", short)
    b = finetune(tiny_model, train, holdout, tmp_path / "b", short)
    c = finetune(
        tiny_model, train, holdout, tmp_path / "c", config("lora", max_steps=4, lora_dropout=0.1, seed=7)
    )
    assert a.train_losses == b.train_losses and a.eval_loss_after == b.eval_loss_after
    assert a.train_losses != c.train_losses


def test_early_stopping_stops_when_held_out_loss_stops_improving(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    # Demanding an improvement of 100 nats per evaluation makes every evaluation a miss.
    cfg = config("lora", eval_every=1, early_stopping_patience=2, early_stopping_min_delta=100.0)
    result = finetune(tiny_model, train, holdout, tmp_path / "stop", cfg)
    assert result.stopped_early and result.steps == 2 < result.total_steps
    assert [step for step, _ in result.eval_losses] == [1, 2]


def test_examples_longer_than_max_seq_len_are_dropped_not_cut(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    result = finetune(
        tiny_model, train, holdout, tmp_path / "short", config("lora", max_seq_len=60, max_steps=1)
    )
    assert result.dropped_too_long > 0
    assert result.train_examples + result.eval_examples + result.dropped_too_long == len(train) + len(holdout)


def test_config_from_policy_takes_the_train_section() -> None:
    policy = TrainPolicy(
        method="full", epochs=2, learning_rate=1e-4, batch_tokens=1024, max_seq_len=256, lora_rank=32
    )
    cfg = FinetuneConfig.from_policy(policy, seed=3)
    assert (
        cfg.method,
        cfg.epochs,
        cfg.learning_rate,
        cfg.batch_tokens,
        cfg.max_seq_len,
        cfg.lora_rank,
        cfg.seed,
    ) == ("full", 2, 1e-4, 1024, 256, 32, 3)


def test_policy_sets_shared_prefixes_and_cpu_threads() -> None:
    cfg = FinetuneConfig.from_policy(TrainPolicy(share_prefix=True, cpu_threads=1))
    assert (cfg.share_prefix, cfg.cpu_threads) == (True, 1)
    default = FinetuneConfig.from_policy(TrainPolicy())
    assert (default.share_prefix, default.cpu_threads) == (False, None)
    with pytest.raises(ValueError):
        TrainPolicy(cpu_threads=0)


def test_cpu_threads_hold_for_the_run_and_are_given_back(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    before = torch.get_num_threads()
    seen: list[int] = []
    finetune(
        tiny_model,
        train[:8],
        holdout[:2],
        tmp_path / "threads",
        config("lora", max_steps=2, cpu_threads=1),
        progress=lambda _: seen.append(torch.get_num_threads()),
    )
    assert seen == [1, 1]
    assert torch.get_num_threads() == before


def test_precision_auto_is_bf16_only_where_it_pays() -> None:
    # forced either way
    assert use_bf16("bf16", "cpu", 64) and not use_bf16("fp32", "cuda", 4096)
    # CPU: never for models narrower than the measured break-even, nor for full fine-tunes
    assert not use_bf16("auto", "cpu", CPU_BF16_MIN_HIDDEN - 1)
    assert not use_bf16("auto", "cpu", None)
    assert not use_bf16("auto", "cpu", 4096, method="full")
    # a LoRA run on a real-width model follows the CPU's native bf16 support
    assert use_bf16("auto", "cpu", 576) == cpu_has_bf16()


def test_a_tiny_model_trains_in_fp32_on_cpu_by_default(
    tiny_model: Path, split: tuple[list[Example], list[Example]], tmp_path: Path
) -> None:
    train, holdout = split
    result = finetune(tiny_model, train[:8], holdout[:2], tmp_path / "p", config("lora", max_steps=1))
    assert result.precision == "fp32"
    forced = finetune(
        tiny_model, train[:8], holdout[:2], tmp_path / "b", config("lora", max_steps=2, precision="bf16")
    )
    assert forced.precision == "bf16" and forced.eval_loss_after is not None
    with safe_open(tmp_path / "b" / "adapter_model.safetensors", "pt") as weights:
        names = list(weights.keys())
        assert names and all(weights.get_tensor(k).dtype == torch.float32 for k in names)
