"""The recorder's spool: JSONL files of storable rows kept while the database is away, replayed
(idempotently, by id) when it answers; and ``quarantine/``, one file per row no store accepts.

Written a batch at a time (one write and one fsync per batch, never on the request path). A write
that fails (ENOSPC, EROFS) is cut back to where it started, so the file never ends in a torn line
of this process's making; a torn line from a crash is quarantined when read.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson

_REPLAY = re.compile(r"^records-.*\.replay-(\d+)$")


class Spool:
    """The spool directory of one process (files of other processes and earlier runs are replayed too)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.quarantine_dir = self.directory / "quarantine"
        self.path = self.directory / f"records-{os.getpid()}.jsonl"
        self._lock = threading.Lock()
        self._claimed: set[Path] = set()

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append ``rows`` durably; raises ``OSError`` (the file as it was before) when it cannot."""
        data = b"".join(orjson.dumps(row) + b"\n" for row in rows)
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                start = os.fstat(fd).st_size
                try:
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                except OSError:
                    _truncate(fd, start)
                    raise
            finally:
                os.close(fd)

    def writable(self) -> bool:
        """True when a small file can be written and synced here now (after ENOSPC or EROFS)."""
        probe = self.directory / f".probe-{os.getpid()}"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as fh:
                fh.write(b"x" * 4096)
                fh.flush()
                os.fsync(fh.fileno())
            probe.unlink()
            return True
        except OSError:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
            return False

    def has_content(self) -> bool:
        """Any spooled record waiting, from this process or any other (a directory listing)."""
        return self._next() is not None

    def claim(self) -> Path | None:
        """Take the oldest spool file for replay (a rename, so a concurrent writer starts a new one)."""
        with self._lock:
            found = self._next()
            if found is None:
                return None
            if _REPLAY.match(found.name):  # a replayer that died mid-way left it: take it over
                claimed = found.with_name(found.name.split(".replay-")[0] + f".replay-{os.getpid()}")
            else:
                claimed = found.with_name(found.stem + f".replay-{os.getpid()}")
            try:
                found.rename(claimed)
            except FileNotFoundError:
                return None
            self._claimed.add(claimed)
            return claimed

    def read(self, claimed: Path) -> tuple[list[dict[str, Any]], list[bytes]]:
        """The rows of a claimed file, and the lines that are not rows (torn by a crash)."""
        rows: list[dict[str, Any]] = []
        bad: list[bytes] = []
        for line in claimed.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
                row["created_at"] = datetime.fromisoformat(row["created_at"])
                rows.append(row)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                bad.append(line)
        return rows, bad

    def done(self, claimed: Path) -> None:
        """Every row of ``claimed`` is stored."""
        self._claimed.discard(claimed)
        claimed.unlink(missing_ok=True)

    def give_back(self, claimed: Path) -> None:
        """Replay stopped (the database went away): the file waits under a fresh name."""
        with self._lock:
            self._claimed.discard(claimed)
            fresh = claimed.with_name(f"records-{os.getpid()}-{time.time_ns()}.jsonl")
            with contextlib.suppress(FileNotFoundError):
                claimed.rename(fresh)

    def quarantine(self, name: str, content: dict[str, Any]) -> Path:
        """Keep one row (or torn line) no store accepts, for a person to look at; raises ``OSError``."""
        self.quarantine_dir.mkdir(parents=True, exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)[:80] or "record"
        path = self.quarantine_dir / f"{safe}-{time.time_ns()}.json"
        with open(path, "wb") as fh:
            fh.write(orjson.dumps(content, default=str))
            fh.flush()
            os.fsync(fh.fileno())
        return path

    def _next(self) -> Path | None:
        if not self.directory.is_dir():
            return None
        candidates = []
        for path in self.directory.iterdir():
            name = path.name
            if name.startswith("records-") and name.endswith(".jsonl"):
                if path.stat().st_size > 0:
                    candidates.append(path)
                else:
                    path.unlink(missing_ok=True)
            elif (m := _REPLAY.match(name)) and path not in self._claimed and _orphaned(int(m.group(1))):
                candidates.append(path)
        return min(candidates, key=_mtime) if candidates else None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _orphaned(pid: int) -> bool:
    """A replay file whose process is gone (or is this one, restarted: containers reuse pid 1)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _truncate(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
    except OSError as exc:  # pragma: no cover - a read-only file system refuses this too
        if exc.errno not in (errno.EROFS, errno.EBADF):
            raise


def error_kind(exc: OSError) -> str:
    """``ENOSPC``, ``EROFS``, … for logs and metric labels."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
