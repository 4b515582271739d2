"""``Patient/[id]/$everything``: the patient's whole record across every source, paged.

The oracle is the database, read here with plain SQL (tests/gateway/test_multisource.py's
``encounters``). Statements are counted with a SQLAlchemy event listener on the adapter's
own engine: a patient with many resources costs the same number as one with few.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy import event
from starlette.applications import Starlette

from gateway import compartment
from gateway.operations.record import REFERENCED
from tests.conftest import LiveServer
from tests.gateway.test_multisource import encounters, walk
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio


@pytest.fixture
async def gw(demo_url: str, make_app: Callable[..., Starlette], tmp_path: Path
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str, Starlette]]:
    app = make_app(demo_url, audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, demo_url, app


def richest(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["patient"]] = counts.get(r["patient"], 0) + 1
    return max(counts, key=lambda p: (counts[p], p))


def of(rows: list[dict[str, Any]], patient: str) -> set[str]:
    return {r["id"] for r in rows if r["patient"] == patient}


# The clinical types of the patient compartment besides Encounter: (type, table, key, the
# soft-delete flag whose 'N' rows are served), as the demo PAS holds them.
CLINICAL = (
    ("AllergyIntolerance", "ALLERGIES", "ALLGY_REFNO", "DELETED_FLAG"),
    ("DocumentReference", "DOCUMENTS", "DOCMT_REFNO", "DELETED_FLAG"),
    ("Condition", "PROBLEMS", "PROBL_REFNO", "DELETED_FLAG"),
    ("Flag", "ALERTS", "ALERT_REFNO", "ARCHV_FLAG"),
    ("Immunization", "IMMUNISATIONS", "IMMUN_REFNO", "DEL_FLAG"),
    ("MedicationRequest", "PRESCRIPTIONS", "PRESC_REFNO", "DEL_FLAG"),
    ("MedicationStatement", "MEDICATION_LIST", "MEDLS_REFNO", "DEL_FLAG"),
    ("Observation", "RESULTS", "RESLT_REFNO", "DEL_FLAG"),
    ("Procedure", "PROCEDURES", "PROCD_REFNO", "DELETED_FLAG"),
)


def whole_record(url: str, rows: list[dict[str, Any]], patient: str) -> set[str]:
    """``Type/id`` of everything the patient's record holds but the Patient itself: its
    encounters (three sources) and its clinical records."""
    out = {f"Encounter/{i}" for i in of(rows, patient)}
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            for rtype, table, key, flag in CLINICAL:
                out |= {f"{rtype}/{k}" for (k,) in conn.execute(sa.text(
                    f'SELECT "{key}" FROM "{table}" WHERE "PATNT_REFNO" = :p '
                    f'AND "{flag}" = \'N\''), {"p": int(patient)})}
    finally:
        engine.dispose()
    return out


def typed(pages: list[dict[str, Any]]) -> list[str]:
    """``Type/id`` of every match over the pages, in order."""
    return [f"{e['resource']['resourceType']}/{e['resource']['id']}" for page in pages
            for e in page.get("entry", []) if e["search"]["mode"] == "match"]


@contextmanager
def statements(app: Starlette) -> Iterator[list[str]]:
    """Every SQL statement the gateway's SQLite connections run while the block runs.

    The SQL adapter runs its reused statements straight on the DBAPI cursor (past
    SQLAlchemy's cursor events), so this counts at the driver: a SQLAlchemy ``connect``
    listener puts sqlite3's trace callback on every connection (the pools are emptied first,
    so every connection used is a new one).
    """
    seen: list[str] = []
    engines = list({id(e): e for p in app.state.registry.sources()
                    if (e := getattr(p.mapping.adapter, "engine", None)) is not None}.values())

    def trace(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.set_trace_callback(seen.append)

    for e in engines:
        assert e.dialect.name == "sqlite"
        event.listen(e, "connect", trace)
        e.dispose()
    try:
        yield seen
    finally:
        for e in engines:
            event.remove(e, "connect", trace)
            e.dispose()


async def test_every_page_walked_is_the_patients_whole_record(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    c, url, _ = gw
    rows = encounters(url)
    pid = richest(rows)
    mine = whole_record(url, rows, pid)
    assert len(of(rows, pid)) >= 8
    assert {m.split("/")[0] for m in mine} > {"Encounter"}  # clinical records too
    ids, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?_count=3")
    assert len(pages) >= 3
    assert ids[0] == pid and ids.count(pid) == 1  # the patient, first, once
    got = typed(pages)
    assert len(got) == len(set(got))
    assert set(got) - {f"Patient/{pid}"} == mine
    for page in pages:
        matches = [e for e in page.get("entry", []) if e["search"]["mode"] == "match"]
        assert len([e for e in matches if e["resource"]["resourceType"] != "Patient"]) <= 3
        refs = {f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in page.get("entry", []) if e["search"]["mode"] == "include"}
        wanted = {ref for e in matches for ref in _refs(e["resource"])
                  if ref.split("/")[0] in ("Practitioner", "Organization", "Location")}
        assert wanted <= refs  # what the page refers to comes with it
        assert page["type"] == "searchset"


def matched(pages: list[dict[str, Any]], rtype: str) -> set[str]:
    """The ids of the ``rtype`` matches over every page."""
    return {e["resource"]["id"] for p in pages for e in p.get("entry", [])
            if e["search"]["mode"] == "match" and e["resource"]["resourceType"] == rtype}


def _refs(node: Any) -> set[str]:
    out: set[str] = set()
    if isinstance(node, dict):
        for k, v in node.items():
            out |= {v} if k == "reference" and isinstance(v, str) else _refs(v)
    elif isinstance(node, list):
        for v in node:
            out |= _refs(v)
    return out


async def test_type_since_and_dates_narrow_it(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    c, url, _ = gw
    rows = encounters(url)
    pid = richest(rows)
    ids, _ = await walk(c, f"/STU3/Patient/{pid}/$everything?_type=Patient")
    assert ids == [pid]
    ids, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?_type=Encounter&_count=50")
    assert set(ids) == of(rows, pid)
    assert not [e for p in pages for e in p.get("entry", []) if e["search"]["mode"] == "include"]
    ids, _ = await walk(c, f"/STU3/Patient/{pid}/$everything?_since=2099-01-01T00:00:00Z")
    assert ids == [pid]  # nothing changed since; the patient is always there
    _, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?_since=1990-01-01T00:00:00Z")
    assert set(typed(pages)) - {f"Patient/{pid}"} == whole_record(url, rows, pid)
    # start: only encounters going on at or after it (the oracle: started, or ongoing, after)
    cut = sorted(r["at"] for r in rows if r["patient"] == pid)[len(of(rows, pid)) // 2]
    import datetime as dt
    day = dt.datetime.fromtimestamp(cut, dt.UTC).date().isoformat()
    _, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?start={day}&_count=50")
    got = {i.split("/")[1] for i in typed(pages) if i.startswith("Encounter/")}
    assert got and got < of(rows, pid)
    for p in pages:
        for e in p.get("entry", []):
            res = e["resource"]
            if res["resourceType"] == "Encounter":
                end = res["period"].get("end") or res["period"]["start"]
                assert end[:10] >= day or "end" not in res["period"]


async def test_unknown_patient_bad_parameters_and_post(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    c, _, _ = gw
    r = await c.get("/STU3/Patient/999999999/$everything")
    assert r.status_code == 404
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "RESOURCE_NOT_FOUND"
    for bad in ("_count=0", "_since=2020-01-01", "start=2020-13", "_type=Nothing"):
        r = await c.get(f"/STU3/Patient/100001/$everything?{bad}")
        assert r.status_code == 400, bad
    r = await c.get("/STU3/Patient/100001/$everything?colour=red",
                    headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    body = {"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueCode": "Patient"}]}
    r = await c.post("/STU3/Patient/100001/$everything", content=json.dumps(body),
                     headers={"Content-Type": "application/fhir+json"})
    assert r.status_code == 200
    assert [e["resource"]["id"] for e in r.json()["entry"]] == ["100001"]
    r = await c.get("/STU3/Patient/100001/$everything?_page=garbage")
    assert r.status_code == 400


async def test_the_statement_count_does_not_grow_with_the_record(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    url = demo_sqlite_url
    app = make_app(url)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        await _compare_statement_counts(c, url, app)


async def _compare_statement_counts(c: httpx.AsyncClient, url: str, app: Starlette) -> None:
    rows = encounters(url)
    rich = richest(rows)
    # a patient with one resource of each Encounter source (as the rich one has)
    sources = {}
    for r in rows:
        sources.setdefault(r["patient"], set()).add(r["source"])
    poor = min((p for p, s in sources.items() if len(s) == 3),
               key=lambda p: (len(of(rows, p)), p))
    assert len(of(rows, rich)) > 2 * len(of(rows, poor))
    counts = {}
    for pid in (poor, rich):
        with statements(app) as seen:
            r = await c.get(f"/STU3/Patient/{pid}/$everything?_count=500")
        assert r.status_code == 200
        assert all(s.lstrip().upper().startswith("SELECT") for s in seen), seen
        served = [e for e in r.json()["entry"] if e["search"]["mode"] != "outcome"]
        counts[pid] = (len(seen), len(served))
    assert counts[rich][1] > counts[poor][1]
    assert counts[rich][0] == counts[poor][0], counts
    # patient (+ its children), one per source of each compartment type (Encounter has three),
    # the referenced types (+ their children): a fixed handful
    sections = sum(1 for s in app.state.registry.sources() if s.resource_type != "Patient"
                   and compartment.link(s).kind == "reference")
    assert sections == 3 + len(CLINICAL)
    assert sections + 1 < counts[rich][0] <= sections + 10


async def test_audited_as_one_record_access(
        gw: tuple[httpx.AsyncClient, str, Starlette], tmp_path: Path) -> None:
    c, _, _ = gw
    r = await c.get("/STU3/Patient/100001/$everything?_count=100")
    assert r.status_code == 200
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    [rec] = [json.loads(x) for x in lines if "$everything" in x]
    assert rec["patient"] == "100001" and rec["interaction"] == "operation"
    assert rec["operation"]["name"] == "everything"
    served = {f"{e['resource']['resourceType']}/{e['resource']['id']}"
              for e in r.json()["entry"] if e["search"]["mode"] != "outcome"}
    assert set(rec["operation"]["types"]) == {s.split("/")[0] for s in served}
    assert {"Patient", "Encounter", "DocumentReference", "Practitioner"} <= set(
        rec["operation"]["types"])
    assert set(rec["entities"]) == served
    # every type served, clinical ones included
    assert set(rec["operation"]["types"]) == {s.split("/")[0] for s in served}
    assert set(rec["operation"]["types"]) > {"Patient", "Encounter", "Practitioner",
                                             "Organization", "Location"}


@pytest.fixture
async def tokens(demo_url: str, make_app: Callable[..., Starlette]
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(demo_url, auth_mode="insecure-demo")
    install(app, {"P": patient_token("100001"), "Q": patient_token("100002"),
                  "enc-only": user_token("user/Patient.read user/Encounter.read"),
                  "no-patient": user_token("user/Encounter.read"),
                  "enc-refs": user_token("user/Patient.read user/Encounter.read "
                                         "user/Practitioner.read user/Location.read "
                                         "user/Organization.read")})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


async def test_patient_tokens_get_only_their_own_record(tokens: httpx.AsyncClient) -> None:
    r = await tokens.get("/STU3/Patient/100001/$everything?_count=100", headers=as_("P"))
    assert r.status_code == 200
    for e in r.json()["entry"]:
        res = e["resource"]
        if res["resourceType"] == "Encounter":
            assert res["subject"]["reference"] == "Patient/100001"
    r = await tokens.get("/STU3/Patient/100001/$everything", headers=as_("Q"))
    assert r.status_code == 404  # as a read of another patient: existence not confirmed
    # a link minted for P does not serve Q
    first = (await tokens.get("/STU3/Patient/100001/$everything?_count=1",
                              headers=as_("P"))).json()
    nxt = next(lk["url"] for lk in first["link"] if lk["relation"] == "next")
    assert (await tokens.get(nxt, headers=as_("Q"))).status_code in (400, 404)


async def test_types_the_scopes_do_not_allow_are_left_out_and_said(
        tokens: httpx.AsyncClient) -> None:
    r = await tokens.get("/STU3/Patient/100001/$everything?_count=100",
                         headers=as_("enc-only"))
    assert r.status_code == 200
    kinds = {e["resource"]["resourceType"] for e in r.json()["entry"]
             if e["search"]["mode"] != "outcome"}
    assert kinds == {"Patient", "Encounter"}  # no Practitioner/Organization/Location scope
    # ... and the types the encounters refer to, left out for that reason, are said
    referred = sorted({ref.split("/")[0] for e in r.json()["entry"]
                       if e["resource"]["resourceType"] == "Encounter"
                       for ref in _refs(e["resource"])} - {"Patient", "Encounter"})
    assert {"Practitioner", "Location"} <= set(referred)
    notes = [i["diagnostics"] for i in outcome_issues([r.json()])
             if i["details"]["coding"][0]["code"] == "NOT_INCLUDED"]
    assert ("resources referred to not included, as the client's scopes do not allow "
            f"reading them: {', '.join(t for t in REFERENCED if t in referred)}") in notes
    # a scope that allows them: nothing is said of them, and they come
    r = await tokens.get("/STU3/Patient/100001/$everything?_count=100&_type=Encounter,"
                         "Practitioner,Location,Organization", headers=as_("enc-refs"))
    assert r.status_code == 200
    assert not [i for i in outcome_issues([r.json()]) if "referred" in i["diagnostics"]]
    assert {e["resource"]["resourceType"] for e in r.json()["entry"]
            if e["search"]["mode"] == "include"} >= {"Practitioner", "Location"}
    r = await tokens.get("/STU3/Patient/100001/$everything", headers=as_("no-patient"))
    assert r.status_code == 403


def test_over_real_http(demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    with LiveServer(make_app(demo_sqlite_url)) as s, httpx.Client(base_url=s.url) as c:
        r = c.get("/STU3/Patient/100001/$everything", params={"_count": "2"})
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/fhir+json")
        nxt = next(lk["url"] for lk in r.json()["link"] if lk["relation"] == "next")
        assert nxt.startswith(s.url + "/STU3/Patient/100001/$everything?")
        assert c.get(nxt).status_code == 200
        cs = c.get("/STU3/metadata").json()
        assert {"name": "everything", "definition": {
            "reference": "http://hl7.org/fhir/OperationDefinition/Patient-everything"}} in \
            cs["rest"][0]["operation"]


async def test_types_the_dates_cannot_narrow_are_named(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    import shutil

    import yaml

    from gateway.auth.apikeys import sha256_hex

    repo = Path(__file__).resolve().parents[3]
    demo = tmp_path / "demo-pas"
    shutil.copytree(repo / "mappings" / "demo-pas", demo)
    shutil.copytree(repo / "mappings" / "codemaps", tmp_path / "codemaps")
    ae = demo / "Encounter.ae.sql.yaml"  # the A&E source without its last-updated column
    text = ae.read_text()
    assert text.count("last_updated: {column: e.MODIF_DTTM}\n") == 1
    ae.write_text(text.replace("last_updated: {column: e.MODIF_DTTM}\n", "").replace(
        "  e.MODIF_DTTM: datetime:iso\n", ""))
    key = "k3y-everything-test-0123456789abcdef0123456789abcdef"
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"client_id": "t", "sha256": sha256_hex(key),
                                              "scopes": "system/*.read"}]}))
    app = make_app(demo_sqlite_url, mappings_dir=demo, auth_mode="api-key",
                   api_keys_file=str(keys), audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw",
            headers={"X-API-Key": key}) as c:
        r = await c.get("/STU3/Patient/100001/$everything?_since=2099-01-01T00:00:00Z")
        plain = await c.get("/STU3/Patient/100001/$everything")
    entries = r.json()["entry"]
    ids = [e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"]
    assert ids[0] == "100001" and all(i.startswith("ae-") for i in ids[1:]) and len(ids) > 1
    notes = [i["diagnostics"] for e in entries if e["search"]["mode"] == "outcome"
             for i in e["resource"]["issue"]]
    assert notes == ["_since does not apply to (no last-updated time): Encounter"]
    assert not [e for e in plain.json()["entry"] if e["search"]["mode"] == "outcome"]


async def test_the_patients_documents_are_in_it_and_their_content_is_not(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    """DocumentReference is in the patient compartment (its patient reference): every live
    document of the patient is there, once; Binary (the same documents' content, served by
    gateway.binary) is not a compartment type, so nothing is served twice."""
    import sqlalchemy as sa

    c, url, _ = gw
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            oracle = {str(r[0]) for r in conn.execute(sa.text(
                """SELECT "DOCMT_REFNO" FROM "DOCUMENTS" WHERE "PATNT_REFNO" = 100001 """
                """AND "DELETED_FLAG" = 'N' """))}
    finally:
        engine.dispose()
    assert len(oracle) >= 8  # the fixture patient: every format, both stores
    _, pages = await walk(c, "/STU3/Patient/100001/$everything?_count=50")
    served = [e["resource"] for p in pages for e in p.get("entry", [])]
    docs = [r["id"] for r in served if r["resourceType"] == "DocumentReference"]
    assert sorted(docs) == sorted(oracle)
    assert "Binary" not in {r["resourceType"] for r in served}
    for r in served:
        if r["resourceType"] == "DocumentReference":
            assert r["subject"]["reference"] == "Patient/100001"
            assert r["content"][0]["attachment"]["url"] == f"Binary/{r['id']}"
    ids, _ = await walk(c, "/STU3/Patient/100001/$everything?_type=DocumentReference")
    assert len(ids) == len(set(ids)) and set(ids) - {"100001"} == oracle


def broken_copy(demo_sqlite_url: str, tmp_path: Path, table: str) -> str:
    """A private copy of the SQLite demo whose ``table`` is gone (its source fails: 502)."""
    import shutil
    import sqlite3

    copy = tmp_path / "copy.sqlite"
    shutil.copy(demo_sqlite_url.removeprefix("sqlite:///"), copy)
    db = sqlite3.connect(copy)
    try:
        db.execute(f'ALTER TABLE "{table}" RENAME TO "{table}_GONE"')
        db.commit()
    finally:
        db.close()
    return f"sqlite:///{copy}"


def outcome_issues(pages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [i for page in pages for e in page.get("entry", [])
            if e["search"]["mode"] == "outcome" for i in e["resource"]["issue"]]


async def test_a_section_that_fails_is_said_and_the_walk_goes_on(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """As a multi-source search: by default (and under ``Prefer: handling=lenient``) a section
    whose source fails is a warning naming its type and source, never a silent gap, and every
    other section is still served, walked to the end; the failed section is asked again on a
    later page, and when nothing but it is left and it still does not answer, that page's
    answer is its error (the link stays good: with the source back, it serves the section).
    The audit record lists only the types served. Under ``Prefer: handling=strict`` the
    source's error is the answer at once."""
    url = broken_copy(demo_sqlite_url, tmp_path, "ALERTS")  # Flag's source
    pid = "100001"
    engine = sa.create_engine(demo_sqlite_url)
    try:
        with engine.connect() as conn:
            flags = {f"Flag/{k}" for (k,) in conn.execute(sa.text(
                'SELECT "ALERT_REFNO" FROM "ALERTS" WHERE "PATNT_REFNO" = :p AND '
                '"ARCHV_FLAG" = \'N\''), {"p": int(pid)})}
    finally:
        engine.dispose()
    assert flags  # the gap is real: the patient has flags the answer cannot hold
    whole = whole_record(demo_sqlite_url, encounters(demo_sqlite_url), pid)
    expected = whole - flags
    app = make_app(url, audit_log=str(tmp_path / "audit.jsonl"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        strict = await c.get(f"/STU3/Patient/{pid}/$everything?_count=500",
                             headers={"Prefer": "handling=strict"})
        assert strict.status_code == 502
        body = strict.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
        for headers in ({}, {"Prefer": "handling=lenient"}):
            pages, last, stuck = await walk_until_error(
                c, f"/STU3/Patient/{pid}/$everything?_count=40", headers)
            assert last.status_code == 502 and stuck is not None
            assert last.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
            issues = outcome_issues(pages)
            assert issues  # said on the page that went past it, and on every retry
            assert {(i["severity"], i["code"], i["details"]["coding"][0]["code"],
                     i["diagnostics"]) for i in issues} == {
                ("warning", "incomplete", "SOURCE_UNAVAILABLE",
                 "Flag source 'Flag.sql' did not answer (BACKEND_ERROR); a later page asks "
                 "it again")}
            served = typed(pages)
            assert len(served) == len(set(served))
            assert set(served) - {f"Patient/{pid}"} == expected  # every other section, whole
    _rename(url, "ALERTS_GONE", "ALERTS")  # the source is back: the same link serves it
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        _, tail = await walk(c, stuck)
    assert set(typed(tail)) == flags and not outcome_issues(tail)
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    recs = [json.loads(x) for x in lines if "$everything" in x]
    assert recs[0]["outcome"]["status"] == 502  # the strict request, first
    partial = [r for r in recs[1:] if r["outcome"]["status"] == 200 and not any(
        e.startswith("Flag/") for e in r["entities"])]
    assert len(partial) >= 4  # both walks, several pages each
    for rec in partial:  # Flag was asked (the backend list says so) but not served
        assert "Flag" not in rec["operation"]["types"]
    assert any(q["resource_type"] == "Flag" for r in partial for q in r["backend"]["queries"])
    assert {"Encounter", "Observation"} <= {t for r in partial for t in r["operation"]["types"]}


def _rename(url: str, old: str, new: str) -> None:
    """Break or mend a source: rename one of its tables (SQLite file or PostgreSQL)."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'ALTER TABLE "{old}" RENAME TO "{new}"'))
    finally:
        engine.dispose()


async def walk_until_error(c: httpx.AsyncClient, url: str, headers: dict[str, str]
                           ) -> tuple[list[dict[str, Any]], httpx.Response, str | None]:
    """The pages of a walk up to its first error (or its end): the bodies of the pages
    that answered, the last response, and the link that answered with an error."""
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        r = await c.get(next_url, headers=headers)
        if r.status_code != 200:
            return pages, r, next_url
        pages.append(r.json())
        next_url = next((lk["url"] for lk in pages[-1]["link"] if lk["relation"] == "next"),
                        None)
        assert len(pages) < 400, "the walk does not end"
    return pages, r, None


async def test_a_section_that_failed_mid_walk_comes_later_when_its_source_is_back(
        demo_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """A source goes away mid-walk (its table renamed, SQLite and PostgreSQL) and comes back:
    the page that reached its section says so, the link remembers the section, and a later
    page serves it — the walk ends with the patient's whole record, each resource once."""
    pid = "100001"  # a record with flags, and sections before and after Flag's
    whole = whole_record(demo_url, encounters(demo_url), pid)
    flags = {x for x in whole if x.startswith("Flag/")}
    assert flags
    app = make_app(demo_url, rate_limit_per_minute=100_000, rate_limit_burst=100_000,
                   source_rate_limit_per_minute=0)
    pages: list[dict[str, Any]] = []
    broken = False
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            next_url: str | None = f"/STU3/Patient/{pid}/$everything?_count=4"
            warned_at = None
            while next_url:
                r = await c.get(next_url)
                assert r.status_code == 200, r.text
                pages.append(r.json())
                if len(pages) == 1:
                    assert not set(typed(pages)) & flags  # Flag's section is further on
                    _rename(demo_url, "ALERTS", "ALERTS_GONE")  # the alerts system goes away
                    broken = True
                elif outcome_issues([pages[-1]]) and warned_at is None:
                    warned_at = len(pages) - 1
                    _rename(demo_url, "ALERTS_GONE", "ALERTS")  # and comes back
                    broken = False
                next_url = next((lk["url"] for lk in pages[-1]["link"]
                                 if lk["relation"] == "next"), None)
                assert len(pages) < 400
    finally:
        if broken:
            _rename(demo_url, "ALERTS_GONE", "ALERTS")
    assert warned_at is not None and warned_at < len(pages) - 1  # gone past, with pages after
    [issue] = outcome_issues(pages)  # said once, on the page that went past it
    assert issue["details"]["coding"][0]["code"] == "SOURCE_UNAVAILABLE"
    assert issue["diagnostics"].startswith("Flag source 'Flag.sql' did not answer")
    got = typed(pages)
    assert len(got) == len(set(got))
    assert set(got) - {f"Patient/{pid}"} == whole  # the flags came later: nothing lost
    assert not set(typed(pages[:warned_at + 1])) & flags


async def test_the_patient_failing_is_an_error_a_referenced_type_a_warning(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """The patient's own source failing leaves nothing to answer: its 502, whatever the
    handling. A source of what the record refers to failing (Practitioner here) is, as any
    section's, a warning naming the type — the page is whole otherwise, and none of that
    type is included; under ``Prefer: handling=strict`` it is the 502."""
    pid = "100001"
    plain = make_app(demo_sqlite_url)
    async with plain.router.lifespan_context(plain), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=plain), base_url="http://gw") as c:
        good = (await c.get(f"/STU3/Patient/{pid}/$everything?_count=500")).json()
    refers = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in good["entry"]
              if e["search"]["mode"] == "include"}
    assert {r.split("/")[0] for r in refers} >= {"Practitioner", "Organization"}
    for table in ("PATIENTS", "CLINICIANS"):
        copy = tmp_path / table
        copy.mkdir()
        app = make_app(broken_copy(demo_sqlite_url, copy, table))
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            lenient = await c.get(f"/STU3/Patient/{pid}/$everything?_count=500")
            strict = await c.get(f"/STU3/Patient/{pid}/$everything?_count=500",
                                 headers={"Prefer": "handling=strict"})
        assert strict.status_code == 502, table
        assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
        if table == "PATIENTS":
            assert lenient.status_code == 502
            assert lenient.json()["resourceType"] == "OperationOutcome"
            continue
        assert lenient.status_code == 200, lenient.text
        body = lenient.json()
        issues = outcome_issues([body])
        assert [(i["severity"], i["details"]["coding"][0]["code"], i["diagnostics"])
                for i in issues] == [
            ("warning", "SOURCE_UNAVAILABLE",
             "Practitioner source 'Practitioner.sql' did not answer (BACKEND_ERROR); the "
             "resources of that type this page refers to are not included")]
        assert typed([body]) == typed([good])  # every match still there
        got = {f"{e['resource']['resourceType']}/{e['resource']['id']}"
               for e in body["entry"] if e["search"]["mode"] == "include"}
        assert got == {r for r in refers if not r.startswith("Practitioner/")}


def test_one_source_of_a_type_failing_over_http(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """Over real HTTP (uvicorn): one of Encounter's three sources gone, the record still comes
    (the other two sources' encounters whole) with a warning naming that source, and a next
    link that asks it again; under ``Prefer: handling=strict`` the answer is its 502 as an
    OperationOutcome."""
    url = broken_copy(demo_sqlite_url, tmp_path, "AE_ATTENDANCES")
    rows = encounters(demo_sqlite_url)
    with_ae = {r["patient"] for r in rows if r["id"].startswith("ae-")}
    pid = richest([r for r in rows if r["patient"] in with_ae])  # A&E and other encounters
    with LiveServer(make_app(url)) as server, httpx.Client(base_url=server.url) as c:
        strict = c.get(f"/STU3/Patient/{pid}/$everything?_type=Encounter&_count=500",
                       headers={"Prefer": "handling=strict"})
        assert strict.status_code == 502
        assert strict.headers["content-type"].startswith("application/fhir+json")
        assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
        r = c.get(f"/STU3/Patient/{pid}/$everything?_type=Encounter&_count=500")
        # the next page asks the A&E source again: nothing else is left, so its 502
        nxt = next(lk["url"] for lk in r.json()["link"] if lk["relation"] == "next")
        again = c.get(nxt)
    assert again.status_code == 502
    assert again.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
    assert r.status_code == 200, r.text
    issues = outcome_issues([r.json()])
    assert [(i["details"]["coding"][0]["code"], i["diagnostics"]) for i in issues] == [
        ("SOURCE_UNAVAILABLE", "Encounter source 'Encounter.ae.sql' did not answer "
                               "(BACKEND_ERROR); a later page asks it again")]
    served = {x.split("/")[1] for x in typed([r.json()]) if x.startswith("Encounter/")}
    assert served == {e for e in of(rows, pid) if not e.startswith("ae-")}
    assert served  # inpatient or outpatient encounters: the other sources answered


async def test_each_page_brings_exactly_what_its_matches_refer_to(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    """The included Practitioners/Organizations/Locations/Medications of every page are
    exactly those its matches refer to (an independent walk of every node of every match),
    each once, in type order then key order."""
    c, url, _ = gw
    pid = richest(encounters(url))
    _, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?_count=37")
    kinds = ("Practitioner", "Organization", "Location", "Medication")
    seen = set()
    for page in pages:
        entries = page.get("entry", [])
        matches = [e["resource"] for e in entries if e["search"]["mode"] == "match"]
        included = [(e["resource"]["resourceType"], e["resource"]["id"]) for e in entries
                    if e["search"]["mode"] == "include"]
        wanted = {tuple(r.split("/", 1)) for m in matches for r in _refs(m)
                  if r.split("/", 1)[0] in kinds}
        assert set(included) == wanted
        assert included == sorted(included, key=lambda x: (kinds.index(x[0]), int(x[1])))
        seen |= {k for k, _ in included}
    assert seen == set(kinds)


async def test_a_link_holds_the_sections_left_and_is_checked(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    """The link's position is the list of sections still to serve (each with its keyset
    position); one of the earlier form (a section, every one after it) still reads; a
    position naming no section, or one twice, is refused."""
    from gateway.bundle import Pager

    c, _, _ = gw
    pager = Pager("test-secret")  # the secret make_app configures
    path = "Patient/100001/$everything"
    fp = Pager.fingerprint(path, "_count=500")

    async def page(position: tuple[Any, ...]) -> httpx.Response:
        token = pager.token(fp, position, False)
        return await c.get(f"/STU3/{path}", params={"_count": "500", "_page": token})

    _, pages = await walk(c, f"/STU3/{path}?_count=500")
    whole = [x for x in typed(pages) if not x.startswith("Patient/")]
    kinds = list(dict.fromkeys(x.split("/")[0] for x in whole))
    assert len(kinds) > 3
    first = [x for x in whole if x.startswith(kinds[0] + "/")]  # section 0's (one source)
    # the earlier form: from section 1 on (no patient: not the first page)
    r = await page((1, None))
    assert r.status_code == 200, r.text
    rest = typed([r.json()])
    assert rest and rest == whole[len(first):len(first) + len(rest)]
    # the sections left, in the order given: the last section, then the first
    r = await page(([11, None], [0, None]))  # 12 sections (3 + CLINICAL)
    assert r.status_code == 200, r.text
    got = typed([r.json()])
    assert got[-len(first):] == first and set(got[:-len(first)]) < set(whole) - set(first)
    for bad in (([99, None],), ([0, None], [0, None]), ([0, "x"],), ((True, None),), (),
                (99, None)):
        r = await page(bad)
        assert r.status_code == 400, bad
        assert r.json()["resourceType"] == "OperationOutcome"


async def test_a_connection_that_cannot_be_opened_is_a_warning_for_its_sections(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """Flag served from a database of its own that cannot even be opened (not one failing
    statement: the connection): its section is a warning and a retry, as a failing
    statement's; the other sections are whole. Strict: the 502."""
    import shutil

    repo = Path(__file__).resolve().parents[3]
    demo = tmp_path / "demo-pas"
    shutil.copytree(repo / "mappings" / "demo-pas", demo)
    shutil.copytree(repo / "mappings" / "codemaps", tmp_path / "codemaps")
    conns = demo / "connections.yaml"
    text = conns.read_text()
    assert text.count("connections:\n") == 1
    conns.write_text(text.replace("connections:\n", "connections:\n  alerts:\n"
                                  "    adapter: sql\n    url_env: CCG_ALERTS_URL_EVFIX_TEST\n"
                                  "    timezone: Europe/London\n"))
    flag = demo / "Flag.sql.yaml"
    text = flag.read_text()
    assert text.count("connection: pas") == 1
    flag.write_text(text.replace("connection: pas", "connection: alerts"))
    gone = f"sqlite:///{tmp_path}/no-such-directory/alerts.sqlite"
    pid = "100001"
    whole = whole_record(demo_sqlite_url, encounters(demo_sqlite_url), pid)
    flags = {x for x in whole if x.startswith("Flag/")}
    assert flags
    import yaml

    from gateway.auth.apikeys import sha256_hex

    key = "k3y-everything-alerts-test-0123456789abcdef0123456789ab"
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"client_id": "t", "sha256": sha256_hex(key),
                                              "scopes": "system/*.read"}]}))
    app = make_app(demo_sqlite_url, mappings_dir=demo, auth_mode="api-key",
                   api_keys_file=str(keys), audit_log=str(tmp_path / "audit.jsonl"),
                   connection_urls={"pas": demo_sqlite_url, "alerts": gone})
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw",
            headers={"X-API-Key": key}) as c:
        strict = await c.get(f"/STU3/Patient/{pid}/$everything?_count=500",
                             headers={"Prefer": "handling=strict"})
        pages, last, stuck = await walk_until_error(
            c, f"/STU3/Patient/{pid}/$everything?_count=500", {})
    assert strict.status_code in (502, 503, 504), strict.text
    assert last.status_code in (502, 503, 504) and stuck is not None  # only Flag was left
    issues = outcome_issues(pages)
    assert issues and all(i["diagnostics"].startswith("Flag source 'Flag.sql' did not answer")
                          for i in issues)
    assert set(typed(pages)) - {f"Patient/{pid}"} == whole - flags


# Each type's care date as the demo PAS holds it (columns of the type's table), in order of
# preference: the first one with a value dates the row (mappings' care-date parameters).
CARE_DATES = {
    "Condition": [("ONSET_DATE",), ("RECORDED_DTTM",)],
    "MedicationRequest": [("ORDER_DTTM",)],
    "MedicationStatement": [("START_DATE", "END_DATE")],
    "DocumentReference": [("SERVICE_START_DTTM", "SERVICE_END_DTTM"), ("CREATED_DTTM",)],
}


def _day(value: Any) -> str | None:
    """A stored date or time as YYYYMMDD (SQLite holds '20230904' or '202309041130',
    PostgreSQL dates and timestamps)."""
    return None if value is None else re.sub(r"\D", "", str(value))[:8]


def dated_in(url: str, rtype: str, patient: str, start: str | None, end: str | None
             ) -> tuple[set[str], int]:
    """The oracle: the ids of the patient's ``rtype`` rows whose care date meets STU3
    ``ge{start}`` and ``le{end}`` (a period: it overlaps the days; no end is ongoing), and
    how many rows the patient has of it."""
    _, table, key, flag = next(c for c in CLINICAL if c[0] == rtype)
    cols = [c for alt in CARE_DATES[rtype] for c in alt]
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                f'SELECT "{key}", {", ".join(f"{chr(34)}{c}{chr(34)}" for c in cols)} '
                f'FROM "{table}" WHERE "PATNT_REFNO" = :p AND "{flag}" = \'N\''),
                {"p": int(patient)}).all()
    finally:
        engine.dispose()
    lo = start.replace("-", "") if start else None
    hi = end.replace("-", "") if end else None
    out: set[str] = set()
    for row in rows:
        values = dict(zip(cols, (_day(v) for v in row[1:]), strict=True))
        for alt in CARE_DATES[rtype]:
            first = values[alt[0]]
            if first is None:
                continue  # no value: the next care date dates it
            last = values[alt[-1]] if len(alt) == 2 else first
            if (lo is None or last is None or last >= lo) and (hi is None or first <= hi):
                out.add(str(row[0]))
            break
    return out, len(rows)


# (start, end): each care date taken out of some rows and not all by the first; the
# fallback dates (Condition's asserted, a document without a service period) reached.
WINDOWS = (("2013-01-01", "2023-09-05"), ("2024-01-01", "2024-12-31"),
           ("2023-09-06", None), (None, "2015-12-31"))


async def test_start_and_end_narrow_every_type_by_its_care_date(
        gw: tuple[httpx.AsyncClient, str, Starlette]) -> None:
    c, url, _ = gw
    pid = "100001"
    for n, (start, end) in enumerate(WINDOWS):
        query = "&".join([f"start={start}"] * bool(start) + [f"end={end}"] * bool(end))
        _, pages = await walk(c, f"/STU3/Patient/{pid}/$everything?{query}&_count=100")
        for rtype in CARE_DATES:
            want, held = dated_in(url, rtype, pid, start, end)
            if n == 0:  # the dates really take some out, and not all
                assert 0 < len(want) < held, rtype
            assert matched(pages, rtype) == want, (rtype, start, end)
        for issue in outcome_issues(pages):  # said only of types without a care date
            assert not any(t in issue["diagnostics"] for t in CARE_DATES), issue
