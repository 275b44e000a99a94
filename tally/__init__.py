"""tally for notebooks: stored samples, bills and plans as polars frames.

``tally.scan(dataset, table)`` is a ``pl.LazyFrame`` of one sample table; ``tally.bill(...)``
and ``tally.plan(...)`` are dicts of ``pl.DataFrame`` equal to the JSON of ``tally bill`` and
``tally plan``. See ``telemetry.api``.
"""

from __future__ import annotations

from telemetry import __version__
from telemetry.api import bill, plan, scan

__all__ = ["__version__", "bill", "plan", "scan"]
