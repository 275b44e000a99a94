"""Logging helpers: one logger tree under ``tally`` and "say it once" for recurring faults."""

from __future__ import annotations

import json
import logging
import threading
from datetime import UTC, datetime

log = logging.getLogger("tally")


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
        with self._lock:
            self._seen.pop(key, None)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (RFC 3339 UTC), level, logger, message."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        body = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def setup(level: str = "info", fmt: str = "text") -> None:
    """Send ``tally`` logs to stderr, one line each, at ``level``, as text or JSON."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("tally")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
