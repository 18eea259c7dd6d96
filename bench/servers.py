"""Which ASGI server, event loop and worker count distillgate runs on, by measurement.

The same app factory (``gateway.app:app_from_environment``, recording to a fresh PostgreSQL
database) under: uvicorn + uvloop (what ``distillgate serve`` runs), uvicorn + asyncio's own
loop, granian (Rust HTTP, ASGI) with uvloop, and ``distillgate serve`` with 2 workers. Each
gets the same wrk load in front of the same static upstream: latency at 1 connection, max
req/s at 64, and a flood of 2,000 connections during which ``/healthz`` is probed on the API
port (where a flood's accept queue builds). Prints one table.

Run: ``python bench/servers.py [--duration 4] [--repeats 2]`` (granian: ``pip install granian``;
skipped with a note when it is missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg
import stack
from rich.console import Console
from rich.table import Table

FACTORY = "gateway.app:app_from_environment"


def variants() -> dict[str, dict[str, Any]]:
    exe = str(Path(sys.executable))
    found: dict[str, dict[str, Any]] = {
        "uvicorn+uvloop (serve)": {},
        "uvicorn+asyncio": {
            "command": [
                exe,
                "-m",
                "uvicorn",
                "--factory",
                FACTORY,
                "--loop",
                "asyncio",
                "--http",
                "httptools",
                "--host",
                "127.0.0.1",
                "--port",
                "{port}",
                "--no-access-log",
                "--backlog",
                "4096",
            ],
        },
        "serve, 2 workers": {"workers": 2},
    }
    if importlib.util.find_spec("granian") is not None:
        granian = shutil.which("granian") or str(Path(sys.executable).parent / "granian")
        found["granian+uvloop"] = {
            "command": [granian, "--interface", "asgi", "--factory", "--loop", "uvloop", "--host", "127.0.0.1",
                        "--port", "{port}", "--no-ws", "--backlog", "4096", "--log-level", "warning", FACTORY],
        }  # fmt: skip
    return found


def probe_during_flood(server: stack.Server, connections: int, seconds: float) -> tuple[float, int]:
    """p50 of /healthz on the API port while wrk holds ``connections`` busy, and its failures."""
    latencies: list[float] = []
    failures = 0
    done = threading.Event()

    def probe() -> None:
        nonlocal failures
        time.sleep(1.0)
        while not done.is_set():
            t0 = time.perf_counter()
            try:
                with urllib.request.urlopen(server.base_url + "/healthz", timeout=5) as resp:
                    resp.read()
                latencies.append((time.perf_counter() - t0) * 1000)
            except OSError:
                failures += 1
            time.sleep(0.2)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    lg.run_wrk(server.chat_url, lg.chat_body(), connections, seconds, headers=server.headers, threads=1)
    done.set()
    thread.join(10)
    return (statistics.median(latencies) if latencies else float("nan")), failures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=4.0, help="seconds per wrk run")
    p.add_argument("--repeats", type=int, default=2, help="repeats of each measurement (median)")
    p.add_argument("--flood", type=int, default=2000, help="connections in the flood")
    p.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test")
    p.add_argument("--gateway-src", help="run gateway/ and router/ from this directory")
    args = p.parse_args()
    if not lg.wrk_available():
        raise SystemExit("wrk is needed (apt-get install wrk)")
    err = Console(stderr=True)
    work = Path(tempfile.mkdtemp(prefix="dg-servers-"))
    upstream = stack.start_upstream(work, delay_ms=0.0, chunks=10, chunk_delay_ms=5.0)
    rows: list[dict[str, Any]] = []
    try:
        upstream.wait_ready()
        body = lg.chat_body()
        direct = statistics.median(
            lg.run_wrk(upstream.chat_url, body, 1, args.duration).p50 for _ in range(2)
        )
        for name, spec in variants().items():
            db = stack.BenchDatabase.fresh_postgres(args.pg_url)
            server = stack.start_distillgate(
                work,
                name.replace(" ", "_").replace(",", "").replace("+", "_").replace("(", "").replace(")", ""),
                upstream,
                db,
                workers=spec.get("workers", 1),
                command=spec.get("command"),
                source=Path(args.gateway_src) if args.gateway_src else None,
            )
            try:
                server.wait_ready()
                lg.run_wrk(server.chat_url, body, 16, 1.0, headers=server.headers)  # warm-up
                one = [
                    lg.run_wrk(server.chat_url, body, 1, args.duration, headers=server.headers)
                    for _ in range(args.repeats)
                ]
                many = [
                    lg.run_wrk(server.chat_url, body, 64, args.duration, headers=server.headers)
                    for _ in range(args.repeats)
                ]
                health_p50, health_failures = probe_during_flood(server, args.flood, 8.0)
                row = {
                    "server": name,
                    "added_p50": statistics.median(r.p50 for r in one) - direct,
                    "p99": statistics.median(r.p99 for r in one),
                    "rps": statistics.median(r.rps for r in many),
                    "health_p50": health_p50,
                    "health_failures": health_failures,
                    "errors": sum(r.errors + r.requests - r.ok for r in one + many),
                }
                err.print(row)
                rows.append(row)
            finally:
                server.stop()
                db.drop()
    finally:
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)
    base = next((r["rps"] for r in rows if r["server"].startswith("uvicorn+uvloop")), float("nan"))
    table = Table(title="distillgate (PostgreSQL recording) under each server, same upstream and load")
    for column in (
        "server",
        "added p50 ms (1 conn)",
        "p99 ms (1 conn)",
        "req/s (64)",
        "vs serve",
        f"/healthz p50 ms during {args.flood}-conn flood",
        "probe failures",
        "errors",
    ):
        table.add_column(column, justify="left" if column == "server" else "right")
    for r in rows:
        table.add_row(
            r["server"],
            f"{r['added_p50']:.3f}",
            f"{r['p99']:.3f}",
            f"{r['rps']:,.0f}",
            f"{r['rps'] / base:.2f}x",
            f"{r['health_p50']:,.1f}",
            str(r["health_failures"]),
            str(r["errors"]),
        )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
