"""Every inbound write runs the profile validator: errors block (422), warnings do not."""

from __future__ import annotations

import pytest

from gateway import writes
from gateway.errors import ResourceInvalid
from tests.gateway.profiles.resources import CC, patient


def test_conformant_write_passes() -> None:
    writes.validate(patient(), "Patient", CC + "CareConnect-Patient-1")


def test_profile_error_is_422_with_one_issue_per_problem() -> None:
    p = patient()
    p["gender"] = "man"  # fhir.resources accepts this; the profile does not
    del p["name"]
    with pytest.raises(ResourceInvalid) as info:
        writes.validate(p, "Patient", CC + "CareConnect-Patient-1")
    exc = info.value
    assert exc.status == 422
    assert sorted(path for path, _ in exc.problems) == ["Patient.gender", "Patient.name"]
    outcome = exc.outcome()
    assert {i["expression"][0] for i in outcome["issue"]} == {"Patient.gender", "Patient.name"}
    assert all(i["severity"] == "error" for i in outcome["issue"])


def test_nhs_number_reported_once() -> None:
    p = patient()
    p["identifier"][0]["value"] = "9990000019"
    with pytest.raises(ResourceInvalid) as info:
        writes.validate(p, "Patient")
    assert [path for path, _ in info.value.problems] == ["Patient.identifier[0].value"]


@pytest.mark.parametrize("identifier", [-1, 1.5, True, "9990000018"])
def test_identifier_that_is_not_a_list_is_422(identifier: object) -> None:
    """INVALID_RESOURCE at Patient.identifier, not a TypeError (a 500 on create and update)."""
    p = patient()
    p["identifier"] = identifier
    with pytest.raises(ResourceInvalid) as info:
        writes.validate(p, "Patient")
    assert info.value.status == 422
    assert any(path.startswith("Patient.identifier") for path, _ in info.value.problems)


def test_warnings_do_not_block() -> None:
    p = patient()
    p["extension"].append({"url": "http://example.org/x", "valueBoolean": True})
    p["language"] = "en-GB"  # information: binding not checked
    writes.validate(p, "Patient")
