"""An asynchronous message's PAS write is audited when the worker makes it: the same trail and
record format as a synchronous write (an ``attempt`` record before the PAS is asked, then the
``access`` record with the outcome), naming the caller and the request that was answered 202,
``"deferred": true``; confined to a patient token's compartment as the request would be; and
no patient data in the application log at info level.

Real uvicorn, real MLLP to the PAS simulator, a real HTTP receiver for the responses; the
trail is read back from its file.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gateway.app import build_app
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.conftest import LiveServer
from tests.e2e.conftest import Receiver, settings, wait_for
from tests.e2e.test_messaging import message, new_patient, response_of, rows
from tests.e2e.test_messaging_admission import PATIENT, admission, admit_message, days_ago, spells
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(pas_url: str, tmp_path: Path
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str, Path]]:
    url = pas_url
    trail = tmp_path / "audit.jsonl"
    async with PasSimulator(url, dialect="demo") as sim:
        app = build_app(settings(tmp_path, url, sim.port, audit_log=str(trail),
                                 log_level="info",
                                 messaging_response_urls="http://127.0.0.1",
                                 messaging_retry_seconds=1))
        install(app, {"clinician": user_token("user/*.*"),
                      "patient": patient_token("D0000003", "patient/*.*")})
        with LiveServer(app) as server:
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                yield c, url, trail


def records(trail: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in trail.read_bytes().splitlines() if line.strip()]


async def test_the_workers_write_is_audited_as_a_synchronous_one(
        gw: tuple[httpx.AsyncClient, str, Path], receiver: tuple[Receiver, LiveServer],
        capfd: pytest.CaptureFixture[str]) -> None:
    c, url, trail = gw
    rec, rserver = receiver
    number, family = "9430001116", "Quixotic-Family"
    msg = message("msg-aud-1", "patient-registration", new_patient(number, family))
    r = await c.post("/$process-message", json=msg, headers=as_("clinician"), params={
        "async": "true", "response-url": f"{rserver.url}/responses"})
    assert r.status_code == 202, r.text
    request_id = r.headers["x-request-id"]
    await wait_for(lambda: rec.got != [], 30, "no response delivered")
    assert response_of(rec.got[0])[0] == "ok"
    assert len(rows(url, number)) == 1
    pid = rec.got[0]["entry"][0]["resource"]["focus"][0]["reference"].removeprefix("Patient/")
    await wait_for(lambda: any(x.get("deferred") and x["event"] == "access"
                               for x in records(trail)), 10, "no deferred access record")
    deferred = [x for x in records(trail) if x.get("deferred")]
    assert [x["event"] for x in deferred] == ["attempt", "access"]
    attempt, access = deferred
    for x in deferred:  # the caller and the request that was answered 202
        assert (x["request_id"], x["client_id"], x["user"], x["role"]) == (
            request_id, "clinician-app", "dr-who", "clinician")
        assert x["method"] == "POST"
        assert x["path"].endswith("/$process-message")
        assert x["logger"] == "gateway.audit"
    assert attempt["outcome"]["result"] == "attempt"
    assert access["outcome"] == {"status": 200, "code": None, "result": "success"}
    assert access["patient"] == pid and access["entities"] == [f"Patient/{pid}"]
    assert any(s.startswith("pas-hl7:MSH-10=") for s in access["backend"]["sent"])
    # the 202 itself was audited too, by the request's own record: the same request id
    accepted = [x for x in records(trail) if x["request_id"] == request_id
                and not x.get("deferred")]
    assert [x["outcome"]["status"] for x in accepted] == [202]
    # the format is the synchronous write's: the same keys, plus "deferred"
    sync = message("msg-aud-2", "patient-registration", new_patient("9430001124", family))
    r = await c.post("/$process-message", json=sync, headers=as_("clinician"))
    assert response_of(r.json())[0] == "ok"
    sync_access = [x for x in records(trail)
                   if x["request_id"] == r.headers["x-request-id"]][-1]
    assert set(access) == set(sync_access) | {"deferred"}
    assert access["interaction"] == attempt["interaction"] == sync_access["interaction"]
    assert sync_access["outcome"] == access["outcome"]
    # no patient data in the application log (info level is on)
    out, err = capfd.readouterr()
    logged = out + err
    assert "message_processing_failed" not in logged
    assert number not in logged and family.upper() not in logged.upper()


async def test_the_worker_confines_a_patient_token_to_its_patient(
        gw: tuple[httpx.AsyncClient, str, Path], receiver: tuple[Receiver, LiveServer]
        ) -> None:
    """A patient token may message an admission of its own patient only: the worker applies
    the token's compartment as the request would have (fatal-error, nothing sent)."""
    c, url, trail = gw
    rec, rserver = receiver
    before = spells(url, PATIENT)
    other = admit_message("msg-aud-3", admission(f"Patient/{PATIENT}",
                                                 days_ago(1, 8).isoformat()))
    r = await c.post("/$process-message", json=other, headers=as_("patient"), params={
        "async": "true", "response-url": f"{rserver.url}/responses"})
    assert r.status_code == 202, r.text
    await wait_for(lambda: rec.got != [], 30, "no response delivered")
    assert response_of(rec.got[0]) == ("fatal-error", ["COMPARTMENT_FORBIDDEN"])
    assert spells(url, PATIENT) == before
    denied = [x for x in records(trail) if x.get("deferred") and x["event"] == "access"]
    assert [(x["outcome"]["code"], x["outcome"]["result"], x["client_id"]) for x in denied
            ] == [("COMPARTMENT_FORBIDDEN", "failure", "patient-app")]
    own = admit_message("msg-aud-4", admission("Patient/D0000003",
                                               days_ago(1, 8).isoformat()))
    r = await c.post("/$process-message", json=own, headers=as_("patient"), params={
        "async": "true", "response-url": f"{rserver.url}/responses"})
    assert r.status_code == 202, r.text
    await wait_for(lambda: len(rec.got) == 2, 30, "no second response")
    assert response_of(rec.got[1])[0] == "ok", rec.got[1]
    assert len(spells(url, "D0000003")) >= 1
    spell = rec.got[1]["entry"][0]["resource"]["focus"][0]["reference"]
    await wait_for(lambda: len([x for x in records(trail) if x.get("deferred")
                                and x["event"] == "access"]) == 2, 10, "no access record")
    admitted = [x for x in records(trail) if x.get("deferred") and x["event"] == "access"][1]
    # the admission's record names the patient it is about, and the spell written
    assert admitted["patient"] == "D0000003" and admitted["entities"] == [spell]
    assert admitted["context_patient"] == "D0000003"
