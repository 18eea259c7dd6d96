"""Unbounded task cardinality (issue 14, item 10): requests that each name a new ``metadata.task``.

Two gateways on PostgreSQL in front of the static upstream, one after the other: the task caps
off (every name a task with its own row, routing state and metric series, as before issue 14)
and on (the defaults: 200 new names per key, 1,000 tasks, 200 metric task labels; the rest
fold into ``_overflow`` and ``_other``). Every ``--sample-every`` requests it samples the
gateway's RSS, the size and fetch time of ``/metrics`` and the request rate since the last
sample, and prints both runs side by side.

Run: ``.venv/bin/python bench/task_cardinality.py`` (60,000 requests per side; ``--requests``
and ``--connections`` to change it). Before issue 14 the probe measured 725 MB and a 211 MB
``/metrics`` after 30k requests.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg
import stack

UNCAPPED = {"max_new_per_key": 10**9, "max_tasks": 10**9, "max_task_labels": 10**9}


@dataclass
class Sample:
    requests: int
    rss_mb: float
    metrics_kib: float
    metrics_s: float
    rate: float


def body(i: int) -> bytes:
    return orjson.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": f"request {i}"}],
            "metadata": {"task": f"unique-task-{i:06d}"},
        }
    )


def scrape(server: stack.Server) -> tuple[float, float]:
    started = time.perf_counter()
    with urllib.request.urlopen((server.ops_url or server.base_url) + "/metrics", timeout=120) as resp:
        size = len(resp.read())
    return size / 1024, time.perf_counter() - started


async def drive(
    server: stack.Server, requests: int, connections: int, every: int
) -> tuple[list[Sample], int]:
    """Send ``requests`` unique-task requests on ``connections`` keep-alive connections."""
    port = int(server.base_url.rsplit(":", 1)[1])
    pool = lg.Pool("127.0.0.1", port, connections)
    samples: list[Sample] = []
    failed = 0
    next_i = 0
    window_started, window_count = time.perf_counter(), 0

    async def one(limit: int) -> None:
        nonlocal next_i, failed, window_count
        while next_i < limit:
            i = next_i
            next_i += 1
            raw = lg.build_request(server.chat_url, body(i), server.headers)
            try:
                resp = await lg._send(pool, raw, 60.0)
                failed += resp.status != 200
            except (lg.HttpError, OSError):
                failed += 1
            window_count += 1

    while next_i < requests:
        limit = min(next_i + every, requests)
        await asyncio.gather(*(one(limit) for _ in range(connections)))
        done = limit
        rate = window_count / (time.perf_counter() - window_started)
        kib, took = await asyncio.to_thread(scrape, server)
        samples.append(Sample(done, server.rss_mb(), kib, took, rate))
        print(
            f"  {server.name}: {done:>6} requests, RSS {samples[-1].rss_mb:7.1f} MB, /metrics {kib:9.1f} KiB "
            f"({took * 1000:.0f} ms), {rate:6.0f} req/s",
            flush=True,
        )
        window_started, window_count = time.perf_counter(), 0
    pool.close()
    return samples, failed


def run(
    name: str,
    caps: dict[str, int] | None,
    requests: int,
    args: argparse.Namespace,
    workdir: Path,
    upstream: stack.Server,
) -> tuple[list[Sample], int, int]:
    db = stack.BenchDatabase.fresh_postgres()
    settings = {"tasks": caps} if caps else {}
    server = stack.start_distillgate(workdir, name, upstream, db, settings=settings)
    try:
        server.wait_ready()
        samples, failed = asyncio.run(drive(server, requests, args.connections, args.sample_every))
        time.sleep(2)  # the task table's refresh and the recorder settle
        tasks = int(db.query("SELECT count(*) FROM task")[0][0])
        return samples, failed, tasks
    finally:
        server.stop()
        db.drop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--sample-every", type=int, default=10_000)
    parser.add_argument(
        "--caps-off-requests",
        type=int,
        default=None,
        help="fewer requests for the slow caps-off side (default: --requests)",
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="dg-cardinality-"))
    upstream = stack.start_upstream(workdir)
    try:
        upstream.wait_ready()
        results = {}
        for name, caps in (("caps-off", UNCAPPED), ("caps-on", None)):
            n = args.requests if caps is None else (args.caps_off_requests or args.requests)
            print(f"{name}: {n} requests, each with a new metadata.task", flush=True)
            results[name] = run(name, caps, n, args, workdir, upstream)
    finally:
        upstream.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    off, on = results["caps-off"], results["caps-on"]
    print()
    print(
        "| requests | RSS MB caps off | RSS MB caps on | /metrics KiB off | /metrics KiB on | scrape s off | scrape s on | req/s off | req/s on |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by_count = {sample.requests: sample for sample in off[0]}
    for b in on[0]:
        a = by_count.get(b.requests)
        cells = (
            [f"{a.rss_mb:.0f}", f"{a.metrics_kib:.0f}", f"{a.metrics_s:.2f}", f"{a.rate:.0f}"]
            if a
            else ["-"] * 4
        )
        print(
            f"| {b.requests} | {cells[0]} | {b.rss_mb:.0f} | {cells[1]} | {b.metrics_kib:.0f} | "
            f"{cells[2]} | {b.metrics_s:.2f} | {cells[3]} | {b.rate:.0f} |"
        )
    print(
        f"\ntask rows: caps off {off[2]}, caps on {on[2]}; failed requests: caps off {off[1]}, caps on {on[1]}"
    )
    last_off = off[0][-1]
    last_on = next(b for b in on[0] if b.requests == last_off.requests)
    print(
        f"caps on / caps off at {last_on.requests} requests: RSS {last_on.rss_mb / last_off.rss_mb:.2f}x, "
        f"/metrics {last_on.metrics_kib / last_off.metrics_kib:.3f}x, req/s {last_on.rate / last_off.rate:.2f}x"
    )


if __name__ == "__main__":
    main()
