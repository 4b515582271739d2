"""FHIR STU3 primitive types in JSON: one check per type, each returning a problem or None.

Problems name the type, never the value (the value may be patient data). A string, like every
FHIR value, must not be empty; a date must be a real calendar date; a dateTime with a time must
carry a time zone; an integer must fit 32 bits.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable

Check = Callable[[object], str | None]

_DATE = re.compile(r"-?([0-9]{4})(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01]))?)?")
_DATETIME = re.compile(
    r"-?([0-9]{4})(-(0[1-9]|1[0-2])(-(0[1-9]|[12][0-9]|3[01])"
    r"(T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
    r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00)))?)?)?"
)
_INSTANT = re.compile(
    r"([0-9]{4})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
    r"(Z|[+-]((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
)
_TIME = re.compile(r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?")
_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
_CODE = re.compile(r"[^\s]+( [^\s]+)*")
_URI = re.compile(r"\S+")
_OID = re.compile(r"urn:oid:[0-2](\.(0|[1-9][0-9]*))+")
_UUID = re.compile(r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_BASE64 = re.compile(r"(\s*[0-9a-zA-Z+/=]){4,}\s*")
_INT32 = (-(2**31), 2**31 - 1)


def _real_date(m: re.Match[str]) -> bool:
    if m.group(5) is None:  # a year, or a year and month: nothing more to check
        return True
    try:
        dt.date(int(m.group(1)), int(m.group(3)), int(m.group(5)))
    except ValueError:
        return False
    return True


def _real_instant_date(m: re.Match[str]) -> bool:
    try:
        dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return False
    return True


def _string(v: object) -> str | None:
    if not isinstance(v, str):
        return "must be a JSON string"
    if not v:
        return "must not be an empty string"
    return None


def _pattern(name: str, rx: re.Pattern[str], extra: Callable[[re.Match[str]], bool] | None = None
             ) -> Check:
    def check(v: object) -> str | None:
        problem = _string(v)
        if problem:
            return problem
        assert isinstance(v, str)
        m = rx.fullmatch(v)
        if m is None or (extra is not None and not extra(m)):
            return f"is not a valid {name}"
        return None

    return check


def _boolean(v: object) -> str | None:
    return None if isinstance(v, bool) else "must be a JSON boolean (true or false)"


def _integer(low: int) -> Check:
    def check(v: object) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return "must be a JSON integer"
        if v < max(low, _INT32[0]) or v > _INT32[1]:
            return "is out of range for its type"
        return None

    return check


def _decimal(v: object) -> str | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return "must be a JSON number"
    if isinstance(v, float) and not math.isfinite(v):
        return "must be a finite number"
    return None


def _xhtml(v: object) -> str | None:
    problem = _string(v)
    if problem:
        return problem
    assert isinstance(v, str)
    return None if v.lstrip().startswith("<div") else "must be an XHTML <div> element"


CHECKS: dict[str, Check] = {
    "string": _string,
    "markdown": _string,
    "id": _pattern("id", _ID),
    "code": _pattern("code", _CODE),
    "uri": _pattern("uri", _URI),
    "oid": _pattern("oid", _OID),
    "uuid": _pattern("uuid", _UUID),
    "date": _pattern("date", _DATE, _real_date),
    "dateTime": _pattern("dateTime", _DATETIME, _real_date),
    "instant": _pattern("instant", _INSTANT, _real_instant_date),
    "time": _pattern("time", _TIME),
    "base64Binary": _pattern("base64Binary", _BASE64),
    "boolean": _boolean,
    "integer": _integer(-(2**31)),
    "unsignedInt": _integer(0),
    "positiveInt": _integer(1),
    "decimal": _decimal,
    "xhtml": _xhtml,
}

PRIMITIVE_TYPES = frozenset(CHECKS)
