"""``distillgate train``, ``adapters``, ``dataset`` and ``student``: the trainer's command-line nouns.

``register`` adds them to the main typer app (``gateway/cli.py``). Settings come from
``--config`` (and ``DISTILLGATE_*``), the routing policy from the settings' ``policy_file``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from gateway.cli_options import ConfigOpt, JsonOpt, print_json, settings_from
from gateway.settings import Settings
from gateway.store.db import Database
from router.policy import Policy, PolicyError, load_policy

adapters_app = typer.Typer(help="Trained student adapters (task@vN).", no_args_is_help=True)
dataset_app = typer.Typer(help="Training sets built from recorded traffic.", no_args_is_help=True)
student_app = typer.Typer(
    help="The embedded student server (vLLM's contract on transformers).", no_args_is_help=True
)

console = Console(stderr=True)
TaskOpt = Annotated[str, typer.Option("--task", "-t", help="Task key.")]


def register(app: typer.Typer) -> None:
    """Add ``train``, ``adapters``, ``dataset`` and ``student`` to ``app``."""
    app.command("train", help="Build a dataset from a task's records, fine-tune, and register task@vN.")(
        train
    )
    app.add_typer(adapters_app, name="adapters")
    app.add_typer(dataset_app, name="dataset")
    app.add_typer(student_app, name="student")


def _policy(settings: Settings) -> Policy:
    if settings.policy_file is None:
        console.print(
            "[red]no policy file:[/red] set policy_file in the settings (or DISTILLGATE_POLICY_FILE)"
        )
        raise typer.Exit(2)
    try:
        return load_policy(settings.policy_file)
    except (PolicyError, OSError) as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(2) from None


def train(
    task: TaskOpt,
    config: ConfigOpt = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base model (default: the policy's student.base_model).")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="GPUs of this node to train on, data-parallel through torchrun"
            " (default: the policy's train.gpus).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Records → dataset snapshot → fine-tune (LoRA or full, per the policy) → ``task@vN``."""
    from trainer.registry import NotEnoughData, train_task
    from trainer.scheduler import TrainingLease

    settings = settings_from(config)
    policy = _policy(settings)
    model = base_model or (policy.student.base_model if policy.student else None)
    if not model:
        console.print("[red]no base model:[/red] set student.base_model in the policy or pass --base-model")
        raise typer.Exit(2)
    db = Database(settings.database_url)
    # The same per-task lease as the scheduler: a CronJob and a worker never train one task at once.
    lease = TrainingLease(db, task, f"cli:{socket.gethostname()}:{os.getpid()}", ttl_s=300)
    if not lease.acquire():
        db.dispose()
        console.print(f"[red]another worker is training {task!r} now[/red]")
        raise typer.Exit(1)
    try:
        outcome = train_task(
            db,
            task,
            policy.for_task(task),
            model,
            settings.adapters_dir,
            progress=not as_json,
            gpus=gpus,
        )
    except NotEnoughData as exc:
        if as_json:
            print_json({"task": task, "status": "failed", "error": str(exc)})
        else:
            console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(1) from None
    finally:
        lease.release()
        db.dispose()
    result, adapter = outcome.result, outcome.adapter
    summary = {
        "task": task,
        "status": "succeeded",
        "adapter": adapter.name,
        "path": adapter.path,
        "base_model": adapter.base_model,
        "method": adapter.method,
        "dataset_id": outcome.snapshot.id,
        "train_examples": result.train_examples,
        "holdout_examples": result.eval_examples,
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "steps": result.steps,
        "tokens_per_s": round(result.tokens_per_s, 1),
        "train_s": round(result.train_s, 2),
        "wall_s": round(result.wall_s, 2),
        "run_id": outcome.run.id,
    }
    if as_json:
        print_json(summary)
        return
    table = Table(title=f"trained {adapter.name}", show_header=False)
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    Console().print(table)


@adapters_app.command("list")
def adapters_list(
    config: ConfigOpt = None,
    task: Annotated[str | None, typer.Option("--task", "-t", help="Only this task.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List adapter versions with their status and held-out losses."""
    from trainer.registry import list_adapters

    settings = settings_from(config)
    db = Database(settings.database_url)
    try:
        adapters = list_adapters(db, task)
    finally:
        db.dispose()
    if as_json:
        print_json([a.model_dump() for a in adapters])
        return
    table = Table(title="adapters")
    table.add_column("name", no_wrap=True)
    for column in ("status", "method", "dataset", "held-out loss", "created"):
        table.add_column(column)
    for a in adapters:
        before, after = a.metrics.get("eval_loss_before"), a.metrics.get("eval_loss_after")
        loss = (
            f"{before:.3f} → {after:.3f}" if isinstance(before, float) and isinstance(after, float) else "-"
        )
        table.add_row(
            a.name,
            a.status,
            a.method,
            str(a.dataset_id or "-"),
            loss,
            a.created_at.strftime("%Y-%m-%d %H:%M"),
        )
    Console().print(table)


@dataset_app.command("build")
def dataset_build(task: TaskOpt, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Select the task's usable records into a new dataset snapshot and show what each filter dropped."""
    snapshot, selection = _snapshot(task, config)
    data = {
        "dataset_id": snapshot.id,
        "task": task,
        "content_hash": snapshot.content_hash,
        **selection.counts(),
    }
    if as_json:
        print_json(data)
        return
    table = Table(title=f"dataset {snapshot.id} for {task}", show_header=False)
    for key in ("examined", "kept", "train", "holdout", "content_hash"):
        table.add_row(key, str(data[key]))
    for name, n in selection.dropped.items():
        table.add_row(f"dropped: {name}", str(n))
    Console().print(table)


def _snapshot(task: str, config: Path | None) -> tuple[Any, Any]:
    """A new dataset snapshot of ``task``'s usable records, as its policy selects them."""
    from trainer.dataset import build_snapshot
    from trainer.registry import dataset_options

    settings = settings_from(config)
    policy = _policy(settings)
    db = Database(settings.database_url)
    try:
        return build_snapshot(db, task, dataset_options(policy.for_task(task)))
    finally:
        db.dispose()


@dataset_app.command("export")
def dataset_export(
    task: TaskOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.", dir_okay=False)],
    config: ConfigOpt = None,
    split: Annotated[str, typer.Option(help="train, holdout or all.")] = "train",
    as_json: JsonOpt = False,
) -> None:
    """Write the task's examples as OpenAI fine-tuning JSONL (a new snapshot records what was exported)."""
    from trainer.dataset import export_jsonl

    if split not in ("train", "holdout", "all"):
        console.print("[red]--split must be train, holdout or all[/red]")
        raise typer.Exit(2)
    snapshot, selection = _snapshot(task, config)
    examples = {
        "train": selection.train,
        "holdout": selection.holdout,
        "all": selection.train + selection.holdout,
    }[split]
    n = export_jsonl(examples, out)
    if as_json:
        print_json({"dataset_id": snapshot.id, "task": task, "split": split, "lines": n, "path": str(out)})
    else:
        console.print(f"wrote {n} examples ({split}) of dataset {snapshot.id} to {out}")


@student_app.command("serve")
def student_serve(
    base_model: Annotated[str, typer.Option(help="Hub id or local path of the base model.")],
    host: Annotated[str, typer.Option(help="Bind address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8100,
    served_model_name: Annotated[str | None, typer.Option(help="Name of the base model in the API.")] = None,
    lora: Annotated[list[str] | None, typer.Option(help="name=path to load at start (repeatable).")] = None,
    api_key: Annotated[
        str | None, typer.Option(envvar="DISTILLGATE_STUDENT_API_KEY", help="Require this bearer key on /v1.")
    ] = None,
    max_lora_rank: Annotated[int, typer.Option(help="Largest LoRA rank accepted.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda …")] = "auto",
    threads: Annotated[
        str | None,
        typer.Option(
            help="CPU threads for torch: a count, or auto (the cores other processes leave, checked"
            " once a second; default: torch's own choice)."
        ),
    ] = None,
    max_batch: Annotated[
        int, typer.Option(min=1, help="Most sequences decoded together; more requests wait their turn.")
    ] = 32,
    prefix_caching: Annotated[
        bool, typer.Option(help="Reuse the KV cache of recent prompts' shared beginnings (not bitwise).")
    ] = True,
    dtype: Annotated[
        str,
        typer.Option(
            help="Weights' precision, as vLLM names it: auto (bf16 on a GPU and on a CPU with native"
            " bf16 for models 512+ wide, else float32), float32, bfloat16, float16."
        ),
    ] = "auto",
) -> None:
    """Serve a base model and runtime-loaded adapters with vLLM's HTTP contract."""
    import uvicorn

    from trainer.student_server import create_student_app

    decode_threads: int | Literal["auto"] | None = None
    if threads is not None:
        if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
            console.print(f"[red]--threads expects a count of at least 1 or auto, got {threads!r}[/red]")
            raise typer.Exit(2)
        decode_threads = "auto" if threads == "auto" else int(threads)
        if decode_threads != "auto":
            import torch

            torch.set_num_threads(decode_threads)

    from trainer.generation import DTYPES

    if dtype != "auto" and dtype not in DTYPES:
        console.print(f"[red]--dtype expects auto or one of {', '.join(DTYPES)}, got {dtype!r}[/red]")
        raise typer.Exit(2)
    adapters: dict[str, str] = {}
    for item in lora or []:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            console.print(f"[red]--lora expects name=path, got {item!r}[/red]")
            raise typer.Exit(2)
        adapters[name] = path
    app = create_student_app(
        base_model,
        served_model_name=served_model_name,
        adapters=adapters,
        api_key=api_key,
        device=device,
        max_lora_rank=max_lora_rank,
        max_batch=max_batch,
        prefix_caching=prefix_caching,
        threads=decode_threads,
        dtype=dtype,
    )
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
