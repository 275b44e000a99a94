"""Error types that carry a clear one-line message to the operator (CLI exit code 2, or 1
for ``RunFailed``)."""

from __future__ import annotations

from pathlib import Path


class TallyError(Exception):
    """Bad usage, configuration or input: reported as one line on stderr, exit code 2."""


class RunFailed(RuntimeError):
    """The run failed for a reason that is neither bad input nor a bug (a worker process killed
    again and again): reported as one line on stderr, exit code 1."""


class ParseError(TallyError):
    """A /proc or /sys file does not have the expected format; the message names the file."""


class SchemaError(ValueError):
    """A table does not match its SPEC §2 schema; the message names the table and column.

    ``missing`` is True when a required column is absent (a file of an older or other layout),
    as opposed to a column of the wrong type or content (a foreign or corrupted file).
    """

    def __init__(self, message: str, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class CollectorUnavailable(Exception):
    """What a collector reads does not exist on this host (no RAPL zones, no NVML): the collector
    reports failure with this one-line reason and the daemon goes on."""


def read_text_file(path: Path, what: str) -> str:
    """The UTF-8 text of ``path``; a ``TallyError`` naming ``what`` and the file when it cannot
    be read or is not UTF-8."""
    try:
        return path.read_text()
    except OSError as exc:
        raise TallyError(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise TallyError(f"{what} {path}: not UTF-8 text") from None
