"""FHIR STU3 search parameter values: parsing and their meaning, independent of any source.

* string — case- and accent-insensitive; prefix match by default, ``:exact``, ``:contains``
* token — ``code``, ``system|code``, ``|code`` (no system), ``system|``; ``:missing``
* date — partial dates are ranges; prefixes eq ne lt gt le ge sa eb ap
* reference — ``Type/id``, ``id`` or an absolute URL ending in ``Type/id``

A comma separates alternatives (OR, ``\\,`` escapes a comma); a repeated parameter is AND.
"""

from __future__ import annotations

import datetime as dt
import re
import typing
import unicodedata
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal
from zoneinfo import ZoneInfo

from adapters.text import fold
from gateway.errors import InvalidParameter

MAX_VALUE_LENGTH = 256
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

DatePrefix = Literal["eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap"]
DATE_PREFIXES: tuple[DatePrefix, ...] = ("eq", "ne", "lt", "gt", "le", "ge", "sa", "eb", "ap")
MODIFIERS: dict[str, frozenset[str]] = {
    "string": frozenset({"exact", "contains", "missing"}),
    "token": frozenset({"missing", "not"}),
    "date": frozenset({"missing"}),
    "reference": frozenset({"missing"}),
    "quantity": frozenset({"missing"}),
}


@dataclass(frozen=True, slots=True)
class StringValue:
    mode: Literal["prefix", "exact", "contains"]
    value: str
    """Folded (lower case, accents removed), as the source side is when compared."""


@dataclass(frozen=True, slots=True)
class TokenValue:
    system: str | None
    """``None`` = any system; ``""`` = explicitly no system (``|code``)."""
    code: str | None
    """``None`` = any code (``system|``)."""


@dataclass(frozen=True, slots=True)
class DateValue:
    prefix: DatePrefix
    low: dt.datetime
    high: dt.datetime
    """The value as a half-open range [low, high) of local wall-clock time."""


@dataclass(frozen=True, slots=True)
class ReferenceValue:
    type: str | None
    id: str


@dataclass(frozen=True, slots=True)
class MissingValue:
    missing: bool


@dataclass(frozen=True, slots=True)
class QuantityValue:
    """``[prefix]number|system|code`` (STU3 quantity search)."""

    prefix: DatePrefix
    number: Decimal
    low: Decimal
    high: Decimal
    """The number's implicit range [low, high): its precision (``5.4`` is 5.35 to 5.45)."""
    system: str | None
    """``None``: any system (``number||code`` or no unit)."""
    code: str | None
    """``None``: any unit."""


Value = StringValue | TokenValue | DateValue | ReferenceValue | MissingValue


def split_values(raw: str) -> list[str]:
    """Split on unescaped commas; unescape ``\\,`` and ``\\$``.

    ``\\|`` and ``\\\\`` stay escaped: a token's ``|`` separates system and code only when
    it is not escaped, which the token parser can tell only if an escaped backslash still
    reads as one. ``_unescape`` finishes the job in each type's parser.
    """
    out: list[str] = []
    buf: list[str] = []
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\" and i + 1 < len(raw) and raw[i + 1] in ",$|\\":
            buf.append(raw[i:i + 2] if raw[i + 1] in "|\\" else raw[i + 1])
            i += 2
            continue
        if ch == ",":
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    out.append("".join(buf))
    return out


_ESCAPED = re.compile(r"\\([\\|])")


def _unescape(value: str) -> str:
    """``\\|`` → ``|`` and ``\\\\`` → ``\\``, left to right (what split_values left)."""
    return _ESCAPED.sub(r"\1", value) if "\\" in value else value


def _check_text(name: str, value: str) -> str:
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidParameter(
            f"search parameter '{name}' has a value longer than {MAX_VALUE_LENGTH} characters"
        )
    if any(unicodedata.category(ch) == "Cc" for ch in value):
        raise InvalidParameter(f"search parameter '{name}' contains control characters")
    return value


def parse_missing(name: str, raw: str) -> MissingValue:
    if raw not in ("true", "false"):
        raise InvalidParameter(f"'{name}:missing' takes true or false")
    return MissingValue(raw == "true")


def parse_string(name: str, raw: str, modifier: str | None) -> StringValue:
    value = _unescape(_check_text(name, raw))
    if not value.strip():
        raise InvalidParameter(f"search parameter '{name}' has an empty value")
    if modifier == "exact":
        # Whole-value match. Still case- and accent-insensitive: legacy systems keep names
        # in capitals, so case in the source carries no information to match on.
        return StringValue("exact", fold(value.strip()))
    return StringValue("contains" if modifier == "contains" else "prefix", fold(value.strip()))


def parse_token(name: str, raw: str) -> TokenValue:
    _check_text(name, raw)
    # split on the first unescaped '|'
    idx = -1
    i = 0
    while i < len(raw):
        if raw[i] == "\\" and i + 1 < len(raw):
            i += 2
            continue
        if raw[i] == "|":
            idx = i
            break
        i += 1
    if idx < 0:
        code = _unescape(raw)
        if not code:
            raise InvalidParameter(f"search parameter '{name}' has an empty value")
        return TokenValue(None, code)
    system, code = _unescape(raw[:idx]), _unescape(raw[idx + 1 :])
    if not system and not code:
        raise InvalidParameter(f"search parameter '{name}' has an empty value")
    return TokenValue(system, code or None)


_DATE_RE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.(?P<f>\d{1,9}))?)?"
    r"(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def parse_date(name: str, raw: str, tz: ZoneInfo, now: dt.datetime | None = None) -> DateValue:
    prefix: DatePrefix = "eq"
    body = raw
    if len(raw) >= 2 and raw[:2] in DATE_PREFIXES:
        prefix = raw[:2]  # type: ignore[assignment]
        body = raw[2:]
    m = _DATE_RE.match(body)
    if not m:
        raise InvalidParameter(
            f"search parameter '{name}' is not a FHIR date (YYYY, YYYY-MM, YYYY-MM-DD or "
            "YYYY-MM-DDThh:mm[:ss][zone]), optionally prefixed by one of "
            f"{', '.join(DATE_PREFIXES)}"
        )
    g = m.groupdict()
    try:
        year = int(g["y"])
        if g["m"] is None:
            low = dt.datetime(year, 1, 1)
            high = dt.datetime(year + 1, 1, 1) if year < 9999 else dt.datetime.max
        elif g["d"] is None:
            month = int(g["m"])
            low = dt.datetime(year, month, 1)
            high = dt.datetime(year + (month == 12), month % 12 + 1, 1)
        elif g["H"] is None:
            low = dt.datetime(year, int(g["m"]), int(g["d"]))
            high = low + dt.timedelta(days=1)
        else:
            low = dt.datetime(year, int(g["m"]), int(g["d"]), int(g["H"]), int(g["M"]),
                              int(g["S"] or 0))
            high = low + (dt.timedelta(seconds=1) if g["S"] else dt.timedelta(minutes=1))
            if g["tz"]:
                zone = dt.UTC if g["tz"] == "Z" else dt.datetime.strptime(g["tz"], "%z").tzinfo
                low = low.replace(tzinfo=zone).astimezone(tz).replace(tzinfo=None)
                high = high.replace(tzinfo=zone).astimezone(tz).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise InvalidParameter(f"search parameter '{name}' is not a valid date") from None
    if prefix == "ap":
        # STU3 leaves "approximately" to the server: widen by 10% of the distance from now.
        current = now or dt.datetime.now()
        gap = abs(current - low) * 0.1
        gap = max(gap, dt.timedelta(days=1))
        low, high = low - gap, high + gap
    return DateValue(prefix, low, high)


_NUMBER_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?$")


def parse_quantity(name: str, raw: str) -> QuantityValue:
    """``[prefix]number|system|code``, ``[prefix]number||code`` or ``[prefix]number``."""
    _check_text(name, raw)
    parts = raw.split("|")
    if len(parts) not in (1, 3):
        raise InvalidParameter(f"'{name}' takes [prefix]number|system|code (or just the "
                               "number)")
    number = parts[0]
    prefix: DatePrefix = "eq"
    if number[:2] in DATE_PREFIXES:
        prefix, number = typing.cast(DatePrefix, number[:2]), number[2:]
    if not _NUMBER_RE.match(number):
        raise InvalidParameter(f"'{name}' needs a number (with an optional prefix such as gt)")
    value = Decimal(number)
    # STU3: the number's precision is its implicit range (5.4 means [5.35, 5.45)).
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    half = Decimal(5).scaleb(exponent - 1)
    system = code = None
    if len(parts) == 3:
        system, code = _unescape(parts[1]) or None, _unescape(parts[2]) or None
        if code is None:
            raise InvalidParameter(f"'{name}' names a unit system but no unit code")
    return QuantityValue(prefix, value, value - half, value + half, system, code)


def parse_reference(name: str, raw: str, allowed: tuple[str, ...]) -> ReferenceValue:
    _check_text(name, raw)
    parts = raw.rstrip("/").split("/")
    if len(parts) == 1 and parts[0] != raw:  # "Patient/": a type without an id
        raise InvalidParameter(f"search parameter '{name}' is not a valid reference")
    if len(parts) == 1:
        rtype, rid = None, parts[0]
    else:
        rtype, rid = parts[-2], parts[-1]
        if "_history" in parts:
            raise InvalidParameter(f"'{name}': versioned references are not supported")
    if not ID_RE.match(rid):
        raise InvalidParameter(f"search parameter '{name}' is not a valid reference")
    if rtype is not None and rtype not in allowed:
        raise InvalidParameter(
            f"search parameter '{name}' refers to {rtype}; it takes {', '.join(allowed)}"
        )
    return ReferenceValue(rtype, rid)
