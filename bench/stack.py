"""The servers a benchmark runs, each in its own process group: the static upstream, the bare
forwarder, distillgate (SQLite or a fresh PostgreSQL database) and LiteLLM's proxy (own venv).

``Server`` also reads what a server costs from ``/proc``: CPU seconds and RSS of its whole tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024
DEFAULT_LITELLM_VENV = Path("/tmp/litellm-venv")
PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children = _children_map()
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (``/proc/stat``: everything but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK


def own_cpu_seconds() -> float:
    """This process's CPU plus its reaped children's (wrk)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _stat_fields(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


@dataclass
class Server:
    """A started server process (group) and how to talk to it."""

    name: str
    base_url: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    """Headers every request needs (auth)."""
    health_path: str = "/healthz"
    db: BenchDatabase | None = None
    metrics_path: str | None = None
    shutdown_s: float | None = None
    """How long the last ``stop`` took (None before; inf when it had to be killed)."""
    ops_url: str | None = None
    """distillgate's ops listener (probes and scrapes), when it has one."""

    @property
    def chat_url(self) -> str:
        return self.base_url + "/v1/chat/completions"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def cpu_seconds(self) -> float:
        """User+system CPU of the live tree, plus what the root collected from reaped children."""
        total = 0
        for i, pid in enumerate(self.pids()):
            fields = _stat_fields(pid)
            if fields is None:
                continue
            total += int(fields[11]) + int(fields[12])
            if i == 0:
                total += int(fields[13]) + int(fields[14])
        return total / CLK_TCK

    def rss_mb(self) -> float:
        total_kb = 0
        for pid in self.pids():
            try:
                total_kb += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
            except OSError:
                continue
        return total_kb / 1024

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        url = self.base_url + self.health_path
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.name} exited during startup; see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout_s:.0f}s; see {self.log_path}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the group, wait; SIGKILL it after ``timeout_s``."""
        if not self.alive():
            return
        started = time.monotonic()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout_s)
            self.shutdown_s = time.monotonic() - started
        except subprocess.TimeoutExpired:
            self.shutdown_s = float("inf")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def spawn(
    name: str, cmd: list[str], port: int, workdir: Path, env: dict[str, str] | None = None, **kw: Any
) -> Server:
    log_path = workdir / f"{name}.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        # Only the files the bench writes configure distillgate, never the caller's environment.
        env={**{k: v for k, v in os.environ.items() if not k.startswith("DISTILLGATE_")}, **(env or {})},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: stopped as a whole, measured as a tree
    )
    log.close()
    return Server(name, f"http://127.0.0.1:{port}", proc, log_path, **kw)


# ---------------------------------------------------------------- databases


class BenchDatabase:
    """A scratch database for one distillgate instance: a SQLite file or a fresh PostgreSQL DB."""

    def __init__(self, url: str, pg_name: str | None = None, pg_admin_url: str | None = None) -> None:
        self.url = url
        self.pg_name = pg_name
        self.pg_admin_url = pg_admin_url

    @classmethod
    def sqlite(cls, path: Path) -> BenchDatabase:
        return cls(f"sqlite:///{path}")

    @classmethod
    def fresh_postgres(cls, admin_url: str = PG_ADMIN_URL) -> BenchDatabase:
        import psycopg

        name = f"dg_bench_{os.getpid()}_{secrets.token_hex(3)}"
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        base = admin_url.rsplit("/", 1)[0]
        return cls(f"{base}/{name}", pg_name=name, pg_admin_url=admin_url)

    @property
    def kind(self) -> str:
        return "postgresql" if self.pg_name else "sqlite"

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if self.pg_name:
            import psycopg

            with psycopg.connect(self.url, connect_timeout=5) as pg:
                return list(pg.execute(sql.replace("?", "%s"), params).fetchall())
        lite = sqlite3.connect(self.url[len("sqlite:///") :], timeout=30)
        try:
            return list(lite.execute(sql, params).fetchall())
        finally:
            lite.close()

    def count_records(self, where: str = "1=1") -> int:
        return int(self.query(f"SELECT count(*) FROM record WHERE {where}")[0][0])

    def settled_count(self, where: str = "1=1", quiet_s: float = 1.0, timeout_s: float = 60.0) -> int:
        """The record count once it has stopped changing for ``quiet_s`` (the recorder flushed)."""
        deadline = time.monotonic() + timeout_s
        last, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            n = self.count_records(where)
            if n != last:
                last, since = n, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return n
            time.sleep(0.2)
        return last

    def drop(self) -> None:
        if not self.pg_name or not self.pg_admin_url:
            return
        import psycopg

        with psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_name}" WITH (FORCE)')


# ---------------------------------------------------------------- the servers


def start_upstream(
    workdir: Path, *, delay_ms: float = 0.0, chunks: int = 10, chunk_delay_ms: float = 5.0
) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        str(BENCH_DIR / "upstream.py"),
        "--port",
        str(port),
        "--delay-ms",
        str(delay_ms),
        "--chunks",
        str(chunks),
        "--chunk-delay-ms",
        str(chunk_delay_ms),
    ]
    return spawn("upstream", cmd, port, workdir)


def start_forwarder(workdir: Path, upstream: Server) -> Server:
    port = free_port()
    cmd = [
        sys.executable,
        str(BENCH_DIR / "forwarder.py"),
        "--port",
        str(port),
        "--upstream",
        upstream.base_url,
    ]
    # The forwarder has no health route: any answer from the upstream's /healthz through it will do.
    return spawn("forwarder", cmd, port, workdir)


def distillgate_executable() -> str:
    beside = Path(sys.executable).parent / "distillgate"
    if beside.exists():
        return str(beside)
    found = shutil.which("distillgate")
    if found is None:
        raise RuntimeError("the `distillgate` command is not installed (pip install -e . in the venv)")
    return found


def start_distillgate(
    workdir: Path,
    name: str,
    upstream: Server,
    db: BenchDatabase,
    *,
    auth: bool = True,
    workers: int = 1,
    settings: dict[str, Any] | None = None,
    policy_defaults: dict[str, Any] | None = None,
    source: Path | None = None,
    command: list[str] | None = None,
    key_options: list[str] | None = None,
) -> Server:
    """Write a settings and a policy file for ``name``, create an API key, start ``distillgate serve``.

    ``command``: run this instead of ``distillgate serve`` (another ASGI server on the same app
    factory, ``gateway.app:app_from_environment``); ``{port}`` in it is replaced, and
    ``DISTILLGATE_CONFIG`` names the settings file.

    ``source``: a directory holding ``gateway/`` and ``router/`` to run instead of the installed
    ones (e.g. ``git archive HEAD gateway router | tar -x -C DIR``: the last commit, not a
    working tree in the middle of an edit).

    ``key_options``: extra ``distillgate keys create`` options for the bench's key (limits).
    """
    home = workdir / name
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    ops_port = free_port()
    policy = {
        "teacher": {"base_url": upstream.base_url + "/v1", "models": ["bench-model"]},
        "prices": {"bench-model": {"input": 2.5, "cached_input": 1.25, "output": 10.0}},
        "defaults": policy_defaults or {},
    }
    (home / "policy.yaml").write_text(yaml.safe_dump(policy))
    config: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": port,
        "ops_port": ops_port,
        "workers": workers,
        "database_url": db.url,
        "policy_file": str(home / "policy.yaml"),
        "log_level": "WARNING",
        "run_scheduler": False,
        "auth": {"required": auth},
        "recorder": {"spool_dir": str(home / "spool")},
        "adapters_dir": str(home / "adapters"),
        **(settings or {}),
    }
    config_path = home / "config.yaml"
    config_path.write_text(yaml.safe_dump(config))
    exe = distillgate_executable()
    headers: dict[str, str] = {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILLGATE_")}
    extra_env = {"PYTHONUNBUFFERED": "1", "DISTILLGATE_CONFIG": str(config_path)}
    if source is not None:
        extra_env["PYTHONPATH"] = str(source.resolve())
    env.update(extra_env)
    if auth:
        out = subprocess.run(
            [
                exe,
                "keys",
                "create",
                "--name",
                "bench",
                "--json",
                "--config",
                str(config_path),
                *(key_options or []),
            ],
            capture_output=True,
            text=True,
            cwd=home,
            env=env,
            timeout=120,
        )
        if out.returncode != 0:
            raise RuntimeError(f"distillgate keys create failed: {out.stdout[-800:]} {out.stderr[-800:]}")
        key = json.loads(out.stdout.strip().splitlines()[-1])["key"]
        headers["authorization"] = f"Bearer {key}"
    server = spawn(
        name,
        [part.replace("{port}", str(port)) for part in command]
        if command
        else [exe, "serve", "--config", str(config_path)],
        port,
        home,
        env=extra_env,
        headers=headers,
        db=db,
        metrics_path="/metrics",
    )
    server.ops_url = f"http://127.0.0.1:{ops_port}"
    return server


def litellm_venv(path: Path, install: bool) -> Path | None:
    """The LiteLLM venv's ``litellm`` executable; created with pip when ``install`` and absent."""
    exe = path / "bin" / "litellm"
    if exe.exists():
        return exe
    if not install:
        return None
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    subprocess.run([str(path / "bin" / "pip"), "install", "-q", "litellm[proxy]", "uvloop"], check=True)
    return exe if exe.exists() else None


def start_litellm(workdir: Path, exe: Path, upstream: Server, *, workers: int = 2) -> Server:
    """LiteLLM's proxy per its production guide: master key, no database, ERROR logs, no verbose."""
    home = workdir / "litellm"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {
        "model_list": [
            {
                "model_name": "bench-model",
                "litellm_params": {
                    "model": "openai/bench-model",
                    "api_base": upstream.base_url + "/v1",
                    "api_key": "sk-bench-upstream",
                },
            }
        ],
        "litellm_settings": {"set_verbose": False, "request_timeout": 600, "drop_params": True},
        "general_settings": {},
    }
    (home / "config.yaml").write_text(yaml.safe_dump(config))
    master_key = "sk-bench-" + secrets.token_hex(16)
    env = {
        "LITELLM_MASTER_KEY": master_key,
        "LITELLM_LOG": "ERROR",
        # Offline box: use the bundled model cost map instead of fetching it at startup.
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    cmd = [
        str(exe),
        "--config",
        str(home / "config.yaml"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(workers),
    ]
    return spawn(
        "litellm",
        cmd,
        port,
        home,
        env=env,
        headers={"authorization": f"Bearer {master_key}"},
        health_path="/health/liveliness",
    )


def scrape_histogram(server: Server, metric: str) -> tuple[float, float] | None:
    """(sum, count) of a Prometheus histogram over all its labels, or None when not exported."""
    if server.metrics_path is None:
        return None
    try:
        with urllib.request.urlopen(server.base_url + server.metrics_path, timeout=5) as resp:
            text = resp.read().decode()
    except OSError:
        return None
    total = count = 0.0
    seen = False
    for line in text.splitlines():
        if line.startswith(metric + "_sum"):
            total += float(line.rsplit(" ", 1)[1])
            seen = True
        elif line.startswith(metric + "_count"):
            count += float(line.rsplit(" ", 1)[1])
    return (total, count) if seen else None
