"""``distillgate policy check`` and ``distillgate tasks …``: the router's command-line nouns.

``register`` adds them to the main typer app (``gateway/cli.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from gateway.cli_options import ConfigOpt, JsonOpt, settings_from
from gateway.store.db import Database
from gateway.store.models import Stage
from router.policy import PolicyError, load_policy, policy_summary
from router.stages import DEFAULT_CANARY, TransitionError, UnknownTask
from router.tasks import Action, UnknownAdapter, force_move, recent_pairs, task_detail, task_rows

policy_app = typer.Typer(help="Routing policy files.", no_args_is_help=True)
tasks_app = typer.Typer(
    help="Tasks: list, show, and force moves (promote, rollback, pause, resume, transition)."
)


def register(app: typer.Typer) -> None:
    """Add ``policy`` (with ``check``) and ``tasks`` to ``app``."""
    app.add_typer(policy_app, name="policy")
    app.add_typer(tasks_app, name="tasks")


@policy_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="The policy YAML file.")],
    as_json: JsonOpt = False,
) -> None:
    """Validate a policy file: OK and a summary of each task, or the error naming the bad key (exit 1)."""
    console = Console()
    try:
        policy = load_policy(file)
    except (PolicyError, OSError) as exc:
        message = str(exc) if isinstance(exc, PolicyError) else f"cannot read {file}: {exc}"
        if as_json:
            typer.echo(json.dumps({"ok": False, "file": str(file), "error": message}))
        else:
            Console(stderr=True).print(f"[red]{message}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    summary = policy_summary(policy)
    if as_json:
        typer.echo(json.dumps({"ok": True, "file": str(file), **msgspec.to_builtins(summary)}))
        return
    console.print(f"[green]OK[/green] {file}", highlight=False)
    student = summary.student
    console.print(
        f"teacher {policy.teacher.base_url} ({policy.teacher.model or 'model passed through'}); "
        f"student {student.base_url + ' ' + student.base_model if student else 'none'}",
        highlight=False,
        soft_wrap=True,
    )
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("task", overflow="fold", min_width=16)
    for name in ("scorer", "pass ≥", "min n", "shadow", "canary %", "audit"):
        table.add_column(name)
    for row in summary.tasks:
        table.add_row(
            row.task,
            row.scorer if row.distill else "teacher only",
            f"{row.threshold:g}",
            str(row.min_samples),
            f"{row.shadow_rate:.0%}",
            "/".join(f"{x * 100:g}" for x in row.canary),
            f"{row.audit_rate:.0%}, <{row.rollback_below:g}",
        )
    console.print(table)


def _database_url(config: Path | None, database_url: str | None) -> str:
    return database_url or settings_from(config).database_url


def _canary(config: Path | None, task: str) -> list[float]:
    """The task's canary steps from the policy file the settings name (the defaults without one)."""
    policy_file = settings_from(config).policy_file
    if policy_file is None:
        return list(DEFAULT_CANARY)
    try:
        return list(load_policy(policy_file).for_task(task).canary)
    except (PolicyError, OSError) as exc:
        Console(stderr=True).print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


DatabaseOption = Annotated[
    str | None, typer.Option("--database-url", envvar="DISTILLGATE_DATABASE_URL", help="Database URL.")
]
ReasonOption = Annotated[str | None, typer.Option("--reason", "-r", help="Why (stored with the transition).")]


def _percent(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def _stage(stage: Stage, canary_step: int) -> str:
    return f"{stage} {canary_step}" if stage == Stage.canary else str(stage)


@tasks_app.callback(invoke_without_command=True)
def tasks(
    ctx: typer.Context,
    config: ConfigOpt = None,
    database_url: DatabaseOption = None,
    as_json: JsonOpt = False,
) -> None:
    """List tasks: stage, adapter, student share of traffic, and shadow pair scores (what
    ``GET /admin/tasks`` returns)."""
    if ctx.invoked_subcommand is not None:
        return
    db = Database(_database_url(config, database_url))
    try:
        rows = task_rows(db)
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({"tasks": msgspec.to_builtins(rows)}))
        return
    table = Table("task", "stage", "adapter", "student", "pairs", "pass rate", "reason")
    for row in rows:
        table.add_row(
            row.task,
            _stage(row.stage, row.canary_step),
            row.adapter or "-",
            f"{row.student_ratio:.0%}",
            str(row.pairs),
            _percent(row.pass_rate),
            row.reason or "",
        )
    Console().print(table)


@tasks_app.command("show")
def show(
    task: Annotated[str, typer.Argument(help="The task key.")],
    pairs: Annotated[int, typer.Option("--pairs", "-n", min=0, help="Recent shadow pairs to show.")] = 10,
    config: ConfigOpt = None,
    database_url: DatabaseOption = None,
    as_json: JsonOpt = False,
) -> None:
    """One task: its stage, transitions with their evidence, and recent shadow pairs
    (``GET /admin/tasks/{task}`` and ``…/pairs``)."""
    db = Database(_database_url(config, database_url))
    try:
        detail = task_detail(db, task)
        recent = recent_pairs(db, task, pairs) if pairs else []
    except UnknownTask:
        Console(stderr=True).print(f"[red]no task {task!r}[/red]", highlight=False)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    if as_json:
        typer.echo(json.dumps({**msgspec.to_builtins(detail), "pairs": msgspec.to_builtins(recent)}))
        return
    console = Console()
    console.print(
        f"[bold]{task}[/bold]  {_stage(detail.stage, detail.canary_step)}  adapter {detail.adapter or '-'}  "
        f"student {detail.student_ratio:.0%}  pass rate {_percent(detail.pass_rate)} "
        f"over {detail.pairs} pairs",
        highlight=False,
        soft_wrap=True,
    )
    moves = Table(
        "when", "from", "to", "adapter", "forced", "reason", title="transitions", box=box.SIMPLE_HEAD
    )
    for move in detail.transitions:
        moves.add_row(
            move.created_at[:19],
            move.from_stage,
            move.to_stage,
            move.adapter or "-",
            "yes" if move.forced else "",
            move.reason,
        )
    console.print(moves)
    if recent:
        table = Table("when", "kind", "adapter", "scorer", "score", "passed", "error", title="recent pairs")
        for pair in recent:
            table.add_row(
                pair.created_at[:19],
                pair.kind,
                pair.adapter,
                pair.scorer,
                f"{pair.score:.3f}",
                "yes" if pair.passed else "no",
                pair.error or "",
            )
        console.print(table)


def _apply(
    task: str,
    move: str,
    reason: str | None,
    config: Path | None,
    database_url: str | None,
    as_json: bool,
    *,
    adapter: str | None = None,
    canary_step: int | None = None,
) -> None:
    canary = _canary(config, task)
    db = Database(_database_url(config, database_url))
    try:
        moved = force_move(
            db,
            task,
            move,
            f"forced through the CLI: {reason or move}",
            source="CLI",
            adapter=adapter,
            canary_step=canary_step,
            canary=canary,
        )
    except (UnknownTask, UnknownAdapter, TransitionError) as exc:
        if as_json:
            typer.echo(json.dumps({"ok": False, "task": task, "error": str(exc)}))
        else:
            Console(stderr=True).print(f"[red]{exc}[/red]", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    finally:
        db.dispose()
    row = {
        "task": moved.key,
        "stage": moved.stage,
        "adapter": moved.adapter,
        "canary_step": moved.canary_step,
        "student_ratio": moved.student_ratio,
    }
    if as_json:
        typer.echo(json.dumps({"ok": True, **row}))
        return
    Console().print(
        f"{task}: {_stage(moved.stage, moved.canary_step)} (adapter {moved.adapter or '-'}, student {moved.student_ratio:.0%}); "
        "gateways route on it within a second",
        highlight=False,
        soft_wrap=True,
    )


def _action_command(action: Action, help_text: str) -> None:
    def command(
        task: Annotated[str, typer.Argument(help="The task key.")],
        reason: ReasonOption = None,
        config: ConfigOpt = None,
        database_url: DatabaseOption = None,
        as_json: JsonOpt = False,
    ) -> None:
        _apply(task, action, reason, config, database_url, as_json)

    command.__doc__ = help_text
    tasks_app.command(action, help=help_text)(command)


_action_command("promote", "Promote a task one stage (or canary step) now, without the gate's evidence.")
_action_command("rollback", "Roll a task back to the teacher.")
_action_command("pause", "Pause a task: the teacher answers everything, the gate leaves it alone.")
_action_command("resume", "Resume a paused task in the stage (and canary step) it was paused in.")


@tasks_app.command("transition")
def transition(
    task: Annotated[str, typer.Argument(help="The task key.")],
    stage: Annotated[Stage, typer.Argument(help="The stage to move it to.")],
    adapter: Annotated[
        str | None, typer.Option("--adapter", help="Another registered adapter of the task to use.")
    ] = None,
    canary_step: Annotated[int | None, typer.Option("--canary-step", min=0, help="The canary step.")] = None,
    reason: ReasonOption = None,
    config: ConfigOpt = None,
    database_url: DatabaseOption = None,
    as_json: JsonOpt = False,
) -> None:
    """Force a task into any stage (``POST /admin/tasks/{task}/transition``)."""
    _apply(task, stage, reason, config, database_url, as_json, adapter=adapter, canary_step=canary_step)
