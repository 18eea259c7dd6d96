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


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who the key is for.")],
    admin: Annotated[bool, typer.Option("--admin", help="May use the admin API.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a key. It is shown once; only its hash is stored."""
    from gateway.auth import create_key
    from gateway.store.db import create_database

    db = create_database(settings_from(config).database_url)
    row, secret = create_key(db, name, admin=admin)
    if as_json:
        print_json({"id": row.id, "name": row.name, "key": secret, "admin": row.admin})
    else:
        console.print(
            f"Created key [bold]{row.name}[/bold] (id {row.id}). Store it now; it is not shown again:"
        )
        typer.echo(secret)


@keys_app.command("list")
def keys_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List keys (prefixes only)."""
    from gateway.auth import list_keys
    from gateway.store.db import create_database

    rows = list_keys(create_database(settings_from(config).database_url))
    data: list[dict[str, Any]] = [
        {
            "id": r.id,
            "name": r.name,
            "prefix": r.prefix,
            "admin": r.admin,
            "created_at": r.created_at,
            "revoked_at": r.revoked_at,
        }
        for r in rows
    ]
    if as_json:
        print_json(data)
        return
    table = Table("id", "name", "prefix", "admin", "created", "revoked")
    for r in data:
        table.add_row(
            str(r["id"]),
            r["name"],
            r["prefix"] + "…",
            "yes" if r["admin"] else "",
            str(r["created_at"])[:19],
            str(r["revoked_at"] or "")[:19],
        )
    console.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key's id.")], config: ConfigOpt = None
) -> None:
    """Revoke a key (takes effect within seconds on every replica)."""
    from gateway.auth import revoke_key
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
