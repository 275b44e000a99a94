"""The bill's range: ``--from``/``--to`` instants (a date or time without an offset is read in
the bill's time zone)."""

from __future__ import annotations

from datetime import UTC, tzinfo

from telemetry.billing.windows import parse_instant
from telemetry.errors import TallyError


def selected_range(
    start: str | None, end: str | None, tz: tzinfo = UTC
) -> tuple[int | None, int | None]:
    """[start, end) in ns from --from/--to (either may be open); raises ``TallyError`` when the
    range is empty."""
    lo = None if start is None else parse_instant(start, "--from", tz)
    hi = None if end is None else parse_instant(end, "--to", tz)
    if lo is not None and hi is not None and hi <= lo:
        raise TallyError(f"--from {start} / --to {end}: the range is empty (--to must be later)")
    return lo, hi
