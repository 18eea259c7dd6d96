"""The live policy: loaded from its file, swapped atomically when the file changes.

An invalid edit is refused and the running policy kept, with the error kept for the admin
API and metrics. Requests read ``store.policy`` once each; a swap never blocks or drops them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import msgspec
import yaml

from gateway.store.models import utcnow
from router.policy import Policy, PolicyError, PolicySummary, parse_policy, policy_summary

log = logging.getLogger("distillgate.policy")

ReloadCallback = Callable[[Policy], None]
"""Called on the event loop with each newly applied policy; its errors are logged, not raised."""


@dataclass(frozen=True)
class _FileStamp:
    """Enough of ``stat`` to notice an edit in place, an atomic rename, or a ConfigMap symlink swap."""

    mtime_ns: int
    size: int
    inode: int


def _stamp(path: Path) -> _FileStamp | None:
    try:
        st = os.stat(path)  # follows symlinks, as Kubernetes ConfigMap mounts need
    except OSError:
        return None
    return _FileStamp(st.st_mtime_ns, st.st_size, st.st_ino)


class PolicyStatus(msgspec.Struct, kw_only=True):
    """Which policy is in force (``GET /admin/policy``)."""

    file: str | None
    """The watched policy file; none when the policy was given in code."""
    version: int
    """1 at start, +1 per applied edit; 0 when no policy is loaded."""
    loaded_at: str | None
    last_error: str | None
    """Why the last refused edit was refused, naming the bad key (cleared by the next good one)."""
    last_error_at: str | None
    policy: PolicySummary | None

    @classmethod
    def of(cls, store: PolicyStore | None) -> PolicyStatus:
        if store is None:
            return cls(file=None, version=0, loaded_at=None, last_error=None, last_error_at=None, policy=None)
        return cls(
            file=str(store.path) if store.path is not None else None,
            version=store.version,
            loaded_at=store.loaded_at.isoformat(),
            last_error=store.last_error,
            last_error_at=store.last_error_at.isoformat() if store.last_error_at else None,
            policy=policy_summary(store.policy),
        )


class PolicyStore:
    """Holds the current ``Policy`` and reloads it from ``path`` when the file changes.

    ``policy``, ``version`` and ``loaded_at`` describe what is applied; ``last_error`` (and
    ``last_error_at``) the most recent refused file, cleared by the next good load.
    """

    def __init__(
        self, path: str | Path | None = None, *, policy: Policy | None = None, poll_interval_s: float = 0.5
    ) -> None:
        """Load ``path`` now (an invalid file raises ``PolicyError``: nothing to fall back to), or
        hold the given ``policy`` without a file."""
        if path is None and policy is None:
            raise ValueError("PolicyStore needs a policy file or a policy")
        self.path = Path(path) if path is not None else None
        self.poll_interval_s = poll_interval_s
        self.version = 0
        self.loaded_at: datetime = utcnow()
        self.last_error: str | None = None
        self.last_error_at: datetime | None = None
        self.callbacks: list[ReloadCallback] = []
        self._task: asyncio.Task[None] | None = None
        self._stamp: _FileStamp | None = None
        self._digest: str | None = None
        if self.path is not None and policy is None:
            self._stamp = _stamp(self.path)
            text = self._read()
            self.policy: Policy = self._parse(text)
            self._digest = _digest(text)
        else:
            assert policy is not None
            self.policy = policy
            if self.path is not None:
                self._stamp = _stamp(self.path)
        self.version = 1

    def _read(self) -> str:
        assert self.path is not None
        try:
            return self.path.read_text()
        except OSError as exc:
            raise PolicyError(f"invalid policy: cannot read {self.path}: {exc.strerror or exc}") from None

    def _parse(self, text: str) -> Policy:
        # Parse the text that was read (and hashed), not the file again: it may change meanwhile.
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise PolicyError(f"invalid policy: {self.path} is not valid YAML: {exc}") from None
        return parse_policy(data, str(self.path))

    def current(self) -> Policy:
        """The policy in force (for parts that take a policy reader)."""
        return self.policy

    def on_reload(self, callback: ReloadCallback) -> None:
        """Register ``callback`` to run after each successful reload."""
        self.callbacks.append(callback)

    def set(self, policy: Policy) -> None:
        """Apply ``policy`` (already validated) and tell the callbacks."""
        self.policy = policy  # one attribute store: readers see the old or the new policy, whole
        self.version += 1
        self.loaded_at = utcnow()
        self.last_error = None
        self.last_error_at = None
        for callback in list(self.callbacks):
            try:
                callback(policy)
            except Exception:
                log.exception("policy reload callback %r failed", callback)

    def reload(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed (or ``force``); apply it if valid.

        Returns True when a new policy was applied. A missing, unreadable or invalid file is
        refused: the current policy stays and ``last_error`` says why, naming the bad key.
        """
        if self.path is None:
            return False
        stamp = _stamp(self.path)
        if not force and stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            text = self._read()
            digest = _digest(text)
            if not force and digest == self._digest and self.last_error is None:
                return False  # touched, not changed
            policy = self._parse(text)
        except PolicyError as exc:
            message = str(exc)
            if message != self.last_error:
                log.error("policy %s refused, keeping version %d: %s", self.path, self.version, message)
            self.last_error = message
            self.last_error_at = utcnow()
            return False
        self._digest = digest
        self.set(policy)
        log.info("policy %s applied as version %d", self.path, self.version)
        return True

    async def start(self) -> None:
        """Start watching the file (call from the app's lifespan)."""
        if self.path is None or self._task is not None:
            return
        self._task = asyncio.create_task(self._watch(), name="distillgate-policy-watch")

    async def stop(self) -> None:
        """Stop watching; safe to call twice."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _watch(self) -> None:
        # Polling rather than inotify: it also sees ConfigMap updates (a symlink swap) and
        # files on network volumes, and one stat every half second costs nothing.
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                self.reload()
            except Exception:
                log.exception("policy watch failed; retrying")


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
