"""The adapter registry and ``train_task``: records to ``task@vN`` on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
from sqlmodel import select

from gateway.store.db import Database
from gateway.store.models import DatasetSnapshot, Record, TrainingRun
from router.policy import TaskPolicy, parse_policy
from tests.trainer.conftest import add_records, intent_records, weather_records
from trainer.finetune import FinetuneConfig
from trainer.registry import (
    NotEnoughData,
    adapter_features,
    adapter_name,
    get_adapter,
    list_adapters,
    list_runs,
    next_version,
    register_adapter,
    set_adapter_status,
    task_dirname,
    train_task,
)


def small_policy(**train: object) -> TaskPolicy:
    values = {
        "method": "lora",
        "epochs": 1,
        "batch_tokens": 1280,
        "max_seq_len": 320,
        "holdout": 0.2,
        "learning_rate": 2e-2,
        "lora_rank": 8,
        "lora_alpha": 16,
    }
    values.update(train)
    policy = parse_policy(
        {"teacher": {"base_url": "http://teacher.invalid/v1"}, "defaults": {"train": values}}
    )
    return policy.for_task("any")


def test_versions_count_up_per_task(store: Database, tmp_path: Path) -> None:
    task, other = f"reg-{store.dialect}", f"reg-other-{store.dialect}"
    first = register_adapter(store, task, tmp_path / "a", base_model="tiny", hyperparams={"lr": 1})
    second = register_adapter(
        store, task, tmp_path / "b", base_model="tiny", metrics={"eval_loss_after": 1.5}
    )
    elsewhere = register_adapter(store, other, tmp_path / "c", base_model="tiny")
    assert (first.name, second.name, elsewhere.name) == (f"{task}@v1", f"{task}@v2", f"{other}@v1")
    assert next_version(store, task) == 3
    assert [a.name for a in list_adapters(store, task)] == [f"{task}@v2", f"{task}@v1"]
    fetched = get_adapter(store, f"{task}@v2")
    assert fetched is not None and fetched.metrics == {"eval_loss_after": 1.5} and fetched.status == "trained"
    updated = set_adapter_status(store, f"{task}@v2", "published", offline_agreement=0.97)
    assert updated is not None and updated.status == "published"
    assert updated.metrics == {"eval_loss_after": 1.5, "offline_agreement": 0.97}
    assert get_adapter(store, "nobody@v1") is None


def test_concurrent_registrations_get_distinct_versions(store: Database, tmp_path: Path) -> None:
    task = f"race-{store.dialect}"
    names: list[str] = []
    errors: list[BaseException] = []

    def register(i: int) -> None:
        staging = tmp_path / f"staging-{i}"
        staging.mkdir()
        (staging / "adapter_config.json").write_text(str(i))
        try:
            names.append(
                register_adapter(
                    store, task, tmp_path / "out" / "v{version}", base_model="tiny", staging_dir=staging
                ).name
            )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(names) == [adapter_name(task, v) for v in (1, 2, 3, 4)]
    contents = {(tmp_path / "out" / f"v{v}" / "adapter_config.json").read_text() for v in (1, 2, 3, 4)}
    assert contents == {"0", "1", "2", "3"}  # every run's files under its own version


def test_train_task_turns_records_into_a_registered_adapter(
    store: Database, tiny_model: Path, tmp_path: Path
) -> None:
    task = f"intent-{store.dialect}"
    add_records(store, intent_records(task, 60) + weather_records(task, 8))
    outcome = train_task(store, task, small_policy(), str(tiny_model), tmp_path / "adapters")

    adapter = outcome.adapter
    assert adapter.name == f"{task}@v1" and adapter.method == "lora" and adapter.base_model == str(tiny_model)
    assert adapter.path == str(tmp_path / "adapters" / task / "v1")
    assert (Path(adapter.path) / "adapter_model.safetensors").is_file()
    assert not list((tmp_path / "adapters" / task).glob(".run-*"))  # staging moved, not copied
    # vLLM's lora_filesystem_resolver layout: <adapters>/<task@vN>, really inside <adapters>,
    # with the adapter_config.json that names the base model it checks.
    by_name = tmp_path / "adapters" / adapter.name
    assert by_name.is_symlink() and by_name.resolve() == Path(adapter.path).resolve()
    root = (tmp_path / "adapters").resolve()
    assert os.path.commonpath([root, by_name.resolve()]) == str(root)
    config = json.loads((by_name / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == str(tiny_model)
    assert adapter.dataset_id == outcome.snapshot.id
    assert adapter.hyperparams["lora_rank"] == 8 and adapter.hyperparams["method"] == "lora"
    metrics = adapter.metrics
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]
    assert metrics["dataset"]["train"] == len(outcome.snapshot.train_ids) > 0
    assert metrics["tokens_per_s"] > 0 and metrics["steps"] > 0
    features = adapter_features(adapter)
    assert features is not None and features["models"] == ["teacher-large"] and features["tools"] is True
    assert features["response_format"] is False and features["max_prompt_tokens"] > 0

    run = outcome.run
    assert run.status == "succeeded" and run.adapter == adapter.name and run.finished_at is not None
    with store.session() as session:
        assert session.get(DatasetSnapshot, outcome.snapshot.id) is not None

    again = train_task(
        store,
        task,
        small_policy(),
        str(tiny_model),
        tmp_path / "adapters",
        config=FinetuneConfig(method="full", max_steps=1, max_seq_len=320, batch_tokens=1280),
    )
    assert again.adapter.name == f"{task}@v2" and again.adapter.method == "full"
    assert (Path(again.adapter.path) / "model.safetensors").is_file()
    assert [r.status for r in list_runs(store, task)] == ["succeeded", "succeeded"]


def test_a_task_without_usable_records_fails_its_run(
    store: Database, tiny_model: Path, tmp_path: Path
) -> None:
    task = f"empty-{store.dialect}"
    add_records(store, intent_records(task, 3, seed=5))
    with store.session() as session:
        for record in session.exec(select(Record).where(Record.task == task)):
            record.status = 500
            session.add(record)
        session.commit()
    with pytest.raises(NotEnoughData):
        train_task(store, task, small_policy(), str(tiny_model), tmp_path / "adapters")
    (run,) = list_runs(store, task)
    assert run.status == "failed" and run.error == "no usable training examples"
    assert list_adapters(store, task) == []


def test_a_crashing_run_is_recorded_and_leaves_nothing_behind(store: Database, tmp_path: Path) -> None:
    task = f"crash-{store.dialect}"
    add_records(store, intent_records(task, 10))
    with pytest.raises(OSError):
        train_task(store, task, small_policy(), str(tmp_path / "no-such-model"), tmp_path / "adapters")
    with store.session() as session:
        (run,) = session.exec(select(TrainingRun).where(TrainingRun.task == task)).all()
    assert run.status == "failed" and run.error and "no-such-model" in run.error
    assert list_adapters(store, task) == []
    assert not (tmp_path / "adapters" / task).exists() or not any((tmp_path / "adapters" / task).iterdir())


def test_task_dirname_is_filesystem_safe() -> None:
    assert task_dirname("classify-email") == "classify-email"
    odd = task_dirname("team/a b:c")
    assert "/" not in odd and " " not in odd and odd.startswith("team_a_b_c-")
    assert task_dirname("team/a b:c") != task_dirname("team_a b:c")
