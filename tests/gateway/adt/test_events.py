"""ADT messages → resources and ACKs: the NHS ITK samples as golden inputs.

``tests/golden/adt/itk-*.hl7`` are the ITK samples from ../shared with one change: PID-3 also
carries the PAS number (``R1234567^^^RCB^PI``), the id the demo Patient mapping is keyed on —
the samples abbreviate PID-3 to the NHS number. The raw samples themselves are tested too:
without a PAS number they are refused with AE 101, not recorded under a made-up id.
``CCG_UPDATE_GOLDEN=1`` rewrites the expected files (review them before committing).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hl7apy.parser import parse_message

from adapters.hl7v2 import er7
from gateway.adt.events import Mapper, Refused, answer
from tests.gateway.adt.conftest import GOLDEN, ITK, adt_message, er7_bytes

UPDATE = os.environ.get("CCG_UPDATE_GOLDEN") == "1"
CASES = sorted(GOLDEN.glob("itk-*.hl7"))
# The demo code maps hold the demo PAS's local codes; these samples' PV1-18 values are not
# among them, and an unmapped code is refused (AE, HL7 error 103), never dropped.
# None since the HL7 v2 mapping reads the patient class from PV1-2 (issue 12): the ITK A03,
# A04 and A05 samples' classes (I, O) are in the code map, so they are accepted.
REFUSED: dict[str, str] = {}


def test_every_itk_sample_is_a_golden_case() -> None:
    samples = {p.name.split("_")[0].lower() for p in ITK.glob("*.txt")}
    assert samples and {c.stem.removeprefix("itk-") for c in CASES} == samples


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.stem)
def test_golden(case: Path, mapper: Mapper) -> None:
    raw = er7_bytes(case)
    msg = er7.parse(raw)
    expected_file = case.with_suffix(".expected.json")
    try:
        inc = mapper.incoming(raw, msg)
        got = {"event": inc.event, "patient": inc.patient_key, "retired": inc.retired,
               "resources": inc.resources}
    except Refused as exc:
        got = {"refused": exc.code, "error": exc.error}
    if UPDATE:
        expected_file.write_text(json.dumps(got, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert got == expected
    if case.stem in REFUSED:
        assert got == {"refused": "AE", "error": REFUSED[case.stem]}
    else:
        assert got["patient"] == "R1234567"
        assert got["resources"][0]["resourceType"] == "Patient"


def test_a40_names_the_retired_id_from_mrg1(mapper: Mapper) -> None:
    raw = er7_bytes(GOLDEN / "itk-a40.hl7")
    inc = mapper.incoming(raw, er7.parse(raw))
    assert (inc.event, inc.patient_key, inc.retired) == ("A40", "R1234567", "22789")


def test_a01_carries_patient_and_encounter(mapper: Mapper) -> None:
    raw = er7_bytes(GOLDEN / "itk-a01.hl7")
    inc = mapper.incoming(raw, er7.parse(raw))
    enc = inc.resources[1]
    assert enc["resourceType"] == "Encounter" and enc["id"] == "2139"
    assert enc["status"] == "in-progress"  # implied by A01 (adt/events.yaml): PV1-41 is empty


@pytest.mark.parametrize("sample", sorted(ITK.glob("*.txt")), ids=lambda p: p.stem)
def test_raw_itk_samples_without_a_pas_number_are_application_errors(sample: Path,
                                                                      mapper: Mapper) -> None:
    raw = er7_bytes(sample)
    with pytest.raises(Refused) as info:
        mapper.incoming(raw, er7.parse(raw))
    assert info.value.code == "AE"
    assert info.value.error in ("101", "103")


def test_a11_cancels_the_encounter_whatever_pv1_says(mapper: Mapper) -> None:
    raw = adt_message("C1", "D0000001", "A11")
    inc = mapper.incoming(raw, er7.parse(raw))
    assert [r.get("status") for r in inc.resources if r["resourceType"] == "Encounter"] == [
        "cancelled"]


@pytest.mark.parametrize(("raw", "code", "error"), [
    (adt_message("C2", "D1", "A17"), "AR", "201"),
    (adt_message("C3", "D1").replace(b"ADT^A08^ADT_A01", b"ORU^R01^ORU_R01"), "AR", "200"),
    (adt_message("C4", "D1", processing="D"), "AR", "202"),
    (adt_message("C5", "D1").replace(b"|2.4", b"|3.0"), "AR", "203"),
    (adt_message("", "D1"), "AR", "101"),
    (adt_message("C6", "D1").replace(b"PID|", b"ZZZ|"), "AE", "100"),
    (adt_message("C7", "D1", "A40"), "AE", "101"),  # a merge without MRG
])
def test_refusals(raw: bytes, code: str, error: str, mapper: Mapper) -> None:
    with pytest.raises(Refused) as info:
        mapper.incoming(raw, er7.parse(raw))
    assert (info.value.code, info.value.error) == (code, error)


def _hl7apy(ack: bytes) -> tuple[str, str, str]:
    """The ACK read by hl7apy, a parser that shares no code with ours."""
    m = parse_message(ack.decode(), find_groups=False)
    return m.msh.msh_9.to_er7(), m.msa.msa_1.to_er7(), m.msa.msa_2.to_er7()


def test_ack_original_mode_read_by_hl7apy() -> None:
    msg = er7.parse(adt_message("CTRL-1", "D1", "A01"))
    ack = answer(msg, "AA")
    assert ack is not None
    assert _hl7apy(ack) == ("ACK^A01^ACK", "AA", "CTRL-1")
    parsed = er7.parse(ack)
    msh = parsed.segments[0]
    # sender and receiver swapped
    assert (msh.value(3), msh.value(4), msh.value(5), msh.value(6)) == (
        "ROUTE", "ROUTE", "PAS", "RCB")


def test_ack_error_carries_err_with_the_hl7_code() -> None:
    msg = er7.parse(adt_message("CTRL-2", "D1", "A17"))
    ack = answer(msg, "AR", error="201", text="not accepted")
    assert ack is not None
    assert _hl7apy(ack)[1:] == ("AR", "CTRL-2")
    err = er7.parse(ack).segment("ERR")
    assert err is not None and err.value(1, 4, 1) == "201"


@pytest.mark.parametrize(("msh15", "outcome", "expected"), [
    ("AL", "AA", "CA"), ("AL", "AE", "CE"), ("AL", "AR", "CR"),
    ("NE", "AA", None), ("NE", "AR", None),
    ("ER", "AA", None), ("ER", "AE", "CE"),
    ("SU", "AA", "CA"), ("SU", "AR", None),
])
def test_enhanced_mode_follows_msh15(msh15: str, outcome: str, expected: str | None) -> None:
    msg = er7.parse(adt_message("E1", "D1", "A01", extra_msh=f"|||{msh15}|NE"))
    ack = answer(msg, outcome, error=None if outcome == "AA" else "207", text="x")
    if expected is None:
        assert ack is None
    else:
        assert ack is not None and _hl7apy(ack)[1] == expected


def test_unreadable_message_gets_ar() -> None:
    ack = answer(None, "AR", error="100", text="the message could not be read")
    assert ack is not None and ack.startswith(b"MSH|^~\\&|") and b"MSA|AR|" in ack
