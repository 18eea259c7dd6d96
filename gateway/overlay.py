"""How layered configuration combines: one mapping laid over another, nested mappings key by key.

The settings file under the environment under explicit arguments (``gateway.settings``), and a
task's overrides over the policy's defaults (``router.policy``).
"""

from __future__ import annotations

from typing import Any


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``top`` on top: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        out[key] = overlay(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return out
