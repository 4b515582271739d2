"""``quantity`` search (STU3: ``[prefix]number|system|code``) on Observation's results, on
SQLite and PostgreSQL, against an oracle: every result row read here with plain SQL and the
question answered in Python with ``Decimal`` (the number's precision as its implicit range,
the unit as the trust's UCUM map or the unit text as stored)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from tests.conftest import gateway_settings

pytestmark = pytest.mark.anyio
UCUM = "http://unitsofmeasure.org"
# mappings/codemaps/ucum-unit.yaml, the units these cases use: stored text -> UCUM code
TO_UCUM = {"mmol/L": "mmol/L", "g/L": "g/L", "x10^9/L": "10*9/L"}
P = 100001


@pytest.fixture(scope="module")
def results(demo_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(demo_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(
                'SELECT "RESLT_REFNO", "PATNT_REFNO", "VALUE_NUM", "UNITS" FROM "RESULTS" '
                "WHERE \"DEL_FLAG\" = 'N'")).all()
    finally:
        engine.dispose()
    return [{"id": str(k), "patient": int(p), "unit": u,
             "value": Decimal(v.strip()) if v is not None and v.strip() else None}
            for k, p, v, u in rows]


@pytest.fixture(scope="module")
async def client(demo_url: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("quantity")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


def unit_is(code: str, system: str | None = UCUM) -> Callable[[dict[str, Any]], bool]:
    def ok(r: dict[str, Any]) -> bool:
        mapped = TO_UCUM.get(r["unit"]) == code
        return mapped if system is not None else mapped or r["unit"] == code
    return ok


def D(x: str) -> Decimal:
    return Decimal(x)


CASES: list[tuple[str, Callable[[Decimal], bool], Callable[[dict[str, Any]], bool] | None]] = [
    (f"gt5.4|{UCUM}|mmol/L", lambda v: v > D("5.4"), unit_is("mmol/L")),
    ("5.4||mmol/L", lambda v: D("5.35") <= v < D("5.45"), unit_is("mmol/L", None)),
    ("5||mmol/L", lambda v: D("4.5") <= v < D("5.5"), unit_is("mmol/L", None)),
    ("ge100", lambda v: v >= 100, None),
    (f"le9.0|{UCUM}|10*9/L", lambda v: v <= 9, unit_is("10*9/L")),
    (f"ne140|{UCUM}|mmol/L", lambda v: not D("139.5") <= v < D("140.5"), unit_is("mmol/L")),
    (f"ap100|{UCUM}|g/L", lambda v: 90 <= v <= 110, unit_is("g/L")),
    ("lt1e1", lambda v: v < 10, None),
    ("sa37.5||Deg C", lambda v: v > D("37.5"), lambda r: r["unit"] == "Deg C"),
    ("gt5.4|http://snomed.info/sct|mmol/L", lambda v: False, None),
    (f"gt5.4|{UCUM}|parsec", lambda v: False, None),
]


def expected(results: list[dict[str, Any]], number: Callable[[Decimal], bool],
             unit: Callable[[dict[str, Any]], bool] | None) -> list[dict[str, Any]]:
    return [r for r in results if r["value"] is not None and number(r["value"])
            and (unit is None or unit(r))]


async def ids(c: httpx.AsyncClient, params: list[tuple[str, str]]) -> set[str]:
    out: list[str] = []
    r = await c.get("/STU3/Observation", params=[*params, ("_count", "500")])
    while True:
        assert r.status_code == 200, r.text
        body = r.json()
        out += [e["resource"]["id"] for e in body.get("entry", [])
                if e["search"]["mode"] == "match"]
        nxt = [x["url"] for x in body["link"] if x["relation"] == "next"]
        if not nxt:
            break
        r = await c.get(nxt[0])
    assert len(out) == len(set(out))
    return set(out)


@pytest.mark.parametrize(("value", "number", "unit"), CASES, ids=[c[0] for c in CASES])
async def test_quantity_search_against_the_database(
        client: httpx.AsyncClient, results: list[dict[str, Any]], value: str,
        number: Callable[[Decimal], bool], unit: Callable[[dict[str, Any]], bool] | None
) -> None:
    want = expected(results, number, unit)
    # every patient's: the count; one patient's: the ids
    r = await client.get("/STU3/Observation", params={"value-quantity": value,
                                                      "_summary": "count"})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == len(want)
    mine = {x["id"] for x in want if x["patient"] == P}
    assert await ids(client, [("patient", str(P)), ("value-quantity", value)]) == mine


async def test_cases_are_not_trivial(results: list[dict[str, Any]]) -> None:
    sizes = [len(expected(results, n, u)) for _, n, u in CASES]
    assert all(s > 0 for s in sizes[:-2]) and sizes[-2:] == [0, 0]
    assert all(s < len(results) for s in sizes)


async def test_several_values_are_or_and_missing(
        client: httpx.AsyncClient, results: list[dict[str, Any]]) -> None:
    low = expected(results, lambda v: v < 2, unit_is("mmol/L"))
    high = expected(results, lambda v: v > 150, unit_is("mmol/L"))
    got = await ids(client, [("patient", str(P)),
                             ("value-quantity", f"lt2|{UCUM}|mmol/L,gt150|{UCUM}|mmol/L")])
    assert got == {x["id"] for x in low + high if x["patient"] == P}
    none = {x["id"] for x in results if x["value"] is None and x["patient"] == P}
    assert none
    assert await ids(client, [("patient", str(P)), ("value-quantity:missing", "true")]) == none
    # AND of two: a range
    both = expected(results, lambda v: 3 <= v <= 6, unit_is("mmol/L"))
    got = await ids(client, [("patient", str(P)), ("value-quantity", f"ge3|{UCUM}|mmol/L"),
                             ("value-quantity", "le6")])
    assert got == {x["id"] for x in both if x["patient"] == P}


@pytest.mark.parametrize("bad", ["abc", "gt", "5.4|x", f"5.4|{UCUM}|", "xx5", "5.4|a|b|c",
                                 "1e9999"])
async def test_bad_values_are_400(client: httpx.AsyncClient, bad: str) -> None:
    r = await client.get("/STU3/Observation", params={"value-quantity": bad})
    assert r.status_code == 400, (bad, r.text)
    assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "INVALID_PARAMETER"


async def test_capability_statement_lists_it(client: httpx.AsyncClient) -> None:
    cs = (await client.get("/STU3/metadata")).json()
    obs = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Observation")
    params = {p["name"]: p["type"] for p in obs["searchParam"]}
    assert params["value-quantity"] == "quantity"
