"""Publishing adapters over vLLM's runtime adapter API, against the embedded student server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.store.db import Database
from gateway.store.models import Task
from tests.servers import ServerThread, free_port, serve
from trainer.generation import StudentModels
from trainer.publish import (
    AdapterConflict,
    AdapterPathNotFound,
    PublishError,
    StudentPublisher,
    publish_adapter,
    student_path,
)
from trainer.registry import get_adapter, register_adapter
from trainer.student_server import create_student_app


@pytest.fixture(scope="module")
def student(tiny_model: Path) -> Iterator[ServerThread]:
    with serve(create_student_app(StudentModels(str(tiny_model)), api_key="student-key")) as server:
        yield server


@pytest.fixture
def publisher(student: ServerThread) -> Iterator[StudentPublisher]:
    with StudentPublisher(student.url + "/v1", api_key="student-key") as client:
        yield client


def test_publish_is_idempotent_and_unpublish_reports_what_it_did(
    publisher: StudentPublisher, intent_lora: Path, weather_full: Path
) -> None:
    assert publisher.publish("intent@v1", str(intent_lora)) is True
    assert publisher.publish("intent@v1", str(intent_lora)) is False  # already there, same path
    assert publisher.loaded() == {"intent@v1": str(intent_lora)}
    with pytest.raises(AdapterConflict):
        publisher.publish("intent@v1", str(weather_full))
    assert publisher.unpublish("intent@v1") is True
    assert publisher.unpublish("intent@v1") is False
    assert publisher.loaded() == {}


def test_a_path_the_student_cannot_see_is_reported(publisher: StudentPublisher, tmp_path: Path) -> None:
    with pytest.raises(AdapterPathNotFound) as info:
        publisher.publish("ghost@v1", str(tmp_path / "nowhere"))
    assert info.value.status == 404 and "No adapter found" in str(info.value)


def test_a_wrong_key_or_a_dead_server_is_a_publish_error(student: ServerThread, intent_lora: Path) -> None:
    with StudentPublisher(student.url, api_key="wrong") as client, pytest.raises(PublishError) as info:
        client.publish("intent@v1", str(intent_lora))
    assert info.value.status == 401
    with (
        StudentPublisher(f"http://127.0.0.1:{free_port()}/v1", timeout=2) as client,
        pytest.raises(PublishError, match="unreachable"),
    ):
        client.loaded()


def test_student_path_maps_the_adapter_volume(tmp_path: Path) -> None:
    local = tmp_path / "adapters" / "intent" / "v3"
    assert student_path(local, tmp_path / "adapters", None) == str(local)
    assert student_path(local, tmp_path / "adapters", "/mnt/adapters") == "/mnt/adapters/intent/v3"


def test_publish_adapter_marks_it_published_and_stores_its_envelope(
    store: Database, publisher: StudentPublisher, intent_lora: Path
) -> None:
    task = f"envelope-{store.dialect}"
    with store.session() as session:
        session.add(Task(key=task))
        session.commit()
    features = {
        "models": ["teacher-large"],
        "tools": False,
        "response_format": False,
        "max_prompt_tokens": 40,
    }
    adapter = register_adapter(store, task, intent_lora, base_model="tiny", metrics={"features": features})
    try:
        assert publish_adapter(store, publisher, adapter, adapters_dir=intent_lora.parent) is True
        stored = get_adapter(store, adapter.name)
        assert stored is not None and stored.status == "published"
        with store.session() as session:
            row = session.get(Task, task)
        assert row is not None and row.features == features
        assert publisher.loaded()[adapter.name] == str(intent_lora)
    finally:
        publisher.unpublish(adapter.name)


def test_a_failed_publish_writes_nothing(
    store: Database, publisher: StudentPublisher, tmp_path: Path
) -> None:
    task = f"unpublished-{store.dialect}"
    adapter = register_adapter(
        store, task, tmp_path / "missing", base_model="tiny", metrics={"features": {"models": ["m"]}}
    )
    with pytest.raises(AdapterPathNotFound):
        publish_adapter(store, publisher, adapter, adapters_dir=tmp_path)
    stored = get_adapter(store, adapter.name)
    assert stored is not None and stored.status == "trained"
