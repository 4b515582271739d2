"""The Practitioners, Organizations, Locations and Medications a record refers to, when the
(single) source of one of those types does not answer — its table renamed away and back, on
SQLite and PostgreSQL. As for a section's source: ``$everything`` and a structured record
still answer, without that type's resources and saying so (a warning entry); under
``Prefer: handling=strict`` the source's 502 is the answer; with the source back, the
answer is whole again.
``$document`` is the 502 either way: a document holds what it refers to."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.gateway.operations.test_document import check_document
from tests.gateway.test_include_source_down import gone

pytestmark = pytest.mark.anyio
PID = "100001"  # a rich record: its resources refer to practitioners
STRICT = {"Prefer": "handling=strict"}


@pytest.fixture
async def gw(demo_url: str, make_app: Callable[..., Starlette]
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = make_app(demo_url, rate_limit_per_minute=0, source_rate_limit_per_minute=0)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        yield c, demo_url


def _held(body: dict[str, Any]) -> list[str]:
    """The served resources (not the operation's own Lists, Composition, Device, outcomes)."""
    return [f"{r['resourceType']}/{r['id']}" for r in (e["resource"] for e in body["entry"])
            if r["resourceType"] not in ("List", "Composition", "Device", "OperationOutcome")]


def _outcomes(body: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [(i["severity"], i["details"]["coding"][0]["code"], i["diagnostics"])
            for e in body["entry"] if e["resource"]["resourceType"] == "OperationOutcome"
            for i in e["resource"]["issue"]]


def _lists(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each List by title, without what is new on every request (id, date)."""
    return {e["resource"]["title"]: {k: v for k, v in e["resource"].items()
                                     if k not in ("id", "date")}
            for e in body["entry"] if e["resource"]["resourceType"] == "List"}


def _strict_is_the_error(r: httpx.Response) -> None:
    assert r.status_code == 502, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"


async def test_structured_record(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    op = f"/STU3/Patient/{PID}/$structured-record"
    healthy = await c.get(op)
    assert healthy.status_code == 200, healthy.text
    whole = healthy.json()
    staff = {x for x in _held(whole) if x.startswith("Practitioner/")}
    assert staff and not _outcomes(whole)  # the gap is real: the record refers to some
    with gone(url, "CLINICIANS") as back:
        _strict_is_the_error(await c.get(op, headers=STRICT))
        r = await c.get(op)
        assert r.status_code == 200, r.text
        body = r.json()
        held = _held(body)
        assert len(held) == len(set(held))
        assert held == [x for x in _held(whole) if x not in staff]  # everything else, whole
        assert _lists(body) == _lists(whole)  # the sections are not what is missing
        assert _outcomes(body) == [(
            "warning", "SOURCE_UNAVAILABLE",
            "Practitioner source 'Practitioner.sql' did not answer (BACKEND_ERROR); the "
            "resources of that type the record refers to are not included")]
        back()
        again = (await c.get(op)).json()
        assert _held(again) == _held(whole) and not _outcomes(again)


async def test_document(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    op = f"/STU3/Patient/{PID}/$document"
    whole = (await c.get(op)).json()
    check_document(whole)
    assert whole["entry"][0]["resource"]["status"] == "final"
    staff = {x for x in _held(whole) if x.startswith("Practitioner/")}
    assert staff
    with gone(url, "CLINICIANS") as back:
        # a document holds what it refers to: never one whose entries refer to nothing
        _strict_is_the_error(await c.get(op, headers=STRICT))
        _strict_is_the_error(await c.get(op))
        back()
        assert (await c.get(op)).json() == whole  # whole again (a document is deterministic)


async def test_everything(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    op = f"/STU3/Patient/{PID}/$everything?_count=500"
    whole = (await c.get(op)).json()
    staff = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in whole["entry"]
             if e["search"]["mode"] == "include"
             and e["resource"]["resourceType"] == "Practitioner"}
    assert staff and not _outcomes(whole)
    with gone(url, "CLINICIANS") as back:
        _strict_is_the_error(await c.get(op, headers=STRICT))
        r = await c.get(op)
        assert r.status_code == 200, r.text
        body = r.json()
        assert _held(body) == [x for x in _held(whole) if x not in staff]
        assert _outcomes(body) == [(
            "warning", "SOURCE_UNAVAILABLE",
            "Practitioner source 'Practitioner.sql' did not answer (BACKEND_ERROR); the "
            "resources of that type this page refers to are not included")]
        back()
        again = (await c.get(op)).json()
        assert _held(again) == _held(whole) and not _outcomes(again)
