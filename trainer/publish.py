"""Publishing adapters to the student server through vLLM's runtime adapter API.

``POST /v1/load_lora_adapter {"lora_name", "lora_path"}`` and ``POST
/v1/unload_lora_adapter {"lora_name"}``; ``GET /v1/models`` lists what is loaded. Works the
same against vLLM and the embedded student server. Synchronous (httpx), because its callers
(the trainer, the scheduler's worker thread, the CLI) are; async code runs it in a thread.
``publish_adapter`` is the whole step for a registered adapter: load it, mark it published,
and store its training envelope in ``Task.features`` for the route decision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from sqlmodel import update

from gateway.store.db import Database
from gateway.store.models import Adapter, Task, utcnow


class PublishError(Exception):
    """The student server refused or failed a publish/unpublish call."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class AdapterPathNotFound(PublishError):
    """The student server sees no adapter at the path (is the adapter volume mounted there?)."""


class AdapterConflict(PublishError):
    """The name is loaded already, from a different path."""


def student_path(local_path: str | Path, adapters_dir: str | Path, adapter_root: str | None) -> str:
    """The path under which the student server sees an adapter the trainer wrote to ``local_path``.

    ``adapter_root`` (the policy's ``student.adapter_root``) replaces ``adapters_dir`` when the
    adapter volume is mounted elsewhere on the student; ``None`` means the same path.
    """
    if adapter_root is None:
        return str(local_path)
    relative = Path(local_path).resolve().relative_to(Path(adapters_dir).resolve())
    return str(Path(adapter_root) / relative)


class StudentPublisher:
    """A client of one student server's adapter API."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        root = base_url.rstrip("/")
        self.root = root[: -len("/v1")] if root.endswith("/v1") else root
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.root, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StudentPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def loaded(self) -> dict[str, str]:
        """Loaded adapters: ``lora_name`` → the path the server loaded it from."""
        response = self._call("GET", "/v1/models")
        data = response.json().get("data") or []
        return {m["id"]: m.get("root") or "" for m in data if isinstance(m, dict) and m.get("parent")}

    def publish(self, name: str, path: str) -> bool:
        """Load ``path`` as ``name``. True when loaded now, False when it was loaded already from
        the same path (publishing is idempotent). Raises ``AdapterPathNotFound`` (404),
        ``AdapterConflict`` (loaded from another path) or ``PublishError``."""
        response = self._call(
            "POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}, expect=(200, 400, 404)
        )
        if response.status_code == 200:
            return True
        message = _error_message(response)
        if response.status_code == 404:
            raise AdapterPathNotFound(message, 404)
        if "already been loaded" in message:
            current = self.loaded().get(name)
            if current is not None and _same_path(current, path):
                return False
            raise AdapterConflict(f"adapter {name!r} is loaded from {current!r}, not {path!r}", 400)
        raise PublishError(message, response.status_code)

    def unpublish(self, name: str) -> bool:
        """Unload ``name``. True when it was loaded, False when the server did not have it (404)."""
        response = self._call("POST", "/v1/unload_lora_adapter", {"lora_name": name}, expect=(200, 404))
        return response.status_code == 200

    def _call(
        self, method: str, path: str, body: dict[str, Any] | None = None, expect: tuple[int, ...] = (200,)
    ) -> httpx.Response:
        try:
            response = self.client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise PublishError(
                f"student server at {self.root} unreachable: {type(exc).__name__}: {exc}"
            ) from None
        if response.status_code not in expect:
            raise PublishError(
                f"{method} {path} → {response.status_code}: {_error_message(response)}", response.status_code
            )
        return response


def publish_adapter(
    db: Database,
    publisher: StudentPublisher,
    adapter: Adapter,
    *,
    adapters_dir: str | Path,
    adapter_root: str | None = None,
) -> bool:
    """Load a registered adapter into the student server, set its status to ``published`` and
    write its training envelope (``Adapter.metrics["features"]``) to ``Task.features``, which
    ``router.decide`` reads to keep requests the student never saw on the teacher.

    Returns what ``StudentPublisher.publish`` returns; raises its errors (nothing is written then).
    """
    loaded_now = publisher.publish(adapter.name, student_path(adapter.path, adapters_dir, adapter_root))
    features = adapter.metrics.get("features")
    with db.session() as session:
        stored = session.get(Adapter, adapter.name)
        if stored is not None:
            stored.status = "published"
            session.add(stored)
        if isinstance(features, dict):
            session.execute(
                update(Task).where(Task.key == adapter.task).values(features=features, updated_at=utcnow())  # type: ignore[arg-type]
            )
        session.commit()
    return loaded_now


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", ""))
    if isinstance(body, dict) and "message" in body:  # older vLLM: the error object is the body
        return str(body["message"])
    return str(error or body)[:500]


def _same_path(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")
