"""NHS number check digit (Modulus 11), as specified by the NHS Data Dictionary."""

from __future__ import annotations


def check_digit(first_nine: str) -> int | None:
    """The check digit for nine digits, or None if no valid NHS number starts with them."""
    total = sum(int(d) * w for d, w in zip(first_nine, range(10, 1, -1), strict=True))
    digit = 11 - total % 11
    if digit == 11:
        return 0
    return None if digit == 10 else digit


def is_valid(value: str) -> bool:
    if len(value) != 10 or not value.isascii() or not value.isdigit():
        return False
    return check_digit(value[:9]) == int(value[9])
