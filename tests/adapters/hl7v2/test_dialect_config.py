"""The PAS dialect as connection configuration, and the values nothing may drop silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from adapters import dropped
from adapters.base import SourceConfigError
from adapters.hl7v2 import er7, messages
from adapters.hl7v2.ack import pas_text
from adapters.hl7v2.adapter import Hl7v2Adapter
from adapters.registry import create
from gateway.mapping.loader import load_directory
from gateway.mapping.storage import from_fhir, make_storage
from gateway.providers import Provider

REPO = Path(__file__).resolve().parents[3]
TZ = ZoneInfo("Europe/London")


@pytest.fixture(scope="module")
def patients(demo_sqlite_url: str) -> Provider:
    loaded = load_directory(REPO / "mappings" / "demo-hl7v2", create,
                            urls={"pas": demo_sqlite_url, "pas-hl7": "mllp://127.0.0.1:9"})
    return next(Provider(m) for m in loaded.mappings if m.resource_type == "Patient")


def _patient(provider: Provider, pid: str) -> dict[str, Any]:
    msg = er7.parse(("MSH|^~\\&|PAS|RX1|CCG|RX1|20240101||RSP^K21^RSP_K21|1|P|2.4\r"
                     "MSA|AA|1\r" + pid + "\r").encode())
    adapter = provider.mapping.adapter
    assert isinstance(adapter, Hl7v2Adapter)
    records = adapter.records(provider.mapping.prepared, msg)
    assert len(records) == 1
    return provider.resource(records[0])


# --- configuration --------------------------------------------------------------------------


def test_the_dialect_is_read_from_the_connection_options() -> None:
    a = Hl7v2Adapter("mllp://127.0.0.1:9", options={"dialect": {
        "wildcard": "%", "matching": "prefix", "identifier_qualifiers": False,
        "qpd_fields": ["PID.3.1", "PID.5.1"], "new_patient_number": ["sent"]}})
    assert a.dialect.wildcard == "%" and a.dialect.new_patient_number == ("sent",)
    # ITK defaults
    d = Hl7v2Adapter("mllp://127.0.0.1:9").dialect
    assert (d.wildcard, d.matching, d.identifier_qualifiers) == ("*", "exact", True)
    assert d.identifier_types == {"NHS": "NH"} and "PID.5.1" in d.qpd_fields
    with pytest.raises(SourceConfigError, match=r"dialect\.wildcard"):
        Hl7v2Adapter("mllp://127.0.0.1:9", options={"dialect": {"wildcard": "?"}})


def test_msh18_must_be_in_table_0211_of_the_declared_version() -> None:
    assert Hl7v2Adapter("mllp://127.0.0.1:9").header.charset == "UNICODE"  # v2.4: UTF-8
    with pytest.raises(SourceConfigError, match="0211"):
        Hl7v2Adapter("mllp://127.0.0.1:9", options={"charset": "UNICODE UTF-8"})
    a = Hl7v2Adapter("mllp://127.0.0.1:9", options={
        "charset": "UNICODE UTF-8", "dialect": {"version": "2.5"}})
    assert a.header.version == "2.5"
    msg = messages.qbp_q22(a.header, "C1", criteria=[("PID.5.1", "X*")], quantity=1,
                           query_tag="t")
    msh = er7.parse(msg).segments[0]
    assert (msh.value(12), msh.value(18)) == ("2.5", "UNICODE UTF-8")


def test_a_mapping_cannot_set_the_wildcard(demo_sqlite_url: str) -> None:
    a = Hl7v2Adapter("mllp://127.0.0.1:9")
    from adapters.base import Needs

    with pytest.raises(SourceConfigError, match=r"dialect\.wildcard"):
        a.prepare({"connection": "x", "wildcard": "*"},
                  Needs(key="PID-3.1", fields=frozenset(), children=frozenset()))


# --- defect 9: redaction ----------------------------------------------------------------------


def test_redaction_takes_whole_values_not_parts_of_words() -> None:
    reply = er7.parse(b"MSH|^~\\&|PAS|RX1|C|R|2024||ACK|2|P|2.4\rMSA|AE|1|PID-3 type PI "
                      b"for SMITH is not valid\r")
    text = pas_text(reply, ["PI", "SMITH", "H"])  # the PAS's words, for the debug log
    assert "PID-3" in text and "[redacted]D" not in text
    assert "SMITH" not in text and text.count("[redacted]") == 2


# --- defect 3: CX-4 and CX-5 ---------------------------------------------------------------


@pytest.mark.parametrize("cx", ["9990000018^^^NHS^NH", "9990000018^^^NHS", "9990000018^^^^NH"])
def test_an_nhs_number_is_read_by_cx4_or_cx5(patients: Provider, cx: str) -> None:
    p = _patient(patients, f"PID|1||D0000001^^^RX1^PI~{cx}||SMITH^JANE||19650412|F")
    nhs = [i for i in p["identifier"] if i["system"] == "https://fhir.nhs.uk/Id/nhs-number"]
    assert [i["value"] for i in nhs] == ["9990000018"]


def test_an_nhs_number_is_written_with_cx4_and_cx5(patients: Provider) -> None:
    from adapters.hl7v2.adapter import _adt_values

    record = patients.to_record({
        "resourceType": "Patient", "id": "D0000009",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9990000018"},
                       {"system": "https://fhir.demo-trust.nhs.uk/Id/pas-number",
                        "value": "D0000009"}],
        "name": [{"use": "official", "family": "Smith", "given": ["Jane"]}],
        "birthDate": "1965-04-12"})
    values = _adt_values(patients.mapping.prepared, record)
    msg = er7.parse(messages.adt(messages.Header(), "C1", event="A31", values=values))
    pid = msg.segment("PID")
    assert pid is not None
    reps = {pid.value(3, 1, repetition=r): (pid.value(3, 4, repetition=r),
                                             pid.value(3, 5, repetition=r))
            for r in range(pid.repetitions(3))}
    assert reps == {"9990000018": ("NHS", "NH"), "D0000009": ("RX1", "PI")}


# --- defect 4: every HL7 date/time precision, PID-30 without a date ----------------------------


@pytest.mark.parametrize(("hl7", "fhir"), [
    ("2024", "2024"),
    ("202401", "2024-01"),
    ("20240110", "2024-01-10"),
    ("2024011009", "2024-01-10T09:00:00+00:00"),
    ("202401100930", "2024-01-10T09:30:00+00:00"),
    ("20240710093015", "2024-07-10T09:30:15+01:00"),  # the connection's zone: BST
    ("20240110093015.25", "2024-01-10T09:30:15.25+00:00"),
    ("20240110093015.1234-0500", "2024-01-10T09:30:15.1234-05:00"),
    ("202401100930+0100", "2024-01-10T09:30:00+01:00"),
])
def test_every_hl7_precision_maps_to_the_same_fhir_precision(hl7: str, fhir: str) -> None:
    storage = make_storage("datetime:hl7", TZ)
    assert storage.to_fhir(hl7) == fhir
    back = from_fhir(storage, fhir, TZ)
    assert storage.to_fhir(back)[:16] == fhir[:16] or len(fhir) > 19


@pytest.mark.parametrize(("hl7", "fhir"), [("1965", "1965"), ("196504", "1965-04"),
                                           ("19650412", "1965-04-12"),
                                           ("196504121515", "1965-04-12")])
def test_birth_dates_keep_their_precision(hl7: str, fhir: str) -> None:
    storage = make_storage("date:hl7", TZ)
    assert storage.to_fhir(hl7) == fhir
    assert from_fhir(storage, fhir, TZ) == hl7[:8]


@pytest.mark.parametrize("death", ["2024", "202401", "20240110", "202401101530",
                                   "20240110153045.5+0000"])
def test_a_death_at_any_precision_is_served(patients: Provider, death: str) -> None:
    p = _patient(patients, f"PID|1||D0000001^^^RX1^PI||SMITH^JANE||19650412|F"
                           f"{'|' * 21}{death}|Y")
    assert p["deceasedDateTime"].replace("-", "").startswith(death[:8])
    assert "deceasedBoolean" not in p


def test_pid30_yes_without_a_date_is_deceased_boolean_true(patients: Provider) -> None:
    p = _patient(patients, "PID|1||D0000001^^^RX1^PI||SMITH^JANE||19650412|F" + "|" * 22 + "Y")
    assert p["deceasedBoolean"] is True and "deceasedDateTime" not in p
    alive = _patient(patients, "PID|1||D0000001^^^RX1^PI||SMITH^JANE||19650412|F"
                               + "|" * 22 + "N")
    assert "deceasedBoolean" not in alive and "deceasedDateTime" not in alive
    # and written back as PID-30 Y
    record = patients.to_record({**p, "id": "D0000001"})
    assert record["PID-30"] == "Y"


def test_a_value_that_cannot_be_mapped_is_logged_and_counted(patients: Provider) -> None:
    before = dropped.snapshot().get(("datetime:hl7", "not an HL7 date/time"), 0)
    for _ in range(2):  # counted every time, not once per distinct value
        p = _patient(patients, "PID|1||D0000001^^^RX1^PI||SMITH^JANE||19650412|F"
                               + "|" * 21 + "20241310|Y")
        assert "deceasedDateTime" not in p
        assert p["deceasedBoolean"] is True  # the date is unusable, PID-30 still says Y
    after = dropped.snapshot()[("datetime:hl7", "not an HL7 date/time")]
    assert after >= before + 2  # once per use of the value (the output and the flag's test)
