"""CLI commands that join several parts: ``worker``, ``report`` and ``demo``."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli import exit_cleanly
from gateway.cli_options import ConfigOpt, JsonOpt, settings_from
from gateway.logs import configure_logging
from router.policy import parse_duration

console = Console()


def register(app: typer.Typer) -> None:
    @app.command()
    def worker(
        config: ConfigOpt = None, port: Annotated[int | None, typer.Option(help="Metrics port.")] = None
    ) -> None:
        """Run the training scheduler as its own process (Kubernetes); serves /metrics and /healthz."""
        import uvicorn

        from gateway.worker import create_worker_app

        settings = settings_from(config, worker_port=port)
        configure_logging(settings.log_level, settings.log_format)
        signal.signal(signal.SIGTERM, exit_cleanly)
        uvicorn.run(
            create_worker_app(settings),
            host=settings.host,
            port=settings.worker_port,
            log_level=settings.log_level.lower(),
            log_config=None,
            access_log=False,
        )

    @app.command()
    def report(
        config: ConfigOpt = None,
        since: Annotated[
            str, typer.Option(help="Window start, as a duration back from now (24h, 7d).")
        ] = "24h",
        task: Annotated[str | None, typer.Option(help="Only this task.")] = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Spend and savings per task and target over a time window."""
        from gateway.report import ledger
        from gateway.store.db import create_database

        try:
            start = datetime.now(UTC) - timedelta(seconds=parse_duration(since))
        except (ValueError, OverflowError) as exc:
            console.print(f"[red]invalid --since: {exc}[/red]")
            raise typer.Exit(2) from None
        rows = ledger(create_database(settings_from(config).database_url), since=start, task=task)
        totals = {
            "spend_usd": sum(r.spend_usd for r in rows),
            "teacher_usd": sum(r.teacher_usd for r in rows),
            "savings_usd": sum(r.savings_usd for r in rows),
            "requests": sum(r.requests for r in rows),
        }
        if as_json:
            typer.echo(
                json.dumps(
                    {"since": start.isoformat(), "rows": [r.as_dict() for r in rows], "totals": totals}
                )
            )
            return
        table = Table(
            "task",
            "target",
            "requests",
            "errors",
            "prompt tok",
            "completion tok",
            "spend $",
            "teacher-equiv $",
            "saved $",
            "avg ms",
            title=f"distillgate spend since {start:%Y-%m-%d %H:%M} UTC",
        )
        for r in rows:
            table.add_row(
                r.task,
                r.target,
                f"{r.requests:,}",
                f"{r.errors:,}",
                f"{r.prompt_tokens:,}",
                f"{r.completion_tokens:,}",
                f"{r.spend_usd:.4f}",
                f"{r.teacher_usd:.4f}",
                f"{r.savings_usd:.4f}",
                f"{r.latency_ms_avg:.0f}",
            )
        table.add_row(
            "[bold]total[/bold]",
            "",
            f"{totals['requests']:,}",
            "",
            "",
            "",
            f"{totals['spend_usd']:.4f}",
            f"{totals['teacher_usd']:.4f}",
            f"{totals['savings_usd']:.4f}",
            "",
        )
        console.print(table)

    try:
        from demo.run import demo_command
    except ImportError:
        return
    app.command(name="demo")(demo_command)
