"""The hot path's cost of per-key limits and PII redaction: two distillgate instances side by side
in front of the same static upstream (``bench/upstream.py``), each on its own fresh PostgreSQL
database, identical but for the controls:

- ``off``: a key without limits, the policy's ``redact`` off;
- ``on``: a key with rpm, tpm and a budget (and a per-task limit on the bench's task), far above
  what the bench sends so nothing is refused, and ``redact`` on with every built-in detector plus
  one custom pattern.

Two request bodies: ``clean`` (nothing to redact: the common case) and ``pii`` (an email, a
phone number, a card number and an IBAN in the prompt, echoed by nothing: the upstream's answer
is static, so only the request is redacted). Latency at 1 connection, repeated with the targets
interleaved so drift hits both alike; then a closed loop at 16 connections for requests/s and the
gateway's CPU seconds per 1,000 requests (its whole process tree, from /proc: steadier than
latency on a busy machine). "own time" is the gateway's ``gateway_overhead_seconds`` mean (its
time per request less the upstream's), which includes waits for the GIL behind the recorder's
writer thread, where redaction runs.

Run: ``python bench/controls_overhead.py [--quick] [--repeats N] [--duration S] [--json]``.
The figure the issue asks for: ``added p50`` (on - off, median over repeats) within 0.1 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg
import stack
from rich.console import Console
from rich.table import Table

err = Console(stderr=True, highlight=False, width=140)
TASK = "bench-task"
PII = (
    "Please update my details: email jane.doe@example.org, phone +44 20 7946 0958, "
    "card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00. Thanks!"
)
CLEAN = "Please summarise the attached meeting notes in three short bullet points, thanks!"
REDACT_ON = {"redact": {"enabled": True, "patterns": {"ticket": r"TCK-\d{8}"}}}
LIMIT_OPTIONS = [
    "--rpm",
    "10000000",
    "--tpm",
    "1000000000",
    "--budget",
    "1000000",
    "--period",
    "month",
    "--task-limit",
    f"{TASK}:rpm=10000000,budget_usd=1000000",
]


def body(content: str) -> bytes:
    data = json.loads(lg.chat_body(content=content))
    data["metadata"] = {"task": TASK}
    return json.dumps(data, separators=(",", ":")).encode()


def micro() -> dict[str, float]:
    """CPU microseconds per call of what the controls add, measured in this process: the request
    path's ``Limiter.admit`` (a key with every limit, one per-task limit), and the writer thread's
    ``Redactor.row`` on a clean and on a PII row (steady state: validators' verdicts cached)."""
    import time

    from gateway.auth import Caller, KeyLimits, TaskLimits
    from gateway.limits import Limiter
    from gateway.metrics import Metrics
    from gateway.redaction import Redactor
    from gateway.store.db import Database
    from router.policy import parse_policy

    limiter = Limiter(Database("sqlite://"))
    limited = Caller(
        1,
        False,
        limits=KeyLimits(
            rpm=10**9, tpm=10**9, budget_usd=1e9, tasks={TASK: TaskLimits(rpm=10**9, budget_usd=1e9)}
        ),
    )
    policy = parse_policy({"teacher": {"base_url": "http://t/v1"}, "defaults": REDACT_ON})
    redactor = Redactor(lambda: policy, Metrics())

    def row(text: str) -> dict[str, Any]:
        return {
            "task": TASK,
            "request": json.loads(body(text)),
            "response": {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": "bench-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "A static answer."},
                        "finish_reason": "stop",
                    }
                ],
            },
            "shadow": None,
            "error": None,
        }

    def cpu_us(fn: Any, n: int) -> float:
        fn()
        start = time.process_time()
        for _ in range(n):
            fn()
        return (time.process_time() - start) / n * 1e6

    return {
        "admit_us": cpu_us(lambda: limiter.admit(limited, TASK), 20000),
        "redact_clean_row_us": cpu_us(lambda: redactor.row(row(CLEAN)), 2000),
        "redact_pii_row_us": cpu_us(lambda: redactor.row(row(PII)), 500),
    }


def closed(server: stack.Server, payload: bytes, connections: int, seconds: float) -> lg.LoadResult:
    if lg.wrk_available():
        return lg.run_wrk(server.chat_url, payload, connections, seconds, headers=server.headers)
    return lg.run(lg.closed_loop(server.chat_url, payload, connections, seconds, headers=server.headers))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="Short phases (a smoke run).")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--duration", type=float, default=None, help="Seconds per latency run.")
    parser.add_argument("--pg-url", default=stack.PG_ADMIN_URL)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    seconds = args.duration or (2.0 if args.quick else 5.0)
    started: list[stack.Server] = []
    databases: list[stack.BenchDatabase] = []
    workdir = Path(tempfile.mkdtemp(prefix="dg-controls-"))
    try:
        upstream = stack.start_upstream(workdir)
        started.append(upstream)
        upstream.wait_ready()
        servers: dict[str, stack.Server] = {}
        for name, defaults, key_options in (("off", {}, []), ("on", REDACT_ON, LIMIT_OPTIONS)):
            db = stack.BenchDatabase.fresh_postgres(args.pg_url)
            databases.append(db)
            server = stack.start_distillgate(
                workdir, f"dg-{name}", upstream, db, policy_defaults=defaults, key_options=key_options
            )
            started.append(server)
            servers[name] = server
        for server in servers.values():
            server.wait_ready(timeout_s=120)
        bodies = {"clean": body(CLEAN), "pii": body(PII)}
        latency: dict[tuple[str, str], list[lg.LoadResult]] = {}
        overhead: dict[tuple[str, str], list[float]] = {}
        cpu: dict[tuple[str, str], float] = {}
        throughput: dict[tuple[str, str], lg.LoadResult] = {}
        for server in servers.values():
            closed(server, bodies["clean"], 16, 1.0 if args.quick else 2.0)  # warm-up
        for rep in range(repeats):
            for kind, payload in bodies.items():
                for name, server in servers.items():
                    before = stack.scrape_histogram(server, "distillgate_gateway_overhead_seconds")
                    result = closed(server, payload, 1, seconds)
                    after = stack.scrape_histogram(server, "distillgate_gateway_overhead_seconds")
                    latency.setdefault((kind, name), []).append(result)
                    if before and after and after[1] > before[1]:
                        mean_ms = (after[0] - before[0]) / (after[1] - before[1]) * 1000
                        overhead.setdefault((kind, name), []).append(mean_ms)
                    err.print(
                        f"  [{rep + 1}/{repeats}] {kind:5s} {name:3s} p50 {result.p50:7.3f} ms  "
                        f"p99 {result.p99:7.3f} ms  {result.rps:7.0f} req/s  failed {result.requests - result.ok}"
                    )
        for kind, payload in bodies.items():
            for name, server in servers.items():
                cpu_before = server.cpu_seconds()
                throughput[(kind, name)] = result = closed(server, payload, 16, seconds)
                cpu[(kind, name)] = (server.cpu_seconds() - cpu_before) / max(1, result.requests) * 1000
        counts = {name: db.settled_count() for name, db in zip(servers, databases, strict=True)}
        redacted = int(databases[1].query("SELECT count(*) FROM record WHERE redacted")[0][0])
        rows: list[dict[str, Any]] = []
        for kind in bodies:
            off = statistics.median(r.p50 for r in latency[(kind, "off")])
            on = statistics.median(r.p50 for r in latency[(kind, "on")])
            paired = statistics.median(
                b.p50 - a.p50 for a, b in zip(latency[(kind, "off")], latency[(kind, "on")], strict=True)
            )
            rows.append(
                {
                    "body": kind,
                    "p50_off_ms": off,
                    "p50_on_ms": on,
                    "added_p50_ms": paired,
                    "p99_off_ms": statistics.median(r.p99 for r in latency[(kind, "off")]),
                    "p99_on_ms": statistics.median(r.p99 for r in latency[(kind, "on")]),
                    "overhead_off_ms": statistics.median(overhead.get((kind, "off"), [float("nan")])),
                    "overhead_on_ms": statistics.median(overhead.get((kind, "on"), [float("nan")])),
                    "cpu_s_per_1k_off": cpu[(kind, "off")],
                    "cpu_s_per_1k_on": cpu[(kind, "on")],
                    "rps_off_16": throughput[(kind, "off")].rps,
                    "rps_on_16": throughput[(kind, "on")].rps,
                    "within_0_1_ms": paired <= 0.1,
                }
            )
        errors = {
            f"{kind}/{name}": sum(r.requests - r.ok + r.errors for r in results)
            for (kind, name), results in latency.items()
        }
        out: dict[str, Any] = {
            "rows": rows,
            "micro": micro(),
            "records": counts,
            "redacted_records_on": redacted,
            "failed_requests": errors,
            "repeats": repeats,
            "seconds": seconds,
        }
        if args.json:
            print(json.dumps(out, indent=2))
            return
        table = Table(title="limits + redaction: on vs off (1 connection p50/p99, 16 connections req/s)")
        for column in (
            "body",
            "p50 off",
            "p50 on",
            "added p50 (paired)",
            "p99 off",
            "p99 on",
            "own time off",
            "own time on",
            "CPU s/1k off",
            "CPU s/1k on",
            "req/s off",
            "req/s on",
            "≤ 0.1 ms",
        ):
            table.add_column(column, justify="right")
        for row in rows:
            table.add_row(
                row["body"],
                f"{row['p50_off_ms']:.3f}",
                f"{row['p50_on_ms']:.3f}",
                f"{row['added_p50_ms']:+.3f}",
                f"{row['p99_off_ms']:.3f}",
                f"{row['p99_on_ms']:.3f}",
                f"{row['overhead_off_ms']:.3f}",
                f"{row['overhead_on_ms']:.3f}",
                f"{row['cpu_s_per_1k_off']:.3f}",
                f"{row['cpu_s_per_1k_on']:.3f}",
                f"{row['rps_off_16']:.0f}",
                f"{row['rps_on_16']:.0f}",
                "yes" if row["within_0_1_ms"] else "NO",
            )
        console = Console(width=200)
        console.print(table)
        m = out["micro"]
        console.print(
            f"CPU per call: Limiter.admit {m['admit_us']:.2f} µs (request path); Redactor.row "
            f"{m['redact_clean_row_us']:.1f} µs clean, {m['redact_pii_row_us']:.1f} µs with PII (writer thread)"
        )
        console.print(f"records: {counts}; redacted on 'on': {redacted}; failed requests: {errors}")
    finally:
        for server in reversed(started):
            server.stop()
        for db in databases:
            db.drop()


if __name__ == "__main__":
    main()
