"""ValueSets and CodeSystems: read, search, ``$expand``, ``$validate-code``, ``$lookup``,
checked against the published Care Connect XML in ../shared read here with lxml (not the
vendored JSON the gateway serves)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import httpx
import pytest
from lxml import etree

from tests.gateway.test_conformance import model_errors, schema, schema_errors

pytestmark = pytest.mark.anyio
__all__ = ["schema"]
F = "{http://hl7.org/fhir}"
VS = "https://fhir.hl7.org.uk/STU3/ValueSet/"
CS = "https://fhir.hl7.org.uk/STU3/CodeSystem/"


def _v(el: Any, tag: str) -> str | None:
    found = el.find(F + tag)
    return None if found is None else found.get("value")


def xml_codesystem(shared: Path, url: str) -> list[tuple[str, str, str | None]] | None:
    for path in (shared / "codesystems").glob("*.xml"):
        root = etree.parse(str(path)).getroot()
        if _v(root, "url") == url:
            return [(url, _v(c, "code") or "", _v(c, "display")) for c in root.iter(F + "concept")]
    return None


def xml_valueset(shared: Path, vs_id: str) -> etree._Element:
    return etree.parse(str(shared / "valuesets" / f"ValueSet-{vs_id}.xml")).getroot()


def xml_expansion(shared: Path, vs_id: str) -> list[tuple[str, str, str | None]] | None:
    """What the published XML says the ValueSet holds; None if it needs a filter or an import."""
    root = xml_valueset(shared, vs_id)
    out: list[tuple[str, str, str | None]] = []
    for inc in root.iter(F + "include"):
        if inc.find(F + "filter") is not None or inc.find(F + "valueSet") is not None:
            return None
        system = _v(inc, "system") or ""
        concepts = inc.findall(F + "concept")
        if concepts:
            held = {c: d for _, c, d in xml_codesystem(shared, system) or []}
            out += [(system, _v(c, "code") or "", _v(c, "display") or held.get(_v(c, "code") or ""))
                    for c in concepts]
        else:
            whole = xml_codesystem(shared, system)
            if whole is None:
                return None
            out += whole
    return out


def contains(body: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    return [(c["system"], c["code"], c.get("display"))
            for c in body["expansion"].get("contains", [])]


async def served_valuesets(fhir: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await fhir.get("/ValueSet", params={"_count": "500"})
    assert r.status_code == 200
    return [e["resource"] for e in r.json()["entry"]]


async def test_every_valueset_expands_as_its_xml_says_or_is_refused(
        fhir: httpx.AsyncClient, shared: Path, schema: dict[str, Any]) -> None:
    expanded = refused = 0
    for vs in await served_valuesets(fhir):
        assert schema_errors(vs) == [] and model_errors(vs) == []
        expected = xml_expansion(shared, vs["id"])
        r = await fhir.get(f"/ValueSet/{vs['id']}/$expand")
        if expected is None:
            assert r.status_code == 422, vs["id"]
            (issue,) = r.json()["issue"]
            assert issue["details"]["coding"][0]["code"] == "VALUESET_NOT_EXPANDABLE"
            refused += 1
            continue
        assert r.status_code == 200, r.text
        body = r.json()
        assert schema_errors(body) == [] and model_errors(body) == []
        assert contains(body) == expected and body["expansion"]["total"] == len(expected)
        expanded += 1
    assert expanded >= 20 and refused >= 10  # both kinds are really tried


@pytest.mark.parametrize("vs_id", ["CareConnect-EthnicCategory-1", "CareConnect-MaritalStatus-1"])
async def test_expand_pages_through_the_whole_set(fhir: httpx.AsyncClient, shared: Path,
                                                  vs_id: str) -> None:
    expected = xml_expansion(shared, vs_id)
    assert expected and len(expected) > 7
    walked: list[tuple[str, str, str | None]] = []
    offset = 0
    while True:
        r = await fhir.get(f"/ValueSet/{vs_id}/$expand",
                           params={"offset": str(offset), "count": "7"})
        body = r.json()
        assert body["expansion"]["total"] == len(expected)
        assert body["expansion"]["offset"] == offset
        page = contains(body)
        if not page:
            break
        assert len(page) <= 7
        walked += page
        offset += 7
    assert walked == expected


async def test_expand_filter_by_url(fhir: httpx.AsyncClient, shared: Path) -> None:
    expected = xml_expansion(shared, "CareConnect-EthnicCategory-1") or []
    for text in ("british", "Any other", "A", "zzz-nothing"):
        t = text.casefold()
        want = [c for c in expected
                if c[1].casefold().startswith(t) or t in (c[2] or "").casefold()]
        r = await fhir.get("/ValueSet/$expand", params={
            "url": VS + "CareConnect-EthnicCategory-1", "filter": text})
        assert r.status_code == 200
        assert contains(r.json()) == want and r.json()["expansion"]["total"] == len(want)
        assert {"name": "filter", "valueString": text} in r.json()["expansion"]["parameter"]
    british = [c for c in expected if "british" in (c[2] or "").casefold()]
    assert len(british) >= 3  # the filter is really narrowing


def result(body: dict[str, Any]) -> dict[str, Any]:
    assert body["resourceType"] == "Parameters", body
    assert schema_errors(body) == [] and model_errors(body) == []
    return {p["name"]: next(v for k, v in p.items() if k.startswith("value"))
            for p in body["parameter"]}


async def test_validate_code(fhir: httpx.AsyncClient, shared: Path,
                             schema: dict[str, Any]) -> None:
    expected = xml_expansion(shared, "CareConnect-AdministrativeGender-1") or []
    assert len(expected) == 4
    url = VS + "CareConnect-AdministrativeGender-1"
    for system, code, display in expected:
        r = await fhir.get("/ValueSet/$validate-code",
                           params={"url": url, "system": system, "code": code})
        assert result(r.json()) == {"result": True, "display": display}
        r = await fhir.get("/ValueSet/CareConnect-AdministrativeGender-1/$validate-code",
                           params={"system": system, "code": code, "display": "Wrong"})
        out = result(r.json())
        assert out["result"] is False and "display" in out["message"]
    r = await fhir.get("/ValueSet/$validate-code", params={
        "url": url, "system": "http://hl7.org/fhir/administrative-gender", "code": "nonsense"})
    out = result(r.json())
    assert out["result"] is False and "not in ValueSet" in out["message"]
    # The right code in the wrong system is not in the set.
    r = await fhir.get("/ValueSet/$validate-code", params={"url": url, "system": "urn:x",
                                                           "code": "male"})
    assert result(r.json())["result"] is False
    # A CodeableConcept in a Parameters body: valid if any coding is.
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "url", "valueUri": url},
        {"name": "codeableConcept", "valueCodeableConcept": {"coding": [
            {"system": "urn:x", "code": "m"},
            {"system": "http://hl7.org/fhir/administrative-gender", "code": "female"}]}}]}
    r = await fhir.post("/ValueSet/$validate-code", json=body,
                        headers={"Content-Type": "application/fhir+json"})
    assert result(r.json()) == {"result": True, "display": "Female"}
    # Not expandable here: not a silent false either.
    r = await fhir.get("/ValueSet/CareConnect-ConditionCode-1/$validate-code",
                       params={"system": "http://snomed.info/sct", "code": "44054006"})
    assert r.status_code == 422
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "VALUESET_NOT_EXPANDABLE"


async def test_lookup_every_code_of_a_codesystem(fhir: httpx.AsyncClient, shared: Path,
                                                 schema: dict[str, Any]) -> None:
    url = CS + "CareConnect-EthnicCategory-1"
    concepts = xml_codesystem(shared, url) or []
    assert len(concepts) > 20
    for _, code, display in concepts:
        r = await fhir.get("/CodeSystem/$lookup", params={"system": url, "code": code})
        assert r.status_code == 200
        out = result(r.json())
        assert out["display"] == display and out["name"] == "Care Connect Ethnic Category"
    r = await fhir.get("/CodeSystem/$lookup", params={"system": url, "code": "NOT-A-CODE"})
    assert (r.status_code, r.json()["issue"][0]["details"]["coding"][0]["code"]) == (
        404, "UNKNOWN_CODE")
    r = await fhir.get("/CodeSystem/$lookup", params={"system": "http://snomed.info/sct",
                                                      "code": "44054006"})
    assert r.status_code == 404
    r = await fhir.get("/CodeSystem/$lookup", params={"code": "A"})
    assert r.status_code == 400


async def test_read_and_search(fhir: httpx.AsyncClient, shared: Path) -> None:
    root = xml_valueset(shared, "CareConnect-AdministrativeGender-1")
    r = await fhir.get("/ValueSet/CareConnect-AdministrativeGender-1")
    assert r.status_code == 200
    vs = r.json()
    assert (vs["url"], vs["name"], vs["status"]) == (_v(root, "url"), _v(root, "name"),
                                                     _v(root, "status"))
    r = await fhir.get("/ValueSet", params={"url": _v(root, "url") or ""})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [
        "CareConnect-AdministrativeGender-1"]
    r = await fhir.get("/ValueSet", params={"name": "administrative"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [
        "CareConnect-AdministrativeGender-1"]
    r = await fhir.get("/ValueSet", params={"name:exact": "administrative gender"})
    assert r.json()["total"] == 0  # :exact is case-sensitive
    every = await served_valuesets(fhir)
    draft = [v for v in every if v["status"] == "draft"]
    r = await fhir.get("/ValueSet", params={"status": "draft", "_count": "500"})
    assert r.json()["total"] == len(draft) > 0
    r = await fhir.get("/CodeSystem", params={"code": CS + "CareConnect-EthnicCategory-1|A"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["CareConnect-EthnicCategory-1"]
    r = await fhir.get("/CodeSystem/CareConnect-NHSNumberVerificationStatus-1")
    assert [c["code"] for c in r.json()["concept"]] == [f"0{n}" for n in range(1, 9)]
    assert (await fhir.get("/ValueSet/no-such-thing")).status_code == 404
    r = await fhir.post("/ValueSet", json={"resourceType": "ValueSet"},
                        headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 405


async def test_search_pages_with_count_and_offset(fhir: httpx.AsyncClient) -> None:
    every = [v["id"] for v in await served_valuesets(fhir)]
    walked: list[str] = []
    url: str | None = "/ValueSet?_count=10"
    while url:
        r = await fhir.get(url)
        body = r.json()
        assert body["total"] == len(every)
        walked += [e["resource"]["id"] for e in body.get("entry", [])]
        url = next((lk["url"].removeprefix("http://gateway/STU3") for lk in body["link"]
                    if lk["relation"] == "next"), None)
    assert walked == every and len(every) > 20
    r = await fhir.get("/ValueSet", params={"_count": "x"})
    assert r.status_code == 400


async def walk(fhir: httpx.AsyncClient, url: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while url:
        body = (await fhir.get(url)).json()
        out += [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]
        url = next((lk["url"].removeprefix("http://gateway/STU3") for lk in body["link"]
                    if lk["relation"] == "next"), None)
    return out


async def test_search_sorts(fhir: httpx.AsyncClient) -> None:
    every = await served_valuesets(fhir)
    names = [v["name"] for v in every]
    by_name = await walk(fhir, "/ValueSet?_sort=name&_count=7")  # paged: the sort is kept
    assert [v["name"] for v in by_name] == sorted(names, key=str.casefold)
    assert [v["name"] for v in await walk(fhir, "/ValueSet?_sort=-name")] == sorted(
        names, key=str.casefold, reverse=True)
    assert sorted(names) != names or sorted(names, reverse=True) != names  # not a no-op
    # two keys: status, then url descending (ties of the first broken by the second)
    two = await walk(fhir, "/ValueSet?_sort=status,-url")
    expected = sorted(sorted(every, key=lambda v: v["url"], reverse=True),
                      key=lambda v: v["status"])
    assert [v["id"] for v in two] == [v["id"] for v in expected]
    cms = await walk(fhir, "/ConceptMap?_sort=-_id&name=s")
    assert [c["id"] for c in cms] == sorted((c["id"] for c in cms), reverse=True)
    assert len(cms) > 3
    codesystems = await walk(fhir, "/CodeSystem?_sort=-version,name")
    pairs = [(c["version"], c["name"].casefold()) for c in codesystems]
    for earlier, later in itertools.pairwise(pairs):
        assert earlier[0] > later[0] or (earlier[0] == later[0] and earlier[1] <= later[1])
    for bad in ("code", "nonsense", "-"):  # a multi-valued or unknown parameter
        r = await fhir.get("/CodeSystem", params={"_sort": bad})
        assert r.status_code == 400, bad
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "INVALID_PARAMETER"


async def test_lenient_search_says_what_it_ignored(fhir: httpx.AsyncClient) -> None:
    r = await fhir.get("/CodeSystem", params={"nonsense": "1"},
                       headers={"Prefer": "handling=lenient"})
    assert r.status_code == 200
    outcome = [e for e in r.json()["entry"] if e["search"]["mode"] == "outcome"]
    assert outcome[0]["resource"]["issue"][0]["details"]["coding"][0]["code"] == (
        "UNKNOWN_PARAMETER")


async def test_every_claimed_search_parameter_finds_what_it_describes(
        fhir: httpx.AsyncClient) -> None:
    statement = (await fhir.get("/metadata")).json()
    claimed = {r["type"]: r for r in statement["rest"][0]["resource"]
               if r["type"] in ("ConceptMap", "ValueSet", "CodeSystem")}
    assert set(claimed) == {"ConceptMap", "ValueSet", "CodeSystem"}
    assert {o["name"] for o in statement["rest"][0]["operation"]} >= {
        "translate", "expand", "validate-code", "lookup"}
    samples = {
        "ConceptMap": ("ctv3-snomed", {"url": "http://gateway/STU3/ConceptMap/ctv3-snomed",
                                       "name": "ctv3", "status": "active",
                                       "source-system": "http://read.info/ctv3",
                                       "target-system": "http://snomed.info/sct",
                                       "source-code": "X40J5", "target-code": "44054006"}),
        "ValueSet": ("CareConnect-EthnicCategory-1", {
            "url": VS + "CareConnect-EthnicCategory-1", "name": "Care Connect Ethnic",
            "status": "draft", "version": "1.1.0"}),
        "CodeSystem": ("CareConnect-EthnicCategory-1", {
            "url": CS + "CareConnect-EthnicCategory-1", "name": "Care Connect Ethnic",
            "status": "draft", "version": "1.1.0", "system": CS + "CareConnect-EthnicCategory-1",
            "code": "A"}),
    }
    for rtype, entry in claimed.items():
        assert [i["code"] for i in entry["interaction"]] == ["read", "search-type"]
        rid, values = samples[rtype]
        for p in entry["searchParam"]:
            value = rid if p["name"] == "_id" else values[p["name"]]
            r = await fhir.get(f"/{rtype}", params={p["name"]: value, "_count": "500"})
            assert r.status_code == 200, (rtype, p)
            assert rid in [e["resource"]["id"] for e in r.json().get("entry", [])], (rtype, p)
            r = await fhir.get(f"/{rtype}", params={p["name"]: "zz-matches-nothing"})
            assert r.json()["total"] == 0, (rtype, p)


def xml_definitions(shared: Path, url: str) -> dict[str, str]:
    for path in (shared / "codesystems").glob("*.xml"):
        root = etree.parse(str(path)).getroot()
        if _v(root, "url") == url:
            return {_v(c, "code") or "": _v(c, "definition") or ""
                    for c in root.iter(F + "concept") if _v(c, "definition")}
    return {}


def properties(body: dict[str, Any]) -> list[tuple[str, Any]]:
    out = []
    for p in body["parameter"]:
        if p["name"] == "property":
            parts = {q["name"]: next(v for k, v in q.items() if k.startswith("value"))
                     for q in p["part"]}
            out.append((parts["code"], parts["value"]))
    return out


async def test_lookup_gives_the_published_definitions(fhir: httpx.AsyncClient,
                                                      shared: Path) -> None:
    """The Care Connect CodeSystems are flat, with definitions on some concepts: $lookup
    returns each as the property ``definition`` — as the XML has it — and nothing else."""
    url = CS + "CareConnect-AdmissionMethod-1"
    definitions = xml_definitions(shared, url)
    assert len(definitions) > 10
    for code, text in definitions.items():
        r = await fhir.get("/CodeSystem/$lookup", params={"system": url, "code": code})
        assert properties(r.json()) == [("definition", text)], code
    other = CS + "CareConnect-EthnicCategory-1"  # no definitions published
    assert xml_definitions(shared, other) == {}
    r = await fhir.get("/CodeSystem/$lookup", params={"system": other, "code": "A"})
    assert r.status_code == 200 and properties(r.json()) == []
    r = await fhir.get("/CodeSystem/$lookup", params={"system": url, "code": "11",
                                                      "property": "parent"})
    assert properties(r.json()) == []  # asked for parent only: the definition is left out


# A CodeSystem with what the Care Connect ones lack: a hierarchy (nested and by property),
# designations, inactive and retired concepts, a property of its own.
EX = "http://example.org/fhir/CodeSystem/ops-test"
EX_VS = "http://example.org/fhir/ValueSet/ops-test"
RICH = {
    "valueSets": [{"resourceType": "ValueSet", "id": "ops-test", "url": EX_VS, "name": "OpsTest",
                   "status": "active", "compose": {"include": [{"system": EX}]}}],
    "codeSystems": [{
        "resourceType": "CodeSystem", "id": "ops-test", "url": EX, "name": "OpsTest",
        "version": "1", "status": "active", "content": "complete",
        "property": [{"code": "inactive", "type": "boolean"}, {"code": "order",
                                                              "type": "integer"}],
        "concept": [
            {"code": "A", "display": "Alpha", "definition": "The first.",
             "designation": [{"language": "en-GB", "value": "Alpha (GB)"},
                             {"language": "cy", "use": {"system": "http://snomed.info/sct",
                                                        "code": "900000000000013009"},
                              "value": "Alffa"}],
             "concept": [
                 {"code": "A1", "display": "Alpha one",
                  "property": [{"code": "inactive", "valueBoolean": True}]},
                 {"code": "A2", "display": "Alpha two",
                  "property": [{"code": "status", "valueCode": "retired"}]}]},
            {"code": "B", "display": "Beta",
             "property": [{"code": "parent", "valueCode": "A"},
                          {"code": "order", "valueInteger": 3}]}]}],
}


@pytest.fixture
async def rich(app: Any, fhir: httpx.AsyncClient) -> httpx.AsyncClient:
    from gateway.terminology.content import Catalogue

    held = Catalogue(RICH)
    registry = app.state.mappings.current.registry
    for rtype in ("ValueSet", "CodeSystem"):
        registry.terminology(rtype).catalogue = held
    return fhir


async def test_expand_active_only_designations_and_display_language(
        rich: httpx.AsyncClient) -> None:
    async def expand(**params: str) -> list[dict[str, Any]]:
        r = await rich.get("/ValueSet/$expand", params={"url": EX_VS, **params})
        assert r.status_code == 200, r.text
        return list(r.json()["expansion"]["contains"])

    assert [c["code"] for c in await expand()] == ["A", "A1", "A2", "B"]
    assert [c["code"] for c in await expand(activeOnly="true")] == ["A", "B"]
    plain = await expand()
    assert all("designation" not in c for c in plain)
    with_designations = await expand(includeDesignations="true")
    assert with_designations[0]["designation"] == RICH["codeSystems"][0][  # type: ignore[index]
        "concept"][0]["designation"]
    assert all("designation" not in c for c in with_designations[1:])
    welsh = await expand(displayLanguage="cy")
    assert [c["display"] for c in welsh] == ["Alffa", "Alpha one", "Alpha two", "Beta"]
    assert (await expand(displayLanguage="en"))[0]["display"] == "Alpha (GB)"  # en → en-GB
    r = await rich.get("/ValueSet/$expand", params={"url": EX_VS, "activeOnly": "yes"})
    assert r.status_code == 400


async def test_lookup_properties_of_a_hierarchy(rich: httpx.AsyncClient) -> None:
    async def lookup(code: str, *wanted: str) -> dict[str, Any]:
        r = await rich.get("/CodeSystem/$lookup", params=[
            ("system", EX), ("code", code), *(("property", w) for w in wanted)])
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    a = await lookup("A")
    # children by nesting (A1, A2) and by B's parent property
    assert properties(a) == [("definition", "The first."), ("child", "A1"), ("child", "A2"),
                             ("child", "B")]
    designations = [p for p in a["parameter"] if p["name"] == "designation"]
    assert [[q["name"] for q in d["part"]] for d in designations] == [
        ["language", "value"], ["language", "use", "value"]]
    assert properties(await lookup("A1")) == [("parent", "A"), ("inactive", True)]
    assert properties(await lookup("A2")) == [("parent", "A"), ("status", "retired")]
    assert properties(await lookup("B")) == [("parent", "A"), ("order", 3)]
    only = await lookup("A", "child")
    assert properties(only) == [("child", "A1"), ("child", "A2"), ("child", "B")]
    assert not [p for p in only["parameter"] if p["name"] == "designation"]
    assert [p["name"] for p in (await lookup("A", "designation"))["parameter"]] == [
        "name", "version", "display", "designation", "designation"]
