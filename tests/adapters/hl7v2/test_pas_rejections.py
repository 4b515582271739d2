"""What the client gets when the PAS refuses a write (an ACK with MSA-1 AE/AR): the PAS's
error code (HL7 table 0357, in a v2.4 ERR-1 ELD, a v2.5 ERR-3, or a v2.3 MSA-6) decides.

The client's mistakes are 4xx: a duplicate key (205) 409 DUPLICATE_IDENTIFIER; an unknown
key (204) 404 for an update of a record the PAS does not know, else 422 UNKNOWN_REFERENCE; a
required field missing, a data type error, a value not in the PAS's table (101, 102, 103)
422 RESOURCE_REJECTED. The PAS's own failures stay 5xx: 207, an unknown code (named in the
message), or no code at all 502 BACKEND_REJECTED; 206 (record locked) 503 with Retry-After.
An AA with a warning is a success. The PAS's own words never reach the client or an
info-level log (they may name the patient). Real TCP MLLP throughout: the repository's PAS
simulator, and the ITK peer that shares no code with the gateway, its behaviour varied.
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.adapters.hl7v2.itk_peer import FIRST_NUMBER, ItkPeer
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT, PROFILES, _app, _oracle
from tests.adapters.hl7v2.test_itk_peer import _gateway

pytestmark = pytest.mark.anyio

JSON = {"Content-Type": "application/fhir+json"}
HELD_NHS = "9990000018"  # the simulator's D0000001
SAMPLE_NHS = "3333333333"  # the ITK peer's sample patient (FREDRICA SMITH)


def _issues(r: httpx.Response) -> list[tuple[str, str]]:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    return [(i["code"], i["details"]["coding"][0]["code"]) for i in body["issue"]]


def _where(r: httpx.Response) -> list[list[str] | None]:
    """Each issue's expression: the elements the PAS's field at fault feeds."""
    return [i.get("expression") for i in r.json()["issue"]]


def _with_nhs(number: str) -> dict[str, Any]:
    body = copy.deepcopy(NEW_PATIENT)
    body["identifier"][0]["value"] = number
    return body


# --- the repository's PAS simulator -----------------------------------------------------------


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    path = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture
async def sim(db_url: str, request: pytest.FixtureRequest) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(db_url, dialect=getattr(request, "param", "demo")) as simulator:
        yield simulator


@pytest.fixture
async def sim_api(db_url: str, sim: PasSimulator, tmp_path: Path
                  ) -> AsyncIterator[httpx.AsyncClient]:
    app = _app(db_url, sim, tmp_path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


@PROFILES
async def test_registering_an_nhs_number_the_pas_holds_is_409(
        sim_api: httpx.AsyncClient, sim: PasSimulator, db_url: str) -> None:
    r = await sim_api.post("/STU3/Patient", json=_with_nhs(HELD_NHS), headers=JSON)
    assert r.status_code == 409, r.text
    assert _issues(r) == [("duplicate", "DUPLICATE_IDENTIFIER")]
    assert "205" in r.text  # the PAS's code is named
    assert _where(r) == [["Patient.identifier.value"]]  # PID-3
    assert HELD_NHS not in r.text and "another patient" not in r.text  # not the PAS's words
    assert _oracle(db_url, "\"NHS_NUMBER\" = :n", n=HELD_NHS) == {"D0000001"}  # nothing added
    assert len(sim.received) == 1  # one A28, not resent


async def test_a_required_field_the_pas_lacks_is_422(sim_api: httpx.AsyncClient,
                                                     db_url: str) -> None:
    # Care Connect does not need a birth date; this PAS does (AE 101 at PID-7)
    body = _with_nhs("9991234578")
    body.pop("birthDate")
    r = await sim_api.post("/STU3/Patient", json=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert _issues(r) == [("invalid", "RESOURCE_REJECTED")]
    assert "101" in r.text and "PID-7" in r.text
    assert _where(r) == [["Patient.birthDate"]]
    assert _oracle(db_url, "\"NHS_NUMBER\" = '9991234578'") == set()


async def test_a_gp_practice_the_pas_does_not_know_is_422(sim_api: httpx.AsyncClient) -> None:
    body = _with_nhs("9991234578")
    body["generalPractitioner"] = [{"identifier": {
        "system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "Z99999"}}]
    r = await sim_api.post("/STU3/Patient", json=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert _issues(r) == [("not-found", "UNKNOWN_REFERENCE")]
    assert "204" in r.text and "PD1-3" in r.text
    assert _where(r) == [["Patient.generalPractitioner.identifier.value"]]


async def test_the_pas_failing_is_still_502(sim_api: httpx.AsyncClient, sim: PasSimulator
                                            ) -> None:
    sim.faults.nak_ae_count = 1  # AE with ERR 207: the PAS's own failure
    r = await sim_api.post("/STU3/Patient", json=_with_nhs("9991234578"), headers=JSON)
    assert r.status_code == 502 and _issues(r) == [("processing", "BACKEND_REJECTED")]
    assert "207" in r.text


# --- the independent ITK peer, its behaviour varied -------------------------------------------


async def _peer_api(peer: ItkPeer, tmp_path: Path, demo_sqlite_url: str
                    ) -> AsyncIterator[httpx.AsyncClient]:
    async for client in _gateway(peer, tmp_path, demo_sqlite_url):
        yield client


@pytest.mark.parametrize("nak", ["AE", "AR"])
@pytest.mark.parametrize("form", ["v2.4", "v2.5", "msa6"])
async def test_the_peer_refusing_a_duplicate_nhs_number_is_409(
        nak: str, form: str, tmp_path: Path, demo_sqlite_url: str) -> None:
    peer = ItkPeer(nak=nak, err_form=form, unique_nhs=True)
    async for api in _peer_api(peer, tmp_path, demo_sqlite_url):
        r = await api.post("/STU3/Patient", json=_with_nhs(SAMPLE_NHS), headers=JSON)
        assert r.status_code == 409, r.text
        assert _issues(r) == [("duplicate", "DUPLICATE_IDENTIFIER")]
        # the peer's text names the holder and repeats the number: none of it is passed on
        for phi in (SAMPLE_NHS, "SMITH", "FREDRICA", FIRST_NUMBER, "already registered"):
            assert phi.lower() not in r.text.lower(), phi
        assert list(peer.patients) == [FIRST_NUMBER]
        # a new NHS number is registered as ever
        r = await api.post("/STU3/Patient", json=_with_nhs("9991234578"), headers=JSON)
        assert r.status_code == 201, r.text


async def test_a_refusal_without_an_error_code_is_502(tmp_path: Path, demo_sqlite_url: str
                                                     ) -> None:
    peer = ItkPeer(nak="AE", err_form="none", unique_nhs=True)
    async for api in _peer_api(peer, tmp_path, demo_sqlite_url):
        r = await api.post("/STU3/Patient", json=_with_nhs(SAMPLE_NHS), headers=JSON)
        assert r.status_code == 502 and _issues(r) == [("processing", "BACKEND_REJECTED")]
        assert "SMITH" not in r.text and SAMPLE_NHS not in r.text


# (script, err_form) → (status, the issues' codes): several ERR segments, warnings, codes
# the gateway has no row for, the PAS's own failure beside a client error
SCRIPTED = {
    "warning-then-duplicate": ("reject:W0,205@PID-3", "v2.5", 409,
                               [("duplicate", "DUPLICATE_IDENTIFIER")]),
    "two-content-errors-v2.5": ("reject:101@PID-7,103@PID-8", "v2.5", 422,
                                [("invalid", "RESOURCE_REJECTED")] * 2),
    "two-content-errors-v2.4": ("reject:102@PID-7,103@PID-8", "v2.4", 422,
                                [("invalid", "RESOURCE_REJECTED")] * 2),
    "duplicate-and-missing": ("reject:205@PID-3,101@PID-7", "v2.5", 409,
                              [("duplicate", "DUPLICATE_IDENTIFIER"),
                               ("invalid", "RESOURCE_REJECTED")]),
    "unknown-gp": ("reject:204@PD1-4", "v2.4", 422, [("not-found", "UNKNOWN_REFERENCE")]),
    "client-error-and-pas-failure": ("reject:101@PID-7,207", "v2.5", 502,
                                     [("processing", "BACKEND_REJECTED")]),
    "internal-error": ("reject:207", "v2.4", 502, [("processing", "BACKEND_REJECTED")]),
    "unmapped-code": ("reject:999", "v2.4", 502, [("processing", "BACKEND_REJECTED")]),
    "unsupported-event": ("reject:201", "v2.5", 502, [("processing", "BACKEND_REJECTED")]),
    "record-locked": ("reject:206", "msa6", 503, [("transient", "BACKEND_UNAVAILABLE")]),
}


@pytest.mark.parametrize("nak", ["AE", "AR"])
@pytest.mark.parametrize("case", list(SCRIPTED))
async def test_what_the_pas_says_decides_the_status(
        case: str, nak: str, tmp_path: Path, demo_sqlite_url: str) -> None:
    script, form, status, issues = SCRIPTED[case]
    peer = ItkPeer(nak=nak, err_form=form)
    async for api in _peer_api(peer, tmp_path, demo_sqlite_url):
        peer.behaviour = [script]
        r = await api.post("/STU3/Patient", json=_with_nhs("9991234578"), headers=JSON)
        assert r.status_code == status, r.text
        assert _issues(r) == issues
        if case.startswith("two-content-errors"):  # each issue at its own element
            assert _where(r) == [["Patient.birthDate"], ["Patient.gender"]]
        assert len(peer.patients) == 1  # refused: nothing applied
        if case == "unmapped-code":
            assert "999" in r.text
        if status == 503:
            assert r.headers["retry-after"]


@pytest.mark.parametrize("form", ["v2.4", "v2.5"])
async def test_an_aa_with_a_warning_is_a_success(form: str, tmp_path: Path,
                                                 demo_sqlite_url: str) -> None:
    peer = ItkPeer(err_form=form, ack_pid=True)
    async for api in _peer_api(peer, tmp_path, demo_sqlite_url):
        peer.behaviour = ["warn"]
        r = await api.post("/STU3/Patient", json=_with_nhs("9991234578"), headers=JSON)
        assert r.status_code == 201, r.text
        assert r.headers["location"].endswith("/Patient/RCB0000002")


@pytest.mark.parametrize(("script", "status", "code"), [
    ("reject:204@PID-3", 404, ("not-found", "RESOURCE_NOT_FOUND")),
    ("reject:204", 404, ("not-found", "RESOURCE_NOT_FOUND")),  # 0357: the record's own key
    ("reject:204@PD1-3", 422, ("not-found", "UNKNOWN_REFERENCE")),
    ("reject:103@PID-8", 422, ("invalid", "RESOURCE_REJECTED")),
])
@pytest.mark.parametrize("form", ["v2.4", "v2.5"])
async def test_an_update_the_pas_refuses(script: str, status: int, code: tuple[str, str],
                                         form: str, tmp_path: Path, demo_sqlite_url: str
                                         ) -> None:
    peer = ItkPeer(err_form=form, nak="AR")
    async for api in _peer_api(peer, tmp_path, demo_sqlite_url):
        served = (await api.get(f"/STU3/Patient/{FIRST_NUMBER}")).json()
        served.pop("meta", None)
        served["name"][0]["family"] = "Byrne"
        before = list(peer.patients[FIRST_NUMBER])
        peer.behaviour = [script]  # the PAS lost the record between the read and the A31
        r = await api.put(f"/STU3/Patient/{FIRST_NUMBER}", json=served, headers=JSON)
        assert r.status_code == status, r.text
        assert _issues(r) == [code]
        assert peer.patients[FIRST_NUMBER] == before


async def test_the_pas_text_is_at_debug_only(tmp_path: Path, demo_sqlite_url: str,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    from gateway.app import build_app
    from gateway.settings import Settings
    from tests.adapters.hl7v2.test_itk_peer import MAPPINGS

    peer = ItkPeer(err_form="v2.5", unique_nhs=True)
    port = await peer.start()
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="t", log_level="debug",
        progress=False, auth_mode="insecure-demo",
        connection_urls={"pas": demo_sqlite_url, "pas-hl7": f"mllp://127.0.0.1:{port}"}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as api:
                capfd.readouterr()
                r = await api.post("/STU3/Patient", json=_with_nhs(SAMPLE_NHS), headers=JSON)
    finally:
        await peer.stop()
    assert r.status_code == 409
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    assert lines
    above_debug = [x for x in lines if x.get("level") != "debug"]
    assert above_debug and not any("already registered" in json.dumps(x) or "SMITH"
                                   in json.dumps(x) for x in above_debug), above_debug
    # the PAS's words, for an operator at debug: the values the gateway sent masked
    [said] = [x for x in lines if x.get("event") == "hl7_rejection_text"]
    assert said["level"] == "debug" and "already registered" in said["text"]
    assert SAMPLE_NHS not in said["text"]


# --- an admission (POST Encounter: ADT^A01) ---------------------------------------------------


def _admission(**changes: Any) -> dict[str, Any]:
    from tests.e2e.test_messaging_admission import admission, days_ago

    body = admission("Patient/D0000001", days_ago(1, 9, 30).isoformat())
    body.update(changes)
    return body


async def test_an_admission_to_a_ward_the_pas_does_not_know_is_422(
        sim_api: httpx.AsyncClient) -> None:
    body = _admission(location=[{"location": {"identifier": {
        "system": "https://fhir.demo-trust.nhs.uk/Id/location-code", "value": "NOWARD"}}}])
    r = await sim_api.post("/STU3/Encounter", json=body, headers=JSON)
    assert r.status_code == 422, r.text
    assert _issues(r) == [("not-found", "UNKNOWN_REFERENCE")]
    assert _where(r) == [["Encounter.location.location.identifier.value"]]  # PV1-3


async def test_an_admission_of_a_patient_the_pas_does_not_know_is_422(
        sim_api: httpx.AsyncClient) -> None:
    # an addition: 204 at PID-3 is the patient referred to, not the Encounter created
    r = await sim_api.post("/STU3/Encounter", json=_admission(
        subject={"reference": "Patient/D9999999"}), headers=JSON)
    assert r.status_code == 422, r.text
    assert _issues(r) == [("not-found", "UNKNOWN_REFERENCE")]
