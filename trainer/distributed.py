"""Data-parallel fine-tuning across the GPUs of one node: PyTorch DDP, launched by ``torchrun``.

``trainer.finetune`` reads its place in the job from torchrun's environment (``World``): every
rank builds the same step groups from the same seed and takes its own slice of each step
(deterministic, every record once per epoch), DDP all-reduces the gradients, and only rank 0
evaluates, keeps the best weights, saves and returns a result. ``Torchrun`` is the runner that
starts such a job from a process that is not one itself (``distillgate train --gpus N``, the
scheduler): the call travels pickled to the ranks and rank 0's answer comes back, so the
training lease, the registry and publishing stay with the single caller.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
"""NVLink multicast off in NCCL, PyTorch and NVSHMEM: on shared multi-GPU hosts a program using it
can put the host's GPUs out of service, so every launch the product makes sets these."""

BACKEND_ENV = "DISTILLGATE_DIST_BACKEND"
"""Overrides the process-group backend (``gloo`` runs several ranks on one GPU, for tests)."""


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job (rank 0 of 1 outside torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> World:
        return cls(
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The rank that evaluates, saves and reports."""
        return self.rank == 0

    def device(self, device: str, gpus: int | None = None) -> str:
        """Each rank on its own GPU (``cuda`` becomes ``cuda:LOCAL_RANK``). More ranks than GPUs
        share them in turn: only gloo allows that (tests of the DDP path on one GPU)."""
        if self.distributed and device == "cuda":
            if gpus is None:
                import torch

                gpus = torch.cuda.device_count()
            return f"cuda:{self.local_rank % max(1, gpus)}"
        return device

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's items of one step: every ``size``-th from ``rank`` (all of them at size 1)."""
        return list(items[self.rank :: self.size])


@contextlib.contextmanager
def process_group(world: World, device: str) -> Iterator[None]:
    """Joins the job's process group for the block (nothing at world size 1, or when the caller
    already joined one); NCCL on GPUs, gloo on CPUs."""
    import torch
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        yield
        return
    for key, value in NO_MULTICAST.items():
        os.environ.setdefault(key, value)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(device))
    backend = os.environ.get(BACKEND_ENV) or ("nccl" if cuda else "gloo")
    dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def data_parallel(model: Any, loss: Callable[[Any, Any], torch.Tensor], world: World) -> Any:
    """A module whose ``forward(unit)`` is ``loss(model, unit)``, in DDP beyond one rank.

    DDP all-reduces only what went through its own forward, and the losses reach past the
    model's forward (the decoder's hidden states, the head in chunks): so DDP wraps the loss.
    The unit moves to the device inside ``loss`` (no device ids: DDP leaves inputs alone)."""
    import torch

    class StepLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, unit: Any) -> torch.Tensor:
            return loss(self.model, unit)

    module = StepLoss()
    if not world.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, device_ids=None)


def no_sync(model: Any, last: bool) -> Any:
    """Gradient accumulation under DDP: only a step's last backward pass all-reduces."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_sum(value: torch.Tensor, world: World) -> torch.Tensor:
    """The sum over ranks (in place; the value itself at world size 1)."""
    if world.distributed:
        import torch.distributed as dist

        dist.all_reduce(value)
    return value


def from_main(values: list[float], world: World, device: str) -> list[float]:
    """Rank 0's ``values`` on every rank (rank 0 evaluates; the others follow its decisions)."""
    if not world.distributed:
        return values
    import torch
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(tensor, 0)
    return [float(v) for v in tensor.tolist()]


class Torchrun:
    """Runs a module-level function under ``torchrun --nproc-per-node N`` and returns rank 0's
    result: the runner ``trainer.registry.train_task`` trains through when a task asks for more
    than one GPU. One job at a time; ``kill`` stops it (scheduler shutdown)."""

    def __init__(self, gpus: int, *, python: str | None = None) -> None:
        if gpus < 1:
            raise ValueError("a torchrun job needs at least one process")
        self.gpus = gpus
        self.python = python or sys.executable
        self._process: subprocess.Popen[bytes] | None = None
        self._killed = False

    def command(self, spec: Path, answer: Path) -> list[str]:
        return [
            self.python,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={self.gpus}",
            "-m",
            "trainer.distributed",
            str(spec),
            str(answer),
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ) | NO_MULTICAST
        # torchrun's default of one thread per rank would make CPU ranks crawl; keep the parent's.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or self.gpus) // self.gpus)))
        return env

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        from trainer.isolation import ChildDied

        if self._killed:
            raise ChildDied("the training job was stopped")
        if callable(kwargs.get("progress")):
            kwargs["progress"] = False  # a callback cannot cross processes; rank 0 logs instead
        with tempfile.TemporaryDirectory(prefix="distillgate-torchrun-") as tmp:
            spec, answer = Path(tmp) / "call.pkl", Path(tmp) / "answer.pkl"
            spec.write_bytes(pickle.dumps((fn, args, kwargs)))
            self._process = subprocess.Popen(
                self.command(spec, answer), env=self.environment(), start_new_session=True
            )
            code = self._process.wait()
            self._process = None
            if answer.exists():
                ok, value = pickle.loads(answer.read_bytes())
                if ok:
                    return value
                raise value
            if self._killed:
                raise ChildDied("the training job was stopped")
            raise ChildDied(f"the torchrun training job exited with code {code} and no answer")

    def kill(self) -> None:
        self._killed = True
        process = self._process
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)

    def close(self) -> None:
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rank_main(spec: str, answer: str) -> int:
    """One rank of a ``Torchrun`` job: run the pickled call; rank 0 writes the answer."""
    fn, args, kwargs = pickle.loads(Path(spec).read_bytes())
    world = World.from_env()
    try:
        reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
    except BaseException as exc:  # the caller raises it
        reply = (False, exc)
    if world.main:
        try:
            data = pickle.dumps(reply)
        except Exception as exc:  # an unpicklable result or exception
            data = pickle.dumps((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({exc})")))
        partial = Path(answer).with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(answer)
    return 0 if reply[0] else 1


if __name__ == "__main__":
    sys.exit(_rank_main(sys.argv[1], sys.argv[2]))
