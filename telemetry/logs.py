"""Logging helpers: one logger tree under ``tally`` and "say it once" for recurring faults."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from datetime import UTC, datetime
from typing import TextIO

log = logging.getLogger("tally")
_FORMAT = ["text"]  # set by setup(): what say() writes


class OnceLogger:
    """Logs a message for a key only the first time, until the key is cleared.

    Used for faults that would otherwise repeat every round: an unreadable RAPL zone, a
    collector that keeps failing with the same error.
    """

    def __init__(self, logger: logging.Logger = log) -> None:
        self._logger = logger
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def warning(self, key: str, message: str) -> bool:
        """Log ``message`` unless ``key`` was last logged with the same message; True if logged."""
        with self._lock:
            if self._seen.get(key) == message:
                return False
            self._seen[key] = message
        self._logger.warning("%s", message)
        return True

    def clear(self, key: str) -> None:
        """Forget ``key`` so its next fault is logged again (the fault went away)."""
        if key in self._seen:  # called for every key every round: most have nothing to forget
            with self._lock:
                self._seen.pop(key, None)


def _json_line(created: float, level: str, logger: str, message: str, **extra: str) -> str:
    stamp = datetime.fromtimestamp(created, tz=UTC).isoformat(timespec="milliseconds")
    body = {
        "time": stamp.replace("+00:00", "Z"),
        "level": level,
        "logger": logger,
        "message": message,
        **extra,
    }
    return json.dumps(body, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339 UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        extra = {"exception": self.formatException(record.exc_info)} if record.exc_info else {}
        return _json_line(
            record.created, record.levelname.lower(), record.name, record.getMessage(), **extra
        )


_LINE_BREAKS = re.compile(r"\s*\n\s*")


def _one_line(text: str) -> str:
    """``text`` on one line: a library's multi-line reason (pyarrow's thrift errors) joined
    with spaces."""
    return _LINE_BREAKS.sub(" ", text).strip() if "\n" in text else text


def say(
    message: str,
    level: str = "info",
    stream: TextIO | None = None,
    plain: str | None = None,
    **extra: str,
) -> None:
    """A line for the operator on ``stream`` (stderr by default): with ``--log-format json`` one
    JSON object like every log record, else ``plain`` (default: an info line as it is, a warning
    or an error as ``tally: LEVEL: message``).

    Banners, warnings and errors of every command go through here, so a log shipper reading
    JSON never meets a plain line.
    """
    out = sys.stderr if stream is None else stream
    message = _one_line(message)
    if _FORMAT[0] == "json":
        line = _json_line(time.time(), level, "tally", message, **extra)
    elif plain is not None:
        line = plain
    else:
        line = message if level == "info" else f"tally: {level}: {message}"
    print(line, file=out, flush=True)


class _OneLine(logging.Formatter):
    """A text log record on one line (:func:`_one_line`), a traceback (debug) left as it is."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _one_line(super().formatMessage(record))


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send ``tally`` logs to stderr, one line each, at ``level``, as text or JSON."""
    handler = logging.StreamHandler()
    _FORMAT[0] = fmt
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tally")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
