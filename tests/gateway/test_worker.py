"""``distillgate worker``'s app builds only what it runs: no recorder, cache, upstreams, shadow
mirror or pipeline, in a process of its own (a fresh interpreter, so nothing else imported them)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

WORKER = """
import sys, threading
import httpx
from gateway.settings import Settings
from gateway.worker import WorkerParts, create_worker_app
from tests.servers import ServerThread

db = sys.argv[1]
policy = sys.argv[2]
app = create_worker_app(Settings(database_url="sqlite:///" + db, policy_file=policy, scheduler_interval_s=0.2))
server = ServerThread(app).start()
try:
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert "distillgate_training_runs_total" in httpx.get(server.url + "/metrics").text
    parts = app.state.parts
    assert isinstance(parts, WorkerParts), parts
    built = {name: type(getattr(parts, name)).__name__ for name in WorkerParts.__slots__}
    threads = sorted(t.name for t in threading.enumerate())
finally:
    server.stop()
serving = ["gateway.recorder", "gateway.cache", "gateway.upstream", "gateway.pipeline", "router.shadow"]
print(built)
print([m for m in serving if m in sys.modules])
print(threads)
"""


def test_the_worker_builds_only_the_database_policy_task_table_scheduler_and_metrics(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "teacher: {base_url: http://teacher.invalid/v1}\n"
        "student: {base_url: http://student.invalid/v1, base_model: tiny}\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", WORKER, str(tmp_path / "worker.db"), str(policy)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    built, imported, threads = done.stdout.strip().splitlines()[-3:]
    assert built == str(
        {
            "settings": "Settings",
            "db": "Database",
            "metrics": "Metrics",
            "policy_store": "PolicyStore",
            "tasks": "TaskTable",
            "scheduler": "Scheduler",
        }
    )
    assert imported == "[]"  # not even imported: nothing of the serving side can have been built
    assert "distillgate-recorder" not in threads
