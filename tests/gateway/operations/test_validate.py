"""``$validate`` over HTTP (in-process), and the CapabilityStatement that now lists it."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest

from tests.gateway.profiles.resources import patient

pytestmark = pytest.mark.anyio
JSON = {"content-type": "application/fhir+json"}


def issues(r: httpx.Response) -> list[dict[str, Any]]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    out: list[dict[str, Any]] = body["issue"]
    return out


async def test_valid_resource_is_all_ok(client: httpx.AsyncClient) -> None:
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(patient()),
                          headers=JSON)
    assert issues(r) == [{"severity": "information", "code": "informational",
                          "diagnostics": "All OK"}]


async def test_invalid_resource_lists_issues_with_200(client: httpx.AsyncClient) -> None:
    p = patient()
    p["gender"] = "man"
    p["birthDate"] = "1965-13-01"
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(p), headers=JSON)
    found = {(i["severity"], i["code"], i["expression"][0]) for i in issues(r)}
    assert found == {("error", "code-invalid", "Patient.gender"),
                     ("error", "value", "Patient.birthDate")}
    assert "man" not in r.text.replace("CareConnect", "").replace("human", "")


async def test_parameters_body_and_instance_level(client: httpx.AsyncClient) -> None:
    p = patient()
    del p["name"]
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "mode", "valueCode": "update"}, {"name": "resource", "resource": p}]}
    r = await client.post("/STU3/Patient/100001/$validate", content=orjson.dumps(params),
                          headers=JSON)
    assert [i["expression"][0] for i in issues(r)] == ["Patient.name"]
    r = await client.post("/STU3/Patient/999/$validate", content=orjson.dumps(patient()),
                          headers=JSON)
    assert [i["expression"][0] for i in issues(r)] == ["Patient.id"]
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(
        {"resourceType": "Parameters", "parameter": []}), headers=JSON)
    assert issues(r)[0]["code"] == "required"


async def test_xml_body(client: httpx.AsyncClient) -> None:
    xml = (b'<Patient xmlns="http://hl7.org/fhir"><name><use value="official"/>'
           b'<family value="Smith"/></name><gender value="man"/></Patient>')
    r = await client.post("/STU3/Patient/$validate", content=xml,
                          headers={"content-type": "application/fhir+xml"})
    assert [(i["code"], i["expression"][0]) for i in issues(r)] == [
        ("code-invalid", "Patient.gender")]


async def test_wrong_type_and_methods(client: httpx.AsyncClient) -> None:
    r = await client.post("/STU3/Encounter/$validate", content=orjson.dumps(patient()),
                          headers=JSON)
    assert issues(r)[0]["code"] == "invalid"
    r = await client.get("/STU3/Patient/$validate")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = await client.post("/STU3/Nonsense/$validate", content=b"{}", headers=JSON)
    assert r.status_code == 404


async def test_get_validates_the_served_resource(client: httpx.AsyncClient) -> None:
    for path in ("Patient/100001", "Encounter/1", "Location/1", "Organization/1",
                 "Practitioner/1"):
        r = await client.get(f"/STU3/{path}/$validate")
        assert [i for i in issues(r) if i["severity"] == "error"] == [], path
    r = await client.get("/STU3/Patient/42/$validate")
    assert r.status_code == 404
    r = await client.get("/STU3/Patient/100001/$validate?_format=xml")
    assert r.status_code == 200 and r.text.lstrip().startswith("<")


async def test_capability_statement_lists_validate(client: httpx.AsyncClient) -> None:
    rest = (await client.get("/STU3/metadata")).json()["rest"][0]
    validate = {"name": "validate", "definition": {
        "reference": "http://hl7.org/fhir/OperationDefinition/Resource-validate"}}
    assert validate in rest["operation"]
