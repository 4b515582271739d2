"""The patient compartment holds for the EPR's medicines and results: a patient/ token for P
sees P's MedicationRequests, MedicationStatements, Immunizations and Observations and no one
else's (by search, by id, by asking for another patient), on SQLite and PostgreSQL; Medication
(a dictionary entry, not patient data) is read like Practitioner. Expected sets come from the
tables directly."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from gateway import compartment
from tests.security.principals import as_, install, patient_token

pytestmark = pytest.mark.anyio

P = "100001"
# type -> (table, key, link column as the mapping names it, element that references Patient)
TYPES = {
    "MedicationRequest": ("PRESCRIPTIONS", "PRESC_REFNO", "m.PATNT_REFNO", ("subject",)),
    "MedicationStatement": ("MEDICATION_LIST", "MEDLS_REFNO", "l.PATNT_REFNO", ("subject",)),
    "Immunization": ("IMMUNISATIONS", "IMMUN_REFNO", "i.PATNT_REFNO", ("patient",)),
    "Observation": ("RESULTS", "RESLT_REFNO", "o.PATNT_REFNO", ("subject",)),
}


def _rows(url: str, table: str, key: str) -> dict[str, set[str]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text(f'SELECT "{key}", "PATNT_REFNO" FROM "{table}" '
                                        "WHERE \"DEL_FLAG\" = 'N'")).all()
    finally:
        engine.dispose()
    out: dict[str, set[str]] = {}
    for rid, patient in rows:
        out.setdefault(str(patient), set()).add(str(rid))
    return out


@pytest.fixture(scope="module")
def data(demo_url: str) -> dict[str, dict[str, set[str]]]:
    return {rtype: _rows(demo_url, table, key) for rtype, (table, key, _, _) in TYPES.items()}


@pytest.fixture
async def api(demo_url: str, make_app: Callable[..., Starlette]
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(demo_url, auth_mode="insecure-demo")
    install(app, {"P": patient_token(P)})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers=as_("P")) as c:
            yield c


async def _all(api: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    next_url: str | None = url
    while next_url:
        r = await api.get(next_url)
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        out += [e["resource"] for e in body.get("entry", ()) if e["search"]["mode"] == "match"]
        next_url = next((ln["url"] for ln in body["link"] if ln["relation"] == "next"), None)
    return out


@pytest.mark.parametrize("rtype", sorted(TYPES))
async def test_a_search_without_a_patient_finds_only_the_tokens_patient(
        api: httpx.AsyncClient, data: dict[str, dict[str, set[str]]], rtype: str) -> None:
    found = await _all(api, f"/STU3/{rtype}?_count=200")
    assert {r["id"] for r in found} == data[rtype][P] != set()
    element = TYPES[rtype][3][0]
    assert {r[element]["reference"] for r in found} == {f"Patient/{P}"}


@pytest.mark.parametrize("rtype", sorted(TYPES))
async def test_another_patients_records_are_never_found(
        api: httpx.AsyncClient, data: dict[str, dict[str, set[str]]], rtype: str) -> None:
    other = min((q for q in data[rtype] if q != P), key=lambda q: (-len(data[rtype][q]), q))
    assert await _all(api, f"/STU3/{rtype}?patient={other}") == []
    for rid in sorted(data[rtype][other])[:3]:
        assert (await api.get(f"/STU3/{rtype}/{rid}")).status_code == 404
    mine = min(data[rtype][P])
    assert (await api.get(f"/STU3/{rtype}/{mine}")).status_code == 200


async def test_the_dictionary_is_not_patient_data(api: httpx.AsyncClient) -> None:
    r = await api.get("/STU3/Medication?_count=5")
    assert r.status_code == 200 and len(r.json()["entry"]) == 5


async def test_links_come_from_the_mappings(demo_url: str,
                                            make_app: Callable[..., Starlette]) -> None:
    registry = make_app(demo_url, auth_mode="insecure-demo").state.registry
    # per source (a type may have several: Encounter); these types have one each
    links = {p.resource_type: compartment.link(p) for p in registry.sources()}
    for rtype, (_, _, column, path) in TYPES.items():
        assert links[rtype].kind == "reference", rtype
        assert links[rtype].refs == (column,), rtype
        assert links[rtype].paths == ((*path, "reference"),), rtype
    assert links["Medication"].kind == "none"
