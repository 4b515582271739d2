"""bench/everything_baseline.py — the hand-written ``$everything`` the benchmark compares the
gateway with — answers what the gateway answers, entry for entry.

The baseline shares no code with the gateway (hand-written SQL and builders), so this is the
check that the benchmark compares like with like: the richest patient of the test demo, whose
first pages fill inside a section and whose record spans every section, at several page
sizes (each cut in a different place), and a poor patient.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

pytestmark = pytest.mark.anyio

BENCH = Path(__file__).resolve().parents[2] / "bench"


def entries(body: dict[str, Any]) -> list[Any]:
    return [(e["fullUrl"].split("/STU3/", 1)[1], e["resource"], e["search"])
            for e in body.get("entry", [])]


def relations(body: dict[str, Any]) -> list[str]:
    return [lk["relation"] for lk in body["link"]]


async def test_the_baseline_serves_what_the_gateway_serves(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    sys.path.insert(0, str(BENCH))
    try:
        import everything_baseline as eb
    finally:
        sys.path.remove(str(BENCH))
    db = demo_sqlite_url.removeprefix("sqlite:///")
    engine = sa.create_engine(demo_sqlite_url)
    try:
        with engine.connect() as conn:
            sizes: dict[int, int] = dict(conn.execute(sa.text(
                'SELECT "PATNT_REFNO", COUNT(*) FROM "RESULTS" WHERE "DEL_FLAG" = \'N\' '
                'GROUP BY "PATNT_REFNO"')).all())
            operated = {p for (p,) in conn.execute(sa.text(
                'SELECT "PATNT_REFNO" FROM "PROCEDURES" WHERE "DELETED_FLAG" = \'N\''))}
    finally:
        engine.dispose()
    rich = max(sizes, key=lambda p: (sizes[p], -p))
    poor = min(sizes, key=lambda p: (sizes[p], p))
    # a whole record with procedures in one page (the richest one's fills before them)
    whole = min(operated & set(sizes), key=lambda p: (sizes[p], p))
    app, baseline = make_app(demo_sqlite_url), eb.build(db)

    def client(a: Starlette) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=a), base_url="http://gw")

    compared = 0
    async with app.router.lifespan_context(app), client(app) as gw, client(baseline) as bl:
        for pid, count in [(rich, 500), (rich, 100), (rich, 37), (rich, 3), (poor, 500),
                           (whole, 500)]:
            path = f"/STU3/Patient/{pid}/$everything?_count={count}"
            g, b = (await gw.get(path)), (await bl.get(path))
            assert g.status_code == b.status_code == 200, path
            assert entries(g.json()) == entries(b.json()), path
            assert relations(g.json()) == relations(b.json()), path
            compared += len(entries(g.json()))
        # between them, every builder of the baseline is compared
        kinds = {e[1]["resourceType"] for pid in (rich, whole) for e in entries(
            (await gw.get(f"/STU3/Patient/{pid}/$everything?_count=500")).json())}
        assert kinds >= {"Patient", "AllergyIntolerance", "Condition", "DocumentReference",
                         "Encounter", "Flag", "Immunization", "MedicationRequest",
                         "MedicationStatement", "Observation", "Procedure", "Practitioner",
                         "Organization", "Location", "Medication"}, kinds
        assert (await bl.get("/STU3/Patient/999999999/$everything")).status_code == 404
    assert compared > 300
