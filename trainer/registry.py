"""The adapter registry: every fine-tuning run is a ``TrainingRun`` row, every successful one an
``Adapter`` named ``task@vN`` with its directory, base model, dataset snapshot,
hyper-parameters and metrics; ``train_task`` runs the whole step from records to a version.

This is what ``distillgate train --task T`` calls, and the scheduler after it.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import col, func, select

from gateway.store.db import Database
from gateway.store.models import Adapter, DatasetSnapshot, TrainingRun, utcnow
from router.decide import StudentEnvelope
from router.policy import TaskPolicy
from trainer.dataset import DatasetOptions, Selection, build_snapshot
from trainer.distributed import Torchrun
from trainer.finetune import FinetuneConfig, FinetuneResult, ProgressCallback, finetune


class NotEnoughData(ValueError):
    """The task has no usable training example yet."""


def adapter_name(task: str, version: int) -> str:
    return f"{task}@v{version}"


def task_dirname(task: str) -> str:
    """A directory name for a task key: itself when filesystem-safe, else a safe form plus a hash."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", task).strip(".") or "task"
    if safe == task:
        return task
    return f"{safe[:80]}-{hashlib.sha256(task.encode()).hexdigest()[:8]}"


def next_version(db: Database, task: str) -> int:
    with db.session() as session:
        current = session.exec(select(func.max(Adapter.version)).where(Adapter.task == task)).one()
    return int(current or 0) + 1


def register_adapter(
    db: Database,
    task: str,
    path: str | Path,
    *,
    base_model: str,
    method: str = "lora",
    dataset_id: int | None = None,
    hyperparams: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    staging_dir: str | Path | None = None,
) -> Adapter:
    """Add ``task@vN`` with the next free N for the task.

    With ``staging_dir``, the files are moved from there to ``path`` formatted with the version
    (``path`` may contain ``{version}``) once the version is claimed, so two concurrent
    registrations never share a directory. A lost race on N retries with N+1.
    """
    for _ in range(20):
        version = next_version(db, task)
        target = Path(str(path).format(version=version))
        adapter = Adapter(
            name=adapter_name(task, version),
            task=task,
            version=version,
            path=str(target),
            base_model=base_model,
            method=method,
            dataset_id=dataset_id,
            hyperparams=hyperparams or {},
            metrics=metrics or {},
        )
        try:
            with db.session() as session:
                session.add(adapter)
                session.commit()
                session.refresh(adapter)
        except IntegrityError:
            continue
        if staging_dir is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            Path(staging_dir).rename(target)
            if task_dirname(task) == task and target.parent.name == task:
                link_by_name(target.parent.parent, adapter.name, target)
        return adapter
    raise RuntimeError(f"could not claim a version for task {task!r}")


def link_by_name(adapters_dir: Path, name: str, target: Path) -> Path:
    """``<adapters_dir>/<task@vN>`` → the adapter's directory (a relative link, replaced atomically).

    The layout vLLM's ``lora_filesystem_resolver`` reads (``VLLM_LORA_RESOLVER_CACHE_DIR`` set
    to the adapters directory): a replica asked for ``task@vN`` that never got the load call
    finds it there, so every replica behind a Service serves every published adapter. The link
    stays inside the directory, as the resolver requires of the real path.
    """
    link = adapters_dir / name
    staging = adapters_dir / f".{name}.link-{os.getpid()}"
    staging.unlink(missing_ok=True)
    staging.symlink_to(os.path.relpath(target, adapters_dir), target_is_directory=True)
    os.replace(staging, link)
    return link


def list_adapters(db: Database, task: str | None = None) -> list[Adapter]:
    """Adapters, newest first (by task, then version)."""
    with db.session() as session:
        query = select(Adapter)
        if task is not None:
            query = query.where(Adapter.task == task)
        query = query.order_by(col(Adapter.task), col(Adapter.version).desc())
        return list(session.exec(query))


def get_adapter(db: Database, name: str) -> Adapter | None:
    with db.session() as session:
        return session.get(Adapter, name)


def adapter_features(adapter: Adapter) -> dict[str, Any] | None:
    """The routing envelope of an adapter's training set (``router.decide.StudentEnvelope`` in its
    ``Task.features`` form), recorded by ``train_task``; ``None`` when it was registered without one."""
    features = adapter.metrics.get("features")
    return features if isinstance(features, dict) else None


def set_adapter_status(db: Database, name: str, status: str, **metrics: Any) -> Adapter | None:
    """Change an adapter's status (``published``, ``retired`` …), merging ``metrics`` into its metrics."""
    with db.session() as session:
        adapter = session.get(Adapter, name)
        if adapter is None:
            return None
        adapter.status = status
        if metrics:
            adapter.metrics = {**adapter.metrics, **metrics}
        session.add(adapter)
        session.commit()
        session.refresh(adapter)
        return adapter


def start_run(db: Database, task: str, dataset_id: int | None = None) -> TrainingRun:
    run = TrainingRun(task=task, dataset_id=dataset_id, status="running")
    with db.session() as session:
        session.add(run)
        session.commit()
        session.refresh(run)
    return run


def finish_run(
    db: Database,
    run_id: int,
    status: str,
    *,
    adapter: str | None = None,
    metrics: dict[str, Any] | None = None,
    error: str | None = None,
) -> TrainingRun:
    with db.session() as session:
        run = session.get(TrainingRun, run_id)
        if run is None:
            raise LookupError(f"no training run {run_id}")
        run.status, run.adapter, run.error = status, adapter, error
        run.metrics = metrics
        run.finished_at = utcnow()
        session.add(run)
        session.commit()
        session.refresh(run)
        return run


def list_runs(db: Database, task: str | None = None, limit: int = 50) -> list[TrainingRun]:
    with db.session() as session:
        query = select(TrainingRun)
        if task is not None:
            query = query.where(TrainingRun.task == task)
        return list(session.exec(query.order_by(col(TrainingRun.id).desc()).limit(limit)))


@dataclass
class TrainTaskResult:
    """What ``train_task`` produced: the adapter row, the run row, the snapshot and the numbers."""

    adapter: Adapter
    run: TrainingRun
    snapshot: DatasetSnapshot
    selection: Selection
    result: FinetuneResult


def dataset_options(policy: TaskPolicy) -> DatasetOptions:
    train = policy.train
    return DatasetOptions(
        holdout=train.holdout,
        max_records=train.max_records,
        max_completion_tokens=train.max_completion_tokens,
        train_on_redacted=policy.redact.train_on_redacted,
    )


def train_task(
    db: Database,
    task: str,
    policy: TaskPolicy,
    base_model: str,
    adapters_dir: str | Path,
    *,
    config: FinetuneConfig | None = None,
    progress: bool | ProgressCallback = False,
    runner: Any = None,
    gpus: int | None = None,
) -> TrainTaskResult:
    """Records → dataset snapshot → fine-tune → ``task@vN`` in the registry.

    The run is recorded as ``running`` first and ``succeeded`` or ``failed`` (with the error)
    after; a failed run leaves no adapter and no directory behind. ``config`` defaults to the
    task policy's ``train`` section. Raises ``NotEnoughData`` when there is nothing to train on.
    ``runner`` (a ``trainer.isolation`` runner) runs the fine-tuning itself, e.g. in a child process.
    ``gpus`` (default: the policy's ``train.gpus``) above 1 runs it as a ``torchrun`` job of that
    many ranks instead (``trainer.distributed.Torchrun``); this process stays the one writer of
    the registry.
    """
    started = time.perf_counter()
    config = config or FinetuneConfig.from_policy(policy.train, policy.soft_labels)
    snapshot, selection = build_snapshot(db, task, dataset_options(policy))
    run = start_run(db, task, snapshot.id)
    if not selection.train:
        finish_run(
            db,
            run.id or 0,
            "failed",
            error="no usable training examples",
            metrics={"dataset": selection.counts()},
        )
        raise NotEnoughData(
            f"task {task!r} has no usable training examples ({selection.counts()['dropped']})"
        )
    root = Path(adapters_dir) / task_dirname(task)
    staging = root / f".run-{run.id}"
    try:
        args = (base_model, selection.train, selection.holdout, staging, config)
        gpus = policy.train.gpus if gpus is None else gpus
        if gpus > 1 and not isinstance(runner, Torchrun):
            runner = Torchrun(gpus)
        if runner is None:
            result = finetune(*args, progress=progress)
        else:
            result = runner.call(finetune, *args, progress=progress)
        envelope = StudentEnvelope.from_requests(ex.request for ex in selection.train)
        metrics = result.metrics() | {
            "dataset": selection.counts(),
            "features": envelope.to_features(),
            "total_s": time.perf_counter() - started,
        }
        adapter = register_adapter(
            db,
            task,
            root / "v{version}",
            base_model=base_model,
            method=config.method,
            dataset_id=snapshot.id,
            hyperparams=asdict(config),
            metrics=metrics,
            staging_dir=staging,
        )
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        finish_run(db, run.id or 0, "failed", error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    result.out_dir = adapter.path
    run = finish_run(db, run.id or 0, "succeeded", adapter=adapter.name, metrics=metrics)
    return TrainTaskResult(adapter=adapter, run=run, snapshot=snapshot, selection=selection, result=result)
