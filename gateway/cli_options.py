"""What every ``distillgate`` command shares: the ``--config`` and ``--json`` options, and the one
way a command loads its settings (a bad file or value names the bad key and exits with 2)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from gateway.settings import Settings, load_settings

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="Settings YAML file.", envvar="DISTILLGATE_CONFIG", exists=True, dir_okay=False
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]


def settings_from(config: Path | None, **overrides: Any) -> Settings:
    """The settings file (``--config``), under ``DISTILLGATE_*`` variables, under the options given
    (those left at ``None`` are not given)."""
    try:
        return load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except Exception as exc:  # pydantic's message names the bad key
        Console(stderr=True).print(f"[red]invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, default=str))
