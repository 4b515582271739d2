"""ConceptMaps from the code maps and ``$translate``, checked against the YAML read here
independently (plain yaml.safe_load, not the gateway's loader)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.mapping.loader import load_codemaps
from gateway.terminology.conceptmaps import LOCAL_SYSTEM, UNMAPPED_POLICY, concept_map, translate
from tests.gateway.terminology.conftest import CODEMAPS
from tests.gateway.test_conformance import model_errors, schema, schema_errors

pytestmark = pytest.mark.anyio
__all__ = ["schema"]  # the fixture, shared


def yaml_maps() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted(CODEMAPS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        out[doc["name"]] = doc
    return out


def source_system(doc: dict[str, Any]) -> str:
    return str(doc.get("source_system") or f"{LOCAL_SYSTEM}/{doc['name']}")


def params(body: dict[str, Any]) -> tuple[bool, str | None, list[dict[str, Any]]]:
    assert body["resourceType"] == "Parameters"
    result = next(p["valueBoolean"] for p in body["parameter"] if p["name"] == "result")
    message = next((p["valueString"] for p in body["parameter"] if p["name"] == "message"), None)
    matches = [{part["name"]: next(v for k, v in part.items() if k.startswith("value"))
                for part in p["part"]} for p in body["parameter"] if p["name"] == "match"]
    return result, message, matches


async def test_every_code_map_is_a_valid_concept_map(fhir: httpx.AsyncClient,
                                                     schema: dict[str, Any]) -> None:
    maps = yaml_maps()
    r = await fhir.get("/ConceptMap", params={"_count": "500"})
    assert r.status_code == 200
    found = {e["resource"]["id"]: e["resource"] for e in r.json()["entry"]}
    assert r.json()["total"] == len(maps) and set(found) == set(maps)
    for name, doc in maps.items():
        cm = found[name]
        assert schema_errors(cm) == [] and model_errors(cm) == []
        assert (await fhir.get(f"/ConceptMap/{name}")).json() == cm
        (group,) = cm["group"]
        assert group["source"] == source_system(doc)
        assert group.get("target") == doc.get("target_system")
        policy = doc.get("unmapped", "omit")
        assert group["extension"] == [{"url": UNMAPPED_POLICY, "valueCode": policy}]
        if policy == "default":
            assert group["unmapped"]["mode"] == "fixed"
            assert group["unmapped"]["code"] == doc["default"]["code"]
        else:
            assert "unmapped" not in group
        listed = {str(k): v for k, v in doc["map"].items()}
        elements = {e["code"]: e["target"] for e in group["element"]}
        assert set(elements) == set(listed)
        for local, target in listed.items():
            (t,) = elements[local]
            if target is None:
                assert t["equivalence"] == "unmatched" and "code" not in t
            else:
                assert t["code"] == target["code"]
                shared_by = sum(1 for v in listed.values() if v and v["code"] == target["code"])
                assert t["equivalence"] == ("equivalent" if shared_by == 1 else "wider")


async def test_translate_forward_and_reverse_against_the_yaml(fhir: httpx.AsyncClient,
                                                             schema: dict[str, Any]) -> None:
    tried = 0
    for name, doc in yaml_maps().items():
        listed = {str(k): v for k, v in doc["map"].items()}
        for local, target in listed.items():
            r = await fhir.get(f"/ConceptMap/{name}/$translate",
                               params={"code": local, "system": source_system(doc)})
            assert r.status_code == 200, r.text
            assert schema_errors(r.json()) == [] and model_errors(r.json()) == []
            result, message, matches = params(r.json())
            if target is None:
                assert (result, matches) == (False, []) and "no target" in (message or "")
                continue
            assert result is True
            assert [m["concept"]["code"] for m in matches] == [target["code"]]
            assert matches[0]["concept"].get("system") == doc.get("target_system")
            tried += 1
        if not doc.get("target_system"):
            continue
        for code in {v["code"] for v in listed.values() if v}:
            expected = {k for k, v in listed.items() if v and v["code"] == code}
            r = await fhir.get(f"/ConceptMap/{name}/$translate",
                               params={"code": code, "system": doc["target_system"],
                                       "reverse": "true"})
            assert schema_errors(r.json()) == [] and model_errors(r.json()) == []
            result, message, matches = params(r.json())
            assert result is True
            assert {m["concept"]["code"] for m in matches} == expected
            assert {m["concept"]["system"] for m in matches} == {source_system(doc)}
            if len(expected) > 1:  # ambiguity: every candidate, said so
                assert "ambiguous" in (message or "")
                assert {m["equivalence"] for m in matches} == {"narrower"}
            else:
                assert message is None and matches[0]["equivalence"] == "equivalent"
            tried += 1
    assert tried > 300


async def test_an_unlisted_code_follows_the_unmapped_policy(fhir: httpx.AsyncClient) -> None:
    seen = set()
    for name, doc in yaml_maps().items():
        policy = doc.get("unmapped", "omit")
        r = await fhir.get(f"/ConceptMap/{name}/$translate",
                           params={"code": "NOT-A-LOCAL-CODE", "system": source_system(doc)})
        result, message, matches = params(r.json())
        if policy == "default":
            assert result is True and [m["concept"]["code"] for m in matches] == [
                doc["default"]["code"]]
            assert matches[0]["equivalence"] == "inexact" and "default" in (message or "")
        else:
            assert (result, matches) == (False, [])
            assert f"unmapped policy {policy}" in (message or "")
        seen.add(policy)
    assert seen == {"omit", "error"}  # the demo has no default map: the next test makes one


def test_a_default_policy_is_a_fixed_unmapped_and_an_inexact_match(
        tmp_path: Path, schema: dict[str, Any]) -> None:
    (tmp_path / "m.yaml").write_text(
        "name: marital\nsource: test\ntarget_system: http://hl7.org/fhir/v3/MaritalStatus\n"
        "unmapped: default\ndefault: {code: UNK, display: unknown}\n"
        "map:\n  M: {code: M, display: Married}\n  W: {code: W}\n  X: null\n",
        encoding="utf-8")
    problems: list[Any] = []
    cmap = load_codemaps(tmp_path, problems)["marital"]
    assert problems == []
    cm = concept_map(cmap, "http://g")
    assert schema_errors(cm) == [] and model_errors(cm) == []
    assert cm["group"][0]["unmapped"] == {"mode": "fixed", "code": "UNK", "display": "unknown"}
    result, message, matches = params(translate(cmap, "Q", False, "http://g"))
    assert result and message and [(m["equivalence"], m["concept"]["code"]) for m in matches] == [
        ("inexact", "UNK")]
    # The default is produced only for unlisted codes: reversed, no local code gives it.
    result, message, matches = params(translate(cmap, "UNK", True, "http://g"))
    assert (result, matches) == (False, []) and "default" in (message or "")
    # Listed with no target: not translated, whatever the policy.
    result, _, matches = params(translate(cmap, "X", False, "http://g"))
    assert (result, matches) == (False, [])


async def test_type_level_translate_finds_the_map_by_system(fhir: httpx.AsyncClient) -> None:
    doc = yaml_maps()["ctv3-snomed"]
    assert doc["source_system"] == "http://read.info/ctv3"
    r = await fhir.get("/ConceptMap/$translate", params={
        "system": "http://read.info/ctv3", "code": "X40J5",
        "targetsystem": "http://snomed.info/sct"})
    result, _, matches = params(r.json())
    assert result and [m["concept"]["code"] for m in matches] == [doc["map"]["X40J5"]["code"]]
    assert matches[0]["source"].endswith("/ConceptMap/ctv3-snomed")
    # The same code as Read v2 is a different system: a different map answers.
    r = await fhir.get("/ConceptMap/$translate", params={
        "system": "http://read.info/readv2", "code": "G20..", "targetsystem":
        "http://snomed.info/sct"})
    result, _, matches = params(r.json())
    assert result and matches[0]["source"].endswith("/ConceptMap/readv2-snomed")
    # By url, with the code as a Coding in a Parameters body.
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri": "http://gateway/STU3/ConceptMap/ctv3-snomed"},
        {"name": "coding", "valueCoding": {"system": "http://read.info/ctv3", "code": "X40J4"}}]}
    r = await fhir.post("/ConceptMap/$translate", json=body,
                        headers={"Content-Type": "application/fhir+json"})
    result, _, matches = params(r.json())
    assert result and matches[0]["concept"]["code"] == doc["map"]["X40J4"]["code"]
    # No map from that system: false with a message, not an error.
    r = await fhir.get("/ConceptMap/$translate", params={"system": "urn:nothing", "code": "x"})
    result, message, matches = params(r.json())
    assert (result, matches) == (False, []) and message


@pytest.mark.parametrize("parameter", [
    5,  # not a list
    [{"name": "coding", "valueCoding": {}}],  # a Coding without a code (was a KeyError)
    [{"name": "coding", "valueCoding": {"system": "http://read.info/ctv3", "code": None}}],
    [{"name": "coding", "valueCoding": {"system": "http://read.info/ctv3", "code": ["X40J4"]}}],
    [{"name": "coding", "valueCoding": {"system": 7, "code": "X40J4"}}],
    [{"name": "codeableConcept", "valueCodeableConcept": {"coding": 1.5}}],
    [{"name": "codeableConcept", "valueCodeableConcept": {"coding": [7]}}],
])
async def test_translate_refuses_parameters_of_the_wrong_type(fhir: httpx.AsyncClient,
                                                              parameter: Any) -> None:
    """A 400 (BAD_REQUEST), never a 500 nor a code made of the Python text of what was sent
    ("None", "['X40J4']")."""
    body = {"resourceType": "Parameters", "parameter": parameter}
    for op in ("/ConceptMap/$translate", "/ValueSet/$validate-code", "/CodeSystem/$lookup"):
        r = await fhir.post(op, json=body, headers={"Content-Type": "application/fhir+json"})
        assert r.status_code == 400, (op, r.text)
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome"
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == "BAD_REQUEST"


VS = "https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-"


async def test_translate_into_a_target_value_set(fhir: httpx.AsyncClient) -> None:
    """``target``: only translations into the ValueSet's codes count (the one the profile
    binds: Patient.gender to CareConnect-AdministrativeGender-1)."""
    gender = VS + "AdministrativeGender-1"
    doc = yaml_maps()["sex"]
    for local, target in doc["map"].items():
        r = await fhir.get("/ConceptMap/sex/$translate", params={"code": local,
                                                                   "target": gender})
        result, message, matches = params(r.json())
        assert result and message is None, (local, message)
        assert [m["concept"]["code"] for m in matches] == [target["code"]]
    # the same code into a ValueSet of another system: no translation, and why
    r = await fhir.get("/ConceptMap/sex/$translate", params={
        "code": "2", "target": VS + "EthnicCategory-1"})
    result, message, matches = params(r.json())
    assert (result, matches) == (False, []) and "not in the target ValueSet" in (message or "")
    # at type level with targetsystem and target together, as a Parameters body
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "coding", "valueCoding": {"system": source_system(doc), "code": "1"}},
        {"name": "targetsystem", "valueUri": "http://hl7.org/fhir/administrative-gender"},
        {"name": "target", "valueUri": gender}]}
    r = await fhir.post("/ConceptMap/$translate", json=body,
                        headers={"Content-Type": "application/fhir+json"})
    result, _, matches = params(r.json())
    assert result and [m["concept"]["code"] for m in matches] == ["male"]
    # reversed, the answers are local codes: never in a published ValueSet
    r = await fhir.get("/ConceptMap/sex/$translate", params={
        "code": "female", "reverse": "true", "target": gender})
    result, message, matches = params(r.json())
    assert (result, matches) == (False, []) and message


@pytest.mark.parametrize(("path", "query", "status", "code"), [
    ("/ConceptMap/$translate", {"code": "x"}, 400, "BAD_REQUEST"),
    ("/ConceptMap/$translate", {"system": "http://read.info/ctv3"}, 400, "BAD_REQUEST"),
    ("/ConceptMap/nope/$translate", {"code": "x", "system": "s"}, 404, "RESOURCE_NOT_FOUND"),
    ("/ConceptMap/$translate", {"url": "http://x/none", "code": "x"}, 404, "RESOURCE_NOT_FOUND"),
    ("/ConceptMap/ctv3-snomed/$translate", {"code": "x", "reverse": "maybe"}, 400,
     "BAD_REQUEST"),
    ("/ConceptMap/ctv3-snomed/$translate", {"code": "x", "target": "http://vs"}, 404,
     "RESOURCE_NOT_FOUND"),  # a target ValueSet not held here
    ("/ConceptMap/ctv3-snomed/$translate", {"code": "x", "dependency": "y"}, 400,
     "BAD_REQUEST"),  # the code maps have no dependsOn
    # a SNOMED CT ValueSet defined by a filter: membership cannot be known here
    ("/ConceptMap/ctv3-snomed/$translate", {"code": "X40J5", "target": VS + "VaccineCode-1"},
     422, "VALUESET_NOT_EXPANDABLE"),
    ("/ConceptMap/nope", {}, 404, "RESOURCE_NOT_FOUND"),
    ("/ConceptMap", {"nonsense": "1"}, 400, "UNSUPPORTED_SEARCH"),  # strict by default
])
async def test_translate_errors(fhir: httpx.AsyncClient, path: str, query: dict[str, str],
                                status: int, code: str | None) -> None:
    r = await fhir.get(path, params=query)
    assert r.status_code == status, r.text
    if code:
        (issue,) = r.json()["issue"]
        assert issue["details"]["coding"][0]["code"] == code
