"""Logging for the whole process: the gateway's own lines (spooling started, replayed N, recorder
restarted) at ``log_level``, with timestamps and levels, as text or one JSON object a line.

uvicorn is started with ``log_config=None`` so its loggers propagate here and share the format.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Literal, TextIO

import orjson

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _UTCFormatter(logging.Formatter):
    """ISO 8601 timestamps in UTC with milliseconds: lines from replicas in other zones sort together."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


class JsonFormatter(_UTCFormatter):
    """One JSON object a line (``ts``, ``level``, ``logger``, ``message``, ``exc`` when there is one)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, str] = {
            "ts": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


_HANDLER_NAME = "distillgate"


def configure_logging(level: str = "INFO", fmt: LogFormat = "text", stream: TextIO | None = None) -> None:
    """Send every logger's lines to ``stream`` (stderr) at ``level``; calling it again replaces its
    own handler only."""
    remove_logging()
    root = logging.getLogger()
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _UTCFormatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())


def remove_logging() -> None:
    """Take away the handler ``configure_logging`` added."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler.get_name() == _HANDLER_NAME:
            root.removeHandler(handler)
