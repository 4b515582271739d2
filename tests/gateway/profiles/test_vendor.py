"""The vendored data is what gateway.profiles.vendor makes from ../shared, and ships."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.profiles import vendor
from gateway.profiles.validator import DATA_DIR
from tests.reference import SHARED, require_shared


def test_data_files_present_with_notice() -> None:
    for name in ("structuredefinitions.json", "terminology.json", "base-stu3.json"):
        json.loads((DATA_DIR / name).read_text())
    notice = (DATA_DIR / "NOTICE.md").read_text()
    assert "Apache License, Version 2.0" in notice and "HL7 UK" in notice
    assert "reviewedprofilesrelease1" in notice
    assert "79f29a65bf607f7058feebabd0c21ffed194ef4c" in notice
    sds = json.loads((DATA_DIR / "structuredefinitions.json").read_text())
    urls = set(sds["structureDefinitions"])
    for t in ("Patient", "Practitioner", "Organization", "Location", "Encounter", "List"):
        assert f"{vendor.CC}CareConnect-{t}-1" in urls


def test_lists_are_checked_against_care_connect_list() -> None:
    # The structured record's sections and $document's Lists claim CareConnect-List-1: the
    # validator has it (not just the STU3 base), with its bindings and cardinalities.
    from gateway.profiles.validator import validate

    url = f"{vendor.CC}CareConnect-List-1"
    empty = {"resourceType": "List", "meta": {"profile": [url]}, "status": "current",
             "mode": "snapshot", "subject": {"reference": "Patient/1"},
             "emptyReason": {"coding": [{"system": "http://hl7.org/fhir/list-empty-reason",
                                         "code": "nilknown"}]}}
    assert validate(empty, url) == []
    bad = validate({**empty, "status": "draft", "mode": None}, url)
    assert {i.expression for i in bad} >= {"List.status", "List.mode"}, bad


def test_regenerating_from_shared_gives_the_committed_data(tmp_path: Path) -> None:
    require_shared(SHARED / "careconnect")
    vendor.vendor(SHARED, tmp_path)
    for name in ("structuredefinitions.json", "terminology.json", "base-stu3.json",
                 "NOTICE.md"):
        assert (tmp_path / name).read_bytes() == (DATA_DIR / name).read_bytes(), name
