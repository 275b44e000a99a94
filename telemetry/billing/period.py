"""The bill's range: ``--from``/``--to`` instants and the windows they select."""

from __future__ import annotations

from datetime import UTC, date, datetime

from telemetry.billing.engine import NS
from telemetry.errors import TallyError


def parse_instant(text: str, what: str) -> int:
    """ISO-8601 date or date-time (naive means UTC) → ns since the epoch; raises ``TallyError``."""
    value = text.strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise TallyError(f"{what}: {text!r} is not an ISO-8601 date or time") from None
    return int(moment.timestamp()) * NS + moment.microsecond * 1000


def selected_range(
    window_s: int, start: str | None, end: str | None
) -> tuple[int | None, int | None]:
    """Window-aligned [start, end): the windows wholly inside --from/--to."""
    w = window_s * NS
    lo = None if start is None else -(-parse_instant(start, "--from") // w) * w
    hi = None if end is None else parse_instant(end, "--to") // w * w
    if lo is not None and hi is not None and hi <= lo:
        raise TallyError(f"--from {start} / --to {end} select no whole {window_s}s window")
    return lo, hi
