"""``_include`` and ``_revinclude`` of a type served by ONE source when that source does not
answer (its table renamed away, SQLite and PostgreSQL): as for a type of several sources
(tests/gateway/test_multisource_include_down.py), the page's matches are served, the include
is left out, and a SOURCE_UNAVAILABLE warning entry names the type, its mapping file and the
include; under ``Prefer: handling=strict`` the source's 502 is the answer. With the source
back, the same search serves the include again. ``_summary=count`` never asks an include."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from tests.gateway.test_multisource_include_down import gateway_with_source_down

pytestmark = pytest.mark.anyio
STRICT = {"Prefer": "handling=strict"}


@pytest.fixture
async def gw(demo_url: str, make_app: Callable[..., Starlette]
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = make_app(demo_url, rate_limit_per_minute=0, source_rate_limit_per_minute=0)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c, demo_url


def _rows(url: str, sql: str, **params: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            return list(c.execute(sa.text(sql), params))
    finally:
        engine.dispose()


def _rename(url: str, old: str, new: str) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(f'ALTER TABLE "{old}" RENAME TO "{new}"'))
    finally:
        engine.dispose()


@contextmanager
def gone(url: str, table: str) -> Iterator[Callable[[], None]]:
    """``table`` renamed away (its source fails: 502) until the yielded ``back()`` is called,
    or the block ends: the demo database is shared by the session."""
    _rename(url, table, f"{table}_GONE")
    state = {"gone": True}

    def back() -> None:
        if state["gone"]:
            _rename(url, f"{table}_GONE", table)
            state["gone"] = False

    try:
        yield back
    finally:
        back()


def _typed(body: dict[str, Any], mode: str) -> list[str]:
    return [f'{e["resource"]["resourceType"]}/{e["resource"]["id"]}' for e in body["entry"]
            if e["search"]["mode"] == mode]


def _warnings(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(i["severity"], i["details"]["coding"][0]["code"], i["diagnostics"])
            for e in body["entry"] if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def _error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", r.text
    issue = body["issue"][0]
    return r.status_code, issue["details"]["coding"][0]["code"], issue["severity"]


async def test_include_of_a_single_source_type_that_does_not_answer(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    (pid,), = _rows(url,  # a patient with several conditions, each with who asserted it
                    'SELECT "PATNT_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = \'N\' '
                    'GROUP BY "PATNT_REFNO" HAVING COUNT(*) >= 3 AND COUNT(*) = '
                    'COUNT("PROCA_REFNO") ORDER BY "PATNT_REFNO" LIMIT 1')
    conditions = {f"Condition/{k}" for (k,) in _rows(
        url, 'SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "PATNT_REFNO" = :p AND '
             '"DELETED_FLAG" = \'N\'', p=pid)}
    asserters = {f"Practitioner/{k}" for (k,) in _rows(
        url, 'SELECT DISTINCT "PROCA_REFNO" FROM "PROBLEMS" WHERE "PATNT_REFNO" = :p AND '
             '"DELETED_FLAG" = \'N\'', p=pid)}
    search = (f"/STU3/Condition?patient={pid}&_include=Condition:asserter"
              "&_include=Condition:patient&_count=500")

    healthy = await c.get(search)
    assert healthy.status_code == 200, healthy.text
    assert set(_typed(healthy.json(), "match")) == conditions
    assert set(_typed(healthy.json(), "include")) == asserters | {f"Patient/{pid}"}
    assert not _warnings(healthy.json())

    with gone(url, "CLINICIANS") as back:  # Practitioner's only source
        strict = await c.get(search, headers=STRICT)
        assert _error(strict) == (502, "BACKEND_ERROR", "error")

        for headers in ({}, {"Prefer": "handling=lenient"}):
            r = await c.get(search, headers=headers)
            assert r.status_code == 200, r.text
            body = r.json()
            matches = _typed(body, "match")
            assert len(matches) == len(set(matches)) and set(matches) == conditions
            # the other include still served, nothing of the type that did not answer
            assert _typed(body, "include") == [f"Patient/{pid}"]
            assert not any(e["resource"]["resourceType"] == "Practitioner"
                           for e in body["entry"])
            assert _warnings(body) == [(
                "warning", "SOURCE_UNAVAILABLE",
                "Practitioner source 'Practitioner.sql' did not answer (BACKEND_ERROR); "
                "_include=Condition:asserter:Practitioner lacks its records")]

        # a count never asks an include: the total, whatever the handling
        for headers in ({}, STRICT):
            count = await c.get(f"{search}&_summary=count", headers=headers)
            assert count.status_code == 200, count.text
            assert count.json()["total"] == len(conditions)

        back()  # the source answers again: the same search serves the include
        again = await c.get(search)
        assert again.status_code == 200, again.text
        assert set(_typed(again.json(), "include")) == asserters | {f"Patient/{pid}"}
        assert not _warnings(again.json())


async def test_include_with_two_target_types_one_not_answering(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    """``Observation:performer`` refers to Practitioners and Organizations: with the
    Practitioners' source gone the Organizations are still included."""
    c, url = gw
    (pid,), = _rows(url,
                    'SELECT "PATNT_REFNO" FROM "RESULT_REPORTS" GROUP BY "PATNT_REFNO" '
                    'HAVING COUNT("PROCA_REFNO") > 0 AND COUNT("ORGAN_REFNO") > 0 '
                    'ORDER BY "PATNT_REFNO" LIMIT 1')
    search = f"/STU3/Observation?patient={pid}&_include=Observation:performer&_count=500"
    healthy = (await c.get(search)).json()
    kinds = {ref.split("/")[0] for ref in _typed(healthy, "include")}
    assert kinds == {"Practitioner", "Organization"}
    with gone(url, "CLINICIANS"):
        r = await c.get(search)
    assert r.status_code == 200, r.text
    body = r.json()
    assert _typed(body, "match") == _typed(healthy, "match")
    assert _typed(body, "include") == [x for x in _typed(healthy, "include")
                                       if x.startswith("Organization/")]
    assert _warnings(body) == [(
        "warning", "SOURCE_UNAVAILABLE",
        "Practitioner source 'Practitioner.sql' did not answer (BACKEND_ERROR); "
        "_include=Observation:performer:Practitioner lacks its records")]


async def test_revinclude_of_a_single_source_type_that_does_not_answer(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    (pid,), = _rows(url,  # a patient with alerts and conditions
                    'SELECT f."PATNT_REFNO" FROM "ALERTS" f WHERE f."ARCHV_FLAG" = \'N\' AND '
                    'EXISTS (SELECT 1 FROM "PROBLEMS" c WHERE c."PATNT_REFNO" = f."PATNT_REFNO" '
                    'AND c."DELETED_FLAG" = \'N\') ORDER BY f."PATNT_REFNO" LIMIT 1')
    flags = {f"Flag/{k}" for (k,) in _rows(
        url, 'SELECT "ALERT_REFNO" FROM "ALERTS" WHERE "PATNT_REFNO" = :p AND '
             '"ARCHV_FLAG" = \'N\'', p=pid)}
    conditions = {f"Condition/{k}" for (k,) in _rows(
        url, 'SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "PATNT_REFNO" = :p AND '
             '"DELETED_FLAG" = \'N\'', p=pid)}
    assert flags and conditions
    search = f"/STU3/Patient?_id={pid}&_revinclude=Flag:patient&_revinclude=Condition:patient"

    healthy = (await c.get(search)).json()
    assert set(_typed(healthy, "include")) == flags | conditions

    with gone(url, "ALERTS") as back:  # Flag's only source
        strict = await c.get(search, headers=STRICT)
        assert _error(strict) == (502, "BACKEND_ERROR", "error")

        r = await c.get(search)
        assert r.status_code == 200, r.text
        body = r.json()
        assert _typed(body, "match") == [f"Patient/{pid}"]
        included = _typed(body, "include")
        assert len(included) == len(set(included)) and set(included) == conditions
        assert _warnings(body) == [(
            "warning", "SOURCE_UNAVAILABLE",
            "Flag source 'Flag.sql' did not answer (BACKEND_ERROR); "
            "_revinclude=Flag:patient lacks its records")]

        back()
        again = (await c.get(search)).json()
        assert set(_typed(again, "include")) == flags | conditions
        assert not _warnings(again)


def test_an_unreachable_source_over_http(demo_sqlite_url: str, tmp_path: Path) -> None:
    """Over real HTTP (uvicorn), Practitioner's source on a connection that cannot be opened
    (503, not a missing table's 502): the Conditions with the warning, strict's 503 with its
    Retry-After; once that system is there, the same search includes the Practitioners."""
    (pid,), = _rows(demo_sqlite_url,
                    'SELECT "PATNT_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = \'N\' '
                    'GROUP BY "PATNT_REFNO" HAVING COUNT(*) >= 3 AND COUNT(*) = '
                    'COUNT("PROCA_REFNO") ORDER BY "PATNT_REFNO" LIMIT 1')
    conditions = {f"Condition/{k}" for (k,) in _rows(
        demo_sqlite_url, 'SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "PATNT_REFNO" = :p AND '
                         '"DELETED_FLAG" = \'N\'', p=pid)}
    asserters = {f"Practitioner/{k}" for (k,) in _rows(
        demo_sqlite_url, 'SELECT DISTINCT "PROCA_REFNO" FROM "PROBLEMS" WHERE '
                         '"PATNT_REFNO" = :p AND "DELETED_FLAG" = \'N\'', p=pid)}
    search = f"/STU3/Condition?patient={pid}&_include=Condition:asserter&_count=500"
    clients = gateway_with_source_down(demo_sqlite_url, tmp_path, "Practitioner.sql.yaml")
    c = next(clients)
    try:
        strict = c.get(search, headers=STRICT)
        assert strict.status_code == 503, strict.text
        assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == \
            "BACKEND_UNAVAILABLE"
        assert strict.headers.get("retry-after")
        r = c.get(search)
        assert r.status_code == 200, r.text
        body = r.json()
        assert set(_typed(body, "match")) == conditions
        assert _typed(body, "include") == []
        assert _warnings(body) == [(
            "warning", "SOURCE_UNAVAILABLE",
            "Practitioner source 'Practitioner.sql' did not answer (BACKEND_UNAVAILABLE); "
            "_include=Condition:asserter:Practitioner lacks its records")]
        # the other system comes up (the file its connection opens read-only appears)
        shutil.copy(demo_sqlite_url.removeprefix("sqlite:///"),
                    tmp_path / "no-such-system.sqlite")
        again = c.get(search)
        assert again.status_code == 200, again.text
        assert set(_typed(again.json(), "include")) == asserters
        assert not _warnings(again.json())
    finally:
        clients.close()
