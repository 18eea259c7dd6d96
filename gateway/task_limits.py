"""Caps on the task names clients introduce: per API key and overall, new names past a cap fold
into one bounded task, ``_overflow``, kept paused on the teacher (issue 14: one unique
``metadata.task`` per request took a gateway to 1.2 GB and a 211 MB ``/metrics``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy.exc import IntegrityError

from gateway.settings import TaskLimitSettings
from gateway.store.db import Database
from gateway.store.models import Stage, Task, utcnow

log = logging.getLogger("distillgate.tasks")

OVERFLOW_TASK = "_overflow"
"""Where requests naming a task past the caps are filed: recorded and answered by the teacher,
never trained on (its row is created paused)."""


class TaskCaps:
    """Admits task names: known ones always, new ones while their key and the process are under
    their caps. Counts are this process's since it started; names stored before count as known."""

    def __init__(
        self, settings: TaskLimitSettings, known: Callable[[], Mapping[str, Any]], db: Database
    ) -> None:
        self.settings = settings
        self.db = db
        self._known = known
        """The task table's rows (re-read every second, so other replicas' tasks count as known)."""
        self._admitted: set[str] = set()
        self._per_key: dict[int | None, int] = {}
        self._full = False
        self.folded = 0
        """Requests filed under ``_overflow`` so far."""

    def admit(self, task: str, key_id: int | None) -> str:
        """``task``, or ``OVERFLOW_TASK`` when it is new and a cap is reached."""
        if task in self._admitted:
            return task
        if task in self._known():
            self._admitted.add(task)
            return task
        return self._admit_new(task, key_id)

    def _admit_new(self, task: str, key_id: int | None) -> str:
        count = self._per_key.get(key_id, 0)
        if not self._full and len(self._admitted) + self._unseen_known() >= self.settings.max_tasks:
            self._full = True
            log.warning(
                "task cap reached (%d tasks): new task names fold into %s",
                self.settings.max_tasks,
                OVERFLOW_TASK,
            )
        if self._full or count >= self.settings.max_new_per_key:
            if self.folded == 0:
                # Created on first use, not at start: a gateway that never folds keeps no such row.
                asyncio.get_running_loop().run_in_executor(None, reserve_overflow_task, self.db)
            self.folded += 1
            return OVERFLOW_TASK
        self._per_key[key_id] = count + 1
        self._admitted.add(task)
        return task

    def _unseen_known(self) -> int:
        """Stored tasks not admitted here yet (they are known, so they count against ``max_tasks``)."""
        return len(self._known().keys() - self._admitted)


def reserve_overflow_task(db: Database) -> None:
    """Hold the ``_overflow`` task paused, so its records are kept but no student is trained on a
    mix of unrelated prompts. Idempotent: the recorder may have created the row meanwhile (as
    ``collecting``, like any new task), and replicas race to create it."""
    try:
        with db.session() as session:
            task = session.get(Task, OVERFLOW_TASK)
            if task is None:
                session.add(Task(key=OVERFLOW_TASK, stage=Stage.paused, paused_from=Stage.collecting))
            elif task.stage == Stage.collecting and task.adapter is None:
                task.stage, task.paused_from, task.updated_at = Stage.paused, Stage.collecting, utcnow()
                session.add(task)
            else:
                return
            session.commit()
    except IntegrityError:
        reserve_overflow_task(db)  # created by the recorder or a replica meanwhile: look again
    except Exception as exc:  # the database is away: the next fold of a restarted process retries
        log.warning("could not hold %s paused (%s)", OVERFLOW_TASK, type(exc).__name__)
