"""Unit tests of the FHIR search value parsers (gateway/search.py)."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from gateway.errors import InvalidParameter
from gateway.search import (
    DATE_PREFIXES,
    MAX_VALUE_LENGTH,
    DateValue,
    MissingValue,
    ReferenceValue,
    StringValue,
    TokenValue,
    fold,
    parse_date,
    parse_missing,
    parse_reference,
    parse_string,
    parse_token,
    split_values,
)

LONDON = ZoneInfo("Europe/London")
D = dt.datetime


# --- split_values --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("smith", ["smith"]),
    ("smith,jones", ["smith", "jones"]),
    ("a,,b", ["a", "", "b"]),
    ("a,", ["a", ""]),
    ("", [""]),
    (r"a\,b", ["a,b"]),                 # escaped comma: one value
    (r"a\,b,c", ["a,b", "c"]),
    (r"a\$b", ["a$b"]),
    (r"a\\b", [r"a\\b"]),               # escaped backslash: kept escaped for the parsers
    (r"a\\,b", [r"a\\", "b"]),          # escaped backslash, then a real comma
    (r"s\|c", [r"s\|c"]),               # \| kept escaped for the token parser
    (r"a\x", [r"a\x"]),                 # not an escape: kept as is
    ("a\\", ["a\\"]),                   # trailing backslash kept
])
def test_split_values(raw: str, expected: list[str]) -> None:
    assert split_values(raw) == expected


# --- string ----------------------------------------------------------------------------------


def test_fold() -> None:
    assert fold("BRONTË") == "bronte"
    assert fold("Zoë Ångström-Ñúñez") == "zoe angstrom-nunez"
    assert fold("O'Brien") == "o'brien"


@pytest.mark.parametrize(("raw", "folded"), [
    ("Smith", "smith"),
    ("BRONTË", "bronte"),
    ("brontë", "bronte"),
    ("  Bron  ", "bron"),
    ("O'Brien", "o'brien"),
    ("a\\|b", "a|b"),
])
def test_string_prefix_is_folded(raw: str, folded: str) -> None:
    assert parse_string("family", raw, None) == StringValue("prefix", folded)


def test_string_contains_and_exact() -> None:
    assert parse_string("family", "RONT", "contains") == StringValue("contains", "ront")
    assert parse_string("family", "Brontë", "contains") == StringValue("contains", "bronte")
    # :exact is a whole-value match, still case- and accent-insensitive (folded)
    assert parse_string("family", "Brontë", "exact") == StringValue("exact", "bronte")
    assert parse_string("family", " SMITH ", "exact") == StringValue("exact", "smith")


@pytest.mark.parametrize("raw", ["", "   ", "\t"])
def test_string_empty_rejected(raw: str) -> None:
    with pytest.raises(InvalidParameter):
        parse_string("family", raw, None)


def test_string_length_limit() -> None:
    ok = "a" * MAX_VALUE_LENGTH
    assert parse_string("family", ok, None).value == ok
    with pytest.raises(InvalidParameter) as info:
        parse_string("family", ok + "a", None)
    assert "256" in info.value.message
    assert ok not in info.value.message  # never echo the value


@pytest.mark.parametrize("raw", ["smi\x00th", "smi\nth", "smith\r", "\x1b[31msmith", "a\x7f"])
def test_control_characters_rejected(raw: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_string("family", raw, None)
    assert "control" in info.value.message
    with pytest.raises(InvalidParameter):
        parse_token("identifier", raw)
    with pytest.raises(InvalidParameter):
        parse_reference("patient", raw, ("Patient",))


def test_missing() -> None:
    assert parse_missing("email", "true") == MissingValue(True)
    assert parse_missing("email", "false") == MissingValue(False)
    for bad in ("True", "1", "", "yes"):
        with pytest.raises(InvalidParameter):
            parse_missing("email", bad)


# --- token -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "system", "code"), [
    ("female", None, "female"),
    ("http://hl7.org/fhir/administrative-gender|female",
     "http://hl7.org/fhir/administrative-gender", "female"),
    ("|female", "", "female"),                                  # explicitly no system
    ("https://fhir.nhs.uk/Id/nhs-number|", "https://fhir.nhs.uk/Id/nhs-number", None),
    ("sys|a|b", "sys", "a|b"),                                  # first bar separates
    (r"a\|b", None, "a|b"),                                     # escaped bar in a code
    (r"s\|x|c", "s|x", "c"),                                    # escaped bar in a system
    (r"sys|a\|b", "sys", "a|b"),
])
def test_token_forms(raw: str, system: str | None, code: str | None) -> None:
    assert parse_token("identifier", raw) == TokenValue(system, code)


@pytest.mark.parametrize("raw", ["", "|"])
def test_token_empty_rejected(raw: str) -> None:
    with pytest.raises(InvalidParameter):
        parse_token("identifier", raw)


def test_token_length_limit() -> None:
    assert parse_token("identifier", "x" * 256).code == "x" * 256
    with pytest.raises(InvalidParameter):
        parse_token("identifier", "x" * 257)


def test_token_via_split_values() -> None:
    # what the planner does: split on commas, then parse each alternative
    values = [parse_token("identifier", v) for v in split_values(r"s|a\,b,s2|c\|d")]
    assert values == [TokenValue("s", "a,b"), TokenValue("s2", "c|d")]


@pytest.mark.parametrize(("raw", "expected"), [
    (r"a\\|b", TokenValue("a\\", "b")),      # an escaped backslash, then the separator
    (r"a\\\|b", TokenValue(None, "a\\|b")),   # an escaped backslash, then an escaped bar
    (r"a\|b\\|c", TokenValue("a|b\\", "c")),
    (r"s|a\\b", TokenValue("s", "a\\b")),
])
def test_token_escapes_via_split_values(raw: str, expected: TokenValue) -> None:
    (value,) = split_values(raw)
    assert parse_token("identifier", value) == expected


def test_string_escapes_via_split_values() -> None:
    values = [parse_string("family", v, "exact") for v in split_values(r"a\\b,c\|d\,e")]
    assert values == [StringValue("exact", "a\\b"), StringValue("exact", "c|d,e")]


# --- date ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "low", "high"), [
    ("2024", D(2024, 1, 1), D(2025, 1, 1)),
    ("1900", D(1900, 1, 1), D(1901, 1, 1)),
    ("2024-02", D(2024, 2, 1), D(2024, 3, 1)),
    ("2023-02", D(2023, 2, 1), D(2023, 3, 1)),
    ("2024-12", D(2024, 12, 1), D(2025, 1, 1)),
    ("2024-02-29", D(2024, 2, 29), D(2024, 3, 1)),
    ("2024-12-31", D(2024, 12, 31), D(2025, 1, 1)),
    ("2024-03-10T10:15", D(2024, 3, 10, 10, 15), D(2024, 3, 10, 10, 16)),
    ("2024-03-10T23:59", D(2024, 3, 10, 23, 59), D(2024, 3, 11, 0, 0)),
    ("2024-03-10T10:15:30", D(2024, 3, 10, 10, 15, 30), D(2024, 3, 10, 10, 15, 31)),
    ("2024-03-10T10:15:59", D(2024, 3, 10, 10, 15, 59), D(2024, 3, 10, 10, 16, 0)),
    # a zone: converted to Europe/London wall-clock time (GMT in winter ...)
    ("2024-01-10T10:15Z", D(2024, 1, 10, 10, 15), D(2024, 1, 10, 10, 16)),
    ("2024-01-10T10:15:00+01:00", D(2024, 1, 10, 9, 15), D(2024, 1, 10, 9, 15, 1)),
    # ... and BST (UTC+1) in summer
    ("2024-07-10T10:15Z", D(2024, 7, 10, 11, 15), D(2024, 7, 10, 11, 16)),
    ("2024-07-10T10:15:00+02:00", D(2024, 7, 10, 9, 15), D(2024, 7, 10, 9, 15, 1)),
    ("2024-07-10T23:30Z", D(2024, 7, 11, 0, 30), D(2024, 7, 11, 0, 31)),   # next local day
    ("2024-07-10T00:30-05:00", D(2024, 7, 10, 6, 30), D(2024, 7, 10, 6, 31)),
    # the clocks go forward at 01:00 UTC on 31 March 2024
    ("2024-03-31T00:59Z", D(2024, 3, 31, 0, 59), D(2024, 3, 31, 2, 0)),
    ("2024-03-31T01:00Z", D(2024, 3, 31, 2, 0), D(2024, 3, 31, 2, 1)),
])
def test_date_ranges(raw: str, low: dt.datetime, high: dt.datetime) -> None:
    assert parse_date("date", raw, LONDON) == DateValue("eq", low, high)


def test_date_fraction_of_second() -> None:
    v = parse_date("date", "2024-03-10T10:15:30.250", LONDON)
    assert (v.low, v.high) == (D(2024, 3, 10, 10, 15, 30), D(2024, 3, 10, 10, 15, 31))


def test_date_year_9999() -> None:
    v = parse_date("date", "9999", LONDON)
    assert v.low == D(9999, 1, 1) and v.high == dt.datetime.max


@pytest.mark.parametrize("prefix", [p for p in DATE_PREFIXES if p != "ap"])
def test_every_prefix(prefix: str) -> None:
    assert parse_date("date", f"{prefix}2024-03", LONDON) == DateValue(
        prefix, D(2024, 3, 1), D(2024, 4, 1))  # type: ignore[arg-type]
    v = parse_date("date", f"{prefix}2024-07-10T10:15Z", LONDON)
    assert (v.prefix, v.low, v.high) == (prefix, D(2024, 7, 10, 11, 15), D(2024, 7, 10, 11, 16))


def test_ap_widens_by_a_tenth_of_the_distance_from_now() -> None:
    now = D(2034, 1, 1)
    v = parse_date("date", "ap2024-01-01", LONDON, now=now)
    gap = (now - D(2024, 1, 1)) / 10  # 365.3 days
    assert v.prefix == "ap"
    assert v.low == D(2024, 1, 1) - gap
    assert v.high == D(2024, 1, 2) + gap
    # in the future too (distance is absolute)
    v = parse_date("date", "ap2044-01-01", LONDON, now=now)
    gap = (D(2044, 1, 1) - now) / 10
    assert (v.low, v.high) == (D(2044, 1, 1) - gap, D(2044, 1, 2) + gap)


def test_ap_widens_by_at_least_a_day() -> None:
    v = parse_date("date", "ap2024-05-01", LONDON, now=D(2024, 5, 3))
    assert (v.low, v.high) == (D(2024, 4, 30), D(2024, 5, 3))
    v = parse_date("date", "ap2024-05-01T10:00", LONDON, now=D(2024, 5, 1, 10, 0))
    assert (v.low, v.high) == (D(2024, 4, 30, 10, 0), D(2024, 5, 2, 10, 1))


@pytest.mark.parametrize("raw", [
    "", "24", "2024-1", "2024-13", "2024-00", "2024-02-30", "2023-02-29", "2024-01-32",
    "2024-01-01T10", "2024-01-01T25:00", "2024-01-01T10:60", "2024-01-01T10:00:61",
    "2024-01-01 10:00", "2024-01-01T10:00+0200", "2024-01-01T10:00+25:00", "2024/01/01",
    "xx2024", "eq", "gt", "GT2024", "2024-01-01Z", "today", "2024-01-01T10:00:00.1234567890",
    "20240101", "eq 2024",
])
def test_bad_dates(raw: str) -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_date("birthdate", raw, LONDON)
    assert "birthdate" in info.value.message


# --- reference -------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "rtype", "rid"), [
    ("Patient/100001", "Patient", "100001"),
    ("100001", None, "100001"),
    ("Patient/abc-1.2", "Patient", "abc-1.2"),
    ("https://example.org/fhir/STU3/Patient/100001", "Patient", "100001"),
    ("http://gateway/STU3/Patient/7/", "Patient", "7"),
])
def test_references(raw: str, rtype: str | None, rid: str) -> None:
    assert parse_reference("patient", raw, ("Patient",)) == ReferenceValue(rtype, rid)


def test_reference_of_one_of_several_types() -> None:
    allowed = ("Practitioner", "Organization")
    assert parse_reference("general-practitioner", "Organization/3", allowed) == \
        ReferenceValue("Organization", "3")
    assert parse_reference("general-practitioner", "Practitioner/3", allowed) == \
        ReferenceValue("Practitioner", "3")


def test_reference_wrong_type() -> None:
    with pytest.raises(InvalidParameter) as info:
        parse_reference("patient", "Practitioner/1", ("Patient",))
    assert "Practitioner" in info.value.message and "Patient" in info.value.message


@pytest.mark.parametrize("raw", [
    "", "Patient/", "/", "Patient/a b", "Patient/1$", "Patient/" + "1" * 65, "Patient/1/_history/2",
    "Patient/ü", "x" * 257,
])
def test_bad_references(raw: str) -> None:
    with pytest.raises(InvalidParameter):
        parse_reference("patient", raw, ("Patient",))
