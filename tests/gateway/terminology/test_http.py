"""A client's journey over real HTTP (uvicorn, JWT): find a Care Connect ValueSet by url, read
it as XML as the explore page does, expand it, validate a code, translate a local code; what
the token's scopes allow and what the audit trail records."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from lxml import etree

from tests.conftest import LiveServer
from tests.gateway.auth.helpers import claims, code, jwks, jwt_app, rsa_key, sign

VS_URL = "https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-AdministrativeGender-1"


def test_terminology_journey_over_http(demo_sqlite_url: str, tmp_path: Path) -> None:
    key = rsa_key("rsa-term")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file)
    token = sign(key, claims("user/ValueSet.read user/ConceptMap.read"))
    auth = {"Authorization": f"Bearer {token}"}
    with LiveServer(app) as server, httpx.Client(base_url=server.url + "/STU3",
                                                 timeout=15) as http:
        r = http.get("/ValueSet", params={"url": VS_URL}, headers=auth)
        assert r.status_code == 200
        (entry,) = r.json()["entry"]
        vs_id = entry["resource"]["id"]
        r = http.get(f"/ValueSet/{vs_id}", headers={**auth, "Accept": "application/xml+fhir"})
        assert r.status_code == 200 and "xml" in r.headers["content-type"]
        root = etree.fromstring(r.content)
        assert root.tag == "{http://hl7.org/fhir}ValueSet"
        assert root.find("{http://hl7.org/fhir}url").get("value") == VS_URL
        r = http.get(f"/ValueSet/{vs_id}/$expand", params={"count": "2"}, headers=auth)
        assert [c["code"] for c in r.json()["expansion"]["contains"]] == ["male", "female"]
        r = http.post("/ValueSet/$validate-code", headers=auth, data={
            "url": VS_URL, "system": "http://hl7.org/fhir/administrative-gender",
            "code": "unknown"})
        assert r.json()["parameter"][0] == {"name": "result", "valueBoolean": True}
        r = http.get("/ConceptMap/sex/$translate", headers=auth, params={
            "code": "female", "system": "http://hl7.org/fhir/administrative-gender",
            "reverse": "true"})  # which local code the PAS uses for female
        assert r.json()["parameter"][:2] == [
            {"name": "result", "valueBoolean": True},
            {"name": "match", "part": [
                {"name": "equivalence", "valueCode": "equivalent"},
                {"name": "concept", "valueCoding": {
                    "system": "https://careconnect-gateway.github.io/fhir/CodeSystem/local/sex",
                    "code": "2"}},
                {"name": "source", "valueUri": server.url + "/STU3/ConceptMap/sex"}]}]
        # Scopes: a type the token does not name is refused; no token at all is 401.
        r = http.get("/CodeSystem/$lookup", headers=auth, params={
            "system": "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-EthnicCategory-1",
            "code": "A"})
        assert (r.status_code, code(r)) == (403, "ACCESS_DENIED")
        r = http.get(f"/ValueSet/{vs_id}")
        assert r.status_code == 401
        # A patient's token: terminology belongs to no patient, so it is served (while that
        # token still reads only its own patient's record).
        mine = {"Authorization": "Bearer " + sign(key, claims("patient/*.read",
                                                              patient="100001"))}
        assert http.get(f"/ValueSet/{vs_id}", headers=mine).status_code == 200
        assert http.get("/ValueSet/$expand", headers=mine,
                        params={"url": VS_URL}).status_code == 200
        assert http.get("/Patient/100001", headers=mine).status_code == 200
        assert http.get("/Patient/100002", headers=mine).status_code == 404
        # Not offered on terminology: recognised, 501 (not "unknown type").
        r = http.get(f"/ValueSet/{vs_id}/_history", headers=auth)
        assert (r.status_code, code(r)) == (501, "NOT_IMPLEMENTED")
    records = [json.loads(line) for line in
               (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()]
    seen = [(r["interaction"], r["resource_type"], r["outcome"]["result"]) for r in records]
    assert ("search-type", "ValueSet", "success") in seen
    assert ("read", "ValueSet", "success") in seen
    assert ("operation", "ValueSet", "success") in seen
    assert ("operation", "ConceptMap", "success") in seen
    assert ("operation", "CodeSystem", "denied") in seen
