"""Storage types: stored legacy values out to FHIR, and FHIR search bounds back to storage."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from gateway.mapping.storage import STORAGE_TYPES, make_storage

LONDON = ZoneInfo("Europe/London")


def to_fhir(kind: str, value: object, tz: ZoneInfo = LONDON) -> object:
    return make_storage(kind, tz).to_fhir(value)


def test_every_declared_type_has_a_converter() -> None:
    for kind in STORAGE_TYPES:
        storage = make_storage(kind, LONDON)
        assert storage.name == kind
        assert storage.kind in ("string", "integer", "date", "datetime")


# --- to FHIR ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("stored", "fhir"), [
    ("19650412", "1965-04-12"),
    (" 19650412 ", "1965-04-12"),
    ("196504121030", "1965-04-12"),  # a longer stamp: the date part
    ("20240229", "2024-02-29"),
    # Not dates: omitted rather than sent as invalid FHIR.
    ("00000000", None),  # the legacy "not known"
    ("20230229", None),
    ("19651301", None),
    ("1965041", None),
    ("1965-04-12", None),
    ("", None),
    ("   ", None),
])
def test_date_yyyymmdd(stored: str, fhir: str | None) -> None:
    assert to_fhir("date:yyyymmdd", stored) == fhir


@pytest.mark.parametrize(("stored", "fhir"), [
    ("1965-04-12", "1965-04-12"),
    ("1965-04-12 10:30:00", "1965-04-12"),
    (dt.date(1965, 4, 12), "1965-04-12"),
    (dt.datetime(1965, 4, 12, 23, 59), "1965-04-12"),
    ("1965-02-30", None),
    ("1965-04", None),
    ("", None),
])
def test_date_iso(stored: object, fhir: str | None) -> None:
    assert to_fhir("date:iso", stored) == fhir


def test_yyyymmddhhmm_gets_the_london_offset_in_winter_and_in_summer() -> None:
    assert to_fhir("datetime:yyyymmddhhmm", "202401151030") == "2024-01-15T10:30:00+00:00"
    assert to_fhir("datetime:yyyymmddhhmm", "202307151030") == "2023-07-15T10:30:00+01:00"
    # Either side of the spring change (31 March 2024, 01:00 GMT -> 02:00 BST).
    assert to_fhir("datetime:yyyymmddhhmm", "202403310059") == "2024-03-31T00:59:00+00:00"
    assert to_fhir("datetime:yyyymmddhhmm", "202403310200") == "2024-03-31T02:00:00+01:00"
    # And the autumn change (27 October 2024, 02:00 BST -> 01:00 GMT).
    assert to_fhir("datetime:yyyymmddhhmm", "202410270000") == "2024-10-27T00:00:00+01:00"
    assert to_fhir("datetime:yyyymmddhhmm", "202410270300") == "2024-10-27T03:00:00+00:00"


def test_wall_clock_times_that_are_ambiguous_or_missing() -> None:
    # 01:30 on the autumn change happens twice: the first (BST) is taken.
    assert to_fhir("datetime:yyyymmddhhmm", "202410270130") == "2024-10-27T01:30:00+01:00"
    # 01:30 on the spring change never happens on the clock; it is read with GMT's offset.
    assert to_fhir("datetime:yyyymmddhhmm", "202403310130") == "2024-03-31T01:30:00+00:00"


def test_the_offset_is_the_connections_time_zone() -> None:
    assert to_fhir("datetime:yyyymmddhhmm", "202307151030", ZoneInfo("UTC")) == (
        "2023-07-15T10:30:00+00:00")
    assert to_fhir("datetime:yyyymmddhhmm", "202307151030", ZoneInfo("Europe/Paris")) == (
        "2023-07-15T10:30:00+02:00")


@pytest.mark.parametrize("stored", ["20240115", "2024011510", "202401151o30", "202402301030",
                                    "202401152460", "", "2024-01-15 10:30"])
def test_yyyymmddhhmm_that_is_not_a_time_is_omitted(stored: str) -> None:
    assert to_fhir("datetime:yyyymmddhhmm", stored) is None


def test_yyyymmddhhmmss() -> None:
    assert to_fhir("datetime:yyyymmddhhmmss", "20230715103045") == "2023-07-15T10:30:45+01:00"
    assert to_fhir("datetime:yyyymmddhhmmss", "20231215103045") == "2023-12-15T10:30:45+00:00"


def test_datetime_iso() -> None:
    assert to_fhir("datetime:iso", "2025-06-01 10:15:00") == "2025-06-01T10:15:00+01:00"
    assert to_fhir("datetime:iso", "2025-01-01T10:15:00") == "2025-01-01T10:15:00+00:00"
    # An offset already stored is kept as it is.
    assert to_fhir("datetime:iso", "2025-06-01T10:15:00+00:00") == "2025-06-01T10:15:00+00:00"
    assert to_fhir("datetime:iso", dt.datetime(2025, 6, 1, 10, 15)) == "2025-06-01T10:15:00+01:00"
    aware = dt.datetime(2025, 6, 1, 10, 15, tzinfo=dt.UTC)
    assert to_fhir("datetime:iso", aware) == "2025-06-01T10:15:00+00:00"
    assert to_fhir("datetime:iso", "not a time") is None
    assert to_fhir("datetime:iso", " ") is None


def reference_compact(stored: str) -> str | None:
    """The plain reading of YYYYMMDDHHMM[SS] the fast path must agree with."""
    s = stored.strip()
    if not s.isdigit() or len(s) < 12:
        return None
    try:
        naive = dt.datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]),
                            int(s[10:12]), int(s[12:14]) if len(s) >= 14 else 0)
    except ValueError:
        return None
    return naive.replace(tzinfo=LONDON).isoformat()


def test_compact_dates_and_times_agree_with_reading_the_digits_one_by_one() -> None:
    minute = make_storage("datetime:yyyymmddhhmm", LONDON).to_fhir
    day = make_storage("date:yyyymmdd", LONDON).to_fhir
    times = ["0000", "2359", "2400", "0160", "9999", "000000", "235959", "000060", "00001",
             "0000001234", "013000"]
    for year in ("0000", "0001", "1847", "1900", "2000", "2023", "2024", "9999"):
        for month in range(14):
            for d in range(33):
                date = f"{year}{month:02d}{d:02d}"
                ok = reference_compact(date + "0000")
                assert day(date) == (ok[:10] if ok else None), date
                for t in times:
                    assert minute(date + t) == reference_compact(date + t), date + t


def digits(s: str, zero: int) -> str:
    return s.translate({ord("0") + i: zero + i for i in range(10)})


@pytest.mark.parametrize("stored", [
    digits("202401151030", 0x0660),  # Arabic-Indic digits: int() reads them, as it always did
    digits("202401151030", 0xFF10),  # full-width digits
    "\u00b202401151030",  # a digit to isdigit() but not to int()
    "184001011200",  # before standard time: London's local mean time, -00:01:15
    "202410270130",  # ambiguous: the first (BST)
])
def test_compact_times_beyond_the_fast_path(stored: str) -> None:
    assert to_fhir("datetime:yyyymmddhhmm", stored) == reference_compact(stored)
    assert to_fhir("date:yyyymmdd", stored) == ((reference_compact(stored) or "")[:10] or None)


def test_datetime_iso_offsets_are_those_of_the_instant() -> None:
    class Stamp(dt.datetime):  # a driver's own datetime type formats as it likes
        def isoformat(self, sep: str = "T", timespec: str = "auto") -> str:
            return "stamp" + super().isoformat(sep, timespec)

    assert to_fhir("datetime:iso", "1840-01-01 12:00:00") == "1840-01-01T12:00:00-00:01:15"
    assert to_fhir("datetime:iso", "2025-06-01 10:15:00.5") == "2025-06-01T10:15:00.500000+01:00"
    assert to_fhir("datetime:iso", dt.datetime(2024, 10, 27, 1, 30, fold=1)) == (
        "2024-10-27T01:30:00+00:00")  # the second 01:30 of the autumn change, if so marked
    assert to_fhir("datetime:iso", Stamp(2025, 6, 1, 10, 15)) == "stamp2025-06-01T10:15:00+01:00"


def test_datetimes_that_compare_equal_keep_their_own_text() -> None:
    # Equal as instants, or differing only in fold: one key to a value cache, two texts.
    utc = dt.datetime(2025, 6, 1, 9, 15, tzinfo=dt.UTC)
    bst = dt.datetime(2025, 6, 1, 10, 15, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert [to_fhir("datetime:iso", utc), to_fhir("datetime:iso", bst)] == [
        "2025-06-01T09:15:00+00:00", "2025-06-01T10:15:00+01:00"]
    first, second = (dt.datetime(2024, 10, 27, 1, 45, fold=f) for f in (0, 1))
    assert [to_fhir("datetime:iso", first), to_fhir("datetime:iso", second)] == [
        "2024-10-27T01:45:00+01:00", "2024-10-27T01:45:00+00:00"]


def test_string_and_integer() -> None:
    assert to_fhir("string", "  SMITH  ") == "SMITH"
    assert to_fhir("string", "   ") is None
    assert to_fhir("string", 42) == "42"
    assert to_fhir("integer", 100001) == 100001


# --- search bounds: rounded up to the stored precision ----------------------------------------


def bound(kind: str, t: dt.datetime) -> object:
    return make_storage(kind, LONDON).bound(t)


def test_bound_rounds_up_to_the_day() -> None:
    assert bound("date:yyyymmdd", dt.datetime(1965, 4, 12)) == "19650412"
    assert bound("date:yyyymmdd", dt.datetime(1965, 4, 12, 0, 0, 1)) == "19650413"
    assert bound("date:yyyymmdd", dt.datetime(1965, 12, 31, 23, 59)) == "19660101"
    assert bound("date:iso", dt.datetime(1965, 4, 12)) == "1965-04-12"
    assert bound("date:iso", dt.datetime(1965, 4, 12, 12)) == "1965-04-13"


def test_bound_rounds_up_to_the_minute_or_second() -> None:
    assert bound("datetime:yyyymmddhhmm", dt.datetime(2024, 3, 10, 14, 22)) == "202403101422"
    assert bound("datetime:yyyymmddhhmm", dt.datetime(2024, 3, 10, 14, 22, 1)) == "202403101423"
    assert bound("datetime:yyyymmddhhmm", dt.datetime(2024, 3, 10, 23, 59, 30)) == "202403110000"
    assert bound("datetime:yyyymmddhhmmss",
                 dt.datetime(2024, 3, 10, 14, 22, 5, 1)) == "20240310142206"
    assert bound("datetime:iso", dt.datetime(2024, 3, 10, 14, 22, 5)) == "2024-03-10 14:22:05"
    assert bound("datetime:iso", dt.datetime(2024, 3, 10, 14, 22, 5, 500)) == "2024-03-10 14:22:06"


def test_rounding_up_makes_half_open_comparisons_exact() -> None:
    # "born on or after 12 April 1965 at noon" cannot include the 12th, stored as a day.
    storage = make_storage("date:yyyymmdd", LONDON)
    after_noon = storage.bound(dt.datetime(1965, 4, 12, 12))
    stored_12th, stored_13th = "19650412", "19650413"
    assert not stored_12th >= after_noon
    assert stored_13th >= after_noon


def test_parse_key() -> None:
    integer = make_storage("integer", LONDON)
    assert integer.parse_key("100001") == 100001
    for bad in ("abc", "-1", "1.5", "1" * 19, ""):
        with pytest.raises(ValueError):
            integer.parse_key(bad)
    assert make_storage("string", LONDON).parse_key("D0000001") == "D0000001"
