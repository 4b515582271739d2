"""Dialect profiles of the PAS simulator: where real PAS HL7 v2 interfaces differ."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Profile:
    """How this PAS speaks HL7 v2 where real PAS interfaces differ (``--dialect``)."""

    name: str
    ack_pid: bool = True
    """The ACK to an A28/A31 carries ``PID|1||<PAS number>...``, to an A01 that PID and the
    new spell's ``PV1`` (a plain ACK does not)."""
    resend_dedup: bool = True
    """A resent MSH-10 gets the first ACK again (not applied twice); off: applied again."""
    nhs_by: Literal["cx4-or-cx5", "cx5"] = "cx4-or-cx5"
    """How an incoming PID-3 repetition is known as the NHS number: CX-4 NHS or CX-5 NH, or
    only CX-5 NH (a PAS keyed on the identifier type)."""
    nhs_out: Literal["cx4+cx5", "cx4"] = "cx4+cx5"
    """``<n>^^^NHS^NH``, or ``<n>^^^NHS`` as in the ITK samples."""
    wildcard: str | None = "*"
    """A trailing wildcard for "starts with"; None: none (the character is literal)."""
    matching: Literal["exact", "prefix"] = "exact"
    """How a value without the wildcard compares."""
    qualifiers: bool = True
    """QPD-3 may qualify an identifier (PID.3.4 / PID.3.5); off: AE 103 for them."""
    visits: Literal["pid-per-visit", "pid-then-visits"] = "pid-per-visit"
    """RSP^ZV2: a PID group per visit, or one PID [PD1] then every PV1 PV2 of the patient
    (QAK-4/5 then count patients)."""
    pid32: bool = True
    """PID-32 NHS number status."""
    death: Literal["minute", "date"] = "minute"
    """PID-29 to the minute, or the date only (PID-30 Y either way)."""
    qak4: Literal["total", "remaining"] = "total"
    """QAK-4 of a continuation reply: the query's total, or the hits from the pointer on."""
    pointer_ttl: float | None = None
    """Seconds a continuation pointer lives (AE 102 "expired" after); None: forever."""
    cancelled_visits: bool = True
    """Cancelled admissions are returned (PV1-41 C); off: gone, as after an A11."""
    admissions: bool = True
    """ADT^A01 (admit) is taken: a new inpatient spell; off: AR 201 (unsupported event), as
    a PAS whose HL7 interface is read-only for visits answers."""


PROFILES = {
    # The simulator as it always was: everything in every reply, numbers in the ACK.
    "demo": Profile("demo"),
    # As the NHS ITK samples write it: plain ACKs, NHS numbers in CX-4, one PID then its
    # visits, no PID-32, dates of death without a time, pointers that expire after 5 minutes.
    "itk": Profile("itk", ack_pid=False, resend_dedup=False, nhs_out="cx4",
                   visits="pid-then-visits", pid32=False, death="date", qak4="remaining",
                   pointer_ttl=300.0, cancelled_visits=False),
    # A PAS that reads identifiers by CX-5 only, prefix-matches natively (no wildcard), takes
    # no identifier qualifiers in queries, lets continuation pointers expire in 2 s and
    # takes no admissions (A01) over HL7.
    "strict": Profile("strict", ack_pid=False, resend_dedup=False, nhs_by="cx5",
                      nhs_out="cx4", wildcard=None, matching="prefix", qualifiers=False,
                      visits="pid-then-visits", pid32=False, death="date", qak4="remaining",
                      pointer_ttl=2.0, cancelled_visits=False, admissions=False),
}
