"""The HL7 v2 adapter against PAS dialects it was not written with (issue 12's defects).

Each test runs the gateway (mappings/demo-hl7v2) against the PAS simulator in one of its
dialect profiles (``itk``: plain ACKs, NHS numbers in CX-4 only, one PID then its visits, no
PID-32, dates of death without a time; ``strict``: identifiers by CX-5 only, native prefix
matching, no identifier qualifiers, expiring continuation pointers), over real TCP. The
connection's dialect is declared as a trust would, in a copy of the mapping directory.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator, Callable
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

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[3]
MAPPINGS = REPO / "mappings" / "demo-hl7v2"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
PAS = "https://fhir.demo-trust.nhs.uk/Id/pas-number"
JSON = {"Content-Type": "application/fhir+json"}

# What a trust declares for the strict PAS: it prefix-matches natively and takes bare numbers.
STRICT = {"wildcard": "none", "matching": "prefix", "identifier_qualifiers": False,
          "new_patient_number": ["query"]}


@pytest.fixture(scope="module")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("dialects") / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    return path


@pytest.fixture
def db_url(template_db: Path, tmp_path: Path) -> str:
    path = tmp_path / "pas.sqlite"
    shutil.copy(template_db, path)  # writes go to a private copy
    return f"sqlite:///{path}"


Api = Callable[..., Any]


@pytest.fixture
async def gateway(db_url: str, tmp_path: Path) -> AsyncIterator[Api]:
    """``await gateway(profile, dialect=None, options=None)`` → (client, simulator, app):
    the simulator in that dialect profile, the gateway with that connection dialect."""
    stack: list[Any] = []

    async def start(profile: str, dialect: dict[str, Any] | None = None,
                    options: dict[str, Any] | None = None) -> tuple[httpx.AsyncClient,
                                                                     PasSimulator, Any]:
        sim = PasSimulator(db_url, dialect=profile)
        await sim.start()
        stack.append(sim.stop)
        app = build_app(Settings(
            mappings_dir=MAPPINGS, data_dir=tmp_path,
            paging_secret="test", log_level="warning", progress=False,
            auth_mode="insecure-demo",
            connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        adapter = _adapter(app)
        if dialect:
            # The connection's dialect, as a trust declares it (options.dialect in
            # connections.yaml; loading it is tested in test_dialect_config.py).
            from adapters.hl7v2.adapter import Dialect

            adapter.dialect = Dialect.model_validate({**adapter.dialect.model_dump(),
                                                      **dialect})
        if options:
            adapter.options = adapter.options.model_copy(update=options)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        stack.append(lambda: lifespan.__aexit__(None, None, None))
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")
        stack.append(client.aclose)
        return client, sim, app

    yield start
    for close in reversed(stack):
        await close()


def _rows(db_url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def _code(r: httpx.Response) -> str:
    code: str = r.json()["issue"][0]["details"]["coding"][0]["code"]
    return code


def _adapter(app: Any) -> Any:
    return next(p.mapping.adapter for p in app.state.registry if p.resource_type == "Patient")


# --- defect 1: a create the PAS accepted with a plain ACK ---------------------------------------


async def test_create_acknowledged_by_a_plain_ack_is_201(gateway: Api, db_url: str) -> None:
    api, _, _ = await gateway("itk")
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 201, r.text
    rows = _rows(db_url, 'SELECT "PASID" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n',
                 n="9991234578")
    assert len(rows) == 1
    # the number came from a follow-up Q22 on the NHS number sent
    assert r.headers["location"].endswith(f"/Patient/{rows[0][0]}")
    assert r.json()["id"] == rows[0][0]


# --- defect 2: a committed write never turns into a failure --------------------------------------


@pytest.mark.parametrize("fault", ["nak", "drop"])
async def test_create_accepted_but_not_read_back_is_201_with_a_warning(
    gateway: Api, db_url: str, fault: str
) -> None:
    api, sim, _ = await gateway("demo")
    sim.faults.only = "QBP"  # the A28 is answered AA; every query after it fails
    if fault == "nak":
        sim.faults.nak_ae_count = 10
    else:
        sim.faults.drop_count = 10
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 201, r.text
    assert "could not be read back" in r.headers["warning"]
    body = r.json()
    assert body["resourceType"] == "Patient" and body["name"][0]["family"] == "O'Connor"
    rows = _rows(db_url, 'SELECT "PASID" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n',
                 n="9991234578")
    assert [body["id"]] == [r_[0] for r_ in rows]
    assert r.headers["location"].endswith(f"/Patient/{body['id']}")


async def test_update_accepted_but_not_read_back_is_200_with_a_warning(gateway: Api) -> None:
    api, sim, _ = await gateway("demo")
    current = (await api.get("/STU3/Patient/D0000002")).json()
    current["name"][0]["family"] = "Renamed"
    # the existence check before the A31 passes, the read after it is refused
    sim.faults.only, sim.faults.every, sim.faults.nak_ar_count = "QBP", 2, 1
    sim.faults.seen = 0
    r = await api.put("/STU3/Patient/D0000002", json=current, headers=JSON)
    assert r.status_code == 200, r.text
    assert "could not be read back" in r.headers["warning"]
    assert r.json()["name"][0]["family"] == "Renamed"


async def test_a_lost_ack_is_504_outcome_unknown_and_a_conditional_retry_finds_it(
    gateway: Api, db_url: str
) -> None:
    api, sim, _ = await gateway("itk")  # this PAS does not recognise a resent MSH-10
    sim.faults.only = "ADT"
    sim.faults.drop_count = 1  # applied, then the connection drops before the ACK
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 504 and _code(r) == "WRITE_OUTCOME_UNKNOWN", r.text
    assert "MAY HAVE BEEN APPLIED" in r.json()["issue"][0]["diagnostics"]
    assert "If-None-Exist" in r.json()["issue"][0]["diagnostics"]
    count = 'SELECT COUNT(*) FROM "PATIENTS" WHERE "NHS_NUMBER" = :n'
    assert _rows(db_url, count, n="9991234578")[0][0] == 1  # not resent: applied once
    retry = await api.post("/STU3/Patient", json=NEW_PATIENT,
                           headers={**JSON, "If-None-Exist": f"identifier={NHS}|9991234578"})
    assert retry.status_code == 200, retry.text
    assert _rows(db_url, count, n="9991234578")[0][0] == 1


# --- defect 3: the NHS number in CX-4 and CX-5 ---------------------------------------------------


async def test_nhs_number_is_written_in_cx4_and_cx5(gateway: Api, db_url: str) -> None:
    api, sim, _ = await gateway("strict", STRICT)  # this PAS keys identifiers on CX-5
    seen: list[bytes] = []
    handler = sim._server.handler

    async def record(data: bytes) -> Any:
        seen.append(data)
        return await handler(data)

    sim._server.handler = record
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 201, r.text
    a28 = next(m for m in seen if b"ADT^A28" in m)
    assert b"9991234578^^^NHS^NH" in a28
    rows = _rows(db_url, 'SELECT "PASID" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n',
                 n="9991234578")
    assert len(rows) == 1 and r.headers["location"].endswith(rows[0][0])


# --- defect 4: dates of death at every precision, PID-30 without a date -------------------------


async def test_a_date_only_death_is_served(gateway: Api, db_url: str) -> None:
    api, _, _ = await gateway("itk")  # PID-29 as YYYYMMDD
    dead = _rows(db_url, 'SELECT "PASID", "DTTM_OF_DEATH" FROM "PATIENTS" WHERE '
                         '"DTTM_OF_DEATH" IS NOT NULL AND "ARCHV_FLAG" = \'N\' LIMIT 3')
    assert dead
    for pasid, death in dead:
        p = (await api.get(f"/STU3/Patient/{pasid}")).json()
        d = death[:8]
        assert p["deceasedDateTime"] == f"{d[:4]}-{d[4:6]}-{d[6:8]}", pasid
        assert "deceasedBoolean" not in p


# --- defect 6: every visit an Encounter, with status and class ----------------------------------


async def test_every_visit_of_a_patient_is_an_encounter(gateway: Api, db_url: str) -> None:
    api, _, _ = await gateway("itk")  # one PID, then every PV1 PV2 of the patient
    many = _rows(db_url, 'SELECT p."PASID", COUNT(*) FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                         'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."ARCHV_FLAG" = \'N\' '
                         'AND s."SPELL_STATUS" != \'C\' GROUP BY p."PASID" HAVING COUNT(*) > 2 '
                         'LIMIT 2')
    assert many
    for pasid, _ in many:
        spells = {r[0] for r in _rows(
            db_url, 'SELECT s."SPELL_NUMBER" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p ON '
                    'p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."PASID" = :p AND '
                    's."SPELL_STATUS" != \'C\'', p=pasid)}
        r = await api.get("/STU3/Encounter", params={"patient": pasid, "_count": 50})
        assert r.status_code == 200, r.text
        bundle = r.json()
        got = [e["resource"] for e in bundle.get("entry", [])]
        assert {e["id"] for e in got} == spells, pasid
        assert bundle.get("total", len(got)) == len(got)
        for enc in got:
            assert enc["status"] in ("finished", "in-progress", "planned")
            assert enc["class"]["code"] in ("IMP", "SS")
            assert enc["subject"]["reference"] == f"Patient/{pasid}"


# --- defect 7: what the gateway serves, its own update accepts -----------------------------------


async def test_get_then_put_round_trips_without_pid32(gateway: Api) -> None:
    api, _, _ = await gateway("itk")  # no PID-32: no NHS number verification status
    for pasid in ("D0000001", "D0000003", "D0000004"):
        served = (await api.get(f"/STU3/Patient/{pasid}")).json()
        served.pop("meta", None)
        r = await api.put(f"/STU3/Patient/{pasid}", json=served, headers=JSON)
        assert r.status_code == 200, (pasid, r.text)


# --- defect 8: one deadline per request, retries only for idempotent messages --------------------


async def test_a_silent_pas_fails_a_read_within_the_deadline(gateway: Api) -> None:
    api, sim, app = await gateway("demo")
    client = _adapter(app).client
    client.reply_timeout, client.retries, client.backoff_base = 0.8, 3, 0.01
    _adapter(app).options = _adapter(app).options.model_copy(update={"deadline": 1.0})
    sim.faults.delay_seconds, sim.faults.delay_count = 5.0, 100
    started = time.monotonic()
    reads = await asyncio.gather(*(api.get(f"/STU3/Patient/D000000{i}") for i in range(1, 5)))
    elapsed = time.monotonic() - started
    assert all(r.status_code == 504 and _code(r) == "BACKEND_TIMEOUT" for r in reads)
    # four reads over a pool of two, each with 4 attempts of 0.8 s: 1 s bounds them all
    assert elapsed < 2.0, elapsed


async def test_a_create_is_never_resent_and_its_timeout_says_the_outcome_is_unknown(
    gateway: Api, db_url: str
) -> None:
    api, sim, app = await gateway("itk")
    client = _adapter(app).client
    client.reply_timeout, client.retries = 0.3, 3
    sim.faults.only, sim.faults.delay_seconds, sim.faults.delay_count = "ADT", 1.0, 1
    before = len(sim.received)
    r = await api.post("/STU3/Patient", json=NEW_PATIENT, headers=JSON)
    assert r.status_code == 504 and _code(r) == "WRITE_OUTCOME_UNKNOWN", r.text
    assert len(sim.received) == before + 1  # sent once, never again
    await asyncio.sleep(0.8)  # the PAS finishes applying it
    count = 'SELECT COUNT(*) FROM "PATIENTS" WHERE "NHS_NUMBER" = :n'
    assert _rows(db_url, count, n="9991234578")[0][0] == 1


# --- defects 5 and 9: the dialect as configuration ----------------------------------------------


def _oracle(db_url: str, where: str) -> set[str]:
    return {r[0] for r in _rows(db_url, f'SELECT "PASID" FROM "PATIENTS" WHERE {where} '
                                        'AND "ARCHV_FLAG" = \'N\'')}


async def test_a_prefix_matching_pas_without_wildcards_is_searched_in_its_terms(
    gateway: Api, db_url: str
) -> None:
    expected = _oracle(db_url, '"SURNAME" LIKE \'SM%\' AND "SEXXX_CODE" = \'2\'')
    assert expected
    api, _, _ = await gateway("strict", STRICT)
    r = await api.get("/STU3/Patient", params={"family": "sm", "gender": "female",
                                               "_count": 100})
    assert r.status_code == 200, r.text
    assert {e["resource"]["id"] for e in r.json().get("entry", [])} == expected
    # :exact holds although this PAS prefix-matches: the reply is filtered
    surname = _rows(db_url, 'SELECT "SURNAME" FROM "PATIENTS" WHERE "SURNAME" LIKE \'SM%\' '
                            'LIMIT 1')[0][0]
    exact = _oracle(db_url, f'"SURNAME" = \'{surname}\' AND "SEXXX_CODE" = \'2\'')
    r = await api.get("/STU3/Patient", params={"family:exact": surname.title(),
                                               "gender": "female", "_count": 100})
    assert {e["resource"]["id"] for e in r.json().get("entry", [])} == exact
    r = await api.get("/STU3/Patient", params={"family:exact": surname.title()[:-1],
                                               "gender": "female"})
    assert r.status_code == 200 and "entry" not in r.json()
    # the NHS number without qualifiers, the reply filtered to NHS numbers
    r = await api.get("/STU3/Patient", params={"identifier": f"{NHS}|9990000018"})
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["D0000001"]


async def test_what_the_dialect_cannot_express_is_400_not_an_empty_200(gateway: Api) -> None:
    api, _, _ = await gateway("strict", {"wildcard": "none", "matching": "exact",
                                         "identifier_qualifiers": False,
                                         "qpd_fields": ["PID.3.1", "PID.5.1", "PID.8"]})
    r = await api.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH"
    r = await api.get("/STU3/Patient", params={"family:exact": "Smith",
                                               "birthdate": "1965-04-12"})
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH"
    assert "PID.7" in r.json()["issue"][0]["diagnostics"]


async def test_page_two_total_is_the_query_total(gateway: Api, db_url: str) -> None:
    api, _, _ = await gateway("itk")  # QAK-4 of a continuation counts from the pointer
    expected = _oracle(db_url, '"SEXXX_CODE" = \'2\' AND "SURNAME" LIKE \'S%\'')
    url: str | None = "/STU3/Patient?family=s&gender=female&_count=4"
    totals, got = [], []
    while url:
        bundle = (await api.get(url)).json()
        totals.append(bundle.get("total"))
        got += [e["resource"]["id"] for e in bundle.get("entry", [])]
        url = next((ln["url"] for ln in bundle["link"] if ln["relation"] == "next"), None)
    assert len(totals) > 2 and set(totals) == {len(expected)}
    assert sorted(got) == sorted(expected)


async def test_an_expired_continuation_pointer_is_a_clear_error(gateway: Api) -> None:
    api, _, _ = await gateway("strict", STRICT)  # pointers live 2 s
    first = (await api.get("/STU3/Patient?family=s&gender=female&_count=2")).json()
    url = next(ln["url"] for ln in first["link"] if ln["relation"] == "next")
    await asyncio.sleep(2.2)
    r = await api.get(url)
    # The link, not the PAS, is what failed: a 400 saying to start again (a retry would
    # meet the same refusal), with the PAS's own words.
    assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN"
    assert "expired" in r.json()["issue"][0]["diagnostics"]
    assert "start the search again" in r.json()["issue"][0]["diagnostics"]
