"""An admission notification by FHIR message: ``admit-inpatient`` → ADT^A01 to the PAS, over
real HTTP (uvicorn) and real MLLP, against the PAS simulator in each of its dialects: one
that names the new spell in its ACK (``demo``), one with plain ACKs (``itk``: the gateway
finds the spell by a visit query) and one that takes no A01 (``strict``: AR, a fatal-error
response message, never a 500).

The oracle for "applied once" is the PAS's own PROVIDER_SPELLS table, read with plain SQL.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa

from adapters.hl7v2.mllp_server import Reply
from gateway.app import build_app
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.conftest import LiveServer
from tests.e2e.conftest import settings
from tests.e2e.test_messaging import EVENTS, NHS, response_of

pytestmark = pytest.mark.anyio

PATIENT = "D0000001"  # the demo's first patient (NHS number 9990000018)
LONDON = ZoneInfo("Europe/London")


def days_ago(days: int, hour: int, minute: int = 0) -> dt.datetime:
    """A past instant (a spell admitted then is in progress, not planned)."""
    day = dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    return day.replace(hour=hour, minute=minute, second=0, microsecond=0)
SPELL_SYSTEM = "https://fhir.demo-trust.nhs.uk/Id/spell-number"


def admission(subject: str, start: str) -> dict[str, Any]:
    """An inpatient admission as a client sends it (CareConnect-Encounter-1)."""
    return {
        "resourceType": "Encounter", "status": "in-progress",
        "class": {"system": "http://hl7.org/fhir/v3/ActCode", "code": "IMP",
                  "display": "inpatient encounter"},
        "type": [{"coding": [{"system": "https://fhir.nhs.uk/STU3/CodeSystem/Specialty-1",
                              "code": "320"}]}],
        "subject": {"reference": subject},
        "participant": [{
            "type": [{"coding": [{"system": "http://hl7.org/fhir/v3/ParticipationType",
                                  "code": "CON", "display": "consultant"}]}],
            "individual": {"identifier": {"system": "https://fhir.hl7.org.uk/Id/gmc-number",
                                          "value": "2000013"}}}],
        "period": {"start": start},
        "hospitalization": {"admitSource": {"coding": [{
            "system": "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-SourceOfAdmission-1",
            "code": "19"}]}},
        "location": [{"location": {"identifier": {
            "system": "https://fhir.demo-trust.nhs.uk/Id/location-code", "value": "W10"}}}],
    }


def admit_message(mid: str, encounter: dict[str, Any],
                  patient: dict[str, Any] | None = None) -> dict[str, Any]:
    entries: list[dict[str, Any]] = [
        {"fullUrl": f"urn:uuid:{mid}", "resource": {
            "resourceType": "MessageHeader", "id": mid,
            "event": {"system": EVENTS, "code": "admit-inpatient"},
            "timestamp": "2026-12-07T09:31:00+00:00",
            "source": {"endpoint": "https://bed-manager.example.nhs.uk/fhir"},
            "focus": [{"reference": "urn:uuid:encounter-1"}]}},
        {"fullUrl": "urn:uuid:encounter-1", "resource": encounter}]
    if patient is not None:
        entries.append({"fullUrl": "urn:uuid:patient-1", "resource": patient})
    return {"resourceType": "Bundle", "type": "message", "entry": entries}


def spells(url: str, pasid: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(sa.text(
            'SELECT s."SPELL_NUMBER", s."ADMIT_DTTM", s."SPELL_STATUS", s."PATCL_CODE", '
            'l."LOCTN_CODE" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p ON p."PATNT_REFNO" = '
            's."PATNT_REFNO" LEFT JOIN "LOCATIONS" l ON l."LOCTN_REFNO" = s."LOCTN_REFNO" '
            'WHERE p."PASID" = :p ORDER BY s."PRVSP_REFNO"'), {"p": pasid}).all()
    engine.dispose()
    return [tuple(r) for r in found]


class A01s:
    """The simulator's MLLP handler, counting A01s; ``late`` applies the next one and
    answers after the gateway stopped waiting."""

    def __init__(self, sim: PasSimulator) -> None:
        self.handler = sim._server.handler
        self.count = 0
        self.late = False

    async def __call__(self, data: bytes) -> bytes | Reply | None:
        reply = await self.handler(data)
        if b"ADT^A01" not in data:
            return reply
        self.count += 1
        if self.late:
            self.late = False
            return Reply(reply if isinstance(reply, bytes) else None, delay=1.5)
        return reply


@pytest.fixture(params=["demo", "itk", "strict"])
async def gw(request: pytest.FixtureRequest, pas_url: str, tmp_path: Path
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str, A01s, str]]:
    url = pas_url
    async with PasSimulator(url, dialect=request.param) as sim:
        a01s = A01s(sim)
        sim._server.handler = a01s
        app = build_app(settings(tmp_path, url, sim.port))
        for p in app.state.registry:
            if p.resource_type == "Encounter":
                adapter = p.mapping.adapter
        adapter.client.reply_timeout = 1.0
        adapter.options = adapter.options.model_copy(update={"deadline": 3.0})
        with LiveServer(app) as server:
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                yield c, url, a01s, request.param


async def test_an_admission_is_an_a01_and_the_spell_is_searchable(
        gw: tuple[httpx.AsyncClient, str, A01s, str]) -> None:
    c, url, a01s, dialect = gw
    before = spells(url, PATIENT)
    start = days_ago(1, 9, 30)
    msg = admit_message("msg-adm-1", admission(f"Patient/{PATIENT}", start.isoformat()))
    r = await c.post("/$process-message", json=msg)
    assert r.status_code == 200, r.text
    code, errors = response_of(r.json())
    assert a01s.count == 1
    if dialect == "strict":  # this PAS takes no A01: refused, reported, nothing applied
        assert (code, errors) == ("fatal-error", ["BACKEND_REJECTED"])
        assert spells(url, PATIENT) == before
        again = await c.post("/$process-message", json=msg)
        assert again.content == r.content and a01s.count == 1
        return
    assert (code, errors) == ("ok", []), r.text
    after = spells(url, PATIENT)
    assert len(after) == len(before) + 1
    number, admitted, status, patcl, ward = after[-1]
    # the PAS keeps local (London) time
    local = start.astimezone(LONDON).strftime("%Y%m%d%H%M")
    assert (admitted, status, patcl, ward) == (local, "A", "1", "W10")
    focus = r.json()["entry"][0]["resource"]["focus"][0]["reference"]
    assert focus == f"Encounter/{number}"  # learned from the ACK (demo) or a ZV1 (itk)
    # visible afterwards through the gateway, as any spell of the demo
    found = (await c.get("/Encounter", params={"patient": PATIENT})).json()
    mine = [e["resource"] for e in found.get("entry", ())
            if e["resource"]["id"] == number]
    assert len(mine) == 1, found
    enc = mine[0]
    assert enc["status"] == "in-progress" and enc["class"]["code"] == "IMP"
    assert dt.datetime.fromisoformat(enc["period"]["start"]) == start
    assert enc["identifier"] == [{"system": SPELL_SYSTEM, "value": number}]
    assert enc["subject"]["reference"] == f"Patient/{PATIENT}"
    # the same message again: answered the same, not applied again
    again = await c.post("/$process-message", json=msg)
    assert again.content == r.content
    assert a01s.count == 1 and spells(url, PATIENT) == after


@pytest.mark.parametrize("gw", ["demo", "itk"], indirect=True)  # the strict PAS takes no A01
async def test_the_patient_carried_in_the_message_and_an_unknown_outcome(
        gw: tuple[httpx.AsyncClient, str, A01s, str]) -> None:
    """The Encounter's subject is the message's own Patient (urn:uuid, NHS number only): the
    gateway finds the PAS's record. The PAS applies the A01 and answers too late: reported
    unknown (never failed), and the resend is applied once."""
    c, url, a01s, dialect = gw
    assert dialect != "strict"
    before = spells(url, PATIENT)
    patient = {"resourceType": "Patient",
               "identifier": [{"system": NHS, "value": "9990000018"}]}
    msg = admit_message("msg-adm-2", admission("urn:uuid:patient-1",
                                               days_ago(2, 14, 5).isoformat()), patient)
    a01s.late = True
    r = await c.post("/$process-message", json=msg)
    assert response_of(r.json()) == ("transient-error", ["WRITE_OUTCOME_UNKNOWN"])
    await asyncio.sleep(1.0)
    assert len(spells(url, PATIENT)) == len(before) + 1  # it was applied
    again = await c.post("/$process-message", json=msg)
    code, _ = response_of(again.json())
    assert code == "ok", again.text
    number = spells(url, PATIENT)[-1][0]
    assert again.json()["entry"][0]["resource"]["focus"][0]["reference"] == \
        f"Encounter/{number}"
    assert a01s.count == 1 and len(spells(url, PATIENT)) == len(before) + 1  # still once
    # a Patient the PAS does not know: a fatal-error response, nothing sent
    stranger = {"resourceType": "Patient",
                "identifier": [{"system": NHS, "value": "9430001094"}]}
    msg = admit_message("msg-adm-3", admission("urn:uuid:patient-1",
                                               days_ago(2, 15).isoformat()), stranger)
    r = await c.post("/$process-message", json=msg)
    assert response_of(r.json()) == ("fatal-error", ["RESOURCE_NOT_FOUND"])
    assert a01s.count == 1


@pytest.mark.parametrize("gw", ["demo"], indirect=True)  # the same declaration for every PAS
async def test_the_capability_statement_lists_exactly_the_declared_events(
        gw: tuple[httpx.AsyncClient, str, A01s, str]) -> None:
    c, _, _, _ = gw
    cs = (await c.get("/metadata")).json()
    [messaging] = cs["messaging"]
    events = {e["code"]["code"]: e for e in messaging["event"]}
    assert list(events) == ["patient-registration", "patient-demographics-update",
                            "admit-inpatient"]
    admit = events["admit-inpatient"]
    assert admit["focus"] == "Encounter" and admit["code"]["system"] == EVENTS
    assert admit["request"]["reference"].endswith("CareConnect-Encounter-1")
    encounter = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Encounter")
    assert "create" in [i["code"] for i in encounter["interaction"]]
