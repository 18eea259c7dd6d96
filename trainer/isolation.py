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
import signal
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Self

log = logging.getLogger("distillgate.trainer")


class ChildDied(RuntimeError):
    """The child process exited (killed, out of memory, or stopped) before it answered."""

    def __init__(self, message: str, *, exit_code: int | None = None, peak_rss_bytes: int = 0) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.peak_rss_bytes = peak_rss_bytes

    @property
    def cause(self) -> str:
        """``oom_kill`` (SIGKILL: what the kernel's OOM killer sends), ``signal``, ``exit`` or ``stopped``."""
        if self.exit_code is None:
            return "stopped"
        if self.exit_code == -signal.SIGKILL:
            return "oom_kill"
        return "signal" if self.exit_code < 0 else "exit"


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
        self._peak_rss = 0

    @property
    def pid(self) -> int | None:
        return self._process.pid

    def call(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            if self._killed or not self._process.is_alive():
                raise self._died()
            try:
                self._conn.send((fn, args, kwargs))
                while not self._conn.poll(0.5):
                    self._peak_rss = max(self._peak_rss, _peak_rss_of(self._process.pid))
                    if not self._process.is_alive():
                        raise self._died()
                ok, value = self._conn.recv()
            except (EOFError, BrokenPipeError, ConnectionResetError) as exc:
                raise self._died() from exc
        if ok:
            return value
        raise value

    def _died(self) -> ChildDied:
        if self._killed:
            return ChildDied("the training process was stopped")
        self._process.join(1)
        code = self._process.exitcode
        peak = f"{self._peak_rss / 1e9:.1f} GB" if self._peak_rss else "an unknown amount"
        if code is not None and code < 0:
            name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
            why = (
                " (most likely the kernel's OOM killer: the machine ran out of memory)"
                if code == -signal.SIGKILL
                else ""
            )
            message = f"the training process was killed by {name}{why} at {peak} peak resident memory"
        else:
            message = f"the training process exited with code {code} at {peak} peak resident memory"
        return ChildDied(message, exit_code=code, peak_rss_bytes=self._peak_rss)

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


def _peak_rss_of(pid: int | None) -> int:
    """A live process's peak resident set (``VmHWM``), 0 when it cannot be read."""
    try:
        for line in open(f"/proc/{pid}/status").read().splitlines():  # noqa: SIM115
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _exit_with_parent() -> None:
    """A child whose parent is gone (killed, crashed) stops too, instead of training for nobody."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="distillgate-parent-watch", daemon=True).start()


def _serve(conn: Connection, torch_threads: int | None, log_level: int) -> None:
    _exit_with_parent()
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
