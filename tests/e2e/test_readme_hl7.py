"""The README's HL7 v2 demo, as written: its create example works, the obvious smaller body
gets a 422 that says what to add, and what it says about ids and archived patients holds."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import build_app
from gateway.settings import Settings

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[2]
JSON = {"content-type": "application/fhir+json"}


def readme_create_body() -> dict[str, Any]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"-d '(\{\"resourceType\": \"Patient\".*?\})' \\", text)
    assert match, "the README's HL7 demo create example is gone"
    body: dict[str, Any] = json.loads(match.group(1))
    return body


@pytest.fixture
async def hl7_demo(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.demo_pas.hl7v2 import PasSimulator

    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=50, progress=False)
    async with PasSimulator(f"sqlite:///{db}") as sim:
        app = build_app(Settings(
            mappings_dir=REPO / "mappings" / "demo-hl7v2", data_dir=tmp_path,
            paging_secret="t", log_level="warning", progress=False, auth_mode="insecure-demo",
            connection_urls={"pas": f"sqlite:///{db}",
                             "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                yield c


async def test_the_readme_create_example_works(hl7_demo: httpx.AsyncClient) -> None:
    body = readme_create_body()
    r = await hl7_demo.post("/STU3/Patient", json=body, headers=JSON)
    assert r.status_code == 201, r.text
    new_id = r.headers["location"].rsplit("/", 1)[1]
    back = (await hl7_demo.get(f"/STU3/Patient/{new_id}")).json()
    assert back["name"][0]["family"] == "Example" and back["birthDate"] == "1990-02-03"


async def test_the_obvious_smaller_body_says_what_to_add(hl7_demo: httpx.AsyncClient) -> None:
    body = readme_create_body()
    del body["name"][0]["use"]
    r = await hl7_demo.post("/STU3/Patient", json=body, headers=JSON)
    assert r.status_code == 422
    issues = r.json()["issue"]
    assert {i["details"]["coding"][0]["code"] for i in issues} == {"INVALID_RESOURCE"}
    by_path = {i["expression"][0]: i["diagnostics"] for i in issues}
    assert 'add "use"' in by_path["Patient.name[0].use"]
    assert "official" in by_path["Patient.name[0].use"]
    assert 'add an item to name with "use": "official"' in by_path["Patient.name"]


async def test_ids_are_pas_numbers_and_archived_patients_are_hidden(
        hl7_demo: httpx.AsyncClient) -> None:
    r = await hl7_demo.get("/STU3/Patient/D0000001")
    assert r.status_code == 200
    assert r.json()["name"][0]["family"] == "Smith"  # Patient/100001 in the SQL demo
    assert (await hl7_demo.get("/STU3/Patient/100001")).status_code in (400, 404)
    assert (await hl7_demo.get("/STU3/Patient/D0000004")).status_code == 200
    archived = await hl7_demo.get("/STU3/Patient/D0000005")  # 100005, archived duplicate
    assert archived.status_code == 404


def readme_admission_message() -> dict[str, Any]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"--data '(\{\"resourceType\": \"Bundle\".*?admit-inpatient.*?\})' \\",
                      text, re.DOTALL)
    assert match, "the README's admission message example is gone"
    body: dict[str, Any] = json.loads(match.group(1))
    return body


async def test_the_readme_admission_message_example_works(hl7_demo: httpx.AsyncClient
                                                          ) -> None:
    r = await hl7_demo.post("/STU3/$process-message", json=readme_admission_message(),
                            headers=JSON)
    assert r.status_code == 200, r.text
    header = r.json()["entry"][0]["resource"]
    assert header["response"]["code"] == "ok", r.text
    spell = header["focus"][0]["reference"].removeprefix("Encounter/")
    found = (await hl7_demo.get("/STU3/Encounter", params={"patient": "D0000001"})).json()
    assert spell in [e["resource"]["id"] for e in found["entry"]]
    # the same admission by REST: POST /Encounter is an ADT^A01 too
    encounter = readme_admission_message()["entry"][1]["resource"]
    encounter["period"]["start"] = "2026-12-06T10:00:00Z"
    r = await hl7_demo.post("/STU3/Encounter", json=encounter, headers=JSON)
    assert r.status_code == 201, r.text
    new = r.headers["location"].rsplit("/", 1)[1]
    back = (await hl7_demo.get(f"/STU3/Encounter/{new}")).json()
    assert back["subject"]["reference"] == "Patient/D0000001"


def readme_registration_message() -> dict[str, Any]:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    match = re.search(r"saved as\n`registration-message.json`:\n\n(.*?)\n\n", text, re.DOTALL)
    assert match, "the README's registration-message.json is gone"
    body: dict[str, Any] = json.loads(match.group(1))
    return body


async def test_the_readme_registration_message_works_and_is_applied_once(
        hl7_demo: httpx.AsyncClient) -> None:
    message = readme_registration_message()
    answers = []
    for _ in range(2):
        r = await hl7_demo.post("/STU3/$process-message", json=message, headers=JSON)
        assert r.status_code == 200, r.text
        header = r.json()["entry"][0]["resource"]
        assert header["response"]["code"] == "ok", r.text
        answers.append(header["focus"][0]["reference"])
    assert answers[0] == answers[1] and answers[0].startswith("Patient/D")
    back = (await hl7_demo.get(f"/STU3/{answers[0]}")).json()
    assert back["name"][0]["family"] == "Example" and back["birthDate"] == "1985-04-12"
