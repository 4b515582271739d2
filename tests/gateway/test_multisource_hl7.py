"""Encounter from an HL7 v2 PAS and an SQL table at once (mappings/demo-hl7v2-mixed).

The HL7 v2 source pages only by its PAS's DSC-1 continuation pointer, so the type is paged
in source order and that source is read in place (gateway.multisource). Here the PAS is the
repo's simulator over real TCP MLLP, answering from the same demo database the SQL source
reads (SQLite and PostgreSQL); the oracle is that database read with plain SQL in the test:
every record of each source must come exactly once over a walk of every page, with `_count`
and `total` right; a PAS that stops answering mid-walk is said on the page (or, strict, is
the answer), never a silent gap; an expired pointer is a clear 400.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from gateway.demo_pas import build_database, ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.demo_pas.hl7v2.profiles import PROFILES, Profile
from gateway.settings import Settings
from tests.pg import TempPostgres

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2-mixed"
PATIENTS = 60
ALL = "date=ge1900-01-01"  # every spell: each source needs a parameter it queries on
STRICT = {"Prefer": "handling=strict"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("ms-hl7") / "pas.sqlite"
        ensure_sqlite_demo(path, patients=PATIENTS, progress=False)
        return f"sqlite:///{path}"
    server: TempPostgres = request.getfixturevalue("postgres_server")
    url = server.create_database("multisource_hl7")
    build_database(url, patients=PATIENTS)
    return url


def _rows(url: str, sql: str) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text(sql))]
    finally:
        engine.dispose()


@dataclasses.dataclass
class Oracle:
    hl7: list[str]
    """The PAS's visits (PROVIDER_SPELLS of live patients), in its reply order."""
    sql: list[str]
    """The SQL source's spells, in key order."""
    by_patient: dict[str, set[str]]


def oracle(url: str, *, cancelled: bool = True) -> Oracle:
    live = '"p"."ARCHV_FLAG" <> \'Y\'' + ("" if cancelled else
                                          ' AND ("s"."SPELL_STATUS" IS NULL OR '
                                          '"s"."SPELL_STATUS" <> \'C\')')
    spells = ('FROM "PROVIDER_SPELLS" "s" JOIN "PATIENTS" "p" '
              'ON "p"."PATNT_REFNO" = "s"."PATNT_REFNO" WHERE "s"."ADMIT_DTTM" IS NOT NULL')
    hl7 = [f"v2-{n}" for n in _rows(url, f'SELECT "s"."SPELL_NUMBER" {spells} AND {live} '
                                          'ORDER BY "p"."PATNT_REFNO", "s"."PRVSP_REFNO"')]
    sql = [str(k) for k in _rows(url, f'SELECT "s"."PRVSP_REFNO" {spells} '
                                      'ORDER BY "s"."PRVSP_REFNO"')]
    by_patient: dict[str, set[str]] = {}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            for pasid, key, number, archived in conn.execute(sa.text(
                    'SELECT "p"."PASID", "s"."PRVSP_REFNO", "s"."SPELL_NUMBER", '
                    f'"p"."ARCHV_FLAG" {spells}')):
                mine = by_patient.setdefault(pasid, set())
                mine.add(str(key))
                if archived != "Y":
                    mine.add(f"v2-{number}")
    finally:
        engine.dispose()
    return Oracle(hl7, sql, by_patient)


class Api:
    """The gateway serving the mixed directory, and the PAS simulator behind it."""

    def __init__(self, client: httpx.AsyncClient, sim: PasSimulator) -> None:
        self.client = client
        self.sim = sim


@asynccontextmanager
async def gateway(db_url: str, tmp: Path, profile: Profile | str = "demo",
                  max_quantity: int = 100) -> AsyncIterator[Api]:
    sim = PasSimulator(db_url, dialect=profile, max_quantity=max_quantity)
    await sim.start()
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp, paging_secret="t", log_level="warning",
        progress=False, auth_mode="insecure-demo", rate_limit_per_minute=100_000,
        rate_limit_burst=100_000, source_rate_limit_per_minute=0,
        connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                yield Api(c, sim)
    finally:
        await sim.stop()


def matches(body: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]


def outcomes(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(code, diagnostics) of every issue of the page's OperationOutcome entries."""
    return [(i["details"]["coding"][0]["code"], i["diagnostics"])
            for e in body.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def link(body: dict[str, Any], relation: str) -> str | None:
    found = [lk["url"] for lk in body["link"] if lk["relation"] == relation]
    assert len(found) <= 1
    return found[0] if found else None


def code(r: httpx.Response) -> str:
    return str(r.json()["issue"][0]["details"]["coding"][0]["code"])


async def walk(c: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None,
               between: Callable[[int], Any] | None = None
               ) -> tuple[list[str], list[dict[str, Any]]]:
    """Every match id over every page, and every page; ``between(n)`` runs (and is awaited)
    after page n."""
    ids: list[str] = []
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        r = await c.get(next_url, headers=headers or {})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        ids += matches(body)
        assert link(body, "previous") is None  # an HL7 v2 source cannot page back
        next_url = link(body, "next")
        assert len(pages) < 200, "the walk does not end"
        if between is not None:
            await between(len(pages))
    return ids, pages


def full_pages(pages: list[dict[str, Any]], count: int) -> Iterator[bool]:
    """Whether each page but the last is a full `_count` (the last: at most)."""
    for i, p in enumerate(pages):
        n = len(matches(p))
        yield n == count if i < len(pages) - 1 else 0 < n <= count


@pytest.mark.parametrize("count", [4, 7, 50])
async def test_a_walk_serves_every_record_of_both_sources_once(
        db_url: str, tmp_path: Path, count: int) -> None:
    want = oracle(db_url)
    assert len(want.hl7) > 15 and len(want.sql) > 15
    async with gateway(db_url, tmp_path) as api:
        ids, pages = await walk(api.client, f"/STU3/Encounter?{ALL}&_count={count}"
                                            "&_total=accurate")
        # One query to the PAS per page holding its records, none after: the SQL pages do
        # not ask it again (its total rides in the link)
        assert len(api.sim.received) == sum(
            1 for p in pages if any(m.startswith("v2-") for m in matches(p)))
    # Source order (mapping files by name: Encounter.hl7v2, then Encounter.sql), each in
    # its own order: every record once, no gap, no repeat.
    assert ids == want.hl7 + want.sql
    assert all(full_pages(pages, count))
    assert {p.get("total") for p in pages} == {len(want.hl7) + len(want.sql)}
    assert not any(outcomes(p) for p in pages)


async def test_short_replies_still_fill_each_page(db_url: str, tmp_path: Path) -> None:
    # The PAS caps every reply at 3 records (RCP-2 asks for more): a page reads several
    # replies, and ends part-way through one (the next page asks that pointer again).
    want = oracle(db_url)
    async with gateway(db_url, tmp_path, max_quantity=3) as api:
        ids, pages = await walk(api.client, f"/STU3/Encounter?{ALL}&_count=7")
        assert ids == want.hl7 + want.sql
        assert all(full_pages(pages, 7))


async def test_an_itk_pas_walk(db_url: str, tmp_path: Path) -> None:
    # The ITK profile: one PID then all its visits, QAK-4 of a continuation counting from the
    # pointer, pointers living 5 minutes, cancelled visits gone.
    want = oracle(db_url, cancelled=False)
    async with gateway(db_url, tmp_path, "itk", max_quantity=5) as api:
        ids, pages = await walk(api.client, f"/STU3/Encounter?{ALL}&_count=6&_total=accurate")
    assert ids == want.hl7 + oracle(db_url).sql
    assert all(full_pages(pages, 6))
    # Its QAK counts patients, not visits: a total it cannot give is left out, never wrong.
    assert {p.get("total") for p in pages} <= {None, len(want.hl7) + len(want.sql)}


async def test_a_pas_stopping_mid_walk_is_said_never_a_silent_gap(
        db_url: str, tmp_path: Path) -> None:
    want = oracle(db_url)
    async with gateway(db_url, tmp_path) as api:
        stopped: list[int] = []

        async def outage(page: int) -> None:
            if page == 2:  # the PAS stops answering part-way through its own records ...
                api.sim.faults.drop_count = 10_000  # every message: connection closed
                stopped.append(page)
            elif page == 4:  # ... and answers again two pages later
                api.sim.faults.drop_count = 0

        ids, pages = await walk(api.client, f"/STU3/Encounter?{ALL}&_count=5",
                                between=outage)
    assert stopped == [2]
    # every record once, whatever the order the outage made
    assert sorted(ids) == sorted(want.hl7 + want.sql) and len(ids) == len(set(ids))
    warned = [i for i, p in enumerate(pages) if outcomes(p)]
    assert warned == [2, 3]  # the pages served while it was down say so
    for i in warned:
        (what, text), = outcomes(pages[i])
        assert what == "SOURCE_UNAVAILABLE" and "'Encounter.hl7v2'" in text
        assert all(not m.startswith("v2-") for m in matches(pages[i]))
    assert ids[:10] == want.hl7[:10]  # its first two pages came before the outage


async def test_a_pas_down_under_strict_is_the_answer(db_url: str, tmp_path: Path) -> None:
    async with gateway(db_url, tmp_path) as api:
        first = (await api.client.get(f"/STU3/Encounter?{ALL}&_count=5")).json()
        api.sim.faults.drop_count = 10_000  # it stops answering
        nxt = link(first, "next")
        assert nxt is not None
        r = await api.client.get(nxt, headers=STRICT)
        assert r.status_code in (502, 503, 504), r.text
        assert code(r) in ("BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT", "BACKEND_ERROR")
        # not strict: a partial page (the SQL source's records) that says so
        r = await api.client.get(nxt)
        assert r.status_code == 200
        assert [c for c, _ in outcomes(r.json())] == ["SOURCE_UNAVAILABLE"]
        assert matches(r.json()) and not any(m.startswith("v2-") for m in matches(r.json()))


async def test_an_expired_pointer_is_a_clear_400_not_a_loop(db_url: str, tmp_path: Path
                                                            ) -> None:
    profile = dataclasses.replace(PROFILES["demo"], pointer_ttl=1.0)
    async with gateway(db_url, tmp_path, profile, max_quantity=5) as api:
        first = (await api.client.get(f"/STU3/Encounter?{ALL}&_count=5")).json()
        nxt = link(first, "next")
        assert nxt is not None and all(m.startswith("v2-") for m in matches(first))
        await asyncio.sleep(1.5)
        for _ in range(2):  # the same answer each time: start again
            r = await api.client.get(nxt)
            assert r.status_code == 400, r.text
            assert code(r) == "INVALID_PAGE_TOKEN"
            text = r.json()["issue"][0]["diagnostics"]
            assert "start the search again" in text and "expired" in text
        # a first page is never a continuation: always answered
        r = await api.client.get(f"/STU3/Encounter?{ALL}&_count=5")
        assert r.status_code == 200 and matches(r.json()) == matches(first)


async def test_a_search_the_pas_cannot_take_leaves_it_out_and_says_so(
        db_url: str, tmp_path: Path) -> None:
    want = oracle(db_url)
    async with gateway(db_url, tmp_path) as api:
        ids, pages = await walk(api.client, "/STU3/Encounter?_count=8")
        assert ids == want.sql
        for p in pages:  # every page says which source was not searched, and why
            (what, text), = outcomes(p)
            assert what == "SOURCE_NOT_SEARCHED"
            assert "'Encounter.hl7v2'" in text and "needs at least one search parameter" in text
            assert "total" not in p  # a total without that source would be wrong
        r = await api.client.get("/STU3/Encounter?_count=8", headers=STRICT)
        assert r.status_code == 400 and code(r) == "UNSUPPORTED_SEARCH"
        # a count without that source would be wrong: its 400
        for counting in ("_summary=count", "_count=0"):
            r = await api.client.get(f"/STU3/Encounter?{counting}")
            assert r.status_code == 400 and code(r) == "UNSUPPORTED_SEARCH"
        r = await api.client.get(f"/STU3/Encounter?{ALL}&_summary=count")
        assert r.status_code == 200 and r.json()["total"] == len(want.hl7) + len(want.sql)
        # several values of one parameter: the SQL source takes them, the PAS cannot
        r = await api.client.get("/STU3/Encounter?_count=8&patient=D0000001,D0000002")
        assert r.status_code == 200
        assert [c for c, _ in outcomes(r.json())] == ["SOURCE_NOT_SEARCHED"]


async def test_reads_and_patient_searches_reach_both_sources(db_url: str, tmp_path: Path
                                                             ) -> None:
    want = oracle(db_url)
    pasid = max(want.by_patient, key=lambda p: (len(want.by_patient[p]), p))
    async with gateway(db_url, tmp_path) as api:
        c = api.client
        for rid in (want.hl7[0], want.hl7[-1], want.sql[0]):
            r = await c.get(f"/STU3/Encounter/{rid}")
            assert r.status_code == 200 and r.json()["id"] == rid
        r = await c.get("/STU3/Encounter/v2-IP99999999")
        assert r.status_code == 404
        r = await c.get(f"/STU3/Encounter?_id={want.hl7[3]},{want.sql[2]}")
        assert r.status_code == 200 and matches(r.json()) == [want.hl7[3], want.sql[2]]
        # one PAS number finds the patient's Encounters in both sources (both map `patient`
        # to the PAS number here), and every subject reference is that patient
        ids, pages = await walk(c, f"/STU3/Encounter?patient={pasid}&_count=2")
        assert set(ids) == want.by_patient[pasid] and len(ids) == len(set(ids))
        assert any(i.startswith("v2-") for i in ids) and any(i.isdigit() for i in ids)
        subjects = {e["resource"]["subject"]["reference"] for p in pages
                    for e in p["entry"] if e["search"]["mode"] == "match"}
        assert subjects == {f"Patient/{pasid}"}
        r = await c.get(f"/STU3/Patient/{pasid}")
        assert r.status_code == 200
        # _include follows both sources' subject references to the PAS's Patient
        r = await c.get(f"/STU3/Encounter?patient={pasid}&_include=Encounter:patient")
        included = [e["resource"]["id"] for e in r.json()["entry"]
                    if e["search"]["mode"] == "include"]
        assert r.status_code == 200 and included == [pasid]


async def test_a_chain_is_resolved_once_and_the_links_say_what_it_found(
        db_url: str, tmp_path: Path) -> None:
    """Neither source can join Patient (it comes from the PAS): the patient query runs
    once, and the self and next links are the search by the patient it found, so a walk
    sends the patient query once, not once a page."""
    want = oracle(db_url)
    pasid = max(want.by_patient, key=lambda p: (len(want.by_patient[p]), p))
    [nhs] = _rows(db_url, f'SELECT "NHS_NUMBER" FROM "PATIENTS" WHERE "PASID" = \'{pasid}\'')
    async with gateway(db_url, tmp_path) as api:
        before = len(api.sim.received)
        ids, pages = await walk(api.client, "/STU3/Encounter?patient.identifier="
                                f"https://fhir.nhs.uk/Id/nhs-number|{nhs}&_count=2")
        assert set(ids) == want.by_patient[pasid] and len(ids) == len(set(ids))
        assert len(pages) > 2
        sent = len(api.sim.received) - before
        before = len(api.sim.received)
        plain, _ = await walk(api.client, f"/STU3/Encounter?patient=Patient/{pasid}&_count=2")
        assert plain == ids
        # the same walk by the patient, and one message more: the patient query, once
        assert sent == len(api.sim.received) - before + 1
        for i, page in enumerate(pages):
            self_link = link(page, "self")
            assert self_link is not None and "patient.identifier" not in self_link
            assert f"patient=Patient%2F{pasid}" in self_link
            assert [c for c, _ in outcomes(page)] == (["CHAIN_RESOLVED_BY_SEARCH"] if i == 0
                                                      else [])
        # Patient comes from the PAS alone: the PAS down, the chain cannot be answered, and
        # that is the answer, lenient or strict — never the SQL source's page without it
        api.sim.faults.drop_count = 10_000
        for headers in ({}, STRICT):
            r = await api.client.get("/STU3/Encounter?patient.identifier="
                                     f"https://fhir.nhs.uk/Id/nhs-number|{nhs}",
                                     headers=headers)
            assert r.status_code in (502, 503, 504), r.text
            assert code(r) in ("BACKEND_UNAVAILABLE", "BACKEND_TIMEOUT", "BACKEND_ERROR")


async def test_the_capability_statement_claims_only_what_both_take(
        db_url: str, tmp_path: Path) -> None:
    async with gateway(db_url, tmp_path) as api:
        cs = (await api.client.get("/STU3/metadata")).json()
        r = await api.client.get(f"/STU3/Encounter?{ALL}&_sort=date")
    enc, = [r for r in cs["rest"][0]["resource"] if r["type"] == "Encounter"]
    assert {p["name"] for p in enc["searchParam"]} == {"_id", "patient", "subject", "date",
                                                       "identifier"}
    assert {i["code"] for i in enc["interaction"]} == {"read", "search-type"}
    assert r.status_code == 400  # the PAS cannot sort: the type has no _sort
