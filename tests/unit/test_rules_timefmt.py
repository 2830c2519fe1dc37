"""rules.timefmt: Date.toJSON rendering and zod-compatible ISO parsing."""

from datetime import datetime, timedelta, timezone

import pytest

from rules.timefmt import is_iso_z, iso_ms, parse_iso_z

UTC = timezone.utc


def test_iso_ms_renders_like_date_tojson() -> None:
    assert iso_ms(datetime(2026, 6, 1, tzinfo=UTC)) == "2026-06-01T00:00:00.000Z"
    assert iso_ms(datetime(2026, 6, 1, 12, 34, 56, 789999, tzinfo=UTC)) == "2026-06-01T12:34:56.789Z"
    assert iso_ms(datetime(2026, 6, 1, 0, 0, 0, 999, tzinfo=UTC)) == "2026-06-01T00:00:00.000Z"


def test_iso_ms_naive_is_utc_and_offsets_convert() -> None:
    assert iso_ms(datetime(2027, 1, 1, 5, 6, 7, 8000)) == "2027-01-01T05:06:07.008Z"
    plus2 = timezone(timedelta(hours=2))
    assert iso_ms(datetime(2026, 1, 1, 1, 0, tzinfo=plus2)) == "2025-12-31T23:00:00.000Z"


def test_iso_ms_pads_small_years_and_passes_none() -> None:
    assert iso_ms(datetime(999, 1, 2, tzinfo=UTC)) == "0999-01-02T00:00:00.000Z"
    assert iso_ms(None) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-06-01T00:00:00Z", datetime(2026, 6, 1, tzinfo=UTC)),
        ("2026-06-01T00:00:00.5Z", datetime(2026, 6, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2026-06-01T00:00:00.123Z", datetime(2026, 6, 1, 0, 0, 0, 123000, tzinfo=UTC)),
        ("2026-06-01T00:00:00.123456789Z", datetime(2026, 6, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        ("2026-06-01T23:59Z", datetime(2026, 6, 1, 23, 59, tzinfo=UTC)),  # zod 4.4: seconds optional
        ("2024-02-29T12:00:00Z", datetime(2024, 2, 29, 12, tzinfo=UTC)),
        ("2000-02-29T00:00:00Z", datetime(2000, 2, 29, tzinfo=UTC)),
    ],
)
def test_parse_iso_z_accepts(text: str, expected: datetime) -> None:
    parsed = parse_iso_z(text)
    assert parsed == expected
    assert parsed.tzinfo is not None and parsed.utcoffset() == timedelta(0)
    assert is_iso_z(text)


@pytest.mark.parametrize(
    "text",
    [
        "2026-06-01T00:00:00",  # no Z
        "2026-06-01T00:00:00+00:00",  # offsets refused
        "2026-06-01T00:00:00.000+02:00",
        "2026-06-01",
        "2026-06-01 00:00:00Z",
        "2026-06-01T00:00:00z",
        "2026-06-01T24:00:00Z",
        "2026-06-01T00:60:00Z",
        "2026-06-01T00:00:60Z",
        "2026-13-01T00:00:00Z",
        "2026-04-31T00:00:00Z",
        "2025-02-29T00:00:00Z",  # not a leap year
        "1900-02-29T00:00:00Z",
        "2026-06-01T00:00.5Z",  # fraction needs seconds
        "2026-06-01T00:00:00.Z",
        "2026-06-01T00:00:00Z\n",
        "２０２６-06-01T00:00:00Z",  # non-ASCII digits
        "",
    ],
)
def test_parse_iso_z_rejects(text: str) -> None:
    assert not is_iso_z(text)
    with pytest.raises(ValueError):
        parse_iso_z(text)


def test_is_iso_z_non_string() -> None:
    assert not is_iso_z(None)
    assert not is_iso_z(1700000000)


def test_round_trip() -> None:
    assert iso_ms(parse_iso_z("2026-06-01T10:20:30.456Z")) == "2026-06-01T10:20:30.456Z"
