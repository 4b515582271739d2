"""Reviewed Python functions a mapping may call (``{function: name, args: [refs]}``).

This is where logic too clever for a transform lives: typed, tested, reviewed. Each takes the
FHIR-converted values of its ``args`` (``None`` when empty) and returns a value or ``None``.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Callable
from typing import Any


def minutes_between(start: Any, end: Any) -> int | None:
    """Whole minutes from one FHIR dateTime to another (a discharged spell's length)."""
    if not start or not end:
        return None
    try:
        delta = dt.datetime.fromisoformat(end) - dt.datetime.fromisoformat(start)
    except (TypeError, ValueError):
        return None
    minutes = int(delta.total_seconds() // 60)
    return minutes if minutes >= 0 else None


def days_between(start: Any, end: Any) -> int | None:
    """Whole calendar days between two FHIR dates or dateTimes (length of stay in days)."""
    if not start or not end:
        return None
    try:
        d0 = dt.date.fromisoformat(str(start)[:10])
        d1 = dt.date.fromisoformat(str(end)[:10])
    except ValueError:
        return None
    days = (d1 - d0).days
    return days if days >= 0 else None


def deceased_flag(indicator: Any, date_of_death: Any) -> bool | None:
    """FHIR ``deceasedBoolean`` from a death indicator (HL7 PID-30, table 0136 ``Y``/``N``)
    when no date of death is known: ``true`` for Y; nothing when a date gives
    ``deceasedDateTime`` instead (deceased[x] holds one of the two), nor for N or blank."""
    if date_of_death:
        return None
    flag = str(indicator).strip().upper() if indicator is not None else ""
    return True if flag == "Y" else None


def visit_status(admitted: Any, discharged: Any, expected: Any = None) -> str:
    """STU3 ``Encounter.status`` of an inpatient visit from its dates: discharged →
    ``finished``; admitted in the past → ``in-progress``, in the future → ``planned``; not
    admitted but an expected admission date (a pre-admission) → ``planned``; else
    ``unknown`` (the element is required, and nothing better is known)."""
    if discharged:
        return "finished"
    if not admitted:
        return "planned" if expected else "unknown"
    try:
        start = dt.datetime.fromisoformat(str(admitted))
    except ValueError:
        return "unknown"
    now = dt.datetime.now(start.tzinfo) if start.tzinfo else dt.datetime.now()
    return "planned" if start > now else "in-progress"
def sha1_hex_to_base64(digest: Any) -> str | None:
    """A SHA-1 stored as 40 hex digits, as FHIR's Attachment.hash wants it (base64 of the
    20 bytes); anything else is omitted rather than sent as a wrong hash."""
    s = str(digest or "").strip()
    if len(s) != 40:
        return None
    try:
        return base64.b64encode(binascii.unhexlify(s)).decode("ascii")
    except (binascii.Error, ValueError):
        return None


FUNCTIONS: dict[str, Callable[..., Any]] = {
    "minutes_between": minutes_between,
    "days_between": days_between,
    "deceased_flag": deceased_flag,
    "visit_status": visit_status,
    "sha1_hex_to_base64": sha1_hex_to_base64,
}


def _deceased_flag_inverse(value: Any, indicator: str, date_of_death: str) -> dict[str, Any]:
    return {indicator: "Y"} if value is True else {}


INVERSES: dict[str, Callable[..., dict[str, Any]]] = {
    "deceased_flag": _deceased_flag_inverse,
}
"""For a function whose value the source stores: (value, *arg refs) → {ref: stored value}."""
