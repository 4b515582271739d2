"""The profile validator: every check fails when it should (a mutated valid resource) and
passes what conforms. Messages never carry values from the resource."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.profiles.validator import Issue, Profiles, _Walker, load_profiles, validate
from tests.gateway.profiles.resources import CC, NHS, encounter, patient

Mutation = Callable[[dict[str, Any]], None]


def errors(resource: dict[str, Any], profile: str | None = None) -> list[Issue]:
    return [i for i in validate(resource, profile) if i.severity == "error"]


def only(issues: list[Issue]) -> Issue:
    assert len(issues) == 1, issues
    return issues[0]


# --- positives ---------------------------------------------------------------------------------


def test_valid_patient_has_no_issues() -> None:
    assert validate(patient()) == []


def test_valid_encounter_has_no_errors() -> None:
    assert errors(encounter()) == []


def test_profile_chosen_from_meta_then_type() -> None:
    p = patient()
    del p["meta"]
    assert validate(p) == []
    assert validate(patient(), CC + "CareConnect-Patient-1") == []


def test_primitive_extension_and_choice_are_accepted() -> None:
    p = patient()
    p["_birthDate"] = {"extension": [{
        "url": "http://hl7.org/fhir/StructureDefinition/patient-birthTime",
        "valueDateTime": "1965-04-12T10:00:00+01:00"}]}
    p["deceasedDateTime"] = "2020-01-01T10:00:00Z"
    p["multipleBirthInteger"] = 2
    assert validate(p) == []


def test_contained_resource_reference() -> None:
    p = patient()
    p["contained"] = [{"resourceType": "Organization", "id": "o1", "name": "A practice"}]
    p["managingOrganization"] = {"reference": "#o1"}
    assert validate(p) == []


# --- negatives: one per check ------------------------------------------------------------------

PHI = "Smith"  # a value in the resource that must never appear in a message


def _nhs(p: dict[str, Any]) -> dict[str, Any]:
    ident: dict[str, Any] = p["identifier"][0]
    return ident


CASES: list[tuple[str, Mutation, str, str, str]] = [
    # (name, mutation, issue code, expression, words in the message)
    ("binding required: gender man", lambda p: p.update(gender="man"), "code-invalid",
     "Patient.gender", "CareConnect-AdministrativeGender-1"),
    ("binding required: CodeableConcept", lambda p: p["maritalStatus"]["coding"][0].update(
        code="XX"), "code-invalid", "Patient.maritalStatus", "CareConnect-MaritalStatus-1"),
    ("binding required: core code list", lambda p: p["identifier"][2].update(use="old"),
     "code-invalid", "Patient.identifier[2].use", "identifier-use"),
    ("missing required element", lambda p: p.pop("name"), "required", "Patient.name",
     "minimum required = 1"),
    ("missing required slice", lambda p: p["name"][0].update(use="usual"), "required",
     "Patient.name", "Patient.name:official"),
    ("missing required child", lambda p: p["telecom"][0].pop("value"), "required",
     "Patient.telecom[0].value", "Patient.telecom.value"),
    ("slice cardinality exceeded", lambda p: p["identifier"].append(dict(_nhs(p))),
     "structure", "Patient.identifier", "Patient.identifier:nhsNumber: maximum allowed = 1"),
    ("prohibited element (max 0)", lambda p: p.update(animal={"species": {"text": "dog"}}),
     "structure", "Patient", "Patient.animal: maximum allowed = 0"),
    ("sub-extension url not defined", lambda p: p["extension"][1]["extension"][0].update(
        url="language2"), "required", "Patient.extension[1].extension", "extension:language"),
    ("wrong reference target type", lambda p: p["generalPractitioner"][0].update(
        reference="Location/1"), "invalid", "Patient.generalPractitioner[0].reference",
     "Organization or Practitioner"),
    ("bad NHS number check digit", lambda p: _nhs(p).update(value="9990000019"), "value",
     "Patient.identifier[0].value", "check digit"),
    ("NHS number verification status missing", lambda p: _nhs(p).pop("extension"),
     "required", "Patient.identifier[0].extension", "nhsNumberVerificationStatus"),
    ("NHS number verification status binding", lambda p: _nhs(p)["extension"][0][
        "valueCodeableConcept"]["coding"][0].update(code="99"), "code-invalid",
     "Patient.identifier[0].extension[0].valueCodeableConcept",
     "CareConnect-NHSNumberVerificationStatus-1"),
    ("extension with wrong value type", lambda p: p["extension"][0].update(
        valueString="x", valueCodeableConcept=None) or p["extension"][0].pop(
        "valueCodeableConcept"), "structure", "Patient.extension[0].valueString",
     "not an allowed type"),
    ("nested extension with wrong value type", lambda p: p["extension"][1]["extension"].append(
        {"url": "preferred", "valueString": "yes"}), "structure",
     "Patient.extension[1].extension[1].valueString", "allowed: valueBoolean"),
    ("unknown modifier extension", lambda p: p.update(modifierExtension=[
        {"url": "http://example.org/x", "valueBoolean": True}]), "extension",
     "Patient.modifierExtension[0]", "unknown modifier extension"),
    ("bad date format", lambda p: p.update(birthDate="12/04/1965"), "value", "Patient.birthDate",
     "not a valid date"),
    ("impossible date", lambda p: p.update(birthDate="1965-02-30"), "value", "Patient.birthDate",
     "not a valid date"),
    ("dateTime without zone", lambda p: p["address"][0]["period"].update(
        start="2018-06-30T00:00:00"), "value", "Patient.address[0].period.start", "dateTime"),
    ("empty string", lambda p: p["name"][0].update(family=""), "value",
     "Patient.name[0].family", "empty string"),
    ("empty object", lambda p: p.update(maritalStatus={}), "structure",
     "Patient.maritalStatus", "empty objects"),
    ("empty array", lambda p: p.update(telecom=[]), "structure", "Patient.telecom",
     "empty arrays"),
    ("unknown element", lambda p: p.update(nickname="Janey"), "structure", "Patient.nickname",
     "unknown element"),
    ("choice type not allowed", lambda p: p.update(deceasedString="yes"), "structure",
     "Patient.deceasedString", "allowed: deceasedBoolean, deceasedDateTime"),
    ("two choice types at once", lambda p: p.update(deceasedBoolean=True,
                                                    deceasedDateTime="2020-01-01"),
     "structure", "Patient", "Patient.deceased[x]: maximum allowed = 1"),
    ("array where one value", lambda p: p.update(gender=["female"]), "structure",
     "Patient.gender", "must not be an array"),
    ("one value where array", lambda p: p.update(address=p["address"][0]), "structure",
     "Patient.address", "must be a JSON array"),
    ("boolean type", lambda p: p.update(active="yes"), "value", "Patient.active", "boolean"),
    ("id format", lambda p: p.update(id="not valid!"), "value", "Patient.id", "valid id"),
    ("invariant per-1", lambda p: p["identifier"][2]["period"].update(
        end="1990-01-01T00:00:00Z"), "invariant", "Patient.identifier[2].period", "per-1"),
    ("invariant ext-1", lambda p: p["extension"][1].update(valueBoolean=True), "invariant",
     "Patient.extension[1]", "ext-1"),
]


@pytest.mark.parametrize(("mutate", "code", "expression", "words"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_check_can_fail(mutate: Mutation, code: str, expression: str, words: str) -> None:
    p = patient()
    mutate(p)
    found = [i for i in errors(p) if i.code == code and i.expression == expression]
    assert found, errors(p)
    assert any(words in i.message for i in found), found
    for issue in validate(p):
        assert PHI not in issue.message and "9990000019" not in issue.message


def test_extensible_binding_warns() -> None:
    # The vendored profiles bind extensibly only to ValueSets not held locally (see the next
    # test), so the compiled marital-status binding is made extensible for this test.
    profiles = load_profiles()
    root = profiles.root(CC + "CareConnect-Patient-1")
    binding = root.props["maritalStatus"].binding
    assert binding is not None and binding.strength == "required"
    binding.strength = "extensible"
    try:
        p = patient()
        p["maritalStatus"]["coding"][0]["code"] = "XX"
        issues = validate(p)
        assert [(i.severity, i.code) for i in issues] == [("warning", "code-invalid")]
        assert "extensible" in issues[0].message
        p["maritalStatus"]["coding"][0] = {"system": "http://example.org/cs", "code": "M",
                                           "display": "Married"}
        assert [i.severity for i in validate(p)] == ["warning"]
    finally:
        binding.strength = "required"


def test_fixed_value_is_checked() -> None:
    # In the vendored profiles every fixed value is also a slice discriminator (an item with
    # another value simply is not in the slice), so the fixed check is driven directly here.
    profiles = load_profiles()
    ext = profiles.extension(CC + "Extension-CareConnect-EthnicCategory-1")
    assert ext is not None
    item = patient()["extension"][0]
    issues: list[Issue] = []
    _Walker(profiles, issues, {}).value(item, ext, "Patient.extension[0]")
    assert issues == []
    item["url"] = "https://example.org/another"
    _Walker(profiles, issues, {}).value(item, ext, "Patient.extension[0]")
    issue = only(issues)
    assert (issue.code, issue.expression) == ("value", "Patient.extension[0].url")
    assert "fixed value" in issue.message


def test_unexpandable_valueset_is_reported_not_checked() -> None:
    p = patient()
    p["language"] = "en-GB"  # bound (extensible) to http://hl7.org/fhir/ValueSet/languages
    issue = only(validate(p))
    assert (issue.severity, issue.code, issue.expression) == (
        "information", "informational", "Patient.language")
    assert issue.message == ("binding not checked: ValueSet "
                             "http://hl7.org/fhir/ValueSet/languages not available locally")
    e = encounter()  # Encounter.class: extensible to v3-ActEncounterCode (not vendored)
    assert any(i.severity == "information" and "v3-ActEncounterCode" in i.message
               for i in validate(e))


def test_unknown_extension_url_is_a_warning_and_still_structurally_checked() -> None:
    p = patient()
    p["extension"].append({"url": "http://example.org/fhir/StructureDefinition/shoe-size",
                           "valueInteger": 42})
    issue = only(validate(p))
    assert (issue.severity, issue.code, issue.expression) == (
        "warning", "extension", "Patient.extension[2]")
    assert "example.org" not in issue.message
    p["extension"][2]["valueInteger"] = "42"
    assert only(errors(p)).expression == "Patient.extension[2].valueInteger"


def test_extension_checked_against_its_own_definition_anywhere() -> None:
    # Not a slice of Encounter.hospitalization? Discharge method is; put it where no slice is.
    e = encounter()
    e["extension"] = [{"url": CC + "Extension-CareConnect-EthnicCategory-1",
                       "valueCodeableConcept": {"coding": [{"code": "nope"}]}}]
    issue = only(errors(e))
    assert issue.code == "code-invalid"
    assert "CareConnect-EthnicCategory-1" in issue.message


def test_reference_forms() -> None:
    e = encounter()
    e["subject"] = {"reference": "https://example.org/fhir/Patient/1/_history/2"}
    assert errors(e) == []
    e["subject"] = {"reference": "https://example.org/fhir/Practitioner/1"}
    assert only(errors(e)).expression == "Encounter.subject.reference"
    e["subject"] = {"reference": "#missing"}
    assert only(errors(e)).code == "not-found"
    e["subject"] = {"identifier": {"system": NHS, "value": "9990000018"}}
    assert errors(e) == []


def test_encounter_checks() -> None:
    e = encounter()
    del e["status"]
    assert only(errors(e)).expression == "Encounter.status"
    e = encounter()
    e["status"] = "done"
    assert only(errors(e)).code == "code-invalid"
    e = encounter()
    e["hospitalization"]["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] = "99"
    assert "CareConnect-AdmissionMethod-1" in only(errors(e)).message
    e = encounter()
    e["length"]["value"] = "4590"
    assert only(errors(e)).expression == "Encounter.length.value"


def test_explicit_profile_and_mismatches() -> None:
    assert only(validate(patient(), CC + "CareConnect-Encounter-1")).code == "invalid"
    assert only(validate(patient(), "http://example.org/nope")).code == "not-supported"
    assert only(validate({"resourceType": "Nonsense"})).code == "not-supported"
    assert only(validate({})).code == "required"


def test_other_resource_types_against_the_base_definition() -> None:
    oo = {"resourceType": "OperationOutcome",
          "issue": [{"severity": "error", "code": "invalid"}]}
    assert validate(oo) == []
    oo["issue"][0]["severity"] = "bad"
    assert only(errors(oo)).expression == "OperationOutcome.issue[0].severity"


def test_a_fresh_load_validates_like_the_shared_one() -> None:
    """A Profiles() built apart from the cached one is complete on its own: it passes what
    conforms and fails what does not, with the same issues. (Its load time and the per-resource
    validate time are figures for bench/validate_bench.py, not assertions here.)"""
    fresh = Profiles()
    assert fresh is not load_profiles()
    assert validate(patient(), profiles=fresh) == []
    bad = patient()
    bad.update(gender="man", birthDate="1965-02-30")
    found = validate(bad, profiles=fresh)
    assert {i.expression for i in found if i.severity == "error"} >= {
        "Patient.gender", "Patient.birthDate"}
    assert found == validate(bad)


def test_a_core_resource_url_validates_against_the_base_definition() -> None:
    """DocumentReference has no Care Connect profile: its STU3 canonical URL is checked
    against the base resource, and really checked (a broken one fails)."""
    import json
    from pathlib import Path

    url = "http://hl7.org/fhir/StructureDefinition/DocumentReference"
    golden = Path(__file__).parents[2] / "golden" / "DocumentReference"
    good = json.loads(next(golden.glob("*.expected.json")).read_text())
    assert url in load_profiles()
    assert [i for i in validate(good, url) if i.severity == "error"] == []
    broken = {**good, "status": "lost", "indexed": None}
    broken["content"] = [{"attachment": {"size": "big"}}]
    errors = [i for i in validate(broken, url) if i.severity == "error"]
    assert {i.expression.split(".")[1].split("[")[0] for i in errors} >= {"status", "content"}
    assert "http://hl7.org/fhir/StructureDefinition/NoSuchThing" not in load_profiles()
# --- a data type's own backbone typed "Element" in a snapshot (Timing.repeat) ------------------


def _medication_request(repeat: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "MedicationRequest", "id": "1",
        "meta": {"profile": [CC + "CareConnect-MedicationRequest-1"]},
        "status": "active", "intent": "order",
        "medicationReference": {"reference": "Medication/1"},
        "subject": {"reference": "Patient/100001"},
        "dosageInstruction": [{"text": "1 tablet twice a day", "timing": {"repeat": repeat}}],
    }


def test_timing_repeat_is_checked_as_the_backbone_it_is() -> None:
    assert errors(_medication_request({"frequency": 2, "period": 1, "periodUnit": "d"})) == []
    issue = only(errors(_medication_request({"frequency": 2, "perod": 1})))
    assert issue.message == "unknown element 'perod' in BackboneElement"
    assert issue.expression == "MedicationRequest.dosageInstruction[0].timing.repeat.perod"
    issue = only(errors(_medication_request({"frequency": "twice"})))
    assert issue.expression == "MedicationRequest.dosageInstruction[0].timing.repeat.frequency"


def test_reference_to_any_resource_takes_every_type() -> None:
    """Reference(Any) (Composition.subject, section.entry): any type; a typed one still
    refuses others."""
    comp = {"resourceType": "Composition", "status": "final", "type": {"text": "x"},
            "date": "2024-01-01", "title": "t", "subject": {"reference": "Patient/1"},
            "author": [{"reference": "Practitioner/1"}],
            "section": [{"title": "s", "entry": [{"reference": "Condition/1"}]}]}
    assert [i for i in validate(comp) if i.severity == "error"] == []
    comp["author"] = [{"reference": "Condition/1"}]
    errors = [i for i in validate(comp) if i.severity == "error"]
    assert [i.expression for i in errors] == ["Composition.author[0].reference"]


LIST_PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-List-1"
NIL = {"coding": [{"system": "http://hl7.org/fhir/list-empty-reason", "code": "nilknown",
                   "display": "Nil Known"}], "text": "Nil Known"}


def test_an_empty_reason_only_on_an_empty_list_or_section() -> None:
    """lst-1, cmp-2 and cmp-1 (STU3): a List or a Composition section with entries cannot
    say why it is empty; a section has text, entries or sub-sections."""
    lst: dict[str, Any] = {
        "resourceType": "List", "meta": {"profile": [LIST_PROFILE]}, "status": "current",
        "mode": "snapshot", "subject": {"reference": "Patient/1"}, "emptyReason": NIL}
    assert [i for i in validate(lst) if i.severity == "error"] == []
    lst["entry"] = [{"item": {"reference": "AllergyIntolerance/1"}}]
    assert [(i.code, i.message[:5]) for i in validate(lst) if i.severity == "error"] == [
        ("invariant", "lst-1")]
    div = '<div xmlns="http://www.w3.org/1999/xhtml">Nil known</div>'
    comp: dict[str, Any] = {
        "resourceType": "Composition", "status": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "60591-5"}]},
        "subject": {"reference": "Patient/1"}, "date": "2024-01-01",
        "author": [{"reference": "Device/1"}], "title": "Summary",
        "section": [{"title": "Allergies", "text": {"status": "generated", "div": div},
                     "emptyReason": NIL}]}
    assert [i for i in validate(comp) if i.severity == "error"] == []
    comp["section"][0]["entry"] = [{"reference": "AllergyIntolerance/1"}]
    comp["section"].append({"title": "Nothing at all"})
    assert [(i.message[:5], i.expression) for i in validate(comp)
            if i.code == "invariant"] == [("cmp-2", "Composition.section[0]"),
                                          ("cmp-1", "Composition.section[1]")]


@pytest.mark.parametrize("coding", [-1, 1.5, True, "S", {"code": "S"}])
def test_a_codeable_concept_whose_coding_is_not_a_list(coding: Any) -> None:
    """Reported as an error at the element, not iterated (an int raised TypeError: $validate
    and every create/update answered 500)."""
    p = patient()
    p["maritalStatus"]["coding"] = coding
    found = errors(p)
    assert found and all(i.expression.startswith("Patient.maritalStatus") for i in found), found
