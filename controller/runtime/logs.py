"""Logging for the daemons and the CLI: one stderr handler in one of three formats.

- `journal`: `<N>LEVEL logger: message` with the syslog priority N in front of every line and no
  timestamp of our own; journald (a unit's stderr) reads the prefix as the entry's priority,
  so `journalctl -p warning -u kvmctl-agent` works. Chosen by `auto` when stderr is the
  journal stream (`$JOURNAL_STREAM` names stderr's device and inode).
- `json`: one JSON object per line (time, level, logger, message, reconcile context).
- `text`: `TIME LEVEL logger: message`, what a terminal wants; `auto` elsewhere.

Inside a reconcile (`telemetry.reconcile_span`) every record carries the object's kind, name
and a reconcile id: ` [kind/name id]` in text, fields in JSON.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TextIO

LogFormat = Literal["auto", "text", "json", "journal"]
LOG_FORMATS: tuple[LogFormat, ...] = ("auto", "text", "json", "journal")

SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


@dataclass(frozen=True)
class LogContext:
    kind: str
    name: str
    reconcile_id: str


log_context: contextvars.ContextVar[LogContext | None] = contextvars.ContextVar(
    "kvmctl_log_context", default=None
)
"""Set by `telemetry.reconcile_span` for the duration of one reconcile."""


class ReconcileContextFilter(logging.Filter):
    """Adds `kind`, `name` and `reconcile_id` to every record ("" outside a reconcile)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = log_context.get()
        record.kind = context.kind if context else ""
        record.object_name = context.name if context else ""
        record.reconcile_id = context.reconcile_id if context else ""
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the reconcile context."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for attribute, key in (
            ("kind", "kind"),
            ("object_name", "name"),
            ("reconcile_id", "reconcileID"),
        ):
            value = getattr(record, attribute, "")
            if value:
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s%(context)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s%(context)s"


class TextFormatter(logging.Formatter):
    """Plain lines, with ` [kind/name rid]` appended inside a reconcile."""

    def __init__(self, fmt: str = TEXT_FORMAT) -> None:
        super().__init__(fmt)

    def format(self, record: logging.LogRecord) -> str:
        kind = getattr(record, "kind", "")
        record.context = (
            f" [{kind}/{getattr(record, 'object_name', '')} {getattr(record, 'reconcile_id', '')}]"
            if kind
            else ""
        )
        return super().format(record)


class JournalFormatter(TextFormatter):
    """Text without a timestamp, each line prefixed `<N>` (journald's stream protocol): a
    traceback's lines keep the record's priority."""

    def __init__(self) -> None:
        super().__init__(JOURNAL_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        priority = SYSLOG_PRIORITY.get(record.levelno)
        if priority is None:  # a custom level: the nearest standard one at or below it
            at_or_below = [level for level in SYSLOG_PRIORITY if level <= record.levelno]
            priority = SYSLOG_PRIORITY[max(at_or_below, default=logging.DEBUG)]
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())


def stderr_is_journal(environ: Mapping[str, str] = os.environ, stream: TextIO = sys.stderr) -> bool:
    """True when `stream` is the journal stream systemd connected (`$JOURNAL_STREAM=dev:inode`)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = os.fstat(stream.fileno())
    except (OSError, ValueError):  # a stream without a descriptor (a test's StringIO)
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


class _StderrHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging` installs (and replaces when called again)."""


def resolve_format(log_format: LogFormat, environ: Mapping[str, str] = os.environ) -> LogFormat:
    """`auto` becomes `journal` under systemd (stderr is the journal), else `text`."""
    if log_format != "auto":
        return log_format
    return "journal" if stderr_is_journal(environ) else "text"


def configure_logging(log_format: LogFormat = "auto", level: int = logging.INFO) -> None:
    """Log to stderr in `log_format`, with the reconcile context on every record."""
    chosen = resolve_format(log_format)
    formatter: logging.Formatter
    if chosen == "json":
        formatter = JsonFormatter()
    elif chosen == "journal":
        formatter = JournalFormatter()
    else:
        formatter = TextFormatter()
    handler = _StderrHandler(sys.stderr)
    handler.addFilter(ReconcileContextFilter())
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
