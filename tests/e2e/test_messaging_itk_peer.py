"""``$process-message`` (sync and async) against a PAS that shares no code with the gateway
(tests/adapters/hl7v2/itk_peer.py: python-hl7, its own MLLP server), over real uvicorn and
real TCP, the peer's behaviour varied: it accepts, refuses (AE, AR; a duplicate key, a
required field missing, a record locked), applies and answers too late, applies and drops
the connection, or drops it without applying.

The rule checked every time, with the peer's own store as the oracle: a write the PAS
accepted is never reported failed; an unknown outcome is reported as such
(``transient-error`` with WRITE_OUTCOME_UNKNOWN), and the retry — the sender's resend, or the
worker's own for an asynchronous message — leaves the write applied exactly once.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from gateway.app import build_app
from tests.adapters.hl7v2.itk_peer import FIRST_NUMBER, ItkPeer
from tests.conftest import LiveServer
from tests.e2e.conftest import Receiver, settings, wait_for
from tests.e2e.test_messaging import message, new_patient, response_of
from tests.e2e.test_messaging_admission import admission, admit_message, days_ago

pytestmark = pytest.mark.anyio

OK: tuple[str, list[str]] = ("ok", [])
REJECTED = ("fatal-error", ["BACKEND_REJECTED"])
UNKNOWN = ("transient-error", ["WRITE_OUTCOME_UNKNOWN"])


def holding(peer: ItkPeer, nhs: str) -> list[str]:
    """The peer's PAS numbers of the patients with this NHS number (its own store)."""
    return [n for n, pid in peer.patients.items()
            if any(rep.split("^")[0] == nhs for rep in pid[3].split("~"))]


@pytest.fixture
async def gw(tmp_path: Path, demo_sqlite_url: str
             ) -> AsyncIterator[tuple[httpx.AsyncClient, ItkPeer]]:
    peer = ItkPeer(late_seconds=1.5)
    port = await peer.start()
    app = build_app(settings(tmp_path, demo_sqlite_url, port,
                             messaging_response_urls="http://127.0.0.1",
                             messaging_retry_seconds=1))
    for p in app.state.registry:
        if p.resource_type == "Patient":
            adapter = p.mapping.adapter
    adapter.client.reply_timeout = 1.0
    adapter.client.backoff_base = 0.01
    adapter.options = adapter.options.model_copy(update={"deadline": 2.5})
    try:
        with LiveServer(app) as server:
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                yield c, peer
    finally:
        await peer.stop()


# (the peer's script, the first answer, the patients it holds then, the answer to the resend,
#  the A28s it received in all)
SCENARIOS = {
    "accept": (["accept"], OK, 1, OK, 1),
    "AE": (["AE"], REJECTED, 0, REJECTED, 1),
    "AR": (["AR"], REJECTED, 0, REJECTED, 1),
    "late": (["late"], UNKNOWN, 1, OK, 1),
    "drop": (["drop"], UNKNOWN, 1, OK, 1),
    "drop-unapplied": (["drop-unapplied"], UNKNOWN, 0, OK, 2),
    # refused for what was sent (HL7 0357): final, the client's to fix, with its own code
    "duplicate": (["reject:205@PID-3"], ("fatal-error", ["DUPLICATE_IDENTIFIER"]), 0,
                  ("fatal-error", ["DUPLICATE_IDENTIFIER"]), 1),
    "required-missing": (["reject:101@PID-7"], ("fatal-error", ["RESOURCE_REJECTED"]), 0,
                         ("fatal-error", ["RESOURCE_REJECTED"]), 1),
    # the record locked (206): nothing applied, send again
    "locked": (["reject:206"], ("transient-error", ["BACKEND_UNAVAILABLE"]), 0, OK, 2),
}


@pytest.mark.parametrize("case", list(SCENARIOS))
async def test_a_registration_whatever_the_peer_does(
        gw: tuple[httpx.AsyncClient, ItkPeer], case: str) -> None:
    c, peer = gw
    script, first, applied, second, a28s = SCENARIOS[case]
    nhs = "9430001132"
    peer.behaviour = list(script)
    msg = message(f"itk-{case}", "patient-registration", new_patient(nhs))
    r = await c.post("/$process-message", json=msg)
    assert r.status_code == 200, r.text
    assert response_of(r.json()) == first
    await asyncio.sleep(1.0)  # a late answer has been given by now
    assert len(holding(peer, nhs)) == applied
    again = await c.post("/$process-message", json=msg)  # the sender's resend
    assert response_of(again.json()) == second
    if first[0] != "transient-error":
        assert again.content == r.content  # a final answer is replayed, not recomputed
    stored = holding(peer, nhs)
    assert len(stored) == (1 if second == OK else 0)  # applied once, or not at all
    assert peer.received.count("ADT^A28") == a28s
    assert len(set(peer.adt_controls)) == len(peer.adt_controls)  # an A28 is never resent
    if second == OK:
        focus = again.json()["entry"][0]["resource"]["focus"][0]["reference"]
        assert focus == f"Patient/{stored[0]}"


@pytest.mark.parametrize("case", ["AE", "late", "drop"])
async def test_a_demographics_update_whatever_the_peer_does(
        gw: tuple[httpx.AsyncClient, ItkPeer], case: str) -> None:
    """An A31 replaces the record, so the gateway may resend it itself: a late or lost ACK
    is followed by a resend the peer accepts — ok, never failed; a NAK is final."""
    c, peer = gw
    patient = (await c.get(f"/Patient/{FIRST_NUMBER}")).json()
    changed = copy.deepcopy(patient)
    changed["name"][0]["family"] = "Smythe"
    peer.behaviour = [case]
    r = await c.post("/$process-message", json=message(
        f"itk-upd-{case}", "patient-demographics-update", changed))
    family = peer.patients[FIRST_NUMBER][5].split("^")[0]
    if case == "AE":
        assert response_of(r.json()) == REJECTED
        assert family.upper() == "SMITH"
        return
    assert response_of(r.json()) == OK, r.text
    assert family == "SMYTHE"
    assert peer.received.count("ADT^A31") == 2  # the first (applied, unanswered), the resend
    assert len(set(peer.adt_controls)) == 1  # the same message, resent


async def test_an_admission_to_a_peer_that_takes_no_a01(
        gw: tuple[httpx.AsyncClient, ItkPeer]) -> None:
    c, peer = gw
    msg = admit_message("itk-adm-1", admission(f"Patient/{FIRST_NUMBER}",
                                               days_ago(1, 9).isoformat()))
    r = await c.post("/$process-message", json=msg)
    assert r.status_code == 200
    assert response_of(r.json()) == REJECTED
    assert peer.received.count("ADT^A01") == 1


@pytest.mark.parametrize(("case", "final", "a28s"), [
    ("accept", OK, 1), ("AE", REJECTED, 1), ("late", OK, 1), ("drop", OK, 1),
    ("drop-unapplied", OK, 2)])
async def test_asynchronous_whatever_the_peer_does(
        gw: tuple[httpx.AsyncClient, ItkPeer], receiver: tuple[Receiver, LiveServer],
        case: str, final: tuple[str, list[str]], a28s: int) -> None:
    """The worker meets the same peer: an unknown outcome is retried by the worker itself
    (finding the patient it may have registered first), and the one response delivered is
    final — never a failure for a write the peer applied."""
    c, peer = gw
    rec, rserver = receiver
    nhs = "9430001140"
    peer.behaviour = [case]
    msg = message(f"itk-async-{case}", "patient-registration", new_patient(nhs))
    r = await c.post("/$process-message", json=msg, params={
        "async": "true", "response-url": f"{rserver.url}/responses"})
    assert r.status_code == 202, r.text
    await wait_for(lambda: rec.got != [], 30, "no response delivered")
    await asyncio.sleep(0.5)
    assert len(rec.got) == 1  # one response, the final one
    assert response_of(rec.got[0]) == final
    stored = holding(peer, nhs)
    assert len(stored) == (1 if final == OK else 0)
    assert peer.received.count("ADT^A28") == a28s
    if final == OK:
        focus = rec.got[0]["entry"][0]["resource"]["focus"][0]["reference"]
        assert focus == f"Patient/{stored[0]}"
    again = await c.post("/$process-message", json=msg)  # a resend, synchronously
    assert again.json() == rec.got[0] and peer.received.count("ADT^A28") == a28s
