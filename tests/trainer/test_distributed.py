"""Data-parallel fine-tuning on CPU: ``distillgate train --gpus 2`` runs a two-rank torchrun job
(gloo) whose loss curve is world size 1's on the same data; rank 0 alone saves and registers."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from sqlmodel import select

from gateway.store.db import Database
from gateway.store.models import Adapter, DatasetSnapshot
from tests.trainer.conftest import cli_config, last_json, run
from trainer.dataset import snapshot_examples
from trainer.distributed import NO_MULTICAST, Torchrun, World
from trainer.finetune import FinetuneConfig, finetune

TRAIN = {
    "method": "lora",
    "epochs": 2,
    "batch_tokens": 160,
    "max_seq_len": 160,
    "holdout": 0.25,
    "lora_rank": 8,
    "lora_alpha": 16,
    "lora_dropout": 0.0,  # dropout masks are drawn per rank: the curves would differ by design
    "learning_rate": 1e-2,
    "gpus": 2,
}


@pytest.fixture
def config(tmp_path: Path, tiny_model: Path) -> Path:
    return cli_config(tmp_path, tiny_model, TRAIN, intents=36, weather=6)


def test_two_ranks_train_the_curve_of_one(
    cli_app: typer.Typer, config: Path, tiny_model: Path, tmp_path: Path
) -> None:
    # --gpus 2 on a machine without GPUs: two CPU ranks over gloo, through torchrun.
    code, out = run(cli_app, "train", "--task", "intent", "--config", str(config), "--gpus", "2", "--json")
    assert code == 0, out
    summary = last_json(out)
    assert summary["status"] == "succeeded" and summary["adapter"] == "intent@v1"

    db = Database(f"sqlite:///{tmp_path / 'distillgate.db'}")
    with db.session() as session:
        adapters = list(session.exec(select(Adapter)))
        snapshot = session.get(DatasetSnapshot, summary["dataset_id"])
    assert [a.name for a in adapters] == ["intent@v1"]  # one writer: one adapter, one version
    assert snapshot is not None
    train, holdout = snapshot_examples(db, snapshot)
    db.dispose()
    two = adapters[0].metrics or {}
    assert two["world_size"] == 2 and not two["fast_path"]
    assert (Path(adapters[0].path) / "adapter_model.safetensors").exists()

    from router.policy import TrainPolicy

    # One rank makes the same optimizer steps when it accumulates the two ranks' micro-batches.
    one_rank = FinetuneConfig.from_policy(TrainPolicy(**TRAIN), gradient_accumulation_steps=2)
    one = finetune(tiny_model, train, holdout, tmp_path / "one-rank", one_rank)
    assert one.world_size == 1 and one.steps == two["steps"] >= 5
    # Every record once per epoch over the two ranks: the same tokens as one rank.
    assert (one.tokens, one.trained_tokens) == (two["tokens"], two["trained_tokens"])
    curve_two = [loss for _, loss in two["train_losses"]]
    curve_one = [loss for _, loss in one.train_losses]
    assert curve_one[-1] < curve_one[0] - 0.5  # it learns: the comparison is of a moving curve
    assert max(abs(a - b) for a, b in zip(curve_one, curve_two, strict=True)) < 2e-3
    assert one.eval_loss_after is not None
    assert abs(one.eval_loss_after - two["eval_loss_after"]) < 2e-3


def test_ranks_share_each_step_exactly_once() -> None:
    items = list(range(11))
    for size in (1, 2, 3, 4):
        shards = [World(rank, size, rank).shard(items) for rank in range(size)]
        assert sorted(x for shard in shards for x in shard) == items
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert World(1, 2, 1).device("cuda", gpus=2) == "cuda:1" and World().device("cuda") == "cuda"
    assert World(3, 4, 3).device("cuda", gpus=2) == "cuda:1" and World(1, 2, 1).device("cpu") == "cpu"


def test_a_failing_job_raises_its_error_here(tiny_model: Path, tmp_path: Path) -> None:
    runner = Torchrun(1)
    assert set(NO_MULTICAST.items()) <= set(runner.environment().items())
    with pytest.raises(ValueError, match="no training example fits"):
        runner.call(finetune, tiny_model, [], [], tmp_path / "out", FinetuneConfig())
