"""The CapabilityStatement is generated from the registry and claims exactly what works.

The expected parameters, includes and revincludes are derived here from the mapping YAML
itself (an oracle independent of the Provider code); then every claim is exercised over HTTP.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from lxml import etree
from starlette.applications import Starlette

from gateway.app import build_app
from gateway.capability import FHIR_VERSION, capability_statement
from gateway.errors import InvalidParameter
from gateway.registry import Registry
from gateway.settings import default_mappings_dir
from tests.conftest import LIMITS_OFF, LiveServer, gateway_settings

BASE = "http://fhir.example/STU3"


def mapping_files() -> dict[str, dict[str, Any]]:
    """Each type's mapping as the YAML says; a type with several files: what they all share
    (a parameter every file declares with the same type and targets; every description)."""
    files: dict[str, list[dict[str, Any]]] = {}
    for f in sorted(default_mappings_dir().glob("*.yaml")):
        doc = yaml.safe_load(f.read_text())
        if isinstance(doc, dict) and "resource" in doc:
            files.setdefault(doc["resource"], []).append(doc)
    out: dict[str, dict[str, Any]] = {}
    for rtype, docs in files.items():
        first = docs[0]
        search: dict[str, Any] = {}
        for name, spec in first.get("search", {}).items():
            specs = [d.get("search", {}).get(name) for d in docs]
            if all(s is not None and s["type"] == spec["type"] for s in specs) and (
                    spec["type"] != "reference"
                    or all(set(targets(s)) == set(targets(spec)) for s in specs)):
                descriptions = list(dict.fromkeys(s["description"] for s in specs
                                                  if s.get("description")))
                search[name] = {**spec, "description": "; ".join(descriptions) or None}
        sort = [n for n in first.get("sort", []) if all(n in d.get("sort", []) for d in docs)]
        out[rtype] = {**first, "search": search, "sort": sort}
    return out



def targets(spec: dict[str, Any]) -> list[str]:
    """Target types of a reference parameter as the YAML declares them."""
    if "targets" in spec:
        return list(spec["targets"])
    return [spec["target"]]


MAPPINGS = mapping_files()


def expected_includes(rtype: str, served: set[str]) -> list[str]:
    out: list[str] = []
    for name, spec in sorted(MAPPINGS[rtype]["search"].items()):
        if spec["type"] != "reference":
            continue
        hit = [t for t in targets(spec) if t in served]
        if hit:
            out.append(f"{rtype}:{name}")
        if len(hit) > 1:
            out += [f"{rtype}:{name}:{t}" for t in hit]
    return out


def expected_revincludes(rtype: str, served: set[str]) -> list[str]:
    return sorted(
        f"{source}:{name}"
        for source in served
        for name, spec in MAPPINGS[source]["search"].items()
        if spec["type"] == "reference" and rtype in targets(spec)
    )


@pytest.fixture(scope="module")
def app(demo_sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Starlette:
    # Every claim of fifteen types is tried by one client: more than the per-client rate
    # limit (tested in test_limits) allows in a burst.
    return build_app(gateway_settings(demo_sqlite_url, tmp_path_factory.mktemp("cap"),
                                      **LIMITS_OFF))


def resources(statement: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (rest,) = statement["rest"]
    assert rest["mode"] == "server"
    return {r["type"]: r for r in rest["resource"]}


def test_every_served_type_is_listed_once(app: Starlette) -> None:
    cs = capability_statement(app.state.registry, BASE)
    listed = [r["type"] for r in cs["rest"][0]["resource"]]
    terminology = ["CodeSystem", "ConceptMap", "ValueSet"]  # gateway.terminology's providers
    assert sorted(MAPPINGS) == [p.resource_type for p in app.state.registry]
    assert [p.resource_type for p in app.state.registry.terminology_providers()] == terminology
    # Binary: the content of the DocumentReferences (gateway.binary), read only, no search.
    assert listed == sorted([*MAPPINGS, "Binary", *terminology])
    binary = resources(cs)["Binary"]
    assert binary["interaction"] == [{"code": "read"}] and "searchParam" not in binary
    assert cs["resourceType"] == "CapabilityStatement"
    assert (cs["fhirVersion"], cs["kind"], cs["status"]) == (FHIR_VERSION, "instance", "active")
    assert cs["implementation"]["url"] == BASE
    assert set(cs["format"]) >= {"application/fhir+json", "application/fhir+xml"}


@pytest.mark.parametrize("rtype", sorted(MAPPINGS))
def test_search_parameters_are_exactly_the_mapped_ones(app: Starlette, rtype: str) -> None:
    entry = resources(capability_statement(app.state.registry, BASE))[rtype]
    declared = MAPPINGS[rtype]["search"]
    got = {p["name"]: p["type"] for p in entry["searchParam"]}
    assert got == {"_id": "token", **{n: s["type"] for n, s in declared.items()}}
    docs = {p["name"]: p.get("documentation") for p in entry["searchParam"]}
    for name, spec in declared.items():
        # a reference parameter's documentation goes on to list its chains (test_chain.py)
        doc, _, chains = (docs[name] or "").partition("Chains (one level): ")
        assert (doc.removesuffix(". ") or None) == spec.get("description")
        assert bool(chains) == (spec["type"] == "reference")
    assert entry["profile"]["reference"] == MAPPINGS[rtype]["profile"]
    assert [i["code"] for i in entry["interaction"]] == ["read", "search-type"]
    assert entry["readHistory"] is False and entry["conditionalCreate"] is False


@pytest.mark.parametrize("rtype", sorted(MAPPINGS))
def test_includes_and_revincludes_follow_the_reference_parameters(app: Starlette,
                                                                 rtype: str) -> None:
    entry = resources(capability_statement(app.state.registry, BASE))[rtype]
    served = set(MAPPINGS)
    assert entry.get("searchInclude", []) == expected_includes(rtype, served)
    assert sorted(entry.get("searchRevInclude", [])) == expected_revincludes(rtype, served)


def test_demo_includes_by_name(app: Starlette) -> None:
    by_type = resources(capability_statement(app.state.registry, BASE))
    assert by_type["Encounter"]["searchInclude"] == [
        "Encounter:location", "Encounter:patient", "Encounter:practitioner", "Encounter:subject"]
    assert by_type["Patient"]["searchInclude"] == [
        "Patient:general-practitioner", "Patient:general-practitioner:Practitioner",
        "Patient:general-practitioner:Organization"]
    assert sorted(by_type["Patient"]["searchRevInclude"]) == [
        "AllergyIntolerance:patient", "Condition:patient", "Condition:subject",
        "DocumentReference:patient", "DocumentReference:subject",
        "Encounter:patient", "Encounter:subject", "Flag:patient", "Flag:subject",
        "Immunization:patient", "MedicationRequest:patient", "MedicationRequest:subject",
        "MedicationStatement:patient", "MedicationStatement:subject", "Observation:patient",
        "Observation:subject", "Procedure:patient", "Procedure:subject"]
    assert sorted(by_type["Practitioner"]["searchRevInclude"]) == [
        "AllergyIntolerance:recorder", "Condition:asserter", "DocumentReference:author",
        "Encounter:practitioner", "Flag:author", "Immunization:practitioner",
        "MedicationRequest:requester", "MedicationStatement:source", "Observation:performer",
        "Patient:general-practitioner", "PractitionerRole:practitioner", "Procedure:performer"]
    assert sorted(by_type["Encounter"]["searchRevInclude"]) == [
        "Condition:context", "Condition:encounter", "DocumentReference:encounter",
        "MedicationRequest:context", "Observation:context", "Observation:encounter",
        "Procedure:context", "Procedure:encounter"]
    assert "searchRevInclude" not in by_type["MedicationStatement"]
    assert "searchInclude" not in by_type["Organization"]


def test_unserved_targets_are_not_claimed(app: Starlette) -> None:
    registry = Registry(p for p in app.state.registry if p.resource_type != "Organization")
    served = set(MAPPINGS) - {"Organization"}
    by_type = resources(capability_statement(registry, BASE))
    assert set(by_type) == served | {"Binary"}
    without = Registry(p for p in app.state.registry if p.resource_type != "DocumentReference")
    assert "Binary" not in resources(capability_statement(without, BASE))
    # general-practitioner now has one served target: no per-type variants
    assert by_type["Patient"]["searchInclude"] == ["Patient:general-practitioner"]
    assert by_type["Location"]["searchInclude"] == ["Location:partof"]
    for rtype in served:
        assert by_type[rtype].get("searchInclude", []) == expected_includes(rtype, served)
        assert sorted(by_type[rtype].get("searchRevInclude", [])) == \
            expected_revincludes(rtype, served)
    # ... and what is not claimed is refused
    planned = registry.get("Patient")
    with pytest.raises(InvalidParameter, match="not supported"):
        registry.plan(planned, [("_id", "100001"),
                                ("_include", "Patient:general-practitioner:Organization")],
                      default_count=10, max_count=10, strict=True)


def test_policy_and_sort_are_documented(app: Starlette) -> None:
    by_type = resources(capability_statement(app.state.registry, BASE))
    patient = by_type["Patient"]["documentation"]
    assert "_sort supports: family, birthdate" in patient
    assert "at least 2 parameters of different types unless searching by identifier or _id" \
        in patient
    for rtype, doc in MAPPINGS.items():
        if not doc.get("sort"):  # nothing to sort by (PractitionerRole, Medication)
            assert "_sort supports" not in by_type[rtype].get("documentation", ""), rtype
            continue
        assert f"_sort supports: {', '.join(doc['sort'])} " in by_type[rtype]["documentation"]


# --- every claim works over HTTP ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(app: Starlette) -> Iterator[LiveServer]:
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url + "/STU3", timeout=15) as c:
        yield c


@pytest.fixture(scope="module")
def served(http: httpx.Client) -> dict[str, dict[str, Any]]:
    """The mapped types' claims (the terminology types': tests/gateway/terminology)."""
    r = http.get("/metadata")
    assert r.status_code == 200
    listed = resources(r.json())
    assert listed["Binary"]["interaction"] == [{"code": "read"}]  # not searchable
    return {t: r for t, r in listed.items() if t in MAPPINGS}


def search(http: httpx.Client, rtype: str, params: dict[str, str]) -> dict[str, Any]:
    r = http.get(f"/{rtype}", params=params)
    assert r.status_code == 200, (rtype, params, r.text)
    body: dict[str, Any] = r.json()
    assert body["resourceType"] == "Bundle" and body["type"] == "searchset"
    return body


def companion(rtype: str, ptype: str) -> dict[str, str]:
    """Satisfy Care Connect's two-parameters-of-different-types rule for Patient."""
    if rtype != "Patient":
        return {}
    return {"family": "smith"} if ptype == "token" else {"gender": "female"}


VALUES = {"string": "a", "token": "x", "date": "ge1900-01-01", "reference": "1",
          "quantity": "gt0"}


def test_metadata_renders_as_xml(http: httpx.Client, app: Starlette) -> None:
    r = http.get("/metadata", params={"_format": "xml"})
    assert r.status_code == 200
    root = etree.fromstring(r.content)
    assert root.tag == "{http://hl7.org/fhir}CapabilityStatement"
    terminology = sum(len(t.params) + 1 for t in app.state.registry.terminology_providers())
    assert len(root.findall(".//{http://hl7.org/fhir}searchParam")) == sum(
        len(m["search"]) + 1 for m in MAPPINGS.values()) + terminology


def test_every_claimed_search_parameter_works(http: httpx.Client,
                                              served: dict[str, dict[str, Any]]) -> None:
    tried = 0
    for rtype, entry in served.items():
        for p in entry["searchParam"]:
            name, ptype = p["name"], p["type"]
            value = "100001" if name == "_id" else VALUES[ptype]
            search(http, rtype, {name: value, **companion(rtype, ptype)})
            if name != "_id":
                found = search(http, rtype, {f"{name}:missing": "false", "_count": "1",
                                             **companion(rtype, ptype)})
                assert found.get("entry"), f"{rtype}.{name} matches nothing in the demo"
            tried += 1
    assert tried == sum(len(m["search"]) + 1 for m in MAPPINGS.values())


def test_every_claimed_sort_works(http: httpx.Client,
                                  served: dict[str, dict[str, Any]]) -> None:
    for rtype, entry in served.items():
        m = re.search(r"_sort supports: ([^(]+) \(", entry.get("documentation", ""))
        assert bool(m) == bool(MAPPINGS[rtype].get("sort")), rtype
        if m is None:
            continue
        for key in m.group(1).split(", "):
            for sort in (key, "-" + key):
                criteria = {"family": "smith", "gender": "female"} if rtype == "Patient" else {}
                search(http, rtype, {"_sort": sort, "_count": "3", **criteria})


def references(node: Any) -> set[str]:
    """Every ``reference`` string anywhere in a resource."""
    found: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "reference" and isinstance(v, str):
                found.add(v)
            else:
                found |= references(v)
    elif isinstance(node, list):
        for v in node:
            found |= references(v)
    return found


def split(bundle: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    entries = bundle.get("entry", [])
    return ([e["resource"] for e in entries if e["search"]["mode"] == "match"],
            [e["resource"] for e in entries if e["search"]["mode"] == "include"])


def test_every_claimed_include_works(http: httpx.Client,
                                     served: dict[str, dict[str, Any]]) -> None:
    tried = 0
    for rtype, entry in served.items():
        for inc in entry.get("searchInclude", []):
            _, param, *only = inc.split(":")
            spec = MAPPINGS[rtype]["search"][param]
            kinds = set(only) or {t for t in targets(spec) if t in served}
            bundle = search(http, rtype, {f"{param}:missing": "false", "_count": "10",
                                          "_include": inc, **companion(rtype, "reference")})
            matches, included = split(bundle)
            assert matches and included, inc
            referenced = set().union(*(references(m) for m in matches))
            for res in included:
                assert res["resourceType"] in kinds, inc
                assert f"{res['resourceType']}/{res['id']}" in referenced, inc
            tried += 1
    assert tried == sum(len(expected_includes(t, set(MAPPINGS))) for t in MAPPINGS)


def test_every_claimed_revinclude_works(http: httpx.Client,
                                        served: dict[str, dict[str, Any]]) -> None:
    tried = 0
    for rtype, entry in served.items():
        for rev in entry.get("searchRevInclude", []):
            source, param = rev.split(":")
            # A source resource that points at one of ours ...
            first = search(http, source, {f"{param}:missing": "false", "_count": "20",
                                          "_include": f"{source}:{param}:{rtype}",
                                          **companion(source, "reference")})
            matches, included = split(first)
            target = next(r for r in included if r["resourceType"] == rtype)
            pointing = {f"{source}/{m['id']}" for m in matches
                        if f"{rtype}/{target['id']}" in references(m)}
            assert pointing, rev
            # ... is found again by _revinclude from ours.
            back = search(http, rtype, {"_id": target["id"], "_revinclude": rev})
            (match,), revs = split(back)
            assert match["id"] == target["id"]
            got = {f"{r['resourceType']}/{r['id']}" for r in revs}
            assert pointing <= got, rev
            assert all(f"{rtype}/{target['id']}" in references(r) for r in revs), rev
            tried += 1
    assert tried == sum(len(expected_revincludes(t, set(MAPPINGS))) for t in MAPPINGS)


@pytest.mark.parametrize(("rtype", "params"), [
    ("Organization", {"_include": "Organization:partof"}),
    ("Patient", {"_id": "100001", "_include": "Patient:organization"}),
    ("Patient", {"_id": "100001", "_revinclude": "Location:organization"}),
    ("Encounter", {"_revinclude": "Patient:general-practitioner"}),
    ("Patient", {"_id": "100001", "_include": "Patient:general-practitioner:Location"}),
    ("Patient", {"_id": "100001", "colour": "red"}),
])
def test_what_is_not_claimed_is_refused(http: httpx.Client, served: dict[str, dict[str, Any]],
                                        rtype: str, params: dict[str, str]) -> None:
    entry = served[rtype]
    for key, value in params.items():
        if key == "_include":
            assert value not in entry.get("searchInclude", [])
        elif key == "_revinclude":
            assert value not in entry.get("searchRevInclude", [])
        elif not key.startswith("_"):
            assert key not in {p["name"] for p in entry["searchParam"]}
    r = http.get(f"/{rtype}", params=params, headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    code = r.json()["issue"][0]["details"]["coding"][0]["code"]
    assert code in {"INVALID_PARAMETER", "UNKNOWN_PARAMETER"}


def test_settings_public_base_url_is_the_implementation_url(demo_sqlite_url: str,
                                                            tmp_path: Path) -> None:
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path,
                                     public_base_url="https://fhir.trust.example/STU3/"))
    with LiveServer(app) as s, httpx.Client(base_url=s.url) as c:
        cs = c.get("/STU3/metadata").json()
    assert cs["implementation"]["url"] == "https://fhir.trust.example/STU3"


def test_the_clinical_types_are_listed_with_their_profiles(app: Starlette) -> None:
    by_type = resources(capability_statement(app.state.registry, BASE))
    for rtype in ("Condition", "AllergyIntolerance", "Flag", "Procedure", "PractitionerRole"):
        assert by_type[rtype]["profile"]["reference"] == (
            f"https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-{rtype}-1")
    # Care Connect's explore pages: every SHALL/SHOULD/MAY parameter is claimed.
    wanted = {"Condition": {"asserted-date", "category", "clinical-status", "patient"},
              "AllergyIntolerance": {"clinical-status", "date", "patient"},
              "Procedure": {"date", "patient", "subject"},
              "Flag": {"date", "patient", "status"},
              "PractitionerRole": {"identifier", "organization", "practitioner"}}
    for rtype, names in wanted.items():
        assert names <= {p["name"] for p in by_type[rtype]["searchParam"]}, rtype
