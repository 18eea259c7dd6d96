"""Gateway overhead, in one run: the upstream direct, a bare Python forwarder, distillgate (recording
to SQLite and to PostgreSQL, cache hits, streaming) and LiteLLM's proxy, all in front of the same
static upstream (``bench/upstream.py``), loaded on loopback by wrk and ``bench/loadgen.py``.

Phases: warm-up; latency at 1 connection (repeated, targets interleaved, so drift hits all alike);
closed loops at 16 and 64 connections (max req/s, CPU seconds per 1k requests from /proc, RSS);
streaming pass-through (time to first chunk and per-chunk delay against the upstream's send stamps);
an open loop at ``--rate`` req/s (repeated, median p99); a 2x-max-rate overload of distillgate (sheds must be 429/503 and
OpenAI-shaped, ``/healthz`` must answer, latency must recover, and every 2xx the clients got must
have its row in the ``record`` table); optionally a soak at half the max rate (``--soak SECONDS``).
It prints tables (rich) or, with ``--json``, one JSON document.

LiteLLM runs from its own virtualenv, never the project's: ``--litellm-venv PATH`` (default
/tmp/litellm-venv, made with ``python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install
'litellm[proxy]' uvloop``; ``--install-litellm`` does that when it is missing). Without it, or with
``--no-litellm``, LiteLLM is skipped with a note. PostgreSQL: a fresh database is created through
``--pg-url`` (default postgresql://postgres@127.0.0.1:5432/test) and dropped afterwards.

Run: ``python bench/gateway_overhead.py [--quick] [--json] [--soak 600] [--profile 10]``.
The machine is shared and small: every figure is compared with baselines measured in the same run,
and the noise table shows how far repeats of the same measurement disagree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import loadgen as lg
import stack
import yaml
from rich.console import Console
from rich.table import Table

ALL_TARGETS = ("direct", "forwarder", "dg-sqlite", "dg-pg", "dg-cache", "litellm")
ERROR_KEYS = {"message", "type", "param", "code"}

err = Console(stderr=True, highlight=False, width=160)


@dataclass
class Plan:
    """How long and how often each phase runs."""

    repeats: int
    latency_s: float
    closed_s: float
    warmup_s: float
    open_s: float
    overload_s: float
    stream_requests: int
    rate: float
    connections: tuple[int, ...] = (16, 64)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        quick = args.quick
        return cls(
            repeats=args.repeats or (1 if quick else 3),
            latency_s=args.duration or (2.0 if quick else 3.0),
            closed_s=args.duration or (2.0 if quick else 4.0),
            warmup_s=1.0 if quick else 2.0,
            open_s=args.open_duration or (3.0 if quick else 10.0),
            overload_s=(4.0 if quick else 10.0) if args.overload_duration is None else args.overload_duration,
            stream_requests=args.stream_requests or (20 if quick else 100),
            rate=args.rate,
        )


@dataclass
class Target:
    """One thing the load is pointed at. ``server`` is whose CPU and memory are counted."""

    name: str
    server: stack.Server
    body: bytes
    stream_body: bytes
    latency: list[lg.LoadResult] = field(default_factory=list)
    closed: dict[int, list[tuple[lg.LoadResult, float]]] = field(default_factory=dict)
    """Per connection count: (result, CPU seconds used) for each repeat."""
    stream: dict[str, float] | None = None
    stream_problem: str | None = None
    """Why streaming was not measured (the smoke request failed)."""
    open: lg.LoadResult | None = None
    """The open-loop run with the median p99 (of ``open_runs``)."""
    open_runs: list[lg.LoadResult] = field(default_factory=list)
    open_note: str = ""
    rss_mb: float = 0.0
    overhead_ms: float | None = None
    """distillgate's own ``gateway_overhead_seconds`` mean over the 1-connection phase."""
    errors: int = 0
    non_2xx: Counter[int] = field(default_factory=Counter)

    @property
    def url(self) -> str:
        return self.server.chat_url

    @property
    def headers(self) -> dict[str, str]:
        return self.server.headers

    def account(self, result: lg.LoadResult) -> None:
        self.errors += result.errors
        for status, n in result.statuses.items():
            if not 200 <= status < 300:
                self.non_2xx[status] += n

    # medians over repeats
    def p50(self) -> float:
        return _median([r.p50 for r in self.latency])

    def p99(self) -> float:
        return _median([r.p99 for r in self.latency])

    def rps(self, connections: int) -> float:
        return _median([r.rps for r, _ in self.closed.get(connections, [])])

    def p99_at(self, connections: int) -> float:
        return _median([r.p99 for r, _ in self.closed.get(connections, [])])

    def cpu_per_1k(self) -> float:
        runs = [run for runs in self.closed.values() for run in runs]
        requests = sum(r.requests for r, _ in runs)
        return sum(cpu for _, cpu in runs) / requests * 1000 if requests else math.nan


def _median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def closed(target: Target, connections: int, seconds: float, body: bytes | None = None) -> lg.LoadResult:
    body = target.body if body is None else body
    if lg.wrk_available():
        return lg.run_wrk(target.url, body, connections, seconds, headers=target.headers)
    return lg.run(lg.closed_loop(target.url, body, connections, seconds, headers=target.headers))


# ---------------------------------------------------------------- setup


def start_targets(
    args: argparse.Namespace, workdir: Path, notes: list[str], started: list[stack.Server]
) -> list[Target]:
    """Start every wanted server (each appended to ``started`` at once, so it is always stopped)."""
    wanted = set(args.targets.split(",")) if args.targets else set(ALL_TARGETS)
    unknown = wanted - set(ALL_TARGETS)
    if unknown:
        raise SystemExit(
            f"unknown targets: {', '.join(sorted(unknown))} (choose from {', '.join(ALL_TARGETS)})"
        )
    if args.no_litellm:
        wanted.discard("litellm")
    upstream = stack.start_upstream(
        workdir, delay_ms=args.upstream_delay_ms, chunks=args.chunks, chunk_delay_ms=args.chunk_delay_ms
    )
    started.append(upstream)
    upstream.wait_ready()
    servers: dict[str, stack.Server] = {}

    def keep(name: str, server: stack.Server) -> None:
        servers[name] = server
        started.append(server)

    if "forwarder" in wanted:
        keep("forwarder", stack.start_forwarder(workdir, upstream))
    dg_settings: dict[str, Any] = {}
    if args.max_in_flight:
        dg_settings["max_in_flight"] = args.max_in_flight
    for item in args.dg_setting:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--dg-setting wants KEY=VALUE, got {item!r}")
        dg_settings[key] = yaml.safe_load(value)
    dg_common = {
        "auth": not args.no_auth,
        "workers": args.dg_workers,
        "settings": dg_settings,
        "source": Path(args.gateway_src) if args.gateway_src else None,
    }
    if "dg-sqlite" in wanted:
        db = stack.BenchDatabase.sqlite(workdir / "dg-sqlite.db")
        keep("dg-sqlite", stack.start_distillgate(workdir, "dg-sqlite", upstream, db, **dg_common))
    if wanted & {"dg-pg", "dg-cache"}:
        try:
            db = stack.BenchDatabase.fresh_postgres(args.pg_url)
        except Exception as exc:
            notes.append(f"PostgreSQL skipped: {type(exc).__name__}: {exc}")
        else:
            try:
                keep("dg-pg", stack.start_distillgate(workdir, "dg-pg", upstream, db, **dg_common))
            except BaseException:
                db.drop()
                raise
    if args.baseline_src:
        # The same gateway at another commit, started beside this one and interleaved with it in
        # every phase: a before/after comparison whose drift hits both alike.
        base_common = {**dg_common, "source": Path(args.baseline_src)}
        if "dg-sqlite" in wanted:
            db = stack.BenchDatabase.sqlite(workdir / "dg-sqlite-base.db")
            keep(
                "dg-sqlite@base",
                stack.start_distillgate(workdir, "dg-sqlite-base", upstream, db, **base_common),
            )
        if "dg-pg" in wanted:
            try:
                db = stack.BenchDatabase.fresh_postgres(args.pg_url)
            except Exception as exc:
                notes.append(f"PostgreSQL baseline skipped: {type(exc).__name__}: {exc}")
            else:
                try:
                    keep(
                        "dg-pg@base",
                        stack.start_distillgate(workdir, "dg-pg-base", upstream, db, **base_common),
                    )
                except BaseException:
                    db.drop()
                    raise
    if "litellm" in wanted:
        exe = stack.litellm_venv(Path(args.litellm_venv), args.install_litellm)
        if exe is None:
            notes.append(
                f"LiteLLM skipped: no venv at {args.litellm_venv} (create it with `python -m venv "
                f"{args.litellm_venv} && {args.litellm_venv}/bin/pip install 'litellm[proxy]' uvloop`, "
                "or pass --install-litellm)"
            )
        else:
            keep("litellm", stack.start_litellm(workdir, exe, upstream, workers=args.litellm_workers))
    for server in servers.values():
        server.wait_ready(timeout_s=120)

    targets: list[Target] = []
    plain, streamed = lg.chat_body(), lg.chat_body(stream=True)
    if "direct" in wanted:
        targets.append(Target("direct", upstream, plain, streamed))
    for name in ("forwarder", "dg-sqlite", "dg-sqlite@base", "dg-pg", "dg-pg@base"):
        if name in servers and name.split("@")[0] in wanted:
            targets.append(Target(name, servers[name], plain, streamed))
    if "dg-cache" in wanted and "dg-pg" in servers:
        cache = Target(
            "dg-cache",
            servers["dg-pg"],
            lg.chat_body(deterministic=True),
            lg.chat_body(stream=True, deterministic=True),
        )
        if cache_works(cache, notes):
            targets.append(cache)
    if "litellm" in servers:
        targets.append(Target("litellm", servers["litellm"], plain, streamed))
    for target in list(targets):
        problem = smoke(target)
        if problem:
            notes.append(f"{target.name} dropped: {problem}")
            targets.remove(target)
        elif target.stream_problem:
            notes.append(f"{target.name}: streaming not measured: {target.stream_problem}")
    return targets


def smoke(target: Target) -> str | None:
    """A plain request must come back 200 with a chat completion; a streamed one must end in
    ``[DONE]`` (else only the streaming phase skips this target)."""
    try:
        resp = lg.run(lg.request_once(target.url, target.body, target.headers))
        if resp.status != 200:
            return f"HTTP {resp.status}: {resp.body[:300]!r}"
        if not json.loads(resp.body)["choices"][0]["message"]["content"]:
            return "empty answer"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        resp = lg.run(lg.request_once(target.url, target.stream_body, target.headers))
        if resp.status != 200 or b"data: [DONE]" not in resp.body:
            target.stream_problem = f"HTTP {resp.status}: {resp.body[:300]!r}"
    except Exception as exc:
        target.stream_problem = f"{type(exc).__name__}: {exc}"
    return None


def cache_works(target: Target, notes: list[str]) -> bool:
    first = lg.run(lg.request_once(target.url, target.body, target.headers))
    time.sleep(0.3)
    second = lg.run(lg.request_once(target.url, target.body, target.headers))
    if first.status == 200 and second.status == 200 and (second.header("x-distillgate-cache") or "") == "hit":
        return True
    notes.append(
        f"dg-cache skipped: a repeated deterministic request was not a cache hit "
        f"(statuses {first.status}/{second.status}, x-distillgate-cache={second.header('x-distillgate-cache')!r})"
    )
    return False


# ---------------------------------------------------------------- phases


def phase_latency(targets: list[Target], plan: Plan) -> None:
    for target in targets:
        target.account(closed(target, 16, plan.warmup_s))
    for rep in range(plan.repeats):
        for target in targets:
            before = stack.scrape_histogram(target.server, "distillgate_gateway_overhead_seconds")
            result = closed(target, 1, plan.latency_s)
            after = stack.scrape_histogram(target.server, "distillgate_gateway_overhead_seconds")
            if before and after and after[1] > before[1] and target.name.startswith("dg"):
                mean = (after[0] - before[0]) / (after[1] - before[1]) * 1000
                target.overhead_ms = mean if target.overhead_ms is None else min(target.overhead_ms, mean)
            target.latency.append(result)
            target.account(result)
            err.print(
                f"  1 conn  [{rep + 1}/{plan.repeats}] {target.name:10s} p50 {result.p50:7.3f} ms  "
                f"p99 {result.p99:7.3f} ms  {result.rps:8.0f} req/s"
            )


def phase_closed(targets: list[Target], plan: Plan) -> None:
    for connections in plan.connections:
        repeats = plan.repeats if connections == max(plan.connections) else 1
        for rep in range(repeats):
            for target in targets:
                cpu0 = target.server.cpu_seconds()
                result = closed(target, connections, plan.closed_s)
                cpu = target.server.cpu_seconds() - cpu0
                target.closed.setdefault(connections, []).append((result, cpu))
                target.rss_mb = max(target.rss_mb, target.server.rss_mb())
                target.account(result)
                err.print(
                    f"  {connections:2d} conns [{rep + 1}/{repeats}] {target.name:10s} {result.rps:8.0f} req/s  "
                    f"p99 {result.p99:8.2f} ms  CPU {cpu / max(1, result.requests) * 1e6:6.0f} µs/req  "
                    f"errors {result.errors + result.requests - result.ok}"
                )


def phase_stream(targets: list[Target], plan: Plan) -> None:
    for target in targets:
        if target.name == "dg-cache":
            continue  # a replayed stream has no live send stamps to compare against
        if target.stream_problem:
            err.print(
                f"  stream  {target.name:10s} skipped: the smoke request failed: {target.stream_problem}"
            )
            continue
        res = lg.run(lg.stream_probe(target.url, target.stream_body, plan.stream_requests, target.headers))
        target.errors += res.errors
        target.stream = res.summary()
        s = target.stream
        err.print(
            f"  stream  {target.name:10s} first chunk p50 {s['first_chunk_p50']:.3f} ms  "
            f"chunk p99 {s['chunk_p99']:.3f} ms  max {s['chunk_max']:.3f} ms  "
            f"arrivals/chunks {s['reads_per_request']:.1f}/{s['chunks_per_request']:.1f}"
        )


def phase_open(targets: list[Target], plan: Plan) -> None:
    """The open loop, repeated like the other phases (targets interleaved); each target keeps the
    run with the median p99, and all runs' p99s are reported."""
    eligible = []
    for target in targets:
        max_rps = target.rps(max(plan.connections))
        if not max_rps >= plan.rate * 1.2:
            target.open_note = f"skipped: max {max_rps:.0f} req/s < 1.2 x {plan.rate:.0f}"
            err.print(f"  open    {target.name:10s} {target.open_note}")
            continue
        eligible.append(target)
    for rep in range(plan.repeats):
        for target in eligible:
            res = lg.run(lg.open_loop(target.url, target.body, plan.rate, plan.open_s, target.headers))
            target.open_runs.append(res)
            target.account(res)
            err.print(
                f"  open    [{rep + 1}/{plan.repeats}] {target.name:10s} {plan.rate:.0f} req/s: p50 {res.p50:.3f} "
                f"p99 {res.p99:.3f} p99.9 {res.p999:.3f} ms  (generator lag p99 {res.lag_p99:.2f} ms)  "
                f"errors {res.errors}"
            )
    for target in eligible:
        ordered = sorted(target.open_runs, key=lambda r: r.p99)
        target.open = ordered[(len(ordered) - 1) // 2]


_PROBE = """
import json, sys, time, urllib.request
url, interval, until = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
out = []
while time.time() < until:
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            ok = resp.status == 200
    except OSError:
        ok = False
    out.append((time.perf_counter() - t0) * 1000 if ok else None)
    time.sleep(interval)
print(json.dumps(out))
"""


class HealthProbe:
    """GET ``/healthz`` on a fresh connection every ``interval_s`` while the overload runs, from a
    process of its own: a thread here would wait on this process's GIL, which the load
    generator's loop holds, and measure that instead of the gateway."""

    def __init__(self, url: str, seconds: float, interval_s: float = 0.1) -> None:
        self.latencies: list[float] = []
        self.failures = 0
        until = time.time() + seconds
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _PROBE, url, str(interval_s), str(until)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def join(self) -> None:
        out, _ = self.proc.communicate(timeout=60)
        for value in json.loads(out or "[]"):
            if value is None:
                self.failures += 1
            else:
                self.latencies.append(value)

    def summary(self) -> dict[str, float]:
        values = sorted(self.latencies)
        return {
            "probes": len(values) + self.failures,
            "failures": self.failures,
            "p50_ms": lg.percentile(values, 50),
            "p99_ms": lg.percentile(values, 99),
            "max_ms": values[-1] if values else math.nan,
        }


def shed_shapes(samples: dict[int, bytes]) -> dict[str, bool]:
    """For each non-2xx status seen: is its body an OpenAI-shaped error?"""
    out = {}
    for status, body in samples.items():
        try:
            error = json.loads(body)["error"]
            out[str(status)] = isinstance(error, dict) and set(error) >= ERROR_KEYS
        except (ValueError, KeyError, TypeError):
            out[str(status)] = False
    return out


def phase_overload(target: Target, plan: Plan, max_connections: int) -> dict[str, Any]:
    """2x the max closed-loop rate, open loop; then recovery; then the DB must hold every 2xx."""
    db = target.server.db
    assert db is not None
    max_rps = target.rps(max(plan.connections))
    rate = 2 * max_rps
    ok_rows = "status >= 200 AND status < 300"
    rows_before = db.settled_count(ok_rows)
    other_before = db.count_records(f"NOT ({ok_rows})")
    baseline = lg.run(lg.closed_loop(target.url, target.body, 1, plan.latency_s, target.headers))
    # Probes go where an orchestrator's would: distillgate's ops listener (ops_port).
    health = HealthProbe((target.server.ops_url or target.server.base_url) + "/healthz", plan.overload_s)
    rss0 = target.server.rss_mb()
    res = lg.run(
        lg.open_loop(
            target.url, target.body, rate, plan.overload_s, target.headers, max_connections=max_connections
        )
    )
    health.join()
    rss1 = target.server.rss_mb()
    time.sleep(1.0)
    recovery = lg.run(lg.closed_loop(target.url, target.body, 1, plan.latency_s, target.headers))
    rows_after = db.settled_count(ok_rows, quiet_s=2.0)
    other_after = db.count_records(f"NOT ({ok_rows})")
    client_ok = baseline.ok + res.ok + recovery.ok
    new_rows = rows_after - rows_before
    summary = {
        "target": target.name,
        "offered_rps": round(rate, 1),
        "duration_s": plan.overload_s,
        "answered": res.requests,
        "answered_within_s": round(res.elapsed_s, 1),
        "ok": res.ok,
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
        "no_response": res.errors,
        "shed_is_openai_shaped": shed_shapes(res.samples),
        "latency_ms": {"p50": res.p50, "p99": res.p99, "max": res.max},
        "generator_lag_p99_ms": res.lag_p99,
        "health": health.summary(),
        "rss_mb": {"before": round(rss0, 1), "after": round(rss1, 1)},
        "recovery": {
            "before_p50_ms": baseline.p50,
            "before_p99_ms": baseline.p99,
            "after_p50_ms": recovery.p50,
            "after_p99_ms": recovery.p99,
            "after_errors": recovery.errors + recovery.requests - recovery.ok,
        },
        "records": {
            "client_2xx": client_ok,
            "new_2xx_rows": new_rows,
            "new_other_rows": other_after - other_before,
            "client_no_response": res.errors + baseline.errors + recovery.errors,
            # A request the client gave up on may still have been answered and recorded.
            "every_2xx_recorded": client_ok
            <= new_rows
            <= client_ok + res.errors + baseline.errors + recovery.errors,
        },
    }
    err.print(f"  overload {target.name}: {json.dumps(summary)}")
    return summary


def phase_soak(target: Target, plan: Plan, seconds: float) -> dict[str, Any]:
    """Half the max rate for ``seconds``, in windows: per-window p50/p99, errors and RSS.

    The load is wrk with a fixed pause between each connection's answer and its next request,
    sized to give half the max rate: a generator in Python needs about a core at this rate on
    this machine (its own stalls then set the p99), wrk a tenth of one. Unlike the open loop,
    a stalled gateway slows this load down, so a stall shows in fewer requests as well as in p99.
    """
    rate = target.rps(max(plan.connections)) / 2
    window = 60.0 if seconds >= 120 else max(5.0, seconds / 5)
    delay_ms = 10
    connections = max(1, math.ceil(rate * (delay_ms + 1.0) / 1000))
    probe = lg.run_wrk(target.url, target.body, connections, 3, target.headers, delay_ms=delay_ms)
    if probe.rps > 0:  # calibrate the connection count to the measured cycle time
        connections = max(1, round(connections * rate / probe.rps))
    windows = []
    rss_start = target.server.rss_mb()
    elapsed = 0.0
    while elapsed < seconds - 0.5:
        span = min(window, seconds - elapsed)
        res = lg.run_wrk(target.url, target.body, connections, span, target.headers, delay_ms=delay_ms)
        elapsed += span
        windows.append(
            {
                "t_s": round(elapsed),
                "rps": round(res.rps, 1),
                "p50_ms": res.p50,
                "p99_ms": res.p99,
                "ok": res.ok,
                "errors": res.errors + res.requests - res.ok,
                "rss_mb": round(target.server.rss_mb(), 1),
            }
        )
        err.print(f"  soak {target.name} {json.dumps(windows[-1])}")
    p99s = [w["p99_ms"] for w in windows]
    return {
        "target": target.name,
        "rate": round(rate, 1),
        "connections": connections,
        "delay_ms": delay_ms,
        "seconds": seconds,
        "rss_start_mb": round(rss_start, 1),
        "rss_growth_mb": round(windows[-1]["rss_mb"] - rss_start, 1) if windows else math.nan,
        "p99_first_ms": p99s[0] if p99s else math.nan,
        "p99_max_ms": max(p99s) if p99s else math.nan,
        "windows": windows,
    }


def phase_profile(target: Target, plan: Plan, seconds: float, workdir: Path) -> dict[str, Any]:
    """py-spy (GIL-holding samples only, so waits do not count) over the gateway under a closed loop
    at the top connection count: the functions and packages where its Python time goes."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        return {"note": "py-spy not installed (pip install -e '.[bench]')"}
    out = workdir / f"profile-{target.name}.txt"
    cmd = [
        exe,
        "record",
        "--pid",
        str(target.server.pid),
        "--subprocesses",
        "--gil",
        "--threads",
        "--duration",
        str(int(seconds)),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
    ]
    spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.5)
    load = closed(target, max(plan.connections), seconds)
    spy.wait(timeout=seconds + 60)
    if not out.exists():
        return {"note": f"py-spy failed: {spy.stderr.read().decode()[-300:] if spy.stderr else ''}"}
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in out.read_text().splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not stack_text:
            continue
        count = int(count_text)
        parts = stack_text.split(";")
        thread = next((f.split(":", 1)[-1].strip() for f in parts if f.startswith("thread ")), "?")
        frames = [f for f in parts if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        samples += count
        threads[thread] += count
        own[frames[-1]] += count
        # "func (litestar/app.py:623)" -> "litestar"
        location = frames[-1].rpartition("(")[2]
        packages[f"{thread}: {location.split('/')[0].split('.py')[0]}"] += count
        for frame in set(frames):
            if "(gateway/" in frame or "(router/" in frame:  # our code's inclusive cost; the rest is plumbing
                total[frame] += count

    def top(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return [(name, round(100 * c / samples, 1)) for name, c in counter.most_common(n)] if samples else []

    return {
        "samples": samples,
        "load_rps": round(load.rps, 1),
        "raw": str(out),
        "threads_pct": top(threads, 5),
        "packages_pct": top(packages, 12),
        "top_own_pct": top(own, 20),
        "top_total_pct": top(total, 20),
    }


# ---------------------------------------------------------------- report


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def ratio(a: float, b: float) -> str:
    if any(math.isnan(x) or x is None for x in (a, b)) or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def report(targets: list[Target], plan: Plan, extra: dict[str, Any], notes: list[str], as_json: bool) -> None:
    by = {t.name: t for t in targets}
    direct = by.get("direct")
    base_p50 = direct.p50() if direct else 0.0
    base_p99 = direct.p99() if direct else 0.0
    top = max(plan.connections)
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        rows[t.name] = {
            "added_p50_ms": t.p50() - base_p50,
            "added_p99_ms": t.p99() - base_p99,
            "p50_ms": t.p50(),
            "p99_ms": t.p99(),
            **{f"rps_{c}": t.rps(c) for c in plan.connections},
            f"p99_ms_{top}": t.p99_at(top),
            "cpu_s_per_1k": t.cpu_per_1k(),
            "rss_mb": t.rss_mb,
            "errors": t.errors,
            "non_2xx": {str(k): v for k, v in t.non_2xx.items()},
            "server_overhead_ms": t.overhead_ms,
            "open_loop": t.open.to_json() if t.open else t.open_note,
            "open_loop_p99_runs_ms": [r.p99 for r in t.open_runs],
            "stream": t.stream,
            "noise": {
                "p50_ms_runs": [round(r.p50, 4) for r in t.latency],
                "p99_ms_runs": [round(r.p99, 4) for r in t.latency],
                f"rps_{top}_runs": [round(r.rps, 1) for r, _ in t.closed.get(top, [])],
            },
        }
    checks = issue_checks(rows, extra, plan)
    if as_json:
        print(
            json.dumps(
                {"plan": plan.__dict__, "targets": rows, **extra, "checks": checks, "notes": notes},
                default=str,
                indent=2,
            )
        )
        return
    out = Console(highlight=False, width=200)
    table = Table(title=f"Gateway overhead (added = minus direct; medians of {plan.repeats} repeat(s))")
    for col in (
        "target",
        "added p50 ms\n1 conn",
        "added p99 ms\n1 conn",
        *(f"req/s\n{c} conns" for c in plan.connections),
        f"p99 ms\n{top} conns",
        "CPU s /\n1k req",
        "RSS MB",
        "errors",
        f"open loop\n{plan.rate:.0f}/s p99 ms",
        "server\noverhead ms",
    ):
        table.add_column(col, justify="right" if col != "target" else "left")
    for name, r in rows.items():
        table.add_row(
            name,
            fmt(r["added_p50_ms"], 3) if name != "direct" else f"({fmt(r['p50_ms'], 3)})",
            fmt(r["added_p99_ms"], 3) if name != "direct" else f"({fmt(r['p99_ms'], 3)})",
            *(fmt(r[f"rps_{c}"], 0) for c in plan.connections),
            fmt(r[f"p99_ms_{top}"]),
            fmt(r["cpu_s_per_1k"], 3),
            fmt(r["rss_mb"], 0),
            str(r["errors"] + sum(r["non_2xx"].values())),
            fmt(r["open_loop"]["latency_ms"]["p99"], 3) if isinstance(r["open_loop"], dict) else "-",
            fmt(r["server_overhead_ms"], 3),
        )
    out.print(table)
    out.print("[dim]direct row: absolute latency of the upstream itself, in parentheses.[/dim]")

    ratios = Table(title="Ratios (distillgate and peers vs LiteLLM and vs the bare forwarder)")
    for col in (
        "target",
        "added p50\nvs LiteLLM",
        "added p50\nvs forwarder",
        f"req/s {top}\nvs LiteLLM",
        f"req/s {top}\nvs forwarder",
        "CPU/1k\nvs LiteLLM",
        "CPU/1k\nvs forwarder",
    ):
        ratios.add_column(col, justify="right" if col != "target" else "left")
    ll, fw = rows.get("litellm"), rows.get("forwarder")
    for name, r in rows.items():
        if name == "direct":
            continue
        ratios.add_row(
            name,
            ratio(r["added_p50_ms"], ll["added_p50_ms"]) if ll else "-",
            ratio(r["added_p50_ms"], fw["added_p50_ms"]) if fw else "-",
            ratio(r[f"rps_{top}"], ll[f"rps_{top}"]) if ll else "-",
            ratio(r[f"rps_{top}"], fw[f"rps_{top}"]) if fw else "-",
            ratio(r["cpu_s_per_1k"], ll["cpu_s_per_1k"]) if ll else "-",
            ratio(r["cpu_s_per_1k"], fw["cpu_s_per_1k"]) if fw else "-",
        )
    out.print(ratios)

    streams = Table(
        title="Streaming pass-through (ms from the upstream sending a chunk to the client having it)"
    )
    for col in (
        "target",
        "TTFB p50",
        "first chunk p50",
        "first chunk p99",
        "chunk p50",
        "chunk p99",
        "chunk max",
        "arrivals / chunks",
    ):
        streams.add_column(col, justify="right" if col != "target" else "left")
    for name, r in rows.items():
        s = r["stream"]
        if s:
            streams.add_row(
                name,
                fmt(s["ttfb_p50"], 3),
                fmt(s["first_chunk_p50"], 3),
                fmt(s["first_chunk_p99"], 3),
                fmt(s["chunk_p50"], 3),
                fmt(s["chunk_p99"], 3),
                fmt(s["chunk_max"], 3),
                f"{s['reads_per_request']:.1f} / {s['chunks_per_request']:.1f}",
            )
    out.print(streams)

    noise = Table(title="Noise: the same measurement repeated (spread = (max - min) / median)")
    for col in ("target", "p50 ms runs (1 conn)", "p50 spread", f"req/s runs ({top} conns)", "req/s spread"):
        noise.add_column(col, justify="right" if col != "target" else "left")
    for name, r in rows.items():
        p50s, rps = r["noise"]["p50_ms_runs"], r["noise"][f"rps_{top}_runs"]
        noise.add_row(
            name,
            " ".join(fmt(v, 3) for v in p50s),
            _spread(p50s),
            " ".join(fmt(v, 0) for v in rps),
            _spread(rps),
        )
    out.print(noise)

    for key in ("overload", "soak"):
        if key in extra:
            out.print(f"[bold]{key}[/bold]")
            out.print_json(json.dumps(extra[key], default=str))
    prof = extra.get("profile")
    if prof and "samples" in prof:
        out.print(
            f"[bold]profile[/bold] (py-spy, GIL-holding samples: {prof['samples']}, under {prof['load_rps']} req/s; "
            f"raw stacks in {prof['raw']} with --keep)"
        )
        for title, key in (
            ("thread", "threads_pct"),
            ("thread: package (own time)", "packages_pct"),
            ("function (own time)", "top_own_pct"),
            ("gateway/router function (inclusive)", "top_total_pct"),
        ):
            spots = Table(title=title, title_justify="left")
            spots.add_column("%", justify="right")
            spots.add_column(title)
            for name, pct in prof[key]:
                spots.add_row(f"{pct:.1f}", name)
            out.print(spots)
    elif prof:
        out.print(f"profile: {prof.get('note')}")
    checks_table = Table(title="Issue 10 targets (this run)")
    for col in ("criterion", "measured", "pass"):
        checks_table.add_column(col)
    for c in checks:
        checks_table.add_row(
            c["criterion"],
            c["measured"],
            {True: "[green]yes[/green]", False: "[red]no[/red]", None: "-"}[c["pass"]],
        )
    out.print(checks_table)
    m = extra.get("machine", {})
    out.print(
        f"machine: {m.get('cpus')} CPUs, busy {m.get('busy_cpus_avg')} CPUs on average during the measurements, "
        f"{m.get('other_processes_cpus_avg')} of them by processes outside this benchmark "
        f"(load average at start {extra.get('loadavg_start')}, end {m.get('loadavg_end')})"
    )
    for note in notes:
        out.print(f"[yellow]note:[/yellow] {note}")


def _spread(values: list[float]) -> str:
    values = [v for v in values if not math.isnan(v)]
    if len(values) < 2:
        return "-"
    return f"{(max(values) - min(values)) / statistics.median(values) * 100:.0f}%"


def issue_checks(rows: dict[str, dict[str, Any]], extra: dict[str, Any], plan: Plan) -> list[dict[str, Any]]:
    """Issue 10's 'done when' list, measured in this run (PostgreSQL recording is the one that counts)."""
    top = max(plan.connections)
    dg = rows.get("dg-pg") or rows.get("dg-sqlite")
    ll, fw = rows.get("litellm"), rows.get("forwarder")
    checks: list[dict[str, Any]] = []

    def add(criterion: str, measured: str, passed: bool | None) -> None:
        checks.append({"criterion": criterion, "measured": measured, "pass": passed})

    if dg is None:
        return checks
    if ll:
        r = dg[f"rps_{top}"] / ll[f"rps_{top}"]
        add("max req/s >= 10x LiteLLM", f"{r:.1f}x", r >= 10)
        r = dg["added_p50_ms"] / ll["added_p50_ms"] if ll["added_p50_ms"] > 0 else math.nan
        add("added p50 <= 1/10 of LiteLLM's", f"{r:.3f}x", r <= 0.1)
    if fw:
        r = dg[f"rps_{top}"] / fw[f"rps_{top}"]
        add("max req/s >= 50% of bare forwarder", f"{100 * r:.0f}%", r >= 0.5)
        d = dg["added_p50_ms"] - fw["added_p50_ms"]
        add("added p50 <= forwarder's + 0.25 ms", f"+{d:.3f} ms", d <= 0.25)
    add("added p99 at 1 conn <= 1.5 ms", f"{dg['added_p99_ms']:.3f} ms", dg["added_p99_ms"] <= 1.5)
    if isinstance(dg["open_loop"], dict):
        p99 = dg["open_loop"]["latency_ms"]["p99"]
        runs = ", ".join(f"{v:.2f}" for v in dg["open_loop_p99_runs_ms"])
        add(f"open loop {plan.rate:.0f}/s p99 <= 5 ms", f"{p99:.3f} ms (median; runs {runs})", p99 <= 5)
    cache = rows.get("dg-cache")
    if cache and "cache_server_ms" in extra:
        p50 = extra["cache_server_ms"]["p50"]
        add("cache hit p50 <= 0.3 ms server-side", f"{p50:.3f} ms", p50 <= 0.3)
    if dg["stream"]:
        s = dg["stream"]
        add(
            "stream: first chunk p50 <= 1 ms after upstream sent it",
            f"{s['first_chunk_p50']:.3f} ms",
            s["first_chunk_p50"] <= 1,
        )
        held = s["reads_per_request"] < s["chunks_per_request"] - 0.5
        add(
            "stream: no chunk batched with the next (each arrives in its own read)",
            f"{s['reads_per_request']:.1f}/{s['chunks_per_request']:.1f} arrivals, max {s['chunk_max']:.2f} ms",
            not held,
        )
    ov = extra.get("overload")
    if isinstance(ov, dict) and "statuses" in ov:
        sheds = {k: v for k, v in ov["statuses"].items() if k in ("429", "503")}
        shaped = all(ov["shed_is_openai_shaped"].get(k, False) for k in sheds)
        add(
            "2x overload sheds with 429/503, OpenAI-shaped",
            json.dumps(sheds) or "none",
            bool(sheds) and shaped,
        )
        h = ov["health"]
        add(
            "/healthz answers during overload (no failure, p99 <= 1 s)",
            f"{h['failures']} failures, p99 {fmt(h['p99_ms'])} ms",
            h["failures"] == 0 and h["p99_ms"] <= 1000,
        )
        rec = ov["recovery"]
        add(
            "recovers after overload (p50 within 2x of before)",
            f"{fmt(rec['before_p50_ms'], 3)} -> {fmt(rec['after_p50_ms'], 3)} ms",
            rec["after_errors"] == 0 and rec["after_p50_ms"] <= 2 * rec["before_p50_ms"],
        )
        rc = ov["records"]
        add(
            "every accepted (2xx) request has its record",
            f"{rc['new_2xx_rows']} rows / {rc['client_2xx']} client 2xx",
            rc["every_2xx_recorded"],
        )
    soak = extra.get("soak")
    if isinstance(soak, dict) and soak.get("windows"):
        add(
            "soak: RSS grows < 50 MB",
            f"{soak['rss_growth_mb']} MB over {soak['seconds']} s",
            soak["rss_growth_mb"] < 50,
        )
        flat = soak["p99_max_ms"] <= max(2 * soak["p99_first_ms"], soak["p99_first_ms"] + 2)
        add(
            "soak: p99 stays flat",
            f"first {fmt(soak['p99_first_ms'])} ms, max {fmt(soak['p99_max_ms'])} ms"
            f" ({min(w['rps'] for w in soak['windows']):,.0f}-{max(w['rps'] for w in soak['windows']):,.0f}"
            f" req/s for {soak['rate']:,.0f})",
            flat,
        )
    return checks


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, short phases (~2 min)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of tables")
    p.add_argument("--targets", help=f"comma list from {','.join(ALL_TARGETS)} (default: all)")
    p.add_argument("--repeats", type=int, help="repeats of the 1-connection and max-rate runs (3; quick 1)")
    p.add_argument("--duration", type=float, help="seconds per closed-loop run (3-4; quick 2)")
    p.add_argument("--rate", type=float, default=1000.0, help="open-loop rate, req/s (1000)")
    p.add_argument("--open-duration", type=float, help="seconds of the open loop (10; quick 3)")
    p.add_argument("--overload-duration", type=float, help="seconds at 2x max rate (10; quick 4); 0 skips")
    p.add_argument(
        "--overload-connections",
        type=int,
        default=4096,
        help="most client connections in the overload (the gateway sheds past its max_in_flight)",
    )
    p.add_argument(
        "--stream-requests", type=int, help="sequential streamed requests per target (100; quick 20)"
    )
    p.add_argument("--chunks", type=int, default=10, help="chunks per streamed answer")
    p.add_argument("--chunk-delay-ms", type=float, default=5.0, help="upstream delay between chunks")
    p.add_argument("--upstream-delay-ms", type=float, default=0.0, help="upstream delay before each answer")
    p.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="soak at half max rate")
    p.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the PostgreSQL gateway under 64-connection load",
    )
    p.add_argument(
        "--dg-workers", type=int, default=1, help="distillgate worker processes (1, like the forwarder)"
    )
    p.add_argument("--max-in-flight", type=int, default=0, help="override distillgate's max_in_flight")
    p.add_argument(
        "--dg-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a distillgate setting for this run (VALUE is YAML), e.g. gil_switch_interval_s=0.001; repeatable",
    )
    p.add_argument("--no-auth", action="store_true", help="run distillgate without API keys")
    p.add_argument(
        "--gateway-src",
        metavar="DIR",
        help="run gateway/ and router/ from DIR (e.g. `git archive HEAD gateway router | tar -x -C DIR`)",
    )
    p.add_argument(
        "--baseline-src",
        metavar="DIR",
        help="also run the gateway from DIR (another commit: `git archive REF gateway router trainer demo | "
        "tar -x -C DIR`) as dg-sqlite@base / dg-pg@base, interleaved with the current one in every phase",
    )
    p.add_argument(
        "--pg-url", default=stack.PG_ADMIN_URL, help="PostgreSQL URL used to create a fresh database"
    )
    p.add_argument("--litellm-venv", default=str(stack.DEFAULT_LITELLM_VENV), help="LiteLLM's own virtualenv")
    p.add_argument("--install-litellm", action="store_true", help="create the LiteLLM venv when missing")
    p.add_argument("--no-litellm", action="store_true", help="skip LiteLLM")
    p.add_argument(
        "--litellm-workers",
        type=int,
        default=2,
        help="LiteLLM workers (2: one per CPU here, as its production guide advises)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work dir (configs, logs, profiles)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    plan = Plan.from_args(args)
    workdir = Path(tempfile.mkdtemp(prefix="dg-bench-"))
    notes: list[str] = []
    extra: dict[str, Any] = {"loadavg_start": Path("/proc/loadavg").read_text().split()[:3]}
    if not lg.wrk_available():
        notes.append("wrk not found (apt-get install wrk): closed loops ran on the Python generator")
    servers: list[stack.Server] = []
    started = time.monotonic()
    try:
        err.print(f"[bold]starting servers[/bold] in {workdir}")
        targets = start_targets(args, workdir, notes, servers)
        # What else ran on the machine meanwhile: busy CPU minus ours (servers, this process, wrk).
        measured_from = time.monotonic()
        busy0, own0 = stack.machine_busy_seconds(), stack.own_cpu_seconds()
        servers0 = sum(s.cpu_seconds() for s in servers)
        err.print("[bold]latency at 1 connection[/bold]")
        phase_latency(targets, plan)
        err.print("[bold]closed loops[/bold]")
        phase_closed(targets, plan)
        cache = next((t for t in targets if t.name == "dg-cache"), None)
        if cache is not None and cache.server.db is not None:
            rows = cache.server.db.query("SELECT latency_ms FROM record WHERE cache_hit")
            values = sorted(float(r[0]) for r in rows)
            if values:
                extra["cache_server_ms"] = {
                    "hits": len(values),
                    "p50": lg.percentile(values, 50),
                    "p99": lg.percentile(values, 99),
                }
        err.print("[bold]streaming[/bold]")
        phase_stream(targets, plan)
        err.print("[bold]open loop[/bold]")
        phase_open(targets, plan)
        dg = next((t for t in targets if t.name == "dg-pg"), None) or next(
            (t for t in targets if t.name == "dg-sqlite"), None
        )
        if dg is not None and plan.overload_s > 0:
            err.print("[bold]overload[/bold]")
            extra["overload"] = phase_overload(dg, plan, args.overload_connections)
        if dg is not None and args.soak > 0:
            err.print("[bold]soak[/bold]")
            extra["soak"] = phase_soak(dg, plan, args.soak)
        if dg is not None and args.profile > 0:
            err.print("[bold]profile[/bold]")
            extra["profile"] = phase_profile(dg, plan, args.profile, workdir)
        span = time.monotonic() - measured_from
        busy = stack.machine_busy_seconds() - busy0
        ours = stack.own_cpu_seconds() - own0 + sum(s.cpu_seconds() for s in servers) - servers0
        extra["machine"] = {
            "cpus": os.cpu_count(),
            "busy_cpus_avg": round(busy / span, 2),
            "other_processes_cpus_avg": round(max(0.0, busy - ours) / span, 2),
            "loadavg_end": Path("/proc/loadavg").read_text().split()[:3],
        }
        extra["elapsed_s"] = round(time.monotonic() - started, 1)
        report(targets, plan, extra, notes, args.json)
    finally:
        for server in reversed(servers):
            server.stop()
            if server.shutdown_s is not None and server.shutdown_s > 10:
                err.print(f"[yellow]{server.name} took {server.shutdown_s:.1f}s to stop on SIGTERM[/yellow]")
            if server.db is not None:
                try:
                    server.db.drop()
                except Exception as exc:
                    err.print(f"[yellow]could not drop {server.db.pg_name}: {exc}[/yellow]")
        if args.keep:
            err.print(f"work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
