"""The HL7 v2 adapter end to end: FHIR REST → gateway → MLLP → PAS simulator → FHIR.

Patient and Encounter come over HL7 v2 (mappings/demo-hl7v2), the rest over SQL, all from
one demo PAS database that the simulator fronts. Real TCP on loopback throughout.
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.settings import Settings

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings" / "demo-hl7v2"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
PAS = "https://fhir.demo-trust.nhs.uk/Id/pas-number"


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    path = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    return f"sqlite:///{path}"


# The simulator's dialect profile: demo unless a test asks for others (indirect parameter).
PROFILES = pytest.mark.parametrize("sim", ["demo", "itk", "strict"], indirect=True)
# What a trust declares for the strict PAS (native prefix matching, bare identifiers).
STRICT_DIALECT = {"wildcard": "none", "matching": "prefix", "identifier_qualifiers": False,
                  "new_patient_number": ["query"]}


@pytest.fixture
async def sim(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(db_url, dialect=getattr(request, "param", "demo")) as simulator:
        yield simulator


def _app(db_url: str, sim: PasSimulator, tmp_path: Path, **extra: Any) -> Any:
    settings = Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="test", log_level="warning",
        progress=False, auth_mode="insecure-demo",
        connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}, **extra,
    )
    app = build_app(settings)
    if sim.profile.name == "strict":
        from adapters.hl7v2.adapter import Dialect, Hl7v2Adapter

        for provider in app.state.registry:
            adapter = provider.mapping.adapter
            if isinstance(adapter, Hl7v2Adapter):
                adapter.dialect = Dialect.model_validate({**adapter.dialect.model_dump(),
                                                          **STRICT_DIALECT})
    return app


@pytest.fixture
async def api(db_url: str, sim: PasSimulator, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(db_url, sim, tmp_path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _code(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


def _oracle(db_url: str, where: str, **params: Any) -> set[str]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT "PASID" FROM "PATIENTS" WHERE {where}'), params)
            return {r[0] for r in rows}
    finally:
        engine.dispose()


async def test_read_by_pas_number_is_care_connect(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Patient/D0000001")
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["id"] == "D0000001"
    assert p["meta"]["profile"] == [
        "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"]
    nhs = next(i for i in p["identifier"] if i["system"] == NHS)
    assert nhs["value"] == "9990000018"
    assert nhs["extension"][0]["valueCodeableConcept"]["coding"][0]["code"] == "01"
    assert p["name"][0]["family"] == "Smith"
    assert p["name"][0]["given"] == ["Jane", "Elizabeth"]
    assert p["gender"] == "female" and p["birthDate"] == "1965-04-12"
    assert len(p["address"]) == 2
    assert {i["identifier"]["system"] for i in p["generalPractitioner"]} == {
        "https://fhir.hl7.org.uk/Id/gmp-number", "https://fhir.nhs.uk/Id/ods-organization-code"}


async def test_hl7_and_sql_agree_on_every_mapped_element(
    api: httpx.AsyncClient, db_url: str, tmp_path: Path
) -> None:
    from gateway.app import build_app as build

    sql_app = build(Settings(data_dir=tmp_path / "sql", paging_secret="t", log_level="warning",
                             progress=False, connection_urls={"pas": db_url},
                             auth_mode="insecure-demo"))
    async with sql_app.router.lifespan_context(sql_app):
        transport = httpx.ASGITransport(app=sql_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as sql:
            for refno, pasid in ((100001, "D0000001"), (100003, "D0000003"),
                                 (100004, "D0000004"), (100006, "D0000006")):
                a = (await sql.get(f"/STU3/Patient/{refno}")).json()
                b = (await api.get(f"/STU3/Patient/{pasid}")).json()
                for key in ("name", "gender", "birthDate", "telecom", "maritalStatus",
                            "extension"):
                    assert a.get(key) == b.get(key), (pasid, key)
                assert a.get("deceasedDateTime") == b.get("deceasedDateTime")
                # the PAS lists current addresses first; the SQL mapping by start date
                def by_start(x: dict[str, Any]) -> str:
                    return str(x.get("period", {}).get("start"))

                assert sorted(a["address"], key=by_start) == sorted(b["address"], key=by_start)
                nhs_a = [i for i in a["identifier"] if i["system"] == NHS]
                nhs_b = [i for i in b["identifier"] if i["system"] == NHS]
                assert nhs_a == nhs_b


@PROFILES
async def test_search_pages_through_continuation(api: httpx.AsyncClient, db_url: str) -> None:
    expected = _oracle(db_url, "\"SEXXX_CODE\" = '2' AND \"SURNAME\" LIKE 'S%' "
                               "AND \"ARCHV_FLAG\" = 'N'")
    assert len(expected) > 5
    got: list[str] = []
    url: str | None = "/STU3/Patient?family=s&gender=female&_count=4"
    pages = 0
    while url:
        r = await api.get(url)
        assert r.status_code == 200, r.text
        bundle = r.json()
        if pages == 0:
            assert bundle["total"] == len(expected)
        got += [e["resource"]["id"] for e in bundle.get("entry", [])]
        url = next((ln["url"] for ln in bundle["link"] if ln["relation"] == "next"), None)
        assert not any(ln["relation"] == "previous" for ln in bundle["link"])
        pages += 1
    assert sorted(got) == sorted(expected) and len(got) == len(set(got))
    assert pages > 1


@PROFILES
async def test_identifier_search_and_no_match(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Patient", params={"identifier": f"{NHS}|9990000018"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["D0000001"]
    r = await api.get("/STU3/Patient", params={"family": "zzzzqq", "gender": "male"})
    assert r.status_code == 200 and "entry" not in r.json() and r.json()["total"] == 0
    r = await api.get("/STU3/Patient", params={"identifier": f"{NHS}|9990000019"})
    assert r.status_code == 400 and _code(r) == "INVALID_NHS_NUMBER"


async def test_searches_hl7_cannot_express_are_400(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Patient", params={"family:contains": "mit", "gender": "female"})
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH"
    r = await api.get("/STU3/Patient", params={"family": "smith", "birthdate": "ge1960"})
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH"
    r = await api.get("/STU3/Patient", params={"family": "smith", "birthdate": "1965-04-12"})
    assert r.status_code == 200 and "D0000001" in [e["resource"]["id"] for e in r.json()["entry"]]


@PROFILES
async def test_encounters_by_patient_and_date(api: httpx.AsyncClient, db_url: str) -> None:
    r = await api.get("/STU3/Encounter", params={"patient": "Patient/D0000001"})
    assert r.status_code == 200, r.text
    entries = r.json()["entry"]
    assert entries
    for e in entries:
        enc = e["resource"]
        assert enc["subject"]["reference"] == "Patient/D0000001"
        assert enc["class"]["system"] == "http://hl7.org/fhir/v3/ActCode"
    first = entries[0]["resource"]
    r = await api.get(f"/STU3/Encounter/{first['id']}")
    assert r.status_code == 200 and r.json()["period"] == first["period"]
    start = first["period"]["start"][:10]
    r = await api.get("/STU3/Encounter", params={"patient": "D0000001", "date": f"ge{start}"})
    assert first["id"] in [e["resource"]["id"] for e in r.json()["entry"]]
    r = await api.get("/STU3/Encounter", params={"patient": "D0000001", "date": f"lt{start}"})
    assert first["id"] not in [e["resource"]["id"] for e in r.json().get("entry", [])]


async def test_capability_reflects_the_hl7_mapping(api: httpx.AsyncClient) -> None:
    cs = (await api.get("/STU3/metadata")).json()
    res = {r["type"]: r for r in cs["rest"][0]["resource"]}
    assert {i["code"] for i in res["Patient"]["interaction"]} == {
        "read", "search-type", "create", "update"}
    assert {i["code"] for i in res["Practitioner"]["interaction"]} == {"read", "search-type"}
    assert {p["name"] for p in res["Patient"]["searchParam"]} == {
        "_id", "identifier", "family", "given", "birthdate", "gender", "address-postalcode"}
    assert "searchInclude" not in res["Patient"]


NEW_PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "identifier": [{
        "system": NHS, "value": "9991234578",
        "extension": [{
            "url": "https://fhir.hl7.org.uk/STU3/StructureDefinition/"
                   "Extension-CareConnect-NHSNumberVerificationStatus-1",
            "valueCodeableConcept": {"coding": [{
                "system": "https://fhir.hl7.org.uk/STU3/CodeSystem/"
                          "CareConnect-NHSNumberVerificationStatus-1",
                "code": "01", "display": "Number present and verified"}]},
        }],
    }],
    "name": [{"use": "official", "family": "O'Connor", "given": ["Siobhán", "Mary"],
              "prefix": ["Ms"]}],
    "telecom": [{"system": "phone", "use": "mobile", "value": "07700 900123"}],
    "gender": "female",
    "birthDate": "1990-02-03",
    "address": [{"use": "home", "line": ["12 Park Row", "Headingley"], "city": "Leeds",
                 "postalCode": "LS6 2AA"}],
    "maritalStatus": {"coding": [{"system": "http://hl7.org/fhir/v3/MaritalStatus",
                                  "code": "S", "display": "Never Married"}]},
}


@PROFILES
async def test_create_round_trips_every_mapped_element(
    api: httpx.AsyncClient, sim: PasSimulator
) -> None:
    assert nhs_valid("9991234578")
    r = await api.post("/STU3/Patient", json=NEW_PATIENT,
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 201, r.text
    location = r.headers["location"]
    new_id = location.rsplit("/", 1)[1]
    assert sim.received  # the A28 went over MLLP
    back = (await api.get(f"/STU3/Patient/{new_id}")).json()
    assert back["name"][0]["family"] == "O'Connor"
    assert back["name"][0]["given"] == ["Siobhán", "Mary"]
    assert back["name"][0]["prefix"] == ["Ms"]
    assert back["gender"] == "female" and back["birthDate"] == "1990-02-03"
    assert back["telecom"] == NEW_PATIENT["telecom"]
    assert back["address"][0]["line"] == ["12 Park Row", "Headingley"]
    assert back["address"][0]["city"] == "Leeds"
    assert back["address"][0]["postalCode"] == "LS6 2AA"
    assert back["maritalStatus"]["coding"][0]["code"] == "S"
    assert next(i for i in back["identifier"] if i["system"] == NHS)["value"] == "9991234578"
    assert next(i for i in back["identifier"] if i["system"] == PAS)["value"] == new_id


@PROFILES
async def test_conditional_create_never_duplicates(api: httpx.AsyncClient, db_url: str) -> None:
    cond = {"If-None-Exist": f"identifier={NHS}|9991234578",
            "Content-Type": "application/fhir+json"}
    first = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=cond)
    again = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=cond)
    assert first.status_code == 201 and again.status_code == 200
    assert first.headers["location"] == again.headers["location"]
    assert len(_oracle(db_url, "\"NHS_NUMBER\" = '9991234578'")) == 1


async def test_lost_ack_is_never_resent_and_says_the_outcome_is_unknown(
    api: httpx.AsyncClient, sim: PasSimulator, db_url: str
) -> None:
    sim.faults.drop_count = 1  # the PAS applies the A28, then the ACK is lost
    r = await api.post("/STU3/Patient", json=NEW_PATIENT,
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 504 and _code(r) == "WRITE_OUTCOME_UNKNOWN", r.text
    assert len(sim.received) == 1  # an A28 is not resent: a PAS need not recognise MSH-10
    assert len(_oracle(db_url, "\"NHS_NUMBER\" = '9991234578'")) == 1


@PROFILES
async def test_update_changes_and_clears(api: httpx.AsyncClient) -> None:
    current = (await api.get("/STU3/Patient/D0000002")).json()
    changed = copy.deepcopy(current)
    changed["name"][0]["family"] = "Jones-Evans"
    changed.pop("telecom", None)
    r = await api.put("/STU3/Patient/D0000002", json=changed,
                      headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    back = (await api.get("/STU3/Patient/D0000002")).json()
    assert back["name"][0]["family"] == "Jones-Evans"
    assert "telecom" not in back
    r = await api.put("/STU3/Patient/D9999999", json={**changed, "id": "D9999999"},
                      headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 404


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (lambda p: p.update(gender="man"), "Patient.gender"),
        (lambda p: p["identifier"][0].update(value="9991234579"), "Patient.identifier[0].value"),
        (lambda p: p.update(photo=[{"url": "http://x/y.png"}]), "Patient.photo[0].url"),
        (lambda p: p["maritalStatus"]["coding"][0].update(code="Q"), "Patient.maritalStatus"),
    ],
)
async def test_invalid_writes_are_422_with_paths(
    api: httpx.AsyncClient, sim: PasSimulator, mutate: Any, path: str
) -> None:
    body = copy.deepcopy(NEW_PATIENT)
    mutate(body)
    before = len(sim.received)
    r = await api.post("/STU3/Patient", json=body,
                       headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 422, r.text
    issues = r.json()["issue"]
    assert any(path in (i.get("expression") or [""])[0] for i in issues), issues
    assert len(sim.received) == before  # nothing reached the PAS


async def test_pas_rejection_is_502_without_phi(api: httpx.AsyncClient, sim: PasSimulator
                                                ) -> None:
    sim.faults.nak_ae_count = 1
    r = await api.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
    assert r.status_code == 502 and _code(r) == "BACKEND_REJECTED"
    assert "smith" not in r.text.lower()


async def test_pas_timeout_is_504(db_url: str, sim: PasSimulator, tmp_path: Path) -> None:
    sim.faults.delay_seconds = 1.0
    sim.faults.delay_count = 10
    app = _app(db_url, sim, tmp_path)
    adapter = next(p.mapping.adapter for p in app.state.registry if p.resource_type == "Patient")
    adapter.client.reply_timeout = 0.2
    adapter.client.retries = 0
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient/D0000001")
    assert r.status_code == 504 and _code(r) == "BACKEND_TIMEOUT"


async def test_pas_down_is_503_with_retry_after(db_url: str, tmp_path: Path) -> None:
    async with PasSimulator(db_url) as simulator:
        port = simulator.port
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="t", log_level="warning",
        progress=False, connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{port}"},
        auth_mode="insecure-demo"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient/D0000001")
            ready = await c.get("/_ready")
    assert r.status_code == 503 and _code(r) == "BACKEND_UNAVAILABLE"
    assert r.headers["retry-after"]
    assert ready.status_code == 503 and ready.json()["checks"]["pas-hl7"] == "fail"


def nhs_valid(value: str) -> bool:
    from gateway.nhs_number import is_valid

    return is_valid(value)
