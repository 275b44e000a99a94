"""tally telemetry: sample schemas, collectors, the Parquet store, replay, daemon and CLI."""

from __future__ import annotations

__version__ = "0.1.0"
