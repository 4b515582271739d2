"""Golden files: each demo mapping turns a raw record into exactly the expected resource.

``<Type>/<case>.input.json`` is a record as the adapter returns it (``"p.SURNAME"`` keys,
children under ``"@addresses"`` ...); ``<case>.expected.json`` is the resource the gateway
serves for it. See README.md for (re)writing the expected files with ``CCG_UPDATE_GOLDEN=1``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.registry import create
from gateway.mapping.loader import load_directory
from gateway.profiles.golden import golden_name
from gateway.providers import Provider
from tests.reference import update_golden

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = sorted(HERE.glob("*/*.input.json"))


def _canonical(value: Any) -> str:
    # Text, not ==: in Python True == 1 and 1 == 1.0, in FHIR JSON they differ.
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


@pytest.fixture(scope="module")
def providers(demo_sqlite_url: str) -> dict[str, Provider]:
    loaded = load_directory(REPO / "mappings" / "demo-pas", create,
                            urls={"pas": demo_sqlite_url})
    return {golden_name(m): Provider(m) for m in loaded.mappings}


def test_every_served_resource_type_has_golden_cases(providers: dict[str, Provider]) -> None:
    covered = {case.parent.name for case in CASES}
    assert covered == set(providers)


def test_every_expected_file_has_its_input() -> None:
    for expected in HERE.glob("*/*.expected.json"):
        if expected.parent.name in ("hl7v2", "adt"):  # messages in: test_golden_hl7v2.py,
            # tests/gateway/adt/test_events.py
            continue
        assert expected.with_name(expected.name.replace(".expected.", ".input.")).is_file()


@pytest.mark.parametrize("case", CASES, ids=lambda p: f"{p.parent.name}/{p.name[:-11]}")
def test_golden(case: Path, providers: dict[str, Provider]) -> None:
    record = json.loads(case.read_text(encoding="utf-8"))
    provider = providers[case.parent.name]
    resource = provider.resource(provider.as_record(record))
    expected_file = case.with_name(case.name.replace(".input.", ".expected."))
    if update_golden():
        expected_file.write_text(json.dumps(resource, indent=2, ensure_ascii=False) + "\n",
                                 encoding="utf-8")
    if not expected_file.is_file():
        pytest.fail(f"{expected_file.name} is missing: run with CCG_UPDATE_GOLDEN=1, then "
                    "review it against the Care Connect profile")
    expected = json.loads(expected_file.read_text(encoding="utf-8"))
    assert resource == expected
    assert _canonical(resource) == _canonical(expected)
    # The id is the record key, as the server will serve it.
    assert resource["id"] == provider.id_prefix + str(record[provider.key])


def _case(rtype: str, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    base = HERE / rtype / name
    return (json.loads(base.with_name(name + ".input.json").read_text(encoding="utf-8")),
            json.loads(base.with_name(name + ".expected.json").read_text(encoding="utf-8")))


def test_golden_patient_checked_by_hand_against_its_source_row() -> None:
    """Values worked out by hand from the input row (and the NHS Data Dictionary / Care Connect
    code systems), not by running the mapping: the expected files are not only the code's
    own output."""
    row, patient = _case("Patient", "100001-two-addresses-old-number-gp")
    assert row["p.SURNAME"] == "SMITH" and row["p.FORENAME"] == "JANE"
    assert patient["name"][0]["family"] == "Smith"                    # SMITH, title case
    assert patient["name"][0]["given"] == ["Jane", "Elizabeth"]       # FORENAME, SECOND_FORENAME
    assert patient["name"][0]["prefix"] == ["Mrs"]
    assert row["p.DTTM_OF_BIRTH"] == "19650412" and patient["birthDate"] == "1965-04-12"
    assert row["p.SEXXX_CODE"] == "2" and patient["gender"] == "female"  # NHS sex 2 = female
    nhs = next(i for i in patient["identifier"] if i["system"].endswith("/nhs-number"))
    assert nhs["value"] == row["p.NHS_NUMBER"] == "9990000018"
    # Ethnic category WB (the PAS's "White British") is Care Connect code A
    ethnic = next(e for e in patient["extension"] if "EthnicCategory" in e["url"])
    assert ethnic["valueCodeableConcept"]["coding"][0]["code"] == "A"
    # The old hospital number was current 11 April 2003 to 16 May 2011, both in British
    # Summer Time (+01:00): midnight London time.
    old = next(i for i in patient["identifier"] if i["value"] == "D0000005")
    assert old["period"] == {"start": "2003-04-11T00:00:00+01:00",
                             "end": "2011-05-16T00:00:00+01:00"}
    # Two addresses: the ended one keeps its end date; the current one has none.
    assert [a["postalCode"] for a in patient["address"]] == ["LS6 1LJ", "LS8 2DR"]
    assert patient["address"][0]["period"]["end"] == "2018-06-30T00:00:00+01:00"
    assert "end" not in patient["address"][1]["period"]
    assert patient["generalPractitioner"] == [{"reference": "Practitioner/1"},
                                              {"reference": "Organization/2"}]


def test_golden_encounter_checked_by_hand_against_its_source_row() -> None:
    row, encounter = _case("Encounter", "2-died-winter")
    # 10 March 2024 14:22 and 15 March 2024 09:30: before the clocks change (31 March), GMT
    assert row["s.ADMIT_DTTM"] == "202403101422" and row["s.DISCH_DTTM"] == "202403150930"
    assert encounter["period"] == {"start": "2024-03-10T14:22:00+00:00",
                                   "end": "2024-03-15T09:30:00+00:00"}
    # 4 days 19 hours 8 minutes = 4*1440 + 19*60 + 8 minutes
    assert encounter["length"]["value"] == 4 * 1440 + 19 * 60 + 8 == 6908
    assert encounter["subject"] == {"reference": f"Patient/{row['s.PATNT_REFNO']}"}
    assert encounter["status"] == "finished"                          # SPELL_STATUS D
    assert encounter["class"]["code"] == "IMP"                        # PATCL_CODE 1: inpatient
    # Discharge method 4 is "Patient died"; destination 79 "Not applicable - Patient died ..."
    methods = {e["valueCodeableConcept"]["coding"][0]["code"]
               for e in encounter["hospitalization"]["extension"]}
    assert methods == {row["s.ADMET_CODE"], row["s.DISMT_CODE"]} == {"21", "4"}
    assert encounter["hospitalization"]["dischargeDisposition"]["coding"][0]["code"] == "79"


def test_rewriting_expected_files_is_refused_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CCG_UPDATE_GOLDEN", "1")
    monkeypatch.setenv("CI", "1")
    with pytest.raises(pytest.fail.Exception, match="CCG_UPDATE_GOLDEN"):
        update_golden()
    monkeypatch.setenv("CI", "")
    assert update_golden() is True
    monkeypatch.delenv("CCG_UPDATE_GOLDEN")
    assert update_golden() is False
