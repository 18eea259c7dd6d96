"""A whole routing stack on loopback: the scripted teacher, a gateway whose policy has a student
section, and the embedded student server with adapters published over its HTTP contract.

The student models are real: a tiny model built on the spot (untrained: a student that
disagrees with the teacher), and the same model fully fine-tuned on the teacher's answers
for the intent task (a student that agrees). Both are built once per session.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import openai
import pytest
import torch
import yaml
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from pydantic import SecretStr

from demo.teacher import ScriptedTeacher, last_user_text
from gateway.app import ServingParts, create_app
from gateway.keys import create_key
from gateway.settings import AuthSettings, RecorderSettings, Settings
from gateway.store.models import Stage
from router.decide import StudentEnvelope, estimate_prompt_tokens
from router.policy import parse_policy
from tests.conftest import ADMIN_KEY, start_gateway
from tests.servers import ServerThread, TcpProxy, wait_until
from tests.trainer.conftest import INTENT_SYSTEM, INTENTS, corpus_texts, intent_email, intent_records
from trainer.dataset import DatasetOptions, select_examples
from trainer.finetune import FinetuneConfig, finetune
from trainer.generation import StudentModels
from trainer.publish import StudentPublisher, publish_adapter
from trainer.registry import register_adapter
from trainer.student_server import create_student_app
from trainer.tinymodel import TinyModelSpec, build_tiny_model

# One intra-op thread: on a small shared machine a second one spin-waits for a busy core.
torch.set_num_threads(1)

TASK = "classify-email"
TRAIN_FROM = 1000
"""Training emails are numbered from here, test traffic from ``TRAFFIC_FROM``: the same
number of digits, so test prompts are as long as the ones the student was trained on."""
TRAFFIC_FROM = 2000


def intent_teacher(body: dict[str, Any]) -> dict[str, Any] | None:
    """The stand-in teacher labels an email by its keywords."""
    if not body.get("messages") or body["messages"][0].get("content") != INTENT_SYSTEM:
        return None
    words = last_user_text(body).lower().split()
    label = next((name for name, keys in INTENTS.items() if any(k in words for k in keys)), "spam")
    return {"role": "assistant", "content": label}


@dataclass(frozen=True)
class StudentModel:
    """A model directory the student server loads as an adapter, and its training envelope."""

    path: Path
    features: dict[str, Any]


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The student's base model: tiny, random weights, a tokenizer trained on the workload."""
    return build_tiny_model(
        tmp_path_factory.mktemp("router-tiny-model"),
        corpus_texts(),
        TinyModelSpec(vocab_size=512, max_position_embeddings=512),
    )


def _envelope(records: list[Any]) -> dict[str, Any]:
    return StudentEnvelope.from_requests(r.request for r in records).to_features()


@pytest.fixture(scope="session")
def agreeing_student(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> StudentModel:
    """The tiny model fully fine-tuned on 320 of the teacher's labels (4-7 s on one busy core;
    it then agreed with the teacher on 400 of 400 unseen emails)."""
    records = intent_records(TASK, 320, start=TRAIN_FROM)
    selection = select_examples(reversed(records), DatasetOptions(holdout=0.0))
    out = tmp_path_factory.mktemp("router-agreeing-student")
    finetune(
        tiny_base,
        selection.train,
        [],
        out,
        FinetuneConfig(method="full", learning_rate=3e-3, epochs=8, batch_tokens=1024, max_seq_len=256),
    )
    return StudentModel(out, _envelope(records))


@pytest.fixture(scope="session")
def disagreeing_student(tiny_base: Path) -> StudentModel:
    """The untrained tiny model: it answers noise, for the same envelope as the agreeing one."""
    return StudentModel(tiny_base, _envelope(intent_records(TASK, 320, start=TRAIN_FROM)))


def routing_policy(teacher_url: str, student_url: str, base_model: Path, **defaults: Any) -> dict[str, Any]:
    """A policy (as its YAML data) with a student section and small numbers, so that stages
    move in a few seconds; ``defaults`` override sections of ``defaults``."""
    values: dict[str, Any] = {
        "cache": {"enabled": False},
        "shadow": {"rate": 1.0, "max_concurrency": 64},
        "promote": {"scorer": "exact", "threshold": 0.8, "min_samples": 20},
        "canary": [0.25, 0.5, 1.0],
        "audit": {"rate": 1.0, "min_samples": 10, "window": 20, "rollback_below": 0.8, "error_burst": 3},
    }
    for key, value in defaults.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) else value
    return {
        "teacher": {
            "base_url": teacher_url + "/v1",
            "api_key_env": "TEACHER_API_KEY",
            "model": "teacher-large",
        },
        "student": {
            "base_url": student_url + "/v1",
            "base_model": str(base_model),
            "engine": "embedded",
            "timeout": "10s",
        },
        "prices": {
            "teacher-large": {"input": 2.5, "cached_input": 1.25, "output": 10.0},
            "student": {"input": 0.05, "output": 0.1},
        },
        "defaults": values,
    }


def start_file_gateway(
    database_url: str, policy_file: Path, tmp_path: Path
) -> tuple[ServerThread, ServingParts, str]:
    """A gateway that reads (and watches) its policy file, as in production."""
    settings = Settings(
        database_url=database_url,
        policy_file=policy_file,
        auth=AuthSettings(required=True, admin_key=SecretStr(ADMIN_KEY)),
        recorder=RecorderSettings(spool_dir=tmp_path / "spool", flush_interval_s=0.05, retry_interval_s=0.3),
        run_scheduler=False,
    )
    app = create_app(settings)
    server = ServerThread(app).start()
    gw: ServingParts = app.state.parts
    _, key = create_key(gw.db, "tests")
    return server, gw, key


@dataclass
class Answer:
    status: int
    content: str
    target: str
    """The ``x-distillgate-target`` header: ``teacher`` or ``student:<adapter>``."""
    label: str
    """What the teacher says the answer is."""
    stream: bool = False
    complete: bool = True
    """A stream ended with a finish reason."""


@dataclass
class Stack:
    """Teacher + gateway + embedded student, and clients for each."""

    teacher: ScriptedTeacher
    gateway_server: ServerThread
    gw: ServingParts
    key: str
    student_server: ServerThread
    student_url: str
    base_model: Path
    max_prompt_tokens: int
    policy_data: dict[str, Any]
    policy_path: Path
    """The policy file a ``policy_file=True`` gateway watches."""
    student_proxy: TcpProxy | None
    admin: httpx.Client = field(init=False)
    client: openai.OpenAI = field(init=False)
    _next: int = TRAFFIC_FROM
    _rng: random.Random = field(default_factory=lambda: random.Random(5))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.admin = httpx.Client(
            base_url=self.gateway_server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=30
        )
        self.client = openai.OpenAI(base_url=self.gateway_server.url + "/v1", api_key=self.key, max_retries=0)

    @property
    def url(self) -> str:
        return self.gateway_server.url

    def email(self) -> tuple[list[dict[str, Any]], str]:
        """A new email (never sent before) within the student's training envelope, and its label."""
        while True:
            with self._lock:
                email, label = intent_email(self._next, self._rng)
                self._next += 1
            messages = [{"role": "system", "content": INTENT_SYSTEM}, {"role": "user", "content": email}]
            if estimate_prompt_tokens(messages) <= self.max_prompt_tokens:
                return messages, label

    def ask(self, *, stream: bool = False, client: openai.OpenAI | None = None) -> Answer:
        """One request for the task through the gateway with the OpenAI SDK."""
        messages, label = self.email()
        raw = (client or self.client).chat.completions.with_raw_response.create(
            model="teacher-large",
            messages=messages,  # type: ignore[arg-type]
            metadata={"task": TASK},
            temperature=0,
            max_tokens=4,
            stream=stream,
        )
        target = raw.headers.get("x-distillgate-target", "")
        if not stream:
            completion = cast(ChatCompletion, raw.parse())
            return Answer(raw.status_code, completion.choices[0].message.content or "", target, label)
        text, finished = "", False
        for chunk in cast(openai.Stream[ChatCompletionChunk], raw.parse()):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finished = finished or chunk.choices[0].finish_reason is not None
        return Answer(raw.status_code, text, target, label, stream=True, complete=finished)

    def state(self) -> tuple[str, int]:
        """The stage and canary step the gateway routes the task on right now."""
        state = self.gw.tasks.task_states.get(TASK)
        return (state.stage.value, state.canary_step) if state is not None else ("none", 0)

    def task(self) -> dict[str, Any]:
        response = self.admin.get(f"/admin/tasks/{TASK}")
        response.raise_for_status()
        return response.json()

    def install(self, model: StudentModel, stage: Stage = Stage.shadow) -> str:
        """Register ``model`` as the task's next adapter, publish it to the student server (which
        writes the task's routing envelope) and force the task into ``stage`` with it."""
        if self.gw.tasks.task_states.get(TASK) is None:  # the task exists once traffic recorded it
            assert self.ask().status == 200
            assert self.gw.recorder.flush(30)  # the task row is written with its first record
        adapter = register_adapter(
            self.gw.db,
            TASK,
            model.path,
            base_model=str(self.base_model),
            method="full",
            metrics={"features": model.features},
        )
        with StudentPublisher(self.student_url) as publisher:
            assert publish_adapter(self.gw.db, publisher, adapter, adapters_dir=model.path.parent)
        response = self.admin.post(
            f"/admin/tasks/{TASK}/transition",
            json={"to": stage.value, "adapter": adapter.name, "reason": "the test installs its student"},
        )
        assert response.status_code == 200, response.text
        assert self.state()[0] == stage.value
        return adapter.name

    def write_policy(self, data: dict[str, Any]) -> None:
        """Edit the watched policy file (written whole, then renamed into place, as editors do)."""
        staged = self.policy_path.with_suffix(".tmp")
        staged.write_text(yaml.safe_dump(data))
        staged.replace(self.policy_path)

    def policy(self) -> dict[str, Any]:
        response = self.admin.get("/admin/policy")
        response.raise_for_status()
        return response.json()

    def wait_for(self, stage: str, timeout_s: float = 30.0) -> None:
        wait_until(lambda: self.state()[0] == stage, timeout_s=timeout_s)

    def close(self) -> None:
        self.admin.close()
        self.client.close()
        self.gateway_server.stop()
        self.student_server.stop()
        if self.student_proxy is not None:
            self.student_proxy.close()


StackFactory = Callable[..., Stack]


@pytest.fixture
def stack(
    teacher: tuple[ScriptedTeacher, ServerThread], tiny_base: Path, tmp_path: Path
) -> Iterator[StackFactory]:
    """``stack(**policy_defaults)`` starts a student server and a gateway in front of it and the
    teacher. ``policy_file=True``: the gateway reads the policy from ``Stack.policy_path``;
    ``student_proxy=True``: it reaches the student through a ``TcpProxy`` that can be cut."""
    teacher_state, teacher_server = teacher
    teacher_state.answer_fn = intent_teacher
    started: list[Stack] = []
    max_prompt = int(_envelope(intent_records(TASK, 320, start=TRAIN_FROM))["max_prompt_tokens"])

    def start(
        database_url: str | None = None,
        *,
        policy_file: bool = False,
        student_proxy: bool = False,
        **defaults: Any,
    ) -> Stack:
        n = len(started)
        student = ServerThread(create_student_app(StudentModels(str(tiny_base)))).start()
        proxy = TcpProxy(student.port).start() if student_proxy else None
        route_url = f"http://127.0.0.1:{proxy.port}" if proxy is not None else student.url
        data = routing_policy(teacher_server.url, route_url, tiny_base, **defaults)
        url = database_url or f"sqlite:///{tmp_path / f'stack{n}.db'}"
        path = tmp_path / f"policy{n}.yaml"
        if policy_file:
            path.write_text(yaml.safe_dump(data))
            server, gw, key = start_file_gateway(url, path, tmp_path)
        else:
            server, gw, key = start_gateway(url, parse_policy(data), tmp_path)
        s = Stack(
            teacher_state, server, gw, key, student, student.url, tiny_base, max_prompt, data, path, proxy
        )
        started.append(s)
        return s

    yield start
    for s in started:
        s.close()
