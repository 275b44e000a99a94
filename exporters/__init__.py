"""tally exporters: Prometheus exposition and its HTTP server."""

from __future__ import annotations
