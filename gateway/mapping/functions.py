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
    "sha1_hex_to_base64": sha1_hex_to_base64,
}
