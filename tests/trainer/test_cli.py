"""``distillgate dataset``, ``train``, ``adapters`` and ``student`` through typer, on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import typer

from tests.trainer.conftest import cli_config, last_json, run


@pytest.fixture
def config(tmp_path: Path, tiny_model: Path) -> Path:
    train = {
        "method": "lora",
        "epochs": 1,
        "batch_tokens": 1280,
        "max_seq_len": 320,
        "holdout": 0.25,
        "lora_rank": 8,
        "lora_alpha": 16,
    }
    return cli_config(tmp_path, tiny_model, train, intents=40, weather=8)


def test_dataset_build_and_export(cli_app: typer.Typer, config: Path, tmp_path: Path) -> None:
    code, out = run(cli_app, "dataset", "build", "--task", "intent", "--config", str(config), "--json")
    assert code == 0, out
    built = last_json(out)
    assert isinstance(built, dict) and built["kept"] == 40 and built["train"] + built["holdout"] == 40
    assert built["dataset_id"] == 1 and len(built["content_hash"]) == 64

    target = tmp_path / "weather.jsonl"
    code, out = run(
        cli_app,
        "dataset",
        "export",
        "--task",
        "weather",
        "--out",
        str(target),
        "--split",
        "all",
        "--config",
        str(config),
        "--json",
    )
    assert code == 0, out
    exported = last_json(out)
    assert isinstance(exported, dict) and exported["lines"] == 8
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert all(line["tools"][0]["function"]["name"] == "get_weather" for line in lines)
    assert all(line["messages"][-1]["tool_calls"] for line in lines)

    code, _ = run(
        cli_app,
        "dataset",
        "export",
        "--task",
        "weather",
        "--out",
        str(target),
        "--split",
        "nope",
        "--config",
        str(config),
    )
    assert code == 2


def test_train_then_list_adapters(cli_app: typer.Typer, config: Path) -> None:
    code, out = run(cli_app, "train", "--task", "intent", "--config", str(config), "--json")
    assert code == 0, out
    summary = last_json(out)
    assert isinstance(summary, dict)
    assert summary["adapter"] == "intent@v1" and summary["status"] == "succeeded"
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert Path(summary["path"], "adapter_config.json").is_file()

    code, out = run(cli_app, "adapters", "list", "--config", str(config), "--json")
    assert code == 0
    listed = last_json(out)
    assert isinstance(listed, list) and [a["name"] for a in listed] == ["intent@v1"]

    code, out = run(cli_app, "adapters", "list", "--config", str(config))
    assert code == 0 and "intent@v1" in out


def test_train_without_data_exits_1(cli_app: typer.Typer, config: Path) -> None:
    code, out = run(cli_app, "train", "--task", "nothing-recorded", "--config", str(config), "--json")
    assert code == 1
    result = last_json(out)
    assert isinstance(result, dict) and result["status"] == "failed"


def test_student_serve_rejects_a_malformed_lora_option(cli_app: typer.Typer, tiny_model: Path) -> None:
    code, _ = run(cli_app, "student", "serve", "--base-model", str(tiny_model), "--lora", "no-equals-sign")
    assert code == 2


def test_student_serve_rejects_a_bad_threads_option(cli_app: typer.Typer, tiny_model: Path) -> None:
    for bad in ("0", "two", "-1"):
        code, output = run(cli_app, "student", "serve", "--base-model", str(tiny_model), "--threads", bad)
        assert code == 2, (bad, output)


def test_student_serve_rejects_a_bad_dtype_option(cli_app: typer.Typer, tiny_model: Path) -> None:
    for bad in ("fp8", "bf16 ", "FLOAT"):
        code, output = run(cli_app, "student", "serve", "--base-model", str(tiny_model), "--dtype", bad)
        assert code == 2, (bad, output)
