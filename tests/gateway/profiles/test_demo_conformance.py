"""Everything the demo serves is Care Connect: zero profile errors, on SQLite and PostgreSQL.

The sample: the fixture patients 100001-100006, the first 200 patients, every Location and
Organization, 100 Practitioners, 100 Encounters of each source, 300 each of the clinical
types, every PractitionerRole and the whole record of patient 100001 — read over HTTP as a
client sees them.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from gateway.profiles.validator import validate

pytestmark = pytest.mark.anyio


async def _resources(client: httpx.AsyncClient, path: str, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    url: str | None = path
    while url and len(out) < limit:
        r = await client.get(url)
        assert r.status_code == 200, r.text
        body = r.json()
        out += [e["resource"] for e in body.get("entry", [])
                if e.get("search", {}).get("mode") == "match"]
        url = next((link["url"] for link in body.get("link", [])
                    if link["relation"] == "next"), None)
    return out[:limit]


def _errors(resources: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(f"{r['resourceType']}/{r['id']}", i.expression, i.message)
            for r in resources for i in validate(r) if i.severity == "error"]


async def test_fixture_patients(client: httpx.AsyncClient) -> None:
    ids = ",".join(str(i) for i in range(100001, 100007))
    patients = await _resources(client, f"/STU3/Patient?_id={ids}", 10)
    assert len(patients) == 6
    assert _errors(patients) == []


@pytest.mark.parametrize(("path", "limit", "at_least"), [
    # the first 200 patients, 100 ids a request (CCG_MAX_VALUES_PER_PARAMETER)
    ("/STU3/Patient?_id=" + ",".join(str(i) for i in range(100001, 100101)) + "&_count=100",
     100, 100),
    ("/STU3/Patient?_id=" + ",".join(str(i) for i in range(100101, 100201)) + "&_count=100",
     100, 100),
    ("/STU3/Location?_count=100", 10_000, 1),
    ("/STU3/Organization?_count=100", 10_000, 1),
    ("/STU3/Practitioner?_count=50", 100, 40),  # the demo has fewer than 100: all of them
    # each of Encounter's three sources (unfiltered, the first 100 are all A&E's)
    ("/STU3/Encounter?class=IMP&_count=50", 100, 100),
    ("/STU3/Encounter?class=AMB&_count=50", 100, 100),
    ("/STU3/Encounter?class=EMER&_count=50", 100, 100),
    ("/STU3/Condition?_count=100", 300, 300),
    ("/STU3/AllergyIntolerance?_count=100", 300, 300),
    ("/STU3/Flag?_count=100", 300, 100),
    ("/STU3/Procedure?_count=100", 300, 300),
    ("/STU3/PractitionerRole?_count=100", 10_000, 40),
    # The rich fixture patient's whole record, every code and status of every catalogue.
    ("/STU3/Condition?patient=100001", 100, 39),
    ("/STU3/AllergyIntolerance?patient=100001", 100, 23),
    ("/STU3/Flag?patient=100001", 100, 20),
    ("/STU3/Procedure?patient=100001", 100, 38),
    # Every document (STU3 base profile: Care Connect has none for DocumentReference).
    ("/STU3/DocumentReference?_count=100", 100_000, 300),
    ("/STU3/Medication?_count=100", 10_000, 70),
    ("/STU3/MedicationRequest?_count=100", 200, 200),
    ("/STU3/MedicationStatement?_count=100", 200, 200),
    ("/STU3/Immunization?_count=100", 200, 200),
    ("/STU3/Immunization?notgiven=true&_count=100", 100, 20),
    ("/STU3/Observation?_count=100", 300, 300),
    ("/STU3/Observation?patient=100001&_count=100", 10_000, 200),
])
async def test_served_resources_conform(client: httpx.AsyncClient, path: str, limit: int,
                                        at_least: int) -> None:
    resources = await _resources(client, path, limit)
    assert len(resources) >= at_least
    assert _errors(resources) == []
    # Nothing is silently passed: what cannot be checked locally is said to be unchecked.
    notes = {i.message for r in resources for i in validate(r) if i.severity != "error"}
    assert all(n.startswith("binding not checked: ValueSet ") for n in notes), notes
