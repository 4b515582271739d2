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


PATIENT_PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"


@pytest.mark.parametrize(("start", "end"), [
    ("2021", "2020"),                                   # year
    ("2021-03", "2021-02"),                             # month
    ("2021-03-02", "2021-03-01"),                       # day: one day reversed
    ("2021", "2020-12-31"),                             # mixed precisions, wholly after
    ("2021-03-02T10:00:00+00:00", "2021-03-01"),        # a time after a whole day
    ("2021-03-01T10:00:01+00:00", "2021-03-01T10:00:00+00:00"),
])
async def test_a_reversed_period_fails_at_every_precision(
        client: httpx.AsyncClient, start: str, end: str) -> None:
    p = patient()
    p["address"] = [{"use": "home", "line": ["1 High Street"], "postalCode": "LS1 1AA",
                     "period": {"start": start, "end": end}}]
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(p), headers=JSON)
    found = [(i["severity"], i["expression"][0]) for i in issues(r)]
    assert ("error", "Patient.address[0].period") in found, found


@pytest.mark.parametrize(("start", "end"), [
    ("2021", "2021"), ("2021-03", "2021-03"), ("2021-03-01", "2021-03-01"),
    ("2020", "2021-01-01"), ("2021-03-01", "2021-03-01T10:00:00+00:00"),
    ("2021-03-01T10:00:00+00:00", "2021-03-01T10:00:00+00:00"),
    ("2021-03-01T10:00:00+01:00", "2021-03-01T09:30:00+00:00"),  # 09:00Z before 09:30Z
])
async def test_a_forward_or_overlapping_period_passes(
        client: httpx.AsyncClient, start: str, end: str) -> None:
    p = patient()
    p["address"] = [{"use": "home", "line": ["1 High Street"], "postalCode": "LS1 1AA",
                     "period": {"start": start, "end": end}}]
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(p), headers=JSON)
    assert issues(r)[0]["diagnostics"] == "All OK"


async def test_an_unknown_profile_is_an_error_naming_it(client: httpx.AsyncClient) -> None:
    unknown = "https://example.org/StructureDefinition/NoSuchProfile"
    params = {"resourceType": "Parameters", "parameter": [
        {"name": "resource", "resource": patient()}, {"name": "profile", "valueUri": unknown}]}
    for r in (await client.post("/STU3/Patient/$validate", content=orjson.dumps(params),
                                headers=JSON),
              await client.post("/STU3/Patient/$validate", params={"profile": unknown},
                                content=orjson.dumps(patient()), headers=JSON),
              await client.get("/STU3/Patient/100001/$validate", params={"profile": unknown})):
        [issue] = issues(r)
        assert issue["severity"] == "error" and issue["code"] == "not-supported"
        assert unknown in issue["diagnostics"] and PATIENT_PROFILE in issue["diagnostics"]
    # an R4-style canonical names the profile too; an empty one is not "no profile"
    for value in ({"valueCanonical": PATIENT_PROFILE}, {"valueString": ""}):
        params["parameter"][1] = {"name": "profile", **value}
        r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(params),
                              headers=JSON)
        expected = "All OK" if value.get("valueCanonical") else None
        assert (issues(r)[0]["diagnostics"] == "All OK") == (expected is not None)
    # a known profile in the URL is used: the Practitioner one does not fit a Patient
    r = await client.post("/STU3/Patient/$validate", content=orjson.dumps(patient()),
                          headers=JSON, params={"profile": PATIENT_PROFILE.replace(
                              "Patient", "Practitioner")})
    assert issues(r)[0]["severity"] == "error"


async def test_xml_elements_out_of_order_are_rejected(client: httpx.AsyncClient) -> None:
    # The gateway's own XML for a served Patient is in order, and validates clean ...
    served = await client.get("/STU3/Patient/100001", params={"_format": "xml"})
    assert served.status_code == 200
    xml = {"content-type": "application/fhir+xml"}
    r = await client.post("/STU3/Patient/$validate", content=served.content, headers=xml)
    assert [i for i in issues(r) if i["severity"] == "error"] == []
    # ... and with two siblings swapped, at the top and inside a name, it is not
    for a, b, where in ((b"<gender ", b"<birthDate ", "Patient.gender"),
                        (b"<use value=\"official\"/>", b"<family ", "Patient.name[0].use")):
        body = served.content
        i, j = body.index(a), body.index(b)
        end_a = body.index(b"/>", i) + 2
        end_b = body.index(b"/>", j) + 2
        assert end_a <= j, "the test swaps two adjacent empty elements"
        swapped = body[:i] + body[j:end_b] + body[end_a:j] + body[i:end_a] + body[end_b:]
        r = await client.post("/STU3/Patient/$validate", content=swapped, headers=xml)
        assert r.status_code == 422, r.text
        problem = r.json()["issue"][0]
        assert problem["expression"] == [where]
        assert "order" in problem["diagnostics"]
