"""What a PAS's refusal (MSA-1 AE/AR, or CE/CR) means: its errors read, and each HL7 table
0357 code mapped to whose fault it is.

Where a PAS puts its errors depends on its HL7 version: in v2.4, ERR-1 — an ELD, repeating,
one error a repetition: ``PID^1^3^205&Duplicate key identifier&HL70357`` (segment, sequence,
field position, then the code); from v2.5 on, one ERR segment per error: ERR-2 the location
(ERL ``PID^1^3``), ERR-3 the code, ERR-4 the severity (table 0516: ``E`` error, ``F`` fatal,
``W`` warning, ``I`` information), ERR-8 a message; a v2.3 PAS (and some v2.4 ones) sends no
ERR and puts the code in MSA-6. Warnings and information are not the refusal's reason.

``TABLE_0357`` says what each code means for the client, and is the only place that does.
A write refused only for what was sent (a duplicate key, an unknown key, a value missing or
not in the PAS's tables) is the client's to fix: a 4xx. Anything else is the PAS's own
failure, as is a code the table does not hold (a later version's, a trust's own): the
**unmapped policy** is 502 ``BACKEND_REJECTED`` naming the code. So are a refusal without any
code and a query refused (the gateway wrote the query, not the client): 502. A record
locked (206) is 503: nothing was applied, try again.

The PAS's own words (MSA-3, the ERR texts) may name the patient — the one sent, or the one
already registered with that NHS number: they never go into a write's error (``pas_text``
gives them, with the values sent masked, for a debug-level log line). A refused query's
error keeps them, masked, as it always has (they are about the query the gateway wrote).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from adapters.base import (
    AdapterError,
    BackendRejected,
    BackendUnavailable,
    DuplicateKey,
    InvalidValue,
    UnknownKey,
    WriteRefused,
)
from adapters.hl7v2 import er7

Fault = Literal["duplicate", "unknown-key", "invalid", "busy", "pas"]


@dataclass(frozen=True, slots=True)
class Condition:
    meaning: str
    fault: Fault


# HL7 table 0357, message error condition codes (v2.4; 104 is v2.8's).
TABLE_0357: dict[str, Condition] = {
    "100": Condition("segment sequence error", "pas"),
    "101": Condition("required field missing", "invalid"),
    "102": Condition("data type error", "invalid"),
    "103": Condition("table value not found", "invalid"),
    "104": Condition("value too long", "invalid"),
    "200": Condition("unsupported message type", "pas"),
    "201": Condition("unsupported event code", "pas"),
    "202": Condition("unsupported processing id", "pas"),
    "203": Condition("unsupported version id", "pas"),
    "204": Condition("unknown key identifier", "unknown-key"),
    "205": Condition("duplicate key identifier", "duplicate"),
    "206": Condition("application record locked", "busy"),
    "207": Condition("application internal error", "pas"),
}
NOT_ERRORS = frozenset({"W", "I"})  # table 0516 severities that do not refuse anything

_CODE = re.compile(r"^[A-Za-z0-9]{1,10}$")
_SEGMENT = re.compile(r"^[A-Z][A-Z0-9]{2}$")
_DIGITS = re.compile(r"\d{6,}")


@dataclass(frozen=True, slots=True)
class AckError:
    code: str | None
    """The table 0357 code as sent (``None``: none, or not a code)."""
    severity: str
    location: str | None
    """``PID-3``: the segment and field the PAS names, if it names one."""

    def describe(self) -> str:
        if self.code is None:
            return "no error code"
        known = TABLE_0357.get(self.code)
        what = known.meaning if known else "not in HL7 table 0357"
        return f"HL7 error {self.code} {what}" + (f" at {self.location}" if self.location
                                                  else "")

    @property
    def fault(self) -> Fault:
        known = TABLE_0357.get(self.code or "")
        return known.fault if known else "pas"


def _code(value: str | None) -> str | None:
    # A code is echoed to the client: only a code's shape, never free text, is taken.
    return value if value and _CODE.match(value) else None


def _location(seg: str | None, field: str | None) -> str | None:
    if seg and _SEGMENT.match(seg) and field and field.isdigit() and len(field) <= 3:
        return f"{seg}-{int(field)}"
    return None


def errors(reply: er7.Message) -> list[AckError]:
    """Every error the reply reports, in order, whatever the version's way of saying it."""
    out: list[AckError] = []
    for err in reply.all("ERR"):
        if err.value(3):  # v2.5+: one error a segment
            where = _location(err.value(2, 1), err.value(2, 3)) or _location(
                err.value(1, 1), err.value(1, 3))
            out.append(AckError(_code(err.value(3, 1)),
                                (err.value(4) or "E").upper(), where))
            continue
        for r in range(max(err.repetitions(1), 1)):  # v2.4: ERR-1 repeats, an ELD each
            out.append(AckError(_code(err.value(1, 4, 1, r)), "E",
                                _location(err.value(1, 1, 1, r), err.value(1, 3, 1, r))))
    if not out:
        msa = reply.segment("MSA")
        code = _code(msa.value(6, 1)) if msa is not None else None
        if code is not None:  # v2.3: MSA-6 error condition
            out.append(AckError(code, "E", None))
    return out


def refusal(label: str, ack_code: str, reply: er7.Message, *,
            write: Literal["create", "update"] | None, own_key: tuple[str, int] | None,
            sensitive: list[str], correlation: str | None) -> AdapterError:
    """The error to raise for a refused message. ``write``: the interaction a refused ADT
    was (None: a query); ``own_key``: the segment and field of the written record's key.

    A refused query's message ends with the PAS's words minus the values sent (as it always
    has: a continuation pointer's "expired" is worth passing on); a refused write's never
    does — a PAS describing why it will not register a patient names the record it holds."""
    ack = ack_code or "no MSA"
    found = [e for e in errors(reply) if e.severity not in NOT_ERRORS]
    said = "; ".join(e.describe() for e in found) or "no error code"
    faults = {e.fault for e in found}
    if not found or "pas" in faults or (write is None and faults != {"busy"}):
        words = pas_text(reply, sensitive)[:200] if write is None else ""
        return BackendRejected(f"the '{label}' PAS rejected the request ({ack}, {said})"
                               + (f": {words}" if words else ""), correlation=correlation)
    if "busy" in faults:
        return BackendUnavailable(f"the '{label}' PAS could not take the request now ({ack}, "
                                  f"{said}): nothing was applied; try again",
                                  correlation=correlation)
    assert write is not None
    refused = [_refused(label, ack, e, write, own_key) for e in found]
    first = refused[0]
    first.others = tuple(refused[1:])
    first.correlation = correlation
    return first


def _refused(label: str, ack: str, e: AckError, write: Literal["create", "update"],
             own_key: tuple[str, int] | None) -> WriteRefused:
    said = f"({ack}, {e.describe()}): nothing was written"
    at = e.location
    if e.fault == "duplicate":
        return DuplicateKey(f"the '{label}' PAS already holds a record with a key sent {said}; "
                            "search by the identifier, or create with If-None-Exist",
                            location=at)
    if e.fault == "unknown-key":
        # Table 0357: 204 is "the ID of the patient, order, etc., was not found", used for
        # transactions other than additions: an update's own record unless it says otherwise.
        own_at = f"{own_key[0]}-{own_key[1]}" if own_key else None
        if write == "update" and at in (None, own_at):
            return UnknownKey(f"the '{label}' PAS does not know the record {said}", own=True,
                              location=at)
        return UnknownKey(f"a record the resource refers to is not known to the '{label}' "
                          f"PAS {said}", location=at)
    return InvalidValue(f"the '{label}' PAS refused a value of the resource {said}",
                        location=at)


def pas_text(reply: er7.Message, sensitive: list[str]) -> str:
    """The PAS's own words (MSA-3, the ERR texts), minus the values sent and long digit runs
    — for a debug-level log line only: what is left may still name the patient."""
    texts: list[str] = []
    msa = reply.segment("MSA")
    if msa is not None and msa.value(3):
        texts.append(msa.value(3) or "")
    for err in reply.all("ERR"):
        for r in range(max(err.repetitions(1), 1)):
            v = err.value(1, 4, 2, r)
            if v and v not in texts:
                texts.append(v)
        for f, c in ((3, 2), (7, 1), (8, 1)):
            v = err.value(f, c)
            if v and v not in texts:
                texts.append(v)
    text = " ".join(t for t in texts if t)
    for s in sensitive:
        s = s.rstrip("*%")
        if s and len(s) > 1:
            # Whole words only: a sent code such as PI must not eat into "PID".
            text = re.sub(rf"(?<![A-Za-z0-9]){re.escape(s)}(?![A-Za-z0-9])", "[redacted]",
                          text, flags=re.IGNORECASE)
    return _DIGITS.sub("[redacted]", text)[:500]
