"""Training and offline evaluation in a child process, so that the process they serve from keeps
its own interpreter lock, memory and accelerator context.

A gateway that trains in-process (one machine, ``run_scheduler``) would otherwise share one
GIL between its event loop and the training loop: requests wait behind Python-level training
steps and the trainer runs several times slower behind the traffic. The child is started
with ``spawn`` (no inherited locks, threads or CUDA state), serves the calls of one training
pass, and exits, returning every byte of model memory to the system.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Self

log = logging.getLogger("distillgate.trainer")


class ChildDied(RuntimeError):
    """The child process exited (killed, out of memory, or stopped) before it answered."""


class Inline:
    """Runs the calls in this process (``distillgate train``, or isolation turned off)."""

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    def close(self) -> None:
        return None

    def kill(self) -> None:
        return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ChildProcess(Inline):
    """One spawned Python process that runs module-level functions sent to it, one at a time.

    Arguments and results travel pickled; an exception raised in the child is raised here
    (or, when it cannot be pickled, a ``RuntimeError`` carrying its text).
    """

    def __init__(self, name: str = "distillgate-train") -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe()
        threads = None
        if "torch" in sys.modules:  # keep the thread count the parent chose (tests and the demo pin it)
            threads = sys.modules["torch"].get_num_threads()
        self._process = ctx.Process(
            target=_serve, args=(child_conn, threads, logging.getLogger().level), name=name, daemon=True
        )
        self._process.start()
        child_conn.close()
        self._lock = threading.Lock()
        self._killed = False

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._killed or not self._process.is_alive():
                raise ChildDied(self._died())
            try:
                self._conn.send((fn, args, kwargs))
                while not self._conn.poll(0.5):
                    if not self._process.is_alive():
                        raise ChildDied(self._died())
                ok, value = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
                raise ChildDied(self._died()) from exc
        if ok:
            return value
        raise value

    def _died(self) -> str:
        if self._killed:
            return "the training process was stopped"
        self._process.join(1)
        return f"the training process exited with code {self._process.exitcode}"

    def close(self) -> None:
        """Ask the child to exit once its current call is done; kill it if it does not."""
        if self._process.is_alive():
            with contextlib.suppress(OSError):
                self._conn.send(None)
            self._process.join(30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)
        self._conn.close()

    def kill(self) -> None:
        """Stop the child now (shutdown): a call waiting on it raises ``ChildDied``."""
        self._killed = True
        if self._process.is_alive():
            self._process.kill()


def _serve(conn: Connection, torch_threads: int | None, log_level: int) -> None:
    logging.basicConfig(level=log_level or logging.WARNING)
    # A background worker: no download or weight-loading progress bars in the server's log
    # (set HF_HUB_DISABLE_PROGRESS_BARS=0 to see them).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if torch_threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(torch_threads))
        import torch

        torch.set_num_threads(torch_threads)
    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone
            return
        if message is None:
            return
        fn, args, kwargs = message
        try:
            reply: tuple[bool, Any] = (True, fn(*args, **kwargs))
        except BaseException as exc:  # everything goes back to the caller
            reply = (False, exc)
        try:
            conn.send(reply)
        except Exception as exc:  # an unpicklable result or exception
            conn.send((False, RuntimeError(f"{type(reply[1]).__name__}: {reply[1]} ({exc})")))
