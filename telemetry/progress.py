"""Progress bars for long work (bill, replay, report): one line on stderr, only on a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24


class Progress:
    """Callable ``(done, total, rows)`` that redraws ``LABEL: STEP done/total [####  ] rows``.

    Draws nothing with ``quiet`` or unless ``stream`` (stderr by default) is a terminal, so logs
    and pipes stay clean; redraws at most every ``min_interval_s`` seconds, and always for the
    last step. As a context manager it ends its line on exit.
    """

    def __init__(
        self,
        label: str,
        step: str = "chunk",
        stream: TextIO | None = None,
        min_interval_s: float = 0.1,
        quiet: bool = False,
    ) -> None:
        self.label = label
        self.step = step
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = not quiet and bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval_s = min_interval_s
        self._drawn = False
        self._last = 0.0

    def __call__(self, done: int, total: int, rows: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if done < total and now - self._last < self.min_interval_s:
            return
        self._last = now
        filled = _WIDTH * done // total if total else _WIDTH
        bar = "#" * filled + "." * (_WIDTH - filled)
        line = f"\r{self.label}: {self.step} {done}/{total} [{bar}] {rows:,} rows"
        print(line, end="", file=self.stream, flush=True)
        self._drawn = True

    def close(self) -> None:
        """End the progress line (if one was drawn) so the next output starts on its own."""
        if self._drawn:
            print(file=self.stream, flush=True)
            self._drawn = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def silent(done: int, total: int, rows: int) -> None:
    """A progress callback that shows nothing (``--quiet``)."""
    return None
