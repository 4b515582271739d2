"""Encounter from three sources (spells, outpatient and A&E attendances) as one searchable type.

The oracle is the database itself, read here with plain SQL: a walk of every page must give
exactly the merged set, in the merged order (date as an instant, then source order, then
key), once each; totals must add up; ids route reads to the right source; and a source that
stops answering mid-walk is reported on the page (or, strict, is the answer) — never a
silent gap. Searches run on SQLite and PostgreSQL; the failure walk over real uvicorn.
"""

from __future__ import annotations

import datetime as dt
import shutil
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from tests.conftest import LIMITS_OFF, LiveServer

pytestmark = pytest.mark.anyio
LONDON = ZoneInfo("Europe/London")
# Source order in the registry (mapping files by name): A&E, outpatient, inpatient spells.
SOURCES = (
    ("ae-", 'SELECT "AEATT_REFNO", "PATNT_REFNO", "ARRIVAL_DTTM", "PROCA_REFNO" FROM '
            '"AE_ATTENDANCES" WHERE "DEL_FLAG" = \'N\''),
    ("op-", 'SELECT "OPATT_REFNO", "PATNT_REFNO", "APPT_DTTM", "PROCA_REFNO" FROM '
            '"OUTPATIENT_ATTENDANCES"'),
    ("", 'SELECT "PRVSP_REFNO", "PATNT_REFNO", "ADMIT_DTTM", "PROCA_REFNO" FROM '
         '"PROVIDER_SPELLS"'),
)


def encounters(url: str) -> list[dict[str, Any]]:
    """Every Encounter the three sources hold, as the oracle sees it."""
    engine = sa.create_engine(url)
    out = []
    try:
        with engine.connect() as conn:
            for i, (prefix, sql) in enumerate(SOURCES):
                for key, patient, when, proca in conn.execute(sa.text(sql)):
                    local = dt.datetime.strptime(when, "%Y%m%d%H%M").replace(tzinfo=LONDON)
                    out.append({"id": f"{prefix}{key}", "key": key, "source": i,
                                "patient": str(patient), "at": local.timestamp(),
                                "practitioner": None if proca is None else str(proca)})
    finally:
        engine.dispose()
    return out


@pytest.fixture
async def client(demo_url: str, make_app: Callable[..., Starlette]
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    # many pages walked twice: the per-client limits are not under test here
    app = make_app(demo_url, **LIMITS_OFF)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, demo_url


async def walk(c: httpx.AsyncClient, url: str, headers: dict[str, str] | None = None
               ) -> tuple[list[str], list[dict[str, Any]]]:
    """Every match id over every page (in order), and every page's body."""
    ids: list[str] = []
    pages: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        r = await c.get(next_url, headers=headers or {})
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append(body)
        ids += [e["resource"]["id"] for e in body.get("entry", [])
                if e["search"]["mode"] == "match"]
        next_url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"), None)
        assert len(pages) < 400, "the walk does not end"
    return ids, pages


def busiest_practitioner(rows: list[dict[str, Any]]) -> str:
    counts: dict[str, set[int]] = {}
    for r in rows:
        if r["practitioner"]:
            counts.setdefault(r["practitioner"], set()).add(r["source"])
    ranked = sorted(((sum(1 for x in rows if x["practitioner"] == p), p)
                     for p, s in counts.items() if len(s) == 3), reverse=True)
    return ranked[0][1]


@pytest.mark.parametrize("sort", ["date", "-date"])
async def test_a_sorted_walk_is_the_merged_set_in_order(
        client: tuple[httpx.AsyncClient, str], sort: str) -> None:
    c, url = client
    rows = encounters(url)
    who = busiest_practitioner(rows)
    mine = [r for r in rows if r["practitioner"] == who]
    assert len({r["source"] for r in mine}) == 3 and len(mine) > 12
    desc = sort.startswith("-")
    expected = [r["id"] for r in sorted(mine, key=lambda r: (
        -r["at"] if desc else r["at"], r["source"], r["key"]))]
    ids, pages = await walk(c, f"/STU3/Encounter?practitioner={who}&_sort={sort}&_count=4"
                               "&_total=accurate")
    assert ids == expected
    assert len(pages) == -(-len(expected) // 4)
    assert {p["total"] for p in pages} == {len(expected)}
    assert all(len([e for e in p.get("entry", []) if e["search"]["mode"] == "match"]) <= 4
               for p in pages)


def link(body: dict[str, Any], relation: str) -> str | None:
    found = [lk["url"] for lk in body["link"] if lk["relation"] == relation]
    assert len(found) <= 1
    return found[0] if found else None


def match_ids(body: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]


async def walk_pages(c: httpx.AsyncClient, url: str, relation: str
                     ) -> tuple[list[list[str]], list[str]]:
    """Follow ``relation`` links from ``url``: each page's match ids, and each page's URL."""
    pages: list[list[str]] = []
    urls: list[str] = []
    next_url: str | None = url
    while next_url is not None:
        assert len(pages) < 400, "the walk does not end"
        r = await c.get(next_url)
        assert r.status_code == 200, r.text
        pages.append(match_ids(r.json()))
        urls.append(next_url)
        next_url = link(r.json(), relation)
    return pages, urls


@pytest.mark.parametrize(("sort", "count"), [("date", 4), ("-date", 5), (None, 7)])
async def test_walking_back_gives_the_same_pages(
        client: tuple[httpx.AsyncClient, str], sort: str | None, count: int) -> None:
    c, url = client
    rows = encounters(url)
    who = busiest_practitioner(rows)
    query = f"/STU3/Encounter?practitioner={who}&_count={count}" + (
        f"&_sort={sort}" if sort else "")
    pages, urls = await walk_pages(c, query, "next")
    assert len(pages) >= 3
    assert sorted(i for p in pages for i in p) == sorted(
        r["id"] for r in rows if r["practitioner"] == who)
    first = (await c.get(urls[0])).json()
    assert link(first, "previous") is None and link(first, "first") is None

    back, back_urls = await walk_pages(c, urls[-1], "previous")
    assert back == pages[::-1]  # the same pages, in reverse, and the walk back ends at the first
    # from any page: `first` is the first page; a page reached backwards links on to the next
    for i, u in enumerate(back_urls[1:-1], start=1):
        body = (await c.get(u)).json()
        first_link = link(body, "first")
        assert first_link is not None
        assert match_ids((await c.get(first_link)).json()) == pages[0]
        nxt = link(body, "next")
        assert nxt is not None
        assert match_ids((await c.get(nxt)).json()) == back[i - 1]


async def test_an_unsorted_walk_of_everything_has_each_once(
        client: tuple[httpx.AsyncClient, str]) -> None:
    c, url = client
    rows = encounters(url)
    ids, _ = await walk(c, "/STU3/Encounter?_count=500")
    assert len(ids) == len(set(ids))
    assert set(ids) == {r["id"] for r in rows}
    # key order, one source after another (ties at "no sort key" go to source order)
    assert ids == [r["id"] for r in sorted(rows, key=lambda r: (r["source"], r["key"]))]
    r = await c.get("/STU3/Encounter?_summary=count")
    assert r.json()["total"] == len(rows)


async def test_ids_route_reads_and_id_searches_to_their_source(
        client: tuple[httpx.AsyncClient, str]) -> None:
    c, url = client
    rows = encounters(url)
    one = {r["source"]: r for r in rows}  # one of each source
    for r in one.values():
        got = await c.get(f"/STU3/Encounter/{r['id']}")
        assert got.status_code == 200 and got.json()["id"] == r["id"]
        assert got.json()["subject"]["reference"] == f"Patient/{r['patient']}"
    # a prefix with a key that source lacks, or no such prefix: not found
    for missing in ("ae-99999999", "op-99999999", "99999999", "xx-1"):
        assert (await c.get(f"/STU3/Encounter/{missing}")).status_code == 404
    wanted = ",".join(r["id"] for r in one.values())
    body = (await c.get(f"/STU3/Encounter?_id={wanted}")).json()
    assert {e["resource"]["id"] for e in body["entry"]} == {r["id"] for r in one.values()}


async def test_includes_work_across_sources(client: tuple[httpx.AsyncClient, str]) -> None:
    c, url = client
    rows = encounters(url)
    who = busiest_practitioner(rows)
    body = (await c.get(f"/STU3/Encounter?practitioner={who}&_sort=-date&_count=100"
                        "&_include=Encounter:patient&_include=Encounter:practitioner")).json()
    matches = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "match"]
    included = {(e["resource"]["resourceType"], e["resource"]["id"]) for e in body["entry"]
                if e["search"]["mode"] == "include"}
    assert {m["id"][:3] for m in matches} >= {"ae-", "op-"}
    assert ("Practitioner", who) in included
    assert {("Patient", m["subject"]["reference"].split("/")[1]) for m in matches} <= included


async def test_a_parameter_one_source_lacks_is_not_the_types(
        client: tuple[httpx.AsyncClient, str]) -> None:
    c, _ = client
    # outpatient declares "type" (specialty); the other two do not
    r = await c.get("/STU3/Encounter?type=320", headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "UNKNOWN_PARAMETER"
    cs = (await c.get("/STU3/metadata")).json()
    enc = next(x for x in cs["rest"][0]["resource"] if x["type"] == "Encounter")
    assert "type" not in {p["name"] for p in enc["searchParam"]}
    assert [i["code"] for i in enc["interaction"]] == ["read", "search-type"]


# --- a source failing mid-walk, over real HTTP ---------------------------------------------------


@pytest.fixture
def copy_url(demo_sqlite_url: str, tmp_path: Path) -> str:
    """A private copy of the SQLite demo: this test breaks and mends one of its tables."""
    source = Path(demo_sqlite_url.removeprefix("sqlite:///"))
    target = tmp_path / "copy.sqlite"
    shutil.copy(source, target)
    return f"sqlite:///{target}"


def _rename(url: str, old: str, new: str) -> None:
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        db.execute(f'ALTER TABLE "{old}" RENAME TO "{new}"')
        db.commit()
    finally:
        db.close()


def test_a_source_failing_mid_walk_is_reported_never_a_silent_gap(
        copy_url: str, make_app: Callable[..., Starlette]) -> None:
    rows = encounters(copy_url)
    who = busiest_practitioner(rows)
    expected = {r["id"] for r in rows if r["practitioner"] == who}
    with LiveServer(make_app(copy_url)) as server, httpx.Client(base_url=server.url) as c:
        first = c.get(f"/STU3/Encounter?practitioner={who}&_sort=date&_count=3").json()
        seen = [e["resource"]["id"] for e in first["entry"] if e["search"]["mode"] == "match"]
        next_url = next(lk["url"] for lk in first["link"] if lk["relation"] == "next")

        _rename(copy_url, "AE_ATTENDANCES", "AE_GONE")  # the A&E system goes away
        strict = c.get(next_url, headers={"Prefer": "handling=strict"})
        assert strict.status_code == 502
        assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
        partial = c.get(next_url)
        assert partial.status_code == 200, partial.text
        body = partial.json()
        outcome = [e["resource"] for e in body["entry"] if e["search"]["mode"] == "outcome"]
        assert len(outcome) == 1
        issue = outcome[0]["issue"][0]
        assert issue["severity"] == "warning" and issue["code"] == "incomplete"
        assert issue["details"]["coding"][0]["code"] == "SOURCE_UNAVAILABLE"
        assert "Encounter.ae.sql" in issue["diagnostics"]
        matches = [e["resource"]["id"] for e in body["entry"] if e["search"]["mode"] == "match"]
        assert matches and not any(m.startswith("ae-") for m in matches)
        assert "total" not in body
        seen += matches
        next_url = next(lk["url"] for lk in body["link"] if lk["relation"] == "next")

        _rename(copy_url, "AE_GONE", "AE_ATTENDANCES")  # back: the rest of the walk
        while next_url:
            body = c.get(next_url).json()
            assert not [e for e in body.get("entry", []) if e["search"]["mode"] == "outcome"]
            seen += [e["resource"]["id"] for e in body.get("entry", [])
                     if e["search"]["mode"] == "match"]
            next_url = next((lk["url"] for lk in body["link"] if lk["relation"] == "next"),
                            None)
    assert len(seen) == len(set(seen))
    assert set(seen) == expected  # the failed source's records came later, none lost


def test_every_source_down_is_an_error_not_an_empty_page(
        copy_url: str, make_app: Callable[..., Starlette]) -> None:
    for table in ("AE_ATTENDANCES", "OUTPATIENT_ATTENDANCES", "PROVIDER_SPELLS"):
        _rename(copy_url, table, table + "_GONE")
    with LiveServer(make_app(copy_url)) as server, httpx.Client(base_url=server.url) as c:
        r = c.get("/STU3/Encounter?patient=100001")
    assert r.status_code == 502


def _matches(body: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in body.get("entry", []) if e["search"]["mode"] == "match"]


def _outcomes(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in body.get("entry", []) if e["search"]["mode"] == "outcome"]


def _link(body: dict[str, Any], relation: str) -> str | None:
    return next((lk["url"] for lk in body["link"] if lk["relation"] == relation), None)


def test_a_source_failing_mid_walk_back_is_reported_and_caught_up(
        copy_url: str, make_app: Callable[..., Starlette]) -> None:
    rows = encounters(copy_url)
    who = busiest_practitioner(rows)
    mine = [r for r in rows if r["practitioner"] == who]
    expected = [r["id"] for r in sorted(mine, key=lambda r: (r["at"], r["source"], r["key"]))]
    app = make_app(copy_url, **LIMITS_OFF)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as c:
        # forwards, every source answering: the pages to come back through
        pages: list[list[str]] = []
        urls: list[str] = []
        url: str | None = f"/STU3/Encounter?practitioner={who}&_sort=date&_count=3"
        while url:
            body = c.get(url).json()
            pages.append(_matches(body))
            urls.append(url)
            url = _link(body, "next")
        assert [i for p in pages for i in p] == expected and len(pages) >= 5

        # back from the last page; the A&E system goes away for one page of the walk back
        last = c.get(urls[-1]).json()
        back_url = _link(last, "previous")
        assert back_url is not None
        healthy = c.get(back_url).json()
        assert _matches(healthy) == pages[-2]
        back_url = _link(healthy, "previous")
        assert back_url is not None
        _rename(copy_url, "AE_ATTENDANCES", "AE_GONE")
        strict = c.get(back_url, headers={"Prefer": "handling=strict"})
        assert strict.status_code == 502
        partial = c.get(back_url).json()
        [outcome] = _outcomes(partial)
        assert outcome["issue"][0]["details"]["coding"][0]["code"] == "SOURCE_UNAVAILABLE"
        assert "Encounter.ae.sql" in outcome["issue"][0]["diagnostics"]
        got = _matches(partial)
        assert got and not any(m.startswith("ae-") for m in got)
        _rename(copy_url, "AE_GONE", "AE_ATTENDANCES")

        # `next` from the partial page: the A&E cut is known on one side only (a probe finds
        # the other); the page after it is the page the walk came back from
        forward = _link(partial, "next")
        assert forward is not None
        assert _matches(c.get(forward).json()) == pages[-2]

        # on back to the start: the A&E records missed come later, none lost, none twice
        seen = pages[-1] + pages[-2] + got
        back_url = _link(partial, "previous")
        while back_url:
            body = c.get(back_url).json()
            assert not _outcomes(body)
            seen += _matches(body)
            back_url = _link(body, "previous")
    assert len(seen) == len(set(seen))
    assert set(seen) == set(expected)


def test_previous_from_a_partial_page_is_the_page_before(
        copy_url: str, make_app: Callable[..., Starlette]) -> None:
    rows = encounters(copy_url)
    who = busiest_practitioner(rows)
    with LiveServer(make_app(copy_url)) as server, httpx.Client(base_url=server.url) as c:
        first = c.get(f"/STU3/Encounter?practitioner={who}&_sort=-date&_count=4").json()
        second_url = _link(first, "next")
        assert second_url is not None
        _rename(copy_url, "OUTPATIENT_ATTENDANCES", "OP_GONE")
        partial = c.get(second_url).json()
        assert len(_outcomes(partial)) == 1 and _matches(partial)
        _rename(copy_url, "OP_GONE", "OUTPATIENT_ATTENDANCES")
        back = _link(partial, "previous")
        assert back is not None
        assert _matches(c.get(back).json()) == _matches(first)
        # and the partial page's `next` asks the outpatient source again from where it was
        seen = _matches(first) + _matches(partial)
        url = _link(partial, "next")
        while url:
            body = c.get(url).json()
            seen += _matches(body)
            url = _link(body, "next")
    assert len(seen) == len(set(seen))
    assert set(seen) == {r["id"] for r in rows if r["practitioner"] == who}


async def test_a_page_either_way_is_one_statement_per_source(
        demo_url: str, make_app: Callable[..., Starlette]) -> None:
    from tests.gateway.test_chain import _count_statements

    app = make_app(demo_url, **LIMITS_OFF)
    engine = app.state.registry.get("Encounter").sources[0].mapping.adapter.engine
    tables = ("PROVIDER_SPELLS", "OUTPATIENT_ATTENDANCES", "AE_ATTENDANCES")
    sent: list[str] = []
    _count_statements(engine, sent)
    rows = encounters(demo_url)
    who = busiest_practitioner(rows)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            pages, urls = await walk_pages(
                c, f"/STU3/Encounter?practitioner={who}&_sort=-date&_count=3", "next")
            assert len(pages) >= 4
            url: str | None = urls[-1]
            asked_back = 0
            while url is not None:
                sent.clear()
                body = (await c.get(url)).json()
                asked = [t for st in sent for t in tables if f'"{t}"' in st]
                # every source at most once (none twice: no probe when every source answers)
                assert len(asked) == len(set(asked)) <= 3, asked
                asked_back += len(asked)
                url = link(body, "previous")
            assert asked_back > len(pages)  # the walk back did ask the sources
