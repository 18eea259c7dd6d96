"""What SIGKILL costs the recording (issue 14, item 6): records of requests already answered 200
that are in neither the database nor the spool after ``kill -9``, and how long before the kill
the oldest of them was answered.

Each run starts the static upstream (``bench/upstream.py``) and distillgate on a fresh
PostgreSQL database (SQLite with ``--sqlite``), loads it with N closed-loop connections (threads
here, a new request as soon as the last one is answered), SIGKILLs the gateway's process group
mid-traffic, then compares the request ids the clients got 200 for with the ids in the database
and the spool. ``--baseline-src DIR`` runs the same against ``gateway/`` and ``router/`` from DIR
(``git archive main gateway router | tar -x -C DIR``) in the same run, for a side-by-side row.

The documented bound is ``recorder.flush_interval_s + recorder.stall_s`` (docs/ARCHITECTURE.md,
"The record step"): records wait at most one flush interval in memory, and a batch being written
at most ``stall_s``.

Run: ``python bench/sigkill_window.py [--quick] [--connections 8 64] [--runs 3] [--sqlite]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import stack
from rich.console import Console
from rich.table import Table

err = Console(stderr=True, highlight=False, width=160)


@dataclass
class KillRun:
    build: str
    connections: int
    answered: int
    lost: int
    oldest_lost_ms: float


def load_then_kill(server: stack.Server, connections: int, seconds: float) -> tuple[dict[str, float], float]:
    """Closed-loop load for ``seconds``, then SIGKILL; the answered ids (when) and the kill time."""
    answered: dict[str, float] = {}
    stopping = threading.Event()
    body = json.dumps({"model": "bench-model", "messages": [{"role": "user", "content": "kill window"}]})

    def client() -> None:
        headers = {**server.headers, "content-type": "application/json"}
        with httpx.Client(timeout=10, headers=headers) as http:
            while not stopping.is_set():
                try:
                    r = http.post(server.chat_url, content=body)
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    answered[r.headers["x-distillgate-request-id"]] = time.monotonic()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(connections)]
    for t in threads:
        t.start()
    time.sleep(seconds)
    killed_at = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    stopping.set()
    for t in threads:
        t.join(15)
    return answered, killed_at


def kept_ids(server: stack.Server, spool: Path) -> set[str]:
    assert server.db is not None
    ids = {row[0] for row in server.db.query("SELECT id FROM record")}
    for path in spool.glob("records-*"):
        for line in path.read_bytes().splitlines():
            if line.strip():
                ids.add(json.loads(line)["id"])
    return ids


def one_run(
    workdir: Path,
    upstream: stack.Server,
    build: str,
    source: Path | None,
    connections: int,
    seconds: float,
    pg: bool,
) -> KillRun:
    name = f"{build}-{connections}-{time.monotonic_ns()}"
    db = stack.BenchDatabase.fresh_postgres() if pg else stack.BenchDatabase.sqlite(workdir / f"{name}.db")
    try:
        server = stack.start_distillgate(workdir, name, upstream, db, source=source)
        server.wait_ready(timeout_s=120)
        answered, killed_at = load_then_kill(server, connections, seconds)
        kept = kept_ids(server, workdir / name / "spool")
        lost = [killed_at - at for rid, at in answered.items() if rid not in kept]
        return KillRun(build, connections, len(answered), len(lost), max(lost, default=0.0) * 1000)
    finally:
        db.drop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 run of 2 s per connection count")
    p.add_argument("--connections", type=int, nargs="+", default=[8, 64])
    p.add_argument("--runs", type=int, help="kills per connection count (3; quick 1)")
    p.add_argument("--seconds", type=float, help="load before each kill (4; quick 2)")
    p.add_argument("--sqlite", action="store_true", help="SQLite instead of a fresh PostgreSQL database")
    p.add_argument(
        "--upstream-delay-ms", type=float, default=0.0, help="the upstream's delay before each answer"
    )
    p.add_argument("--baseline-src", metavar="DIR", help="also run gateway/ and router/ from DIR")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    runs = args.runs or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 4.0)
    builds: list[tuple[str, Path | None]] = [("this tree", None)]
    if args.baseline_src:
        builds.insert(0, ("baseline", Path(args.baseline_src)))

    workdir = Path(tempfile.mkdtemp(prefix="dg-sigkill-bench-"))
    upstream = stack.start_upstream(workdir, delay_ms=args.upstream_delay_ms)
    results: list[KillRun] = []
    try:
        upstream.wait_ready()
        for connections in args.connections:
            for _ in range(runs):
                for build, source in builds:  # interleaved: the machine's load hits both alike
                    result = one_run(workdir, upstream, build, source, connections, seconds, not args.sqlite)
                    err.print(f"[dim]{result}[/dim]")
                    results.append(result)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps([r.__dict__ for r in results]))
        return
    print_table(results)


def print_table(results: list[KillRun]) -> None:
    from gateway.settings import RecorderSettings

    defaults = RecorderSettings()
    table = Table(
        title=f"SIGKILL mid-traffic: answered records lost (documented bound: flush_interval_s + stall_s = "
        f"{(defaults.flush_interval_s + defaults.stall_s) * 1000:.0f} ms)"
    )
    for column in ("build", "connections", "kills", "answered (mean)", "lost per kill", "oldest lost, ms"):
        table.add_column(column, justify="right")
    groups: dict[tuple[str, int], list[KillRun]] = {}
    for r in results:
        groups.setdefault((r.build, r.connections), []).append(r)
    for (build, connections), rs in groups.items():
        table.add_row(
            build,
            str(connections),
            str(len(rs)),
            f"{statistics.mean(r.answered for r in rs):,.0f}",
            ", ".join(str(r.lost) for r in rs),
            ", ".join(f"{r.oldest_lost_ms:.0f}" for r in rs),
        )
    Console().print(table)


if __name__ == "__main__":
    main()
