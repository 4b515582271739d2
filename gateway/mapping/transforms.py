"""The closed set of value transforms a mapping may name (``transform: title_case``).

Each takes one non-empty value and returns a value or ``None`` (meaning "omit"). A list of
names applies them in order. Anything cleverer is a Python function registered in
``gateway.mapping.functions`` and reviewed like any other code — not a string language in YAML.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import lru_cache
from typing import Any

Transform = Callable[[Any], Any]

_WORD = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?", re.UNICODE)


def _cap(m: re.Match[str]) -> str:
    w = m.group(0).lower()
    if "'" in w:
        head, tail = w.split("'", 1)
        # O'BRIEN -> O'Brien, but ST JOHN'S -> St John's
        return head.capitalize() + "'" + (tail.capitalize() if len(tail) > 1 else tail)
    if w.startswith("mc") and len(w) > 2:  # MCDONALD -> McDonald (not Mac-: Machin, Mack)
        return "Mc" + w[2:].capitalize()
    return w.capitalize()


# Names and places repeat across records: converting each distinct value once is cheaper
# than a regex with a Python callback per word every time.
@lru_cache(maxsize=65536)
def _title_case(value: Any) -> Any:
    # Legacy PAS store names in capitals; "O'BRIEN-SMITH" -> "O'Brien-Smith".
    s = str(value)
    # Most values (and nearly all first-seen ones: address lines) are ASCII without an
    # apostrophe, where words are runs of A-Z a-z and str.title() does what the regex does
    # in a sixth of the time -- unless a word starts with Mc (it gives Mcdonald).
    if s.isascii() and "'" not in s:
        t = s.title()
        if "Mc" not in t:
            return t
    return _WORD.sub(_cap, s)


def _yes_no(value: Any) -> Any:
    s = str(value).strip().upper()
    return True if s in ("Y", "YES", "1", "T", "TRUE") else False if s in (
        "N", "NO", "0", "F", "FALSE") else None


def _not(value: Any) -> Any:
    return None if not isinstance(value, bool) else not value


def _string(value: Any) -> Any:
    s = str(value).strip()
    return s or None


def _integer(value: Any) -> Any:
    try:
        return int(str(value).strip())
    except ValueError:
        return None


def _decimal(value: Any) -> Any:
    # A measured value stored as text ("5.4", "137", "-0.5"): the JSON number FHIR's decimal
    # is. Anything else ("<0.1", "POSITIVE") is no number: omitted, so map it elsewhere.
    s = str(value).strip()
    if not _DECIMAL.fullmatch(s):
        return None
    return int(s) if s.lstrip("-").isdigit() else float(s)


_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def _digits(value: Any) -> Any:
    s = "".join(ch for ch in str(value) if ch.isdigit())
    return s or None


def _no_spaces(value: Any) -> Any:
    s = "".join(str(value).split())
    return s or None


TRANSFORMS: dict[str, tuple[Transform, str]] = {
    "title_case": (_title_case, "SMITH-JONES -> Smith-Jones; O'BRIEN -> O'Brien; "
                   "MCDONALD -> McDonald"),
    "upper": (lambda v: str(v).upper(), "to upper case"),
    "lower": (lambda v: str(v).lower(), "to lower case"),
    "string": (_string, "any value as trimmed text (integers become their digits)"),
    "integer": (_integer, "text of digits as a JSON number; anything else is omitted"),
    "decimal": (_decimal, "text of a decimal number (5.4, -0.5, 137) as a JSON number; "
                "anything else is omitted"),
    "yes_no": (_yes_no, "Y/N, 1/0, T/F as true/false; anything else is omitted"),
    "not": (_not, "negate a boolean (after yes_no)"),
    "digits": (_digits, "keep only the digits (phone numbers, NHS numbers with spaces)"),
    "no_spaces": (_no_spaces, "remove all white space"),
}


# The reverse of each transform, for writes: the source's own convention where the forward
# direction loses information (names were upper case before title_case made them readable).
INVERSES: dict[str, Transform] = {
    "title_case": lambda v: str(v).upper(),
    "upper": lambda v: v,
    "lower": lambda v: v,
    "string": lambda v: v,
    "integer": lambda v: str(v),
    "decimal": lambda v: str(v),
    "yes_no": lambda v: None if not isinstance(v, bool) else ("Y" if v else "N"),
    "not": _not,
    "digits": lambda v: v,
    "no_spaces": lambda v: v,
}


def chain(names: list[str]) -> Transform:
    return compose([TRANSFORMS[n][0] for n in names])


def inverse_chain(names: list[str]) -> Transform:
    return compose([INVERSES[n] for n in reversed(names)])


def compose(fns: list[Transform]) -> Transform:
    """Apply ``fns`` in order, stopping at ``None`` (omit)."""
    if len(fns) == 1:
        return fns[0]

    def run(value: Any) -> Any:
        for fn in fns:
            if value is None:
                return None
            value = fn(value)
        return value

    return run
