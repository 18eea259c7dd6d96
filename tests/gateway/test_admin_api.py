"""The admin API's documentation (``/docs``): every admin route, under one tag, with the schema
of what it answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.app import create_app
from gateway.settings import Settings


def resolve(schema: dict[str, Any], document: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return document["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


def test_docs_show_a_response_schema_for_every_admin_route(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'dg.db'}"))
    document = app.openapi_schema.to_schema()
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        if path.startswith("/admin/")
        for method, operation in item.items()
    ]
    # the recorder, the records, the tasks and their moves (each also by query, for names like a/b), the policy, the keys
    assert len(operations) == 24
    for path, method, operation in operations:
        assert operation["tags"] == ["admin"], (method, path)
        (status,) = [code for code in operation["responses"] if code.startswith("2")]
        schema = operation["responses"][status]["content"]["application/json"]["schema"]
        properties = resolve(schema, document).get("properties")
        assert properties, (method, path, schema)  # a typed struct, not an untyped object
    tasks = resolve(
        document["paths"]["/admin/tasks"]["get"]["responses"]["200"]["content"]["application/json"]["schema"],
        document,
    )
    row = resolve(tasks["properties"]["data"]["items"], document)
    assert {"task", "stage", "adapter", "student_ratio", "pass_rate"} <= set(row["properties"])
