"""The gateway against a PAS that shares no code with it (tests/adapters/hl7v2/itk_peer.py:
python-hl7 and the NHS ITK samples), over real TCP."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapters import dropped
from gateway.app import build_app
from gateway.settings import Settings
from tests.adapters.hl7v2.itk_peer import FIRST_NUMBER, ItkPeer
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings" / "demo-hl7v2"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
JSON = {"Content-Type": "application/fhir+json"}


async def _gateway(peer: ItkPeer, tmp_path: Path, demo_sqlite_url: str
                   ) -> AsyncIterator[httpx.AsyncClient]:
    port = await peer.start()
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="t", log_level="warning",
        progress=False, auth_mode="insecure-demo",
        connection_urls={"pas": demo_sqlite_url, "pas-hl7": f"mllp://127.0.0.1:{port}"}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                yield c
    finally:
        await peer.stop()


@pytest.fixture(params=[False, True], ids=["plain-ack", "ack-with-pid"])
def peer(request: pytest.FixtureRequest) -> ItkPeer:
    return ItkPeer(ack_pid=request.param)


@pytest.fixture
async def api(peer: ItkPeer, tmp_path: Path, demo_sqlite_url: str
              ) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _gateway(peer, tmp_path, demo_sqlite_url):
        yield client


async def test_the_itk_sample_patient_is_read(api: httpx.AsyncClient) -> None:
    before = dropped.snapshot().get(("date:hl7", "not an HL7 date/time"), 0)
    r = await api.get(f"/STU3/Patient/{FIRST_NUMBER}")
    assert r.status_code == 200, r.text
    p = r.json()
    assert p["name"][0]["family"] == "Smith" and p["name"][0]["given"][0] == "Fredrica"
    # the sample writes the NHS number in CX-4 only (3333333333^^^NHS)
    assert [i["value"] for i in p["identifier"] if i["system"] == NHS] == ["3333333333"]
    assert p["gender"] == "female" and p["address"][0]["city"] == "Malton"
    # its PID-7 is 196513121515 (month 13): left out, and counted, not silently
    assert "birthDate" not in p
    assert dropped.snapshot()[("date:hl7", "not an HL7 date/time")] > before


async def test_search_then_create_then_round_trip(api: httpx.AsyncClient, peer: ItkPeer
                                                  ) -> None:
    r = await api.get("/STU3/Patient", params={"family": "smi", "gender": "female"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [FIRST_NUMBER]
    r = await api.get("/STU3/Patient", params={"identifier": f"{NHS}|3333333333"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == [FIRST_NUMBER]

    sent_before = len(peer.received)
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 201, r.text
    new_id = r.headers["location"].rsplit("/", 1)[1]
    assert new_id == "RCB0000002" and new_id in peer.patients
    after_a28 = peer.received[sent_before:]
    assert after_a28[0] == "ADT^A28"
    # with a plain ACK the number is found by QBP^Q22 on the NHS number; with a PID, not
    assert ("QBP^Q22" in after_a28) is (not peer.ack_pid)

    served = (await api.get(f"/STU3/Patient/{new_id}")).json()
    assert served["name"][0]["family"] == "O'Connor"
    changed = copy.deepcopy(served)
    changed.pop("meta", None)
    changed["name"][0]["family"] = "Byrne"
    r = await api.put(f"/STU3/Patient/{new_id}", json=changed, headers=JSON)
    assert r.status_code == 200, r.text
    assert peer.patients[new_id][5].startswith("BYRNE") or peer.patients[new_id][5].startswith(
        "Byrne")
    # and the sample patient as served goes back unchanged (GET → PUT)
    sample: dict[str, Any] = (await api.get(f"/STU3/Patient/{FIRST_NUMBER}")).json()
    sample.pop("meta", None)
    r = await api.put(f"/STU3/Patient/{FIRST_NUMBER}", json=sample, headers=JSON)
    assert r.status_code == 200, r.text


async def test_a_pas_ignoring_rcp2_loses_no_patient(tmp_path: Path, demo_sqlite_url: str
                                                    ) -> None:
    # Replies of 7 for pages of 5: the pointer stands after the 7th, so the page carries all
    # seven (more than _count) rather than dropping two that no pointer reaches again.
    peer = ItkPeer(honour_quantity=False, page_cap=7)
    sample = peer.patients[FIRST_NUMBER]
    for i in range(16):
        pid = list(sample)
        pid[3] = f"RCB{9000000 + i:07d}^^^RCB^PI"
        peer.patients[f"RCB{9000000 + i:07d}"] = pid
    async for api in _gateway(peer, tmp_path, demo_sqlite_url):
        url: str | None = "/STU3/Patient?family=smi&gender=female&_count=5"
        ids: list[str] = []
        sizes = []
        while url is not None:
            body = (await api.get(url)).json()
            got = [e["resource"]["id"] for e in body.get("entry", [])]
            ids += got
            sizes.append(len(got))
            url = next((ln["url"] for ln in body["link"] if ln["relation"] == "next"), None)
        assert ids == list(peer.patients) and sizes == [7, 7, 3]
