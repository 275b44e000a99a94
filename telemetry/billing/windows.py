"""Bill windows (SPEC §4): fixed lengths aligned to the Unix epoch, or calendar days, ISO weeks
and months in a time zone; and instants written in that zone.

A window is named by an integer id: for a fixed length W the id k is [k·W, (k+1)·W); for calendar
windows it counts days, weeks or months since 1970 in the zone. ``index`` maps sample times to ids
on the array backend (one ``searchsorted`` against the boundaries it has met so far), so a bill
sums per calendar window as exactly as per fixed window.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import numpy as np

from kernels.backend import array_namespace, to_backend
from telemetry.errors import TallyError

NS = 1_000_000_000
CALENDAR = ("day", "week", "month")
_EPOCH_MONDAY = date(1969, 12, 29)  # the ISO week holding 1970-01-01 starts here


def zone(name: str | None, what: str = "timezone") -> tzinfo:
    """The IANA zone ``name`` (None or "UTC" → UTC); raises ``TallyError`` naming ``what``."""
    if name is None or name in ("UTC", "Z", "Etc/UTC"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise TallyError(
            f"{what}: {name!r} is not an IANA time zone (like Asia/Shanghai)"
        ) from None


def zone_name(tz: tzinfo) -> str:
    return "UTC" if tz is UTC else str(getattr(tz, "key", tz))


def to_ns(moment: datetime) -> int:
    """An aware datetime → ns since the epoch (exact to the microsecond)."""
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * NS + delta.microseconds * 1000


def iso(ns: int, tz: tzinfo = UTC) -> str:
    """ISO-8601 with the zone's offset at that instant (``Z`` for UTC); whole seconds unless the
    instant has a fraction."""
    seconds, rest = divmod(ns, NS)
    moment = datetime.fromtimestamp(seconds, tz=UTC).astimezone(tz)
    if rest:
        moment = moment + timedelta(microseconds=rest // 1000)
    text = moment.isoformat()
    return text.replace("+00:00", "Z") if tz is UTC else text


def parse_instant(text: str, what: str, tz: tzinfo = UTC) -> int:
    """ISO-8601 date or date-time → ns; one without an offset is read in ``tz``. Raises
    ``TallyError`` naming ``what``."""
    value = str(text).strip()
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime(day.year, day.month, day.day)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise TallyError(f"{what}: {text!r} is not an ISO-8601 date or time") from None
    if moment.tzinfo is None:
        moment = _localize(moment, tz)
    return to_ns(moment)


def _localize(naive: datetime, tz: tzinfo) -> datetime:
    """``naive`` wall time in ``tz``; a time skipped by a DST jump moves past the jump."""
    aware = naive.replace(tzinfo=tz)
    back = aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    if back != naive:  # in a gap: the wall time does not exist
        aware = (naive + timedelta(hours=1)).replace(tzinfo=tz)
    return aware


class Windows:
    """Either ``seconds`` (a fixed length) or ``calendar`` in ``tz``."""

    def __init__(self, spec: int | str, tz: tzinfo = UTC) -> None:
        self.tz = tz
        if isinstance(spec, str):
            if spec not in CALENDAR:
                raise TallyError(f"window: {spec!r} is not one of {', '.join(CALENDAR)}")
            self.calendar: str | None = spec
            self.length_ns = 0
        else:
            self.calendar = None
            self.length_ns = int(spec) * NS
        # calendar boundaries met so far: the start of window first_id + i is _starts[i]
        self._first_id = 0
        self._starts = np.zeros(0, dtype=np.int64)
        self._on_backend: dict[int, Any] = {}

    @property
    def label(self) -> str:
        return self.calendar or f"{self.length_ns // NS}s"

    # ---------------------------------------------------------------- ids and bounds
    def id_of(self, ns: int) -> int:
        """The id of the window holding instant ``ns``."""
        if self.calendar is None:
            return ns // self.length_ns
        local = datetime.fromtimestamp(ns // NS, tz=UTC).astimezone(self.tz).date()
        if self.calendar == "day":
            return (local - date(1970, 1, 1)).days
        if self.calendar == "week":
            return (local - _EPOCH_MONDAY).days // 7
        return (local.year - 1970) * 12 + local.month - 1

    def start_of(self, window: int) -> int:
        """The first instant (ns) of window ``window``."""
        if self.calendar is None:
            return window * self.length_ns
        if self.calendar == "day":
            day = date(1970, 1, 1) + timedelta(days=window)
        elif self.calendar == "week":
            day = _EPOCH_MONDAY + timedelta(days=7 * window)
        else:
            year, month = divmod(window, 12)
            day = date(1970 + year, month + 1, 1)
        return to_ns(_localize(datetime(day.year, day.month, day.day), self.tz))

    def bounds(self, window: int) -> tuple[int, int]:
        return self.start_of(window), self.start_of(window + 1)

    def names(self, window: int) -> tuple[str, str]:
        start, end = self.bounds(window)
        return iso(start, self.tz), iso(end, self.tz)

    def index(self, times_ns: Any) -> Any:
        """Window id of each time (int64 array on the times' backend)."""
        xp = array_namespace(times_ns)
        if self.calendar is None:
            return xp.floor_divide(times_ns, self.length_ns)
        if times_ns.shape[0] == 0:
            return xp.zeros(0, dtype=xp.int64)
        self._cover(self.id_of(int(times_ns.min())), self.id_of(int(times_ns.max())))
        starts = self._on_backend.get(id(xp))
        if starts is None:
            starts = self._on_backend[id(xp)] = to_backend(xp, self._starts)
        position = xp.searchsorted(starts, times_ns, side="right") - 1
        return position.astype(xp.int64) + self._first_id

    def _cover(self, low: int, high: int) -> None:
        have = self._starts.size
        if have and self._first_id <= low and high < self._first_id + have - 1:
            return
        first = min(low, self._first_id) if have else low
        last = max(high, self._first_id + have - 2) if have else high
        self._first_id = first
        self._starts = np.array([self.start_of(w) for w in range(first, last + 2)], dtype=np.int64)
        self._on_backend.clear()
