"""FHIR messaging end to end: ``$process-message`` over real HTTP (uvicorn) to the PAS
simulator over real MLLP (ADT^A28 / ADT^A31), the PAS's answers varied (AA, NAK, late ACK),
and the asynchronous mode's outbox across a restart of a real gateway subprocess.

The oracle for "applied once" is the PAS's own database, read with plain SQL.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import sqlalchemy as sa
from fhir.resources.STU3 import get_fhir_model_class
from jsonschema import Draft6Validator
from starlette.applications import Starlette

from gateway.demo_pas.hl7v2 import PasSimulator
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT
from tests.conftest import LiveServer
from tests.e2e.conftest import MAPPINGS, Faults, Receiver, wait_for
from tests.redis_server import free_port
from tests.security.principals import as_

pytestmark = pytest.mark.anyio

EVENTS = "https://careconnect-gateway.github.io/fhir/CodeSystem/message-event"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
ERRORS = "https://careconnect-gateway.github.io/fhir/CodeSystem/gateway-error-code"


def message(mid: str, event: str, patient: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "message", "entry": [
        {"fullUrl": f"urn:uuid:{mid}", "resource": {
            "resourceType": "MessageHeader", "id": mid,
            "event": {"system": EVENTS, "code": event},
            "timestamp": "2026-12-07T09:00:00+00:00",
            "source": {"endpoint": "https://ehr.example.nhs.uk/fhir"},
            "focus": [{"reference": "urn:uuid:patient-1"}]}},
        {"fullUrl": "urn:uuid:patient-1", "resource": patient}]}


def new_patient(number: str, family: str = "O'Connor") -> dict[str, Any]:
    p = copy.deepcopy(NEW_PATIENT)
    p["identifier"][0]["value"] = number
    p["name"][0]["family"] = family
    return p


def rows(url: str, number: str) -> list[tuple[Any, ...]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        found = conn.execute(sa.text('SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE '
                                     '"NHS_NUMBER" = :n'), {"n": number}).all()
    engine.dispose()
    return [tuple(r) for r in found]


@functools.cache
def _schema() -> Draft6Validator:
    return Draft6Validator(json.loads((Path(__file__).resolve().parents[2].parent / "shared" /
                                       "fhir-stu3" / "fhir.schema.json").read_text()))


def response_of(bundle: dict[str, Any]) -> tuple[str, list[str]]:
    """The response code, and the gateway error codes of its OperationOutcome (the message
    checked by the STU3 JSON Schema and model first)."""
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "message"
    errors = [e.message[:200] for e in _schema().iter_errors(bundle)]
    assert not errors, errors
    get_fhir_model_class("Bundle").model_validate(bundle)
    header = bundle["entry"][0]["resource"]
    assert header["resourceType"] == "MessageHeader"
    codes = [c["code"] for e in bundle["entry"][1:]
             for i in e["resource"].get("issue", ())
             for c in i.get("details", {}).get("coding", ()) if c.get("system") == ERRORS]
    if header["response"]["code"] != "ok":
        assert header["response"]["details"]["reference"] == bundle["entry"][1]["fullUrl"]
        assert bundle["entry"][1]["resource"]["resourceType"] == "OperationOutcome"
    return header["response"]["code"], codes


async def test_registration_then_update_applied_once_and_answered_the_same(
        gw: tuple[httpx.AsyncClient, str, Faults]) -> None:
    c, url, faults = gw
    number = "9430001000"
    assert rows(url, number) == []
    msg = message("msg-reg-1", "patient-registration", new_patient(number))
    r = await c.post("/$process-message", json=msg,
                     headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200, r.text
    code, _ = response_of(r.json())
    assert code == "ok", r.text
    header = r.json()["entry"][0]["resource"]
    assert header["response"]["identifier"] == "msg-reg-1"
    [(refno,)] = rows(url, number)
    pid = header["focus"][0]["reference"].removeprefix("Patient/")
    read = (await c.get(f"/Patient/{pid}")).json()
    assert read["identifier"][0]["value"] == number  # the focus is the patient registered
    again = await c.post("/$process-message", json=msg)
    assert again.content == r.content  # answered the same, byte for byte
    assert rows(url, number) == [(refno,)] and faults.a28s == 1  # applied once
    # the same id with other content is refused, not applied
    other = message("msg-reg-1", "patient-registration", new_patient("9430001019"))
    code, errors = response_of((await c.post("/$process-message", json=other)).json())
    assert (code, errors) == ("fatal-error", ["MESSAGE_ID_REUSED"])
    # a demographics update: ADT^A31, read back through the gateway
    changed = (await c.get(f"/Patient/{pid}")).json()
    changed["name"][0]["family"] = "Byrne"
    up = message("msg-upd-1", "patient-demographics-update", changed)
    r = await c.post("/$process-message", json=up)
    assert response_of(r.json())[0] == "ok", r.text
    assert (await c.get(f"/Patient/{pid}")).json()["name"][0]["family"] == "Byrne"


async def test_a_reload_keeps_the_message_store_and_uses_the_new_providers(
        gw_app: tuple[httpx.AsyncClient, str, Faults, Starlette]) -> None:
    """A mappings reload (SIGHUP) swaps the providers; the messaging state is built once: a
    message answered before the reload is replayed after it, new ones go through the new
    generation's adapters."""
    c, url, faults, app = gw_app
    messaging = app.state.messaging
    live = app.state.mappings
    msg = message("msg-rel-1", "patient-registration", new_patient("9430001035"))
    first = await c.post("/$process-message", json=msg)
    assert response_of(first.json())[0] == "ok", first.text
    old = live.registry
    assert messaging.registry is old
    result = await live.reload()
    assert result.ok, result.problems
    assert app.state.messaging is messaging and live.registry is not old
    assert messaging.registry is live.registry  # providers found through the live mappings
    again = await c.post("/$process-message", json=msg)
    assert again.content == first.content and faults.a28s == 1  # the store survived
    other = message("msg-rel-2", "patient-registration", new_patient("9430001043"))
    r = await c.post("/$process-message", json=other)
    assert response_of(r.json())[0] == "ok", r.text
    assert faults.a28s == 2 and len(rows(url, "9430001043")) == 1
    cs = (await c.get("/metadata")).json()
    assert {e["code"]["code"] for m in cs["messaging"] for e in m["event"]} == {
        "patient-registration", "patient-demographics-update", "admit-inpatient"}


async def test_unroutable_and_malformed(gw: tuple[httpx.AsyncClient, str, Faults]) -> None:
    c, _, faults = gw
    msg = message("msg-x-1", "patient-admission", new_patient("9430001027"))
    r = await c.post("/$process-message", json=msg)
    assert r.status_code == 200
    assert response_of(r.json()) == ("fatal-error", ["MESSAGE_EVENT_NOT_SUPPORTED"])
    other_system = message("msg-x-2", "patient-registration", new_patient("9430001027"))
    other_system["entry"][0]["resource"]["event"]["system"] = "http://example.org/events"
    r = await c.post("/$process-message", json=other_system)
    assert response_of(r.json()) == ("fatal-error", ["MESSAGE_EVENT_NOT_SUPPORTED"])
    invalid = message("msg-x-3", "patient-registration", {**new_patient("9430001027"),
                                                          "gender": "sometimes"})
    code, errors = response_of((await c.post("/$process-message", json=invalid)).json())
    assert code == "fatal-error" and errors and set(errors) == {"INVALID_RESOURCE"}
    for n, focus in enumerate((5, True, "urn:uuid:patient-1", {"reference": "x"}, [7],
                                  [{"reference": 7}])):
        odd = message(f"msg-x-f{n}", "patient-registration", new_patient("9430001027"))
        odd["entry"][0]["resource"]["focus"] = focus  # not a list of References: refused
        r = await c.post("/$process-message", json=odd)
        assert r.status_code == 200, r.text
        assert response_of(r.json()) == ("fatal-error", ["MESSAGE_FOCUS_INVALID"]), focus
    assert faults.a28s == 0
    for bad in ({"resourceType": "Patient"}, {"resourceType": "Bundle", "type": "message",
                                               "entry": [{"resource": {"resourceType":
                                                                       "Patient"}}]}):
        r = await c.post("/$process-message", json=bad)
        assert r.status_code == 400 and r.json()["resourceType"] == "OperationOutcome"
    for n, code in enumerate(([7], ["patient-registration"], {"code": "x"}, 7, None)):
        odd = message(f"msg-x-e{n}", "patient-registration", new_patient("9430001027"))
        odd["entry"][0]["resource"]["event"]["code"] = code  # a list was a TypeError: 500
        r = await c.post("/$process-message", json=odd)
        assert r.status_code == 400, r.text
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "BAD_REQUEST"
    r = await c.get("/$process-message")
    assert r.status_code == 405
    # the write's own scope: a reader cannot register a patient by message
    msg = message("msg-x-4", "patient-registration", new_patient("9430001027"))
    r = await c.post("/$process-message", json=msg, headers=as_("reader"))
    assert r.status_code == 403 and faults.a28s == 0
    cs = (await c.get("/metadata")).json()
    assert not list(_schema().iter_errors(cs))
    events = [e["code"]["code"] for m in cs["messaging"] for e in m["event"]]
    assert events == ["patient-registration", "patient-demographics-update",
                      "admit-inpatient"]
    assert "process-message" in [o["name"] for o in cs["rest"][0]["operation"]]


async def test_a_pas_that_naks(gw: tuple[httpx.AsyncClient, str, Faults]) -> None:
    c, url, faults = gw
    faults.next = ["nak"]
    msg = message("msg-nak-1", "patient-registration", new_patient("9430001035"))
    r = await c.post("/$process-message", json=msg)
    assert response_of(r.json()) == ("fatal-error", ["BACKEND_REJECTED"])
    assert rows(url, "9430001035") == []
    again = await c.post("/$process-message", json=msg)  # answered the same, not resent
    assert again.content == r.content and faults.a28s == 1


async def test_a_pas_that_times_out_is_never_reported_failed(
        gw: tuple[httpx.AsyncClient, str, Faults]) -> None:
    c, url, faults = gw
    faults.next = ["late"]  # applied, AA too late
    msg = message("msg-late-1", "patient-registration", new_patient("9430001043"))
    r = await c.post("/$process-message", json=msg)
    code, errors = response_of(r.json())
    assert (code, errors) == ("transient-error", ["WRITE_OUTCOME_UNKNOWN"])  # not a failure
    await asyncio.sleep(1.0)
    [(refno,)] = rows(url, "9430001043")  # it was applied
    again = await c.post("/$process-message", json=msg)  # the sender resends
    code, _ = response_of(again.json())
    assert code == "ok", again.text
    pid = again.json()["entry"][0]["resource"]["focus"][0]["reference"].removeprefix("Patient/")
    assert (await c.get(f"/Patient/{pid}")).json()["identifier"][0]["value"] == "9430001043"
    assert rows(url, "9430001043") == [(refno,)] and faults.a28s == 1  # still once


# --- asynchronous: the outbox across a restart of a real gateway process -----------------------


def start_gateway(tmp: Path, url: str, mllp_port: int, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    env.update({"CCG_PAS_URL": url, "CCG_PAS_HL7_URL": f"mllp://127.0.0.1:{mllp_port}",
                "CCG_AUTH_MODE": "insecure-demo", "CCG_PAGING_SECRET": "t",
                "CCG_LOG_LEVEL": "warning", "CCG_PROGRESS": "false",
                "CCG_MESSAGING_RESPONSE_URLS": "http://127.0.0.1",
                "CCG_MESSAGING_RETRY_SECONDS": "1"})
    with (tmp / "stderr").open("ab") as err:
        proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port",
                                 str(port), "--mappings", str(MAPPINGS), "--data-dir",
                                 str(tmp / "data")], stdout=subprocess.DEVNULL, stderr=err,
                                env=env, cwd=tmp)
    return proc


async def test_async_response_survives_a_restart(
        pas: tuple[PasSimulator, str, Faults], receiver: tuple[Receiver, LiveServer],
        tmp_path: Path) -> None:
    sim, url, faults = pas
    rec, rserver = receiver
    rec.accepting = False  # until the gateway has been killed and started again
    port = free_port()
    proc = start_gateway(tmp_path, url, sim.port, port)
    base = f"http://127.0.0.1:{port}/STU3"
    try:
        async with httpx.AsyncClient(timeout=30) as c:
            async def up() -> bool:
                try:
                    return (await c.get(f"http://127.0.0.1:{port}/_health")).status_code == 200
                except httpx.TransportError:
                    return False
            deadline = time.monotonic() + 60
            while not await up():
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
                assert time.monotonic() < deadline, "the gateway did not start"
                await asyncio.sleep(0.2)
            # a response-url off the allow-list is refused before anything is recorded
            msg = message("msg-async-1", "patient-registration", new_patient("9430001051"))
            r = await c.post(f"{base}/$process-message", json=msg, params={
                "async": "true", "response-url": "http://198.51.100.7/responses"})
            assert r.status_code == 400
            r = await c.post(f"{base}/$process-message", json=msg, params={
                "async": "true", "response-url": f"{rserver.url}/responses"})
            assert r.status_code == 202, r.text
            await wait_for(lambda: rows(url, "9430001051") != [], 30, "not applied")
            await wait_for(lambda: rec.refused >= 1, 30, "no delivery attempted")
            proc.kill()  # no goodbye: only what is on disk survives
            proc.wait()
            rec.accepting = True
            proc = start_gateway(tmp_path, url, sim.port, port)
            deadline = time.monotonic() + 60
            while not await up():
                assert proc.poll() is None, (tmp_path / "stderr").read_text()[-2000:]
                assert time.monotonic() < deadline, "the gateway did not restart"
                await asyncio.sleep(0.2)
            await wait_for(lambda: rec.got != [], 60, "the response was not delivered")
            got = rec.got[0]
            assert response_of(got)[0] == "ok"
            assert got["entry"][0]["resource"]["response"]["identifier"] == "msg-async-1"
            [(refno,)] = rows(url, "9430001051")
            assert got["entry"][0]["resource"]["focus"][0]["reference"].startswith("Patient/")
            # the same message again: not applied again; the same response if sent sync
            r = await c.post(f"{base}/$process-message", json=msg)
            assert orjson.loads(r.content) == got
            assert faults.a28s == 1 and rows(url, "9430001051") == [(refno,)]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the audit of a synchronous message: its response's outcome, as an operation -------------


def audit_records(tmp: Path, request_id: str) -> list[dict[str, Any]]:
    lines = (tmp / "audit.jsonl").read_bytes().splitlines()
    return [r for r in map(orjson.loads, lines) if r.get("request_id") == request_id]


async def test_a_synchronous_message_is_audited_as_an_operation_with_its_responses_outcome(
        gw: tuple[httpx.AsyncClient, str, Faults], tmp_path: Path) -> None:
    from gateway.audit import audit_event

    c, _, faults = gw
    seen: dict[str, tuple[str, str | None, str, str]] = {}
    faults.next = [None, "nak"]  # type: ignore[list-item]
    for mid, event, expect in (
            ("msg-audit-ok", "patient-registration", "ok"),
            ("msg-audit-nak", "patient-registration", "fatal-error"),
            ("msg-audit-unrouted", "patient-admission", "fatal-error")):
        number = {"msg-audit-ok": "9430001108", "msg-audit-nak": "9430001116"}.get(
            mid, "9430001124")
        r = await c.post("/$process-message", json=message(mid, event, new_patient(number)))
        assert r.status_code == 200 and response_of(r.json())[0] == expect, r.text
        records = audit_records(tmp_path, r.headers["x-request-id"])
        access = [x for x in records if x["event"] == "access"]
        attempts = [x for x in records if x["event"] == "attempt"]
        assert len(access) == 1
        [rec] = access
        assert rec["interaction"] == "operation"  # not a create
        assert rec["operation"]["name"] == "process-message"
        # the attempt record, before the PAS is asked, is kept for a message that writes
        assert [x["interaction"] for x in attempts] == (
            [] if mid == "msg-audit-unrouted" else ["operation"])
        seen[mid] = (rec["outcome"]["result"], rec["outcome"]["code"],
                     audit_event(rec, "t")["outcome"], audit_event(rec, "t")["action"])
        assert rec["outcome"]["status"] == 200  # the HTTP status, as sent
    assert seen == {
        "msg-audit-ok": ("success", None, "0", "E"),
        # the PAS's NAK: a 502 over REST, a serious failure
        "msg-audit-nak": ("failure", "BACKEND_REJECTED", "8", "E"),
        # the message refused: a minor failure
        "msg-audit-unrouted": ("failure", "MESSAGE_EVENT_NOT_SUPPORTED", "4", "E"),
    }
    assert faults.a28s == 2
