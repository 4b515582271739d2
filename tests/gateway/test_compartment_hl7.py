"""Patient-compartment enforcement over HL7 v2: the compartment travels in QPD-3 to the PAS.

Patient and Encounter come from the PAS simulator (mappings/demo-hl7v2); the patient link is
the PAS number (PID-3.1 with PID-3.5 = PI), so a patient/ token's searches carry
``@PID.3.1^<PAS number>~@PID.3.5^PI``, a read of another patient sends nothing at all, and
writes are confined to the token's own Patient.
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
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"
JSON = {"Content-Type": "application/fhir+json"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    path = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture
def people(db_url: str) -> dict[str, Any]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                'SELECT p."PASID", s."SPELL_NUMBER" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."ARCHV_FLAG" = \'N\'')).all()
    finally:
        engine.dispose()
    spells: dict[str, set[str]] = {}
    for pasid, spell in rows:
        spells.setdefault(pasid, set()).add(spell)
    ranked = sorted(spells, key=lambda p: (-len(spells[p]), p))
    p, q = ranked[0], ranked[1]
    return {"P": p, "Q": q, "p_spells": spells[p], "q_spells": spells[q]}


@pytest.fixture
async def sim(db_url: str) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(db_url) as simulator:
        yield simulator


@pytest.fixture
async def api(db_url: str, sim: PasSimulator, tmp_path: Path, people: dict[str, Any]
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="test", log_level="warning",
        progress=False, auth_mode="insecure-demo",
        connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
    install(app, {"P": patient_token(people["P"], "patient/*.*"),
                  "clinician": user_token()})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _spell_numbers(bundle: dict[str, Any]) -> set[str]:
    return {i["value"] for e in bundle.get("entry", [])
            if e["resource"]["resourceType"] == "Encounter"
            for i in e["resource"]["identifier"]}


async def test_encounter_search_carries_the_compartment_to_the_pas(
    api: httpx.AsyncClient, people: dict[str, Any]
) -> None:
    r = await api.get("/STU3/Encounter?date=ge1900-01-01", headers=as_("P"))
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert _spell_numbers(bundle) == people["p_spells"]
    assert {e["resource"]["subject"]["reference"] for e in bundle["entry"]} == {
        f"Patient/{people['P']}"}
    # no filter at all: the compartment alone is the query
    r = await api.get("/STU3/Encounter", headers=as_("P"))
    assert r.status_code == 200 and _spell_numbers(r.json()) == people["p_spells"]
    r = await api.get(f"/STU3/Encounter?patient={people['Q']}", headers=as_("P"))
    assert r.status_code == 200 and _spell_numbers(r.json()) == set()
    r = await api.get(f"/STU3/Encounter?patient={people['Q']}", headers=as_("clinician"))
    assert _spell_numbers(r.json()) == people["q_spells"]


async def test_reading_another_patient_sends_nothing(
    api: httpx.AsyncClient, sim: PasSimulator, people: dict[str, Any]
) -> None:
    before = len(sim.received)
    r = await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("P"))
    assert r.status_code == 404
    assert len(sim.received) == before  # a contradiction: answered without asking the PAS
    r = await api.get(f"/STU3/Patient/{people['P']}", headers=as_("P"))
    assert r.status_code == 200 and r.json()["id"] == people["P"]
    assert len(sim.received) == before + 1  # one Q21, still a key lookup


async def test_patient_searches_and_includes(api: httpx.AsyncClient,
                                             people: dict[str, Any]) -> None:
    theirs = (await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("clinician"))).json()
    r = await api.get(f"/STU3/Patient?family={theirs['name'][0]['family']}"
                      f"&gender={theirs['gender']}", headers=as_("P"))
    assert r.status_code == 200
    assert {e["resource"]["id"] for e in r.json().get("entry", [])} <= {people["P"]}
    r = await api.get(f"/STU3/Patient?_id={people['P']}&_revinclude=Encounter:patient",
                      headers=as_("P"))
    assert r.status_code == 200, r.text
    assert _spell_numbers(r.json()) == people["p_spells"]
    r = await api.get("/STU3/Encounter?_include=Encounter:patient", headers=as_("P"))
    assert {e["resource"]["id"] for e in r.json()["entry"]
            if e["resource"]["resourceType"] == "Patient"} == {people["P"]}


async def test_writes_are_confined_to_the_tokens_patient(
    api: httpx.AsyncClient, sim: PasSimulator, people: dict[str, Any]
) -> None:
    own = (await api.get(f"/STU3/Patient/{people['P']}", headers=as_("P"))).json()
    changed = copy.deepcopy(own)
    changed["name"][0]["family"] = "Compartment-Test"
    r = await api.put(f"/STU3/Patient/{people['P']}", json=changed,
                      headers={**JSON, **as_("P")})
    assert r.status_code == 200, r.text
    assert r.json()["name"][0]["family"] == "Compartment-Test"
    theirs = (await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("clinician"))).json()
    before = len(sim.received)
    r = await api.put(f"/STU3/Patient/{people['Q']}", json=theirs,
                      headers={**JSON, **as_("P")})
    assert r.status_code == 404
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers={**JSON, **as_("P")})
    assert r.status_code == 403 and r.json()["issue"][0]["details"]["coding"][0]["code"] == \
        "COMPARTMENT_FORBIDDEN"
    assert len(sim.received) == before  # nothing about the other patient reached the PAS


async def test_conditional_create_never_answers_with_another_patient(
    api: httpx.AsyncClient, sim: PasSimulator, people: dict[str, Any]
) -> None:
    theirs = (await api.get(f"/STU3/Patient/{people['Q']}", headers=as_("clinician"))).json()
    nhs = next(i["value"] for i in theirs["identifier"] if "nhs-number" in i["system"])
    before = len(sim.received)
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers={
        **JSON, **as_("P"),
        "If-None-Exist": f"identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"})
    assert r.status_code == 403, r.text  # not 200 with the other patient's record
    assert people["Q"] not in r.text and nhs not in r.text
    assert "Location" not in r.headers
    assert len(sim.received) <= before + 1  # at most the (confined) probe; no A28

