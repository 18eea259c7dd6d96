"""The ``distillgate`` command: one entry, a sub-command per noun; rich tables for people, ``--json`` for machines."""

from __future__ import annotations

import importlib
import os
import signal
import socket
import tempfile
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli_options import ConfigOpt, JsonOpt, print_json, settings_from
from gateway.logs import configure_logging

app = typer.Typer(
    name="distillgate",
    help="OpenAI-compatible gateway that distills a teacher into a student.",
    no_args_is_help=True,
    add_completion=False,
)
keys_app = typer.Typer(help="Gateway API keys.", no_args_is_help=True)
db_app = typer.Typer(help="The database.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(db_app, name="db")

console = Console()


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
    port: Annotated[int | None, typer.Option(help="Port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
) -> None:
    """Run the gateway."""
    import uvicorn

    settings = settings_from(config, host=host, port=port, workers=workers)
    configure_logging(settings.log_level, settings.log_format)
    if config is not None:
        os.environ["DISTILLGATE_CONFIG"] = str(config.resolve())
    for key, value in (("host", host), ("port", port), ("workers", workers)):
        if value is not None:
            os.environ[f"DISTILLGATE_{key.upper()}"] = str(value)
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="distillgate-metrics-")
    # uvicorn drains on SIGTERM, then restores the previous handler and raises the signal again;
    # with the default one the drained process would die by signal (status 143) and orchestrators
    # would count a clean stop as a failure. SIGTERM before uvicorn takes over exits 0 too.
    signal.signal(signal.SIGTERM, exit_cleanly)
    server_config = uvicorn.Config(
        "gateway.app:app_from_environment",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level.lower(),
        log_config=None,  # uvicorn's loggers propagate to the process's handler (gateway/logs.py)
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
        timeout_keep_alive=30,
        backlog=4096,
    )
    sockets = [server_config.bind_socket()]
    if settings.ops_port is not None:
        sockets.append(_ops_socket(settings.host, settings.ops_port))
    server = uvicorn.Server(server_config)
    try:
        if settings.workers > 1:
            from uvicorn.supervisors import Multiprocess

            Multiprocess(server_config, sockets=sockets).run()
        else:
            server_config.load_app()
            server.run(sockets=sockets)
    except KeyboardInterrupt:
        pass
    if settings.workers == 1 and not server.started:
        raise SystemExit(3)  # uvicorn's startup-failure status


def _ops_socket(host: str, port: int) -> socket.socket:
    """The ops listener: the same app on a second port whose accept queue only probes and scrapes
    use. uvloop accepts one connection per loop turn; under a flood of new client connections
    the API port's queue holds thousands, and a probe there would wait behind all of them."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise typer.BadParameter(f"cannot listen on {host}:{port} for ops_port ({exc.strerror})") from None
    sock.set_inheritable(True)
    return sock


def exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM after uvicorn's graceful drain: exit 0 (uvicorn re-raises the signal it caught)."""
    raise SystemExit(0)


def _limit_options(
    expires_in: str | None,
    tasks: list[str] | None,
    rpm: int | None,
    tpm: int | None,
    budget: float | None,
    period: str | None,
    task_limit: list[str] | None,
) -> dict[str, Any]:
    """The key settings given on the command line (``--task-limit task:rpm=10,budget_usd=5``)."""
    from datetime import timedelta

    from gateway.store.models import utcnow
    from router.policy import parse_duration

    out: dict[str, Any] = {}
    if expires_in is not None:
        try:
            out["expires_at"] = utcnow() + timedelta(seconds=parse_duration(expires_in))
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--expires-in") from None
    if tasks:
        out["tasks"] = list(tasks)
    for name, value in (("rpm", rpm), ("tpm", tpm), ("budget_usd", budget), ("budget_period", period)):
        if value is not None:
            out[name] = value
    if task_limit:
        per_task: dict[str, dict[str, Any]] = {}
        for item in task_limit:
            task, _, spec = item.partition(":")
            limits: dict[str, Any] = {}
            for part in filter(None, spec.split(",")):
                field, _, raw = part.partition("=")
                if field not in ("rpm", "tpm", "budget_usd"):
                    raise typer.BadParameter(
                        f"unknown limit {field!r} in {item!r}", param_hint="--task-limit"
                    )
                try:
                    limits[field] = float(raw) if field == "budget_usd" else int(raw)
                except ValueError:
                    raise typer.BadParameter(
                        f"{field} needs a number in {item!r}", param_hint="--task-limit"
                    ) from None
            if not task or not limits:
                raise typer.BadParameter(
                    f"use task:rpm=N,tpm=N,budget_usd=X, not {item!r}", param_hint="--task-limit"
                )
            per_task[task] = limits
        out["task_limits"] = per_task
    return out


ExpiresOpt = Annotated[str | None, typer.Option("--expires-in", help="Expire after this long (30d, 12h).")]
TasksOpt = Annotated[list[str] | None, typer.Option("--task", help="Allow only this task (repeat for more).")]
RpmOpt = Annotated[int | None, typer.Option(help="Requests per minute.")]
TpmOpt = Annotated[int | None, typer.Option(help="Tokens per minute.")]
BudgetOpt = Annotated[float | None, typer.Option("--budget", help="Spend allowed per period, USD.")]
PeriodOpt = Annotated[str | None, typer.Option("--period", help="Budget period: day, week or month.")]
TaskLimitOpt = Annotated[
    list[str] | None, typer.Option("--task-limit", help="Limits on one task: task:rpm=N,tpm=N,budget_usd=X.")
]


def _key_row(view: Any) -> dict[str, Any]:
    import msgspec

    return msgspec.to_builtins(view)


def _fail(exc: Exception) -> typer.Exit:
    console.print(f"[red]{getattr(exc, 'message', exc)}[/red]")
    return typer.Exit(2)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin API.")] = False,
    expires_in: ExpiresOpt = None,
    task: TasksOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    budget: BudgetOpt = None,
    period: PeriodOpt = None,
    task_limit: TaskLimitOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key, optionally with an expiry, a task allow-list and limits. It is shown once;
    only its hash is stored."""
    import msgspec

    from gateway.errors import GatewayError
    from gateway.keys import KeySettings, KeyView, create_key
    from gateway.store.db import create_database

    db = create_database(settings_from(config).database_url)
    try:
        settings = msgspec.convert(
            _limit_options(expires_in, task, rpm, tpm, budget, period, task_limit), KeySettings
        )
        row, secret = create_key(db, name, admin=admin, settings=settings)
    except (GatewayError, msgspec.ValidationError) as exc:
        raise _fail(exc) from None
    if as_json:
        print_json({**_key_row(KeyView.of(row)), "key": secret})
    else:
        console.print(
            f"Created key [bold]{row.name}[/bold] (id {row.id}). Store it now; it is not shown again:"
        )
        typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (prefixes only) with their limits."""
    from gateway.keys import KeyView, list_keys
    from gateway.store.db import create_database

    data = [_key_row(KeyView.of(r)) for r in list_keys(create_database(settings_from(config).database_url))]
    if as_json:
        print_json(data)
        return
    table = Table("id", "name", "prefix", "admin", "tasks", "rpm", "tpm", "budget", "expires", "revoked")
    for r in data:
        budget = f"${r['budget_usd']:g}/{r['budget_period']}" if r["budget_usd"] is not None else ""
        table.add_row(
            str(r["id"]),
            r["name"],
            r["prefix"] + "…",
            "yes" if r["admin"] else "",
            ",".join(r["tasks"]) if r["tasks"] is not None else "all",
            str(r["rpm"] or ""),
            str(r["tpm"] or ""),
            budget,
            str(r["expires_at"] or "")[:19],
            str(r["revoked_at"] or "")[:19],
        )
    console.print(table)


@keys_app.command("show")
def keys_show(key_id: Annotated[int, typer.Argument(help="The key's id.")], config: ConfigOpt = None) -> None:
    """One key's settings, as JSON."""
    from gateway.keys import KeyView, get_key
    from gateway.store.db import create_database

    row = get_key(create_database(settings_from(config).database_url), key_id)
    if row is None:
        console.print(f"[red]no key with id {key_id}[/red]")
        raise typer.Exit(1)
    print_json(_key_row(KeyView.of(row)))


@keys_app.command("update")
def keys_update(
    key_id: Annotated[int, typer.Argument(help="The key's id.")],
    expires_in: ExpiresOpt = None,
    task: TasksOpt = None,
    rpm: RpmOpt = None,
    tpm: TpmOpt = None,
    budget: BudgetOpt = None,
    period: PeriodOpt = None,
    task_limit: TaskLimitOpt = None,
    clear: Annotated[
        list[str] | None,
        typer.Option(
            "--clear", help="Remove a setting: expires_at, tasks, rpm, tpm, budget_usd, task_limits."
        ),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Change a key's expiry, allow-list or limits (every replica applies it within a second)."""
    import msgspec

    from gateway.errors import GatewayError
    from gateway.keys import KeyView, update_key
    from gateway.store.db import create_database

    changes = _limit_options(expires_in, task, rpm, tpm, budget, period, task_limit)
    changes |= {name: None for name in clear or []}
    if not changes:
        raise typer.BadParameter("nothing to change")
    try:
        row = update_key(create_database(settings_from(config).database_url), key_id, changes)
    except (GatewayError, msgspec.ValidationError) as exc:
        raise _fail(exc) from None
    if row is None:
        console.print(f"[red]no key with id {key_id}[/red]")
        raise typer.Exit(1)
    print_json(_key_row(KeyView.of(row)))


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id.")], config: ConfigOpt = None
) -> None:
    """Revoke a key (every replica refuses it within a second; ``POST /admin/keys/{id}/revoke``
    refuses it at once on the replica that serves the call)."""
    from gateway.keys import revoke_key
    from gateway.store.db import create_database

    if not revoke_key(create_database(settings_from(config).database_url), key_id):
        console.print(f"[red]no active key with id {key_id}[/red]")
        raise typer.Exit(1)
    console.print(f"revoked key {key_id}")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOpt = None) -> None:
    """Apply migrations up to the newest."""
    from gateway.store.db import Database

    Database(settings_from(config).database_url).migrate()
    console.print("database is up to date")


@db_app.command("prune")
def db_prune(
    keep_months: Annotated[
        int | None, typer.Option(help="Whole months of records kept (default: retention.records_months).")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply retention once: clear old bodies per task (policy ``retention.body_days``), drop whole
    months past ``records_months`` (one partition each on PostgreSQL), create the next months'
    partitions, delete stale usage counters and expired cache entries."""
    import msgspec

    from gateway.retention import prune
    from gateway.store.db import create_database
    from router.policy import PolicyError, load_policy

    settings = settings_from(config)
    retention = settings.retention
    if keep_months is not None:
        retention = retention.model_copy(update={"records_months": keep_months})
    try:
        policy = load_policy(settings.policy_file) if settings.policy_file else None
    except PolicyError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None
    result = prune(create_database(settings.database_url), policy, retention)
    if as_json:
        print_json(msgspec.to_builtins(result))
        return
    if result.skipped:
        console.print("another replica is pruning; nothing done")
        return
    cleared = sum(result.bodies_cleared.values())
    console.print(
        f"bodies cleared: {cleared} (held by snapshots: {result.bodies_held}); "
        f"partitions dropped: {', '.join(result.partitions_dropped) or 'none'}; "
        f"created: {', '.join(result.partitions_created) or 'none'}; rows deleted: {result.rows_deleted}; "
        f"usage rows: {result.usage_deleted}; cache entries: {result.cache_deleted}"
    )


@db_app.command("current")
def db_current(config: ConfigOpt = None) -> None:
    """Show the database's migration revision."""
    from alembic import command

    from gateway.store.db import alembic_config

    command.current(alembic_config(settings_from(config).database_url))


def _register_plugins() -> None:
    for module in ("router.cli", "trainer.cli", "gateway.commands"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(app)


_register_plugins()


def main() -> None:
    app()
