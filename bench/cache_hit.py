"""What a prompt-cache hit costs at the gateway (issue 3): client-side and server-side latency.

One run starts the static upstream and distillgate (SQLite, or PostgreSQL with ``--pg``), fills
the cache with one deterministic request (temperature 0), then measures, interleaved and repeated:
the upstream directly (the loopback floor), cache hits (plain and streamed replay), and misses
(temperature 0.7, always forwarded) for comparison. Client-side figures come from wrk at 1
connection (``added`` = minus direct); server-side ones from the hit records' ``latency_ms`` in
the database (the gateway's own clock, handler entry to answer) and from the
``distillgate_gateway_overhead_seconds`` histogram. The hit ratio is checked in the database too.

Run: ``python bench/cache_hit.py [--quick] [--pg] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg
import stack
from rich.console import Console
from rich.table import Table

err = Console(stderr=True, highlight=False, width=160)
OVERHEAD = "distillgate_gateway_overhead_seconds"


def measure(
    url: str, body: bytes, headers: dict[str, str], connections: int, seconds: float
) -> lg.LoadResult:
    if lg.wrk_available():
        return lg.run_wrk(url, body, connections, seconds, headers=headers)
    return lg.run(lg.closed_loop(url, body, connections, seconds, headers=headers))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repeat of 2 s runs")
    p.add_argument("--repeats", type=int, help="interleaved repeats (3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per run (3; quick 2)")
    p.add_argument("--pg", action="store_true", help="PostgreSQL (a fresh database) instead of SQLite")
    p.add_argument("--pg-url", default=stack.PG_ADMIN_URL)
    p.add_argument("--no-auth", action="store_true", help="run distillgate without API keys")
    p.add_argument("--gateway-src", metavar="DIR", help="run gateway/ and router/ from DIR")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    args = p.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    seconds = args.duration or (2.0 if args.quick else 3.0)

    workdir = Path(tempfile.mkdtemp(prefix="dg-cache-bench-"))
    servers: list[stack.Server] = []
    db = (
        stack.BenchDatabase.fresh_postgres(args.pg_url)
        if args.pg
        else stack.BenchDatabase.sqlite(workdir / "dg.db")
    )
    try:
        upstream = stack.start_upstream(workdir)
        servers.append(upstream)
        upstream.wait_ready()
        dg = stack.start_distillgate(
            workdir,
            "dg",
            upstream,
            db,
            auth=not args.no_auth,
            source=Path(args.gateway_src) if args.gateway_src else None,
            policy_defaults={"cache": {"enabled": True, "only_deterministic": True, "ttl": "1d"}},
        )
        servers.append(dg)
        dg.wait_ready()
        hit_body = lg.chat_body(deterministic=True, content="What is the capital of France?")
        hit_stream = lg.chat_body(stream=True, deterministic=True, content="What is the capital of France?")
        for body in (hit_body, hit_stream):  # fill (the first may miss), then it must hit
            lg.run(lg.request_once(dg.chat_url, body, dg.headers))
        time.sleep(0.3)
        for body in (hit_body, hit_stream):
            check = lg.run(lg.request_once(dg.chat_url, body, dg.headers))
            if check.status != 200 or check.header("x-distillgate-cache") != "hit":
                raise SystemExit(
                    f"no cache hit: HTTP {check.status}, x-distillgate-cache={check.header('x-distillgate-cache')!r}"
                    f" {check.body[:200]!r}"
                )
        miss_body = lg.chat_body(content="What is the capital of France?")
        rows: dict[str, list[lg.LoadResult]] = {"direct": [], "hit": [], "hit (stream)": [], "miss": []}
        targets = {
            "direct": (upstream.chat_url, hit_body, {}),
            "hit": (dg.chat_url, hit_body, dg.headers),
            "hit (stream)": (dg.chat_url, hit_stream, dg.headers),
            "miss": (dg.chat_url, miss_body, dg.headers),
        }
        for url, body, headers in targets.values():
            measure(url, body, headers, 8, 1.0)  # warm-up
        hits_before = db.settled_count("cache_hit")
        hit_requests = 0
        overhead: dict[str, list[float]] = {"hit": [], "miss": []}
        for rep in range(repeats):
            for name, (url, body, headers) in targets.items():
                before = stack.scrape_histogram(dg, OVERHEAD)
                run = measure(url, body, headers, 1, seconds)
                after = stack.scrape_histogram(dg, OVERHEAD)
                rows[name].append(run)
                if name.startswith("hit"):
                    hit_requests += run.requests
                if before and after and after[1] > before[1] and name in overhead:
                    overhead[name].append((after[0] - before[0]) / (after[1] - before[1]) * 1000)
                err.print(
                    f"  [{rep + 1}/{repeats}] {name:13s} p50 {run.p50:.3f} ms  p99 {run.p99:.3f} ms  "
                    f"{run.rps:,.0f} req/s"
                )
        # The hits recorded during the 1-connection runs (the newest ones) give the server-side view.
        hit_rows = db.settled_count("cache_hit") - hits_before
        server_ms = sorted(
            float(r[0])
            for r in db.query(
                f"SELECT latency_ms FROM record WHERE cache_hit ORDER BY created_at DESC LIMIT {int(hit_rows)}"
            )
        )
        throughput = {
            name: measure(url, body, headers, 64, seconds) for name, (url, body, headers) in targets.items()
        }
        result = summarise(rows, throughput, server_ms, overhead, hit_rows, hit_requests)
        result["database"] = db.kind
        if args.json:
            print(json.dumps(result, indent=2, default=str))
        else:
            show(result)
    finally:
        for server in reversed(servers):
            server.stop()
        db.drop()
        shutil.rmtree(workdir, ignore_errors=True)


def _med(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def summarise(
    rows: dict[str, list[lg.LoadResult]],
    throughput: dict[str, lg.LoadResult],
    server_ms: list[float],
    overhead: dict[str, list[float]],
    hit_rows: int,
    hit_requests: int,
) -> dict[str, Any]:
    base50 = _med([r.p50 for r in rows["direct"]])
    base99 = _med([r.p99 for r in rows["direct"]])
    client = {}
    for name, runs in rows.items():
        p50, p99 = _med([r.p50 for r in runs]), _med([r.p99 for r in runs])
        client[name] = {
            "p50_ms": p50,
            "p99_ms": p99,
            "added_p50_ms": p50 - base50,
            "added_p99_ms": p99 - base99,
            "p50_runs": [round(r.p50, 4) for r in runs],
            "rps_1_conn": _med([r.rps for r in runs]),
            "rps_64_conns": throughput[name].rps,
            "errors": sum(r.errors + r.requests - r.ok for r in runs) + throughput[name].errors,
        }
    return {
        "client": client,
        "server": {
            "hit_records": len(server_ms),
            "p50_ms": lg.percentile(server_ms, 50),
            "p99_ms": lg.percentile(server_ms, 99),
            "overhead_metric_mean_ms": {k: _med(v) for k, v in overhead.items()},
        },
        "hit_ratio": {"hit_rows": hit_rows, "hit_requests_answered": hit_requests},
    }


def show(result: dict[str, Any]) -> None:
    out = Console(highlight=False, width=160)
    table = Table(title=f"Cache hit cost (client side, 1 connection; {result['database']})")
    for col in (
        "",
        "p50 ms",
        "p99 ms",
        "added p50 ms",
        "added p99 ms",
        "p50 runs",
        "req/s 1 conn",
        "req/s 64 conns",
        "errors",
    ):
        table.add_column(col, justify="left" if not col else "right")
    for name, r in result["client"].items():
        table.add_row(
            name,
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            "-" if name == "direct" else f"{r['added_p50_ms']:.3f}",
            "-" if name == "direct" else f"{r['added_p99_ms']:.3f}",
            " ".join(f"{v:.3f}" for v in r["p50_runs"]),
            f"{r['rps_1_conn']:,.0f}",
            f"{r['rps_64_conns']:,.0f}",
            str(r["errors"]),
        )
    out.print(table)
    s = result["server"]
    out.print(
        f"server side (hit records' latency_ms, {s['hit_records']} hits): p50 {s['p50_ms']:.3f} ms, "
        f"p99 {s['p99_ms']:.3f} ms; gateway_overhead_seconds mean: "
        + ", ".join(f"{k} {v:.3f} ms" for k, v in s["overhead_metric_mean_ms"].items())
    )
    h = result["hit_ratio"]
    out.print(
        f"hit records written during the 1-connection runs: {h['hit_rows']} for {h['hit_requests_answered']} "
        "hit requests answered (wrk may leave one in flight per run)"
    )
    ok = s["p50_ms"] <= 0.3
    out.print(
        f"issue 3/10 target: cache hit p50 <= 0.3 ms server-side: {'[green]yes[/green]' if ok else '[red]no[/red]'}"
    )


if __name__ == "__main__":
    main()
