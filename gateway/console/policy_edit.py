"""Editing one task's section of the policy file from the console.

The edited file is checked exactly as ``distillgate policy check`` checks a file
(``router.policy.parse_policy`` on its YAML), so the console refuses with the same error. Only a
valid file is written (whole, then renamed into place) and the store reloads it at once; a
refused edit never touches the file. The file is written back as YAML data: comments in it
are not kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from router.policy import Policy, PolicyError, parse_policy
from router.policy_store import PolicyStore


class NoPolicyFile(PolicyError):
    """The policy was given in code: there is no file to edit."""


def _file(store: PolicyStore | None) -> Path:
    if store is None or store.path is None:
        raise NoPolicyFile("this gateway's policy was given in code, not read from a file: nothing to edit")
    return store.path


def task_section(store: PolicyStore | None, task: str) -> str:
    """The task's own section (``tasks.<task>``) as the file has it, as YAML ('' when it has none)."""
    data = yaml.safe_load(_file(store).read_text()) or {}
    section = (data.get("tasks") or {}).get(task) if isinstance(data, dict) else None
    return "" if section is None else yaml.safe_dump(section, sort_keys=False)


def edited(data: Any, task: str, section_text: str) -> dict[str, Any]:
    """The policy file's data with ``tasks.<task>`` replaced by ``section_text`` (empty: removed)."""
    if not isinstance(data, dict):
        raise PolicyError("invalid policy: the policy file must be a YAML mapping")
    try:
        section = yaml.safe_load(section_text)
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid policy: the section of task {task!r} is not valid YAML: {exc}") from None
    tasks = dict(data.get("tasks") or {})
    if section is None:
        tasks.pop(task, None)
    else:
        tasks[task] = section
    out = {k: v for k, v in data.items() if k != "tasks"}
    return {**out, "tasks": tasks} if tasks else out


def apply_task_section(store: PolicyStore | None, task: str, section_text: str) -> Policy:
    """Validate the file as it would be with the edit, then write it and reload the store.

    Raises ``PolicyError`` (the message ``distillgate policy check`` prints for that file)
    and leaves the file byte for byte as it was."""
    path = _file(store)
    assert store is not None
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise PolicyError(f"invalid policy: {path} is not valid YAML: {exc}") from None
    text = yaml.safe_dump(edited(data, task, section_text), sort_keys=False)
    policy = parse_policy(yaml.safe_load(text), str(path))
    fd, staged = tempfile.mkstemp(prefix=".console-", suffix=".yaml", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
        if path.exists():
            os.chmod(staged, path.stat().st_mode & 0o777)
        os.replace(staged, path)
    except BaseException:
        Path(staged).unlink(missing_ok=True)
        raise
    store.reload(force=True)
    return policy
