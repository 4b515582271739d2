"""Primitive formats and local ValueSet expansion."""

from __future__ import annotations

import pytest

from gateway.profiles.primitives import CHECKS
from gateway.profiles.terminology import Terminology
from gateway.profiles.validator import load_profiles

GOOD = [
    ("id", "abc-1.2"), ("date", "2020"), ("date", "2020-02"), ("date", "2020-02-29"),
    ("dateTime", "2020-02-29T10:00:00+01:00"), ("dateTime", "2020-02-29T10:00:00.5Z"),
    ("dateTime", "2020-02"), ("instant", "2020-02-29T10:00:00Z"), ("time", "23:59:59"),
    ("uri", "urn:oid:1.2.3"), ("code", "in-progress"), ("code", "a b"), ("decimal", 1.5),
    ("decimal", 3), ("integer", -1), ("positiveInt", 1), ("unsignedInt", 0),
    ("boolean", False), ("string", " x "), ("oid", "urn:oid:2.16.840.1"),
    ("base64Binary", "aGVsbG8="), ("xhtml", "<div>x</div>"),
]
BAD = [
    ("id", "a b"), ("id", "x" * 65), ("date", "2019-02-29"), ("date", "2020-1-01"),
    ("date", "2020-02-29T10:00:00Z"), ("dateTime", "2020-02-29T10:00:00"),
    ("dateTime", "2020-02-29T10:00Z"), ("instant", "2020-02-29"), ("time", "24:00:00"),
    ("uri", "has space"), ("uri", ""), ("code", " lead"), ("code", "two  spaces"),
    ("decimal", "1.5"), ("decimal", True), ("decimal", float("nan")), ("integer", 1.0),
    ("integer", True), ("integer", 2**31), ("positiveInt", 0), ("unsignedInt", -1),
    ("boolean", "true"), ("string", ""), ("string", 1), ("markdown", ""),
    ("oid", "1.2.3"), ("xhtml", "<p>x</p>"),
]


@pytest.mark.parametrize(("type_code", "value"), GOOD)
def test_good_primitives(type_code: str, value: object) -> None:
    assert CHECKS[type_code](value) is None


@pytest.mark.parametrize(("type_code", "value"), BAD)
def test_bad_primitives(type_code: str, value: object) -> None:
    assert CHECKS[type_code](value) is not None


def test_expansion_from_concepts_codesystems_and_core_enumerations() -> None:
    t = load_profiles().terminology
    gender = t.expand("https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-AdministrativeGender-1")
    assert gender is not None and gender.codes == {"male", "female", "other", "unknown"}
    assert gender.has_coding("http://hl7.org/fhir/administrative-gender", "male")
    assert not gender.has_coding("http://example.org", "male")
    ethnic = t.expand("https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-EthnicCategory-1")
    assert ethnic is not None and {"A", "Z"} <= ethnic.codes
    use = t.expand("http://hl7.org/fhir/ValueSet/identifier-use")
    assert use is not None and use.codes == {"usual", "official", "temp", "secondary"}
    assert use.has_coding(None, "usual")
    # SNOMED CT filters cannot be expanded locally; unknown ValueSets neither.
    assert t.expand("https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-EncounterType-1") is None
    assert t.expand("http://hl7.org/fhir/ValueSet/languages") is None


def test_expansion_rules() -> None:
    t = Terminology({
        "valueSets": {
            "a": {"compose": {"include": [{"system": "s", "concept": ["1", "2", "3"]}],
                              "exclude": [{"system": "s", "concept": ["2"]}]}},
            "b": {"compose": {"include": [{"valueSet": ["a"]}, {"system": "cs"}]}},
            "c": {"compose": {"include": [{"system": "partial"}]}},
            "d": {"compose": {"include": [{"valueSet": ["d"]}]}},
        },
        "codeSystems": {"cs": {"content": "complete", "concept": ["x"]},
                        "partial": {"content": "fragment", "concept": ["y"]}},
    })
    a = t.expand("a")
    assert a is not None and a.pairs == {("s", "1"), ("s", "3")}
    b = t.expand("b")
    assert b is not None and b.pairs == {("s", "1"), ("s", "3"), ("cs", "x")}
    assert t.expand("c") is None
    assert t.expand("d") is None
