"""An Encounter ``date`` search finds exactly the encounters whose *served* period overlaps it.

A FHIR STU3 client reads a Period without an end as ongoing. The oracle reads the database with
plain SQL (which encounters a patient has in each of the three sources, and when each starts and
ends), checks the served periods against it, and then evaluates every search the way such a
client would, on the served period: a source whose search reads a record one way while the
served resource says another (an outpatient attendance searched as a point, served as ongoing)
fails here. SQLite and PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Callable
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from tests.conftest import LIMITS_OFF
from tests.e2e.claimed_search import date_compare, date_range, target_range

pytestmark = pytest.mark.anyio
LONDON = ZoneInfo("Europe/London")
# (id prefix, SQL: key, patient, start, end) — the end as the source records it (None: none)
SOURCES = (
    ("ae-", 'SELECT "AEATT_REFNO", "PATNT_REFNO", "ARRIVAL_DTTM", "DEPART_DTTM" '
            'FROM "AE_ATTENDANCES" WHERE "DEL_FLAG" = \'N\''),
    # the source records the appointment time only: no end, no slot length
    ("op-", 'SELECT "OPATT_REFNO", "PATNT_REFNO", "APPT_DTTM", NULL FROM "OUTPATIENT_ATTENDANCES"'),
    ("", 'SELECT "PRVSP_REFNO", "PATNT_REFNO", "ADMIT_DTTM", "DISCH_DTTM" FROM "PROVIDER_SPELLS"'),
)
PREFIXES = ("eq", "ne", "gt", "lt", "ge", "le")


def _instant(text: str | None) -> float | None:
    if text is None:
        return None
    return dt.datetime.strptime(text, "%Y%m%d%H%M").replace(tzinfo=LONDON).timestamp()


def database(url: str) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per patient, every encounter the sources hold: id -> {start, end} (epoch seconds)."""
    engine = sa.create_engine(url)
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    try:
        with engine.connect() as conn:
            for prefix, sql in SOURCES:
                for key, patient, start, end in conn.execute(sa.text(sql)):
                    out.setdefault(str(patient), {})[f"{prefix}{key}"] = {
                        "start": _instant(start), "end": _instant(end)}
    finally:
        engine.dispose()
    return out


def patients(db: dict[str, dict[str, dict[str, float | None]]]) -> list[str]:
    """100001 (op-1, op-2), and the first few with encounters in all three sources and an
    A&E attendance still going on, if any."""
    def has(p: str, prefix: str) -> bool:
        return any(i.startswith(prefix) if prefix else i.isdigit() for i in db[p])
    full = sorted((p for p in db if p != "100001" and has(p, "ae-") and has(p, "op-")
                   and has(p, "")), key=int)[:3]
    ongoing = sorted((p for p in db for i, e in db[p].items()
                      if i.startswith("ae-") and e["end"] is None), key=int)[:1]
    return ["100001", *full, *ongoing]


def search_values(periods: list[dict[str, str]]) -> list[str]:
    """Years, days and instants from the served periods' starts and ends, each prefix."""
    texts: set[str] = set()
    for period in periods:
        for edge in ("start", "end"):
            if edge in period:
                t = period[edge]
                texts.update({t[:4], t[:10], t})
    return [f"{p}{t}" for t in sorted(texts) for p in PREFIXES]


async def served(c: httpx.AsyncClient, query: str) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    url: str | None = f"/STU3/Encounter?{query}&_count=100"
    while url:
        r = await c.get(url)
        assert r.status_code == 200, r.text
        bundle = r.json()
        for entry in bundle.get("entry", []):
            if entry.get("search", {}).get("mode", "match") == "match":
                out[entry["resource"]["id"]] = entry["resource"]
        url = next((link["url"] for link in bundle.get("link", [])
                    if link["relation"] == "next"), None)
    return out


@pytest.fixture
async def client(demo_url: str, make_app: Callable[..., Starlette]
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = make_app(demo_url, **LIMITS_OFF)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, demo_url


async def test_a_date_search_is_the_served_periods_overlapping_it(
        client: tuple[httpx.AsyncClient, str]) -> None:
    c, url = client
    db = database(url)
    checked = 0
    for patient in patients(db):
        everything = await served(c, f"patient={patient}")
        # the served periods are the database's: same encounters, same start, the recorded end
        assert set(everything) == set(db[patient])
        periods = {}
        for rid, resource in everything.items():
            period, row = resource["period"], db[patient][rid]
            assert date_range(period["start"], LONDON)[0] == row["start"]
            if row["end"] is not None:
                assert date_range(period["end"], LONDON)[0] == row["end"]
            elif rid.startswith("op-"):  # over (finished or cancelled), never ongoing
                assert resource["status"] in ("finished", "cancelled")
                assert "end" in period, rid
            elif rid.startswith("ae-"):  # no departure: served and searched as ongoing
                assert resource["status"] == "in-progress" and "end" not in period
            periods[rid] = period
        for query in search_values(list(periods.values())):
            prefix, text = query[:2], query[2:]
            search = date_range(text, LONDON)
            expected = {rid for rid, period in periods.items()
                        if date_compare(prefix, target_range(period, LONDON) or (0, 0), search)}
            got = set(await served(c, f"patient={patient}&date={query.replace('+', '%2B')}"))
            assert got == expected, (patient, query)
            checked += 1
    assert checked > 100


async def test_outpatient_attendance_1_is_not_after_2023(
        client: tuple[httpx.AsyncClient, str]) -> None:
    # the example of the gap: op-1 (2023-10-17) was neither served nor searched as ongoing
    c, _ = client
    after = await served(c, "patient=100001&date=gt2023")
    assert "op-1" not in after and "op-2" in after
    op1 = (await c.get("/STU3/Encounter/op-1")).json()
    assert op1["period"] == {"start": "2023-10-17T09:30:00+01:00",
                             "end": "2023-10-17T09:30:00+01:00"}
