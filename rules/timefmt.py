"""Timestamp rendering and parsing with the reference's exact formats."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

# zod 4.4 `z.string().datetime()` (the reference's version): calendar-checked date (leap years
# included), `HH:MM` with optional `:SS` and optional fraction of any length after the seconds,
# and a mandatory `Z` (offsets are refused). re.ASCII keeps `\d` to 0-9 like JavaScript.
_ISO_Z = re.compile(
    r"(?:(?:\d\d[2468][048]|\d\d[13579][26]|\d\d0[48]|[02468][048]00|[13579][26]00)-02-29"
    r"|\d{4}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    r"|(?:02)-(?:0[1-9]|1\d|2[0-8])))"
    r"T(?:[01]\d|2[0-3]):[0-5]\d(?::[0-5]\d(?:\.\d+)?)?Z",
    re.ASCII,
)


def iso_ms(dt: datetime | None) -> str | None:
    """Render like JavaScript `Date.prototype.toJSON`: UTC, milliseconds, `Z`.

    Naive datetimes are taken as UTC. Sub-millisecond digits are truncated, as node-postgres does
    when it turns a timestamptz into a Date.
    """
    if dt is None:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    elif dt.utcoffset():
        dt = dt.astimezone(timezone.utc)
    # isoformat truncates to milliseconds and ends in "+00:00" here (C code: a list page renders
    # hundreds of these).
    return dt.isoformat(timespec="milliseconds")[:-6] + "Z"


def is_iso_z(value: object) -> bool:
    """True when `value` is a string zod's default `.datetime()` accepts."""
    return isinstance(value, str) and _ISO_Z.fullmatch(value) is not None


def parse_iso_z(value: str) -> datetime:
    """Parse a zod-valid ISO datetime ending in `Z` into an aware UTC datetime.

    Fractions longer than microseconds are truncated. Raises ValueError when the string is not
    accepted by the zod rule or names a year Python cannot represent (0000).
    """
    if not is_iso_z(value):
        raise ValueError(f"not an ISO-8601 UTC datetime ending in Z: {value!r}")
    date_part, time_part = value[:-1].split("T")
    year, month, day = (int(p) for p in date_part.split("-"))
    pieces = time_part.split(":")
    hour, minute = int(pieces[0]), int(pieces[1])
    second = 0
    micros = 0
    if len(pieces) == 3:
        sec_text, _, frac = pieces[2].partition(".")
        second = int(sec_text)
        if frac:
            micros = int(frac[:6].ljust(6, "0"))
    # datetime() raises ValueError itself for year 0.
    return datetime(year, month, day, hour, minute, second, tzinfo=timezone.utc) + timedelta(
        microseconds=micros
    )


def parse_rfc3339(value: object) -> datetime:
    """An RFC 3339 instant with its offset (`Z` or ±hh:mm); ValueError for anything else (numbers,
    dates without a time, local times)."""
    if not isinstance(value, str) or len(value) < 16 or value[10] not in "Tt ":
        raise ValueError("must be an RFC 3339 date-time with its offset")
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError("must carry its UTC offset (Z or ±hh:mm)")
    return parsed
