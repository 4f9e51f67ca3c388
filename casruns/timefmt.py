"""Timestamps and durations as casruns writes and reads them.

Timestamps are RFC 3339 in UTC with microseconds and a ``Z`` suffix
(``2026-11-24T22:00:00.123456Z``). Durations given by users are ``90``, ``90s``, ``15m``,
``2h``, ``7d`` or combinations such as ``1h30m``; they are stored as seconds (float).
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone

from .errors import InvalidInput

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}


def format_ts(t: float) -> str:
    dt = datetime.fromtimestamp(t, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def now_ts() -> str:
    return format_ts(time.time())


MAX_YEAR = 9000


def parse_ts(s: str) -> float:
    """Parse an RFC 3339 timestamp (any offset; ``Z`` accepted) to epoch seconds."""
    if not isinstance(s, str) or not s:
        raise InvalidInput(f"invalid timestamp {s!r}")
    text = s.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInput(f"invalid timestamp {s!r}: expected RFC 3339, e.g. 2026-11-24T22:00:00Z") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    if dt.year > MAX_YEAR:
        # every time casruns computes from it (retention, deadlines) must stay a timestamp
        raise InvalidInput(f"invalid timestamp {s!r}: later than the year {MAX_YEAR}")
    return dt.timestamp()


# Longest accepted duration: deadlines and retention times computed from it stay representable
# as timestamps (a 10^20-day timeout once overflowed in the supervisor and was restarted forever).
MAX_DURATION = 100 * 365.25 * 86400


def parse_duration(s: str | float | int) -> float:
    """Parse ``90``, ``1.5s``, ``15m``, ``1h30m``, ``7d`` into seconds. Raises InvalidInput."""
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        if s < 0:
            raise InvalidInput(f"invalid duration {s!r}: must not be negative")
        if s != s or s > MAX_DURATION:
            raise InvalidInput(f"invalid duration {s!r}: longer than 100 years")
        return float(s)
    text = str(s).strip().lower()
    if not text:
        raise InvalidInput("empty duration")
    try:
        value = float(text)
    except ValueError:
        pos = 0
        value = 0.0
        for m in _DURATION_RE.finditer(text):
            if m.start() != pos:
                break
            value += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(text):
            raise InvalidInput(
                f"invalid duration {s!r}: use seconds or a number with a unit, e.g. 90s, 15m, 2h, 7d, 1h30m"
            ) from None
    if value < 0 or value != value or value == float("inf"):
        raise InvalidInput(f"invalid duration {s!r}")
    if value > MAX_DURATION:
        raise InvalidInput(f"invalid duration {s!r}: longer than 100 years")
    return value


def parse_time_or_ago(s: str, *, now: float | None = None) -> float:
    """``--since`` values: an RFC 3339 timestamp or a duration meaning that long ago."""
    try:
        return parse_ts(s)
    except InvalidInput:
        pass
    try:
        return (time.time() if now is None else now) - parse_duration(s)
    except InvalidInput:
        raise InvalidInput(f"invalid time {s!r}: expected RFC 3339 or a duration such as 2h") from None
