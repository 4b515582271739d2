"""SMART scope grammar (v1 and v2) and the Principal contract."""

from __future__ import annotations

from types import MappingProxyType, SimpleNamespace

import pytest

from gateway.auth.principal import (
    PRINCIPAL_SCOPE_KEY,
    Principal,
    Scope,
    get_principal,
    parse_scope,
    parse_scopes,
)

ALL = frozenset("cruds")


@pytest.mark.parametrize(("text", "expected"), [
    ("patient/Patient.read", Scope("patient", "Patient", frozenset("rs"))),
    ("user/*.write", Scope("user", "*", frozenset("cud"))),
    ("system/*.*", Scope("system", "*", ALL)),
    ("user/Encounter.*", Scope("user", "Encounter", ALL)),
    ("patient/Patient.rs", Scope("patient", "Patient", frozenset("rs"))),
    ("user/*.cruds", Scope("user", "*", ALL)),
    ("system/Patient.r", Scope("system", "Patient", frozenset("r"))),
    ("system/Patient.s", Scope("system", "Patient", frozenset("s"))),
    ("user/Patient.cu", Scope("user", "Patient", frozenset("cu"))),
    ("user/Patient.cd", Scope("user", "Patient", frozenset("cd"))),
])
def test_valid_scopes(text: str, expected: Scope) -> None:
    assert parse_scope(text) == expected


@pytest.mark.parametrize("text", [
    "openid", "fhirUser", "launch", "launch/patient", "offline_access", "online_access",
    "patient/Observation.rs?category=laboratory",  # v2 query: dropped, never widened
    "user/Patient.rs?_security=R",
    "user/Patient.sr", "user/Patient.rr", "user/Patient.", "user/Patient.x",
    "user/Patient.readwrite", "user/Patient.READ", "user/patient.read", "admin/*.*",
    "user/*", "user/.read", "User/Patient.read", "user/Patient.read/extra",
    "user/Pat-ient.read", "user/**.read", " user/Patient.read ", "",
])
def test_invalid_scopes_grant_nothing(text: str) -> None:
    assert parse_scope(text) is None


def test_parse_scopes_ignores_unknown_and_deduplicates() -> None:
    scopes = parse_scopes("openid  fhirUser user/Patient.read\tuser/Patient.rs "
                          "patient/Observation.rs?x=1 system/Encounter.c")
    assert scopes == (Scope("user", "Patient", frozenset("rs")),
                      Scope("system", "Encounter", frozenset("c")))
    assert parse_scopes(["user/Patient.r user/Encounter.s", 3, "bad"]) == (  # type: ignore[list-item]
        Scope("user", "Patient", frozenset("r")), Scope("user", "Encounter", frozenset("s")))
    assert parse_scopes("") == ()


def principal(text: str, patient: str | None = None) -> Principal:
    return Principal("c", None, None, parse_scopes(text), patient, "jwt")


def test_allows_is_deny_by_default() -> None:
    p = principal("user/Patient.r user/Encounter.read user/*.c")
    assert p.allows("Patient", "r") and not p.allows("Patient", "s")
    assert p.allows("Encounter", "r") and p.allows("Encounter", "s")
    assert p.allows("Location", "c") and not p.allows("Location", "r")
    assert not p.allows("Patient", "u") and not p.allows("Patient", "d")
    assert not principal("").allows("Patient", "r")
    assert not principal("openid fhirUser").allows("Patient", "r")


@pytest.mark.parametrize(("text", "restricted"), [
    ("patient/*.read", True),
    ("patient/Patient.read user/Practitioner.read", True),
    ("patient/*.read user/*.read", False),
    ("patient/Patient.r user/Patient.rs", False),
    ("patient/Patient.rs user/Patient.r", True),  # search only through the patient scope
    ("user/*.read", False),
    ("system/*.*", False),
    ("", False),
])
def test_patient_restricted(text: str, restricted: bool) -> None:
    assert principal(text, "1").patient_restricted is restricted


def test_patient_restricted_for_one_interaction() -> None:
    p = principal("patient/*.read user/Practitioner.read", "1")
    assert p.patient_restricted_for("Patient", "r")
    assert not p.patient_restricted_for("Practitioner", "r")
    assert not p.patient_restricted_for("Patient", "c")  # not granted at all


def test_get_principal_from_scope_request_and_state() -> None:
    p = principal("user/*.read")
    scope = {"type": "http", "state": {PRINCIPAL_SCOPE_KEY: p}}
    assert get_principal(scope) is p
    assert get_principal({"type": "http"}) is None
    assert get_principal({"state": {PRINCIPAL_SCOPE_KEY: "forged"}}) is None
    state = SimpleNamespace(principal=p)
    assert get_principal(state) is p
    assert get_principal(SimpleNamespace(state=state)) is p
    assert p.scope_text == "user/*.rs"
    # any Mapping, not only dicts, for the scope and for its state
    assert get_principal({"state": MappingProxyType({PRINCIPAL_SCOPE_KEY: p})}) is p
    assert get_principal(MappingProxyType({"state": {PRINCIPAL_SCOPE_KEY: p}})) is p
    assert get_principal({"state": None}) is None


def test_derived_properties_are_computed_once_and_equality_is_unchanged() -> None:
    p = principal("patient/*.read user/Practitioner.read", "1")
    assert p.patient_restricted and p.patient_restricted  # cached after the first use
    assert p.scope_text == "patient/*.rs user/Practitioner.rs"
    assert {"patient_restricted", "scope_text"} <= set(vars(p))
    fresh = principal("patient/*.read user/Practitioner.read", "1")
    assert fresh == p and hash(fresh) == hash(p)  # a cached value is not a field


@pytest.mark.parametrize(("path", "root", "expected"), [
    ("/STU3/metadata", "", "/STU3/metadata"),
    ("/fhir/STU3/metadata", "/fhir", "/STU3/metadata"),
    ("/fhir", "/fhir", ""),
    ("/fhirSTU3/metadata", "/fhir", "/fhirSTU3/metadata"),
    ("/other/_health", "/fhir", "/other/_health"),
])
def test_public_paths_are_matched_as_the_router_matches(path: str, root: str,
                                                        expected: str) -> None:
    from starlette._utils import get_route_path

    from gateway.auth.middleware import route_path

    scope = {"type": "http", "path": path, "root_path": root}
    assert route_path(scope) == expected == get_route_path(scope)
