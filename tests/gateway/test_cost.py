"""Search size and cost, checked before any backend is asked (issue 13, items 1, 3 and 4)."""

from __future__ import annotations

import gc
import sqlite3
import tracemalloc
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from adapters.base import And, Chain, Compare, In, Or, Text
from gateway.cost import estimate

pytestmark = pytest.mark.anyio


def _code(r: httpx.Response) -> str:
    value: str = r.json()["issue"][0]["details"]["coding"][0]["code"]
    return value


@pytest.fixture
async def api(demo_sqlite_url: str, make_app: Callable[..., Starlette]
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(demo_sqlite_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            c.app = app  # type: ignore[attr-defined]
            yield c


def test_the_estimate() -> None:
    family = Text("p.SURNAME", "prefix", "smith")
    assert estimate(And((family, Compare("p.SEX", "=", "2"))), "p") == 1
    name = Or(tuple(Text(c, "prefix", "x") for c in ("p.A", "p.B", "p.C")))
    assert estimate(name, "p") == 9
    address = Or(tuple(Text(f"a.L{i}", "prefix", "x") for i in range(5)))
    assert estimate(address, "p") == 5 * 5 * 2
    wide = And((Compare("p.SEX", "=", "2"),
                Or(tuple(Or(tuple(Text(f"a.L{i}", "prefix", f"a{v}") for i in range(5)))
                         for v in range(50)))))
    assert estimate(wide, "p") == 250 * 250 * 2
    assert estimate(In("p.ID", tuple(range(100))), "p") == 1
    assert estimate(Or(tuple(Compare("p.ID", "=", i) for i in range(100))), "p") == 100
    assert estimate(None, "p") == 1


def test_the_estimate_looks_inside_a_chain() -> None:
    """A chain's subquery costs what its criteria cost, and its tables are other tables
    (even where an alias is the outer query's: a self-reference reads the table again)."""
    name = Or(tuple(Text(c, "prefix", "x") for c in ("p.A", "p.B", "p.C")))
    chained = Chain("e.PATNT_REFNO", object(), "p.PATNT_REFNO", name)
    assert estimate(chained, "e") == 3 * 3 * 2
    wide = Chain("e.PATNT_REFNO", object(), "p.PATNT_REFNO",
                 Or(tuple(Text(f"a.L{i}", "prefix", f"a{v}") for i in range(5)
                          for v in range(50))))
    assert estimate(And((Compare("e.STATUS", "=", "D"), wide)), "e") == 250 * 250 * 3
    assert estimate(Chain("l.PARENT", object(), "l.KEY", Text("l.NAME", "prefix", "x")),
                    "l") == 1 * 1 * 2
    assert estimate(Chain("e.PATNT_REFNO", object(), "p.PATNT_REFNO", None), "e") == 2


async def test_too_many_parameters(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Patient", params=[("name", "a")] * 2000 + [("gender", "female")])
    assert r.status_code == 400 and _code(r) == "TOO_MANY_PARAMETERS"
    r = await api.get("/STU3/Patient", params=[("name", "a")] * 49 + [("gender", "female")])
    assert r.status_code == 200


async def test_too_many_values(api: httpx.AsyncClient) -> None:
    ids = ",".join(str(100000 + i) for i in range(101))
    r = await api.get("/STU3/Patient", params={"_id": ids})
    assert r.status_code == 400 and _code(r) == "TOO_MANY_VALUES"
    assert r.json()["issue"][0]["expression"] == ["_id"]
    r = await api.get("/STU3/Patient", params={"_id": ids.rsplit(",", 1)[0]})
    assert r.status_code == 200
    # POST _search counts the form too
    r = await api.post("/STU3/Patient/_search", content=f"_id={ids}",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and _code(r) == "TOO_MANY_VALUES"


async def test_a_costly_search_is_refused_before_the_database(api: httpx.AsyncClient) -> None:
    app: Any = api.app  # type: ignore[attr-defined]
    engine = app.state.registry.get("Patient").mapping.adapter.engine
    sent: list[str] = []
    sa.event.listen(engine, "connect", lambda c, _r: c.set_trace_callback(sent.append))
    engine.dispose()
    addresses = ",".join(f"a{i}" for i in range(50))
    r = await api.get("/STU3/Patient", params={"gender": "female", "address": addresses})
    assert r.status_code == 400 and _code(r) == "SEARCH_TOO_COSTLY"
    assert not sent  # nothing reached the database
    r = await api.get("/STU3/Patient", params={"gender": "female", "address": "a0,a1,a2"})
    assert r.status_code == 200 and sent


async def test_a_costly_chain_is_refused_before_the_database(api: httpx.AsyncClient) -> None:
    """Text predicates inside a chained parameter or a _has count as the target's own."""
    app: Any = api.app  # type: ignore[attr-defined]
    engine = app.state.registry.get("Patient").mapping.adapter.engine
    sent: list[str] = []
    sa.event.listen(engine, "connect", lambda c, _r: c.set_trace_callback(sent.append))
    engine.dispose()
    addresses = ",".join(f"a{i}" for i in range(50))
    for rtype, params in (
            ("Encounter", {"patient.address": addresses, "patient.birthdate": "ge1970"}),
            ("Practitioner", {"_has:Patient:general-practitioner:address": addresses})):
        r = await api.get(f"/STU3/{rtype}", params=params)
        assert r.status_code == 400 and _code(r) == "SEARCH_TOO_COSTLY", (rtype, r.text)
    assert not sent  # nothing reached the database
    r = await api.get("/STU3/Encounter", params={"patient.address": "a0,a1,a2",
                                                 "patient.birthdate": "ge1970"})
    assert r.status_code == 200 and sent


async def test_the_budget_is_a_setting(demo_sqlite_url: str,
                                       make_app: Callable[..., Starlette]) -> None:
    app = make_app(demo_sqlite_url, search_cost_budget=8)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            r = await c.get("/STU3/Patient", params={"name": "smith", "gender": "female"})
            assert r.status_code == 400 and _code(r) == "SEARCH_TOO_COSTLY"
            r = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
            assert r.status_code == 200


async def test_values_the_database_cannot_take_are_a_400_not_an_outage(
        api: httpx.AsyncClient) -> None:
    # An SQLite built with a small variable limit (999 before 3.32): a long list of values
    # is the client's input, not a database outage (it was 503 BACKEND_UNAVAILABLE).
    app: Any = api.app  # type: ignore[attr-defined]
    engine = app.state.registry.get("Patient").mapping.adapter.engine
    sa.event.listen(engine, "connect", lambda c, _r: c.setlimit(
        sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 40))
    engine.dispose()
    ids = ",".join(str(100000 + i) for i in range(60))
    r = await api.get("/STU3/Patient", params=[("_id", ids), ("_id", ids)])
    assert r.status_code == 400, r.text
    assert _code(r) == "TOO_MANY_VALUES" and "retry-after" not in r.headers
    r = await api.get("/STU3/Patient", params={"_id": "100001,100002"})
    assert r.status_code == 200


async def test_large_search_shapes_do_not_grow_memory(api: httpx.AsyncClient) -> None:
    # Each new 14 KB search shape kept ~30 MB in the statement cache (issue 13): ten of them
    # now leave the process within a few MB of where it was.
    await api.get("/STU3/Patient", params={"family": "warm", "gender": "female"})
    gc.collect()
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        for shape in range(10):
            params = [("name", f"a{shape}")] * (300 + shape) + [("gender", "female")]
            await api.get("/STU3/Patient", params=params)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - start
    finally:
        tracemalloc.stop()
    assert grown < 8 * 1024 * 1024, grown
