"""Every interaction checked against SMART scopes (v1 and v2), deny by default.

The demo serves Patient, Practitioner, Organization, Location and Encounter over SQL, read and
search only; creates and updates are exercised on the HL7 v2 demo (Patient) at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.auth.devkeys import mint_dev_token
from tests.gateway.auth.helpers import READ_IDS, SERVED, SigningKey, claims, code, sign

pytestmark = pytest.mark.anyio

# scope string → {type: (read allowed, search allowed)} ("*" for every type)
MATRIX: list[tuple[str, dict[str, tuple[bool, bool]]]] = [
    ("user/*.read", {"*": (True, True)}),
    ("system/*.*", {"*": (True, True)}),
    ("user/*.write", {"*": (False, False)}),
    ("user/*.cruds", {"*": (True, True)}),
    ("system/*.rs", {"*": (True, True)}),
    ("user/*.r", {"*": (True, False)}),
    ("user/*.s", {"*": (False, True)}),
    ("user/*.cud", {"*": (False, False)}),
    ("openid fhirUser launch offline_access", {"*": (False, False)}),
    ("user/*.rs?_security=R", {"*": (False, False)}),  # v2 query scopes: dropped
    ("user/*.sr user/*.reads", {"*": (False, False)}),  # malformed: ignored
    ("", {"*": (False, False)}),
]
for rtype in SERVED:
    MATRIX.append((f"user/{rtype}.read", {"*": (False, False), rtype: (True, True)}))
    MATRIX.append((f"system/{rtype}.r", {"*": (False, False), rtype: (True, False)}))
    MATRIX.append((f"user/{rtype}.s", {"*": (False, False), rtype: (False, True)}))
    MATRIX.append((f"user/{rtype}.*", {"*": (False, False), rtype: (True, True)}))


def expected(table: dict[str, tuple[bool, bool]], rtype: str) -> tuple[bool, bool]:
    return table.get(rtype, table["*"])


@pytest.mark.parametrize(("scope", "table"), MATRIX, ids=[m[0] or "(none)" for m in MATRIX])
async def test_scope_matrix_read_and_search(gw: httpx.AsyncClient, rs_key: SigningKey,
                                            scope: str, table: dict[str, tuple[bool, bool]]
                                            ) -> None:
    headers = {"Authorization": "Bearer " + sign(rs_key, claims(scope=scope))}
    for rtype in SERVED:
        may_read, may_search = expected(table, rtype)
        rid = READ_IDS[rtype]
        read = await gw.get(f"/STU3/{rtype}/{rid}", headers=headers)
        assert read.status_code == (200 if may_read else 403), (rtype, read.text)
        checks = [await gw.get(f"/STU3/{rtype}", params={"_id": rid}, headers=headers),
                  await gw.post(f"/STU3/{rtype}/_search", data={"_id": rid}, headers=headers),
                  await gw.get(f"/STU3/{rtype}/_search", params={"_id": rid}, headers=headers),
                  await gw.get(f"/STU3/{rtype}", params={"_id": rid, "_summary": "count"},
                               headers=headers)]
        for r in checks:
            assert r.status_code == (200 if may_search else 403), (rtype, r.url, r.text)
        for r in (read, *checks):
            if r.status_code == 403:
                assert code(r) == "ACCESS_DENIED"
                assert 'error="insufficient_scope"' in r.headers["www-authenticate"]


async def test_403_comes_before_404_and_400(gw: httpx.AsyncClient, rs_key: SigningKey) -> None:
    headers = {"Authorization": "Bearer " + sign(rs_key, claims(scope="user/Encounter.read"))}
    assert (await gw.get("/STU3/Patient/999999", headers=headers)).status_code == 403
    bad_search = await gw.get("/STU3/Patient", params={"family": "x"}, headers=headers)
    assert bad_search.status_code == 403  # not the 400 that would tell what the policy is
    assert (await gw.get("/STU3/Encounter/999999", headers=headers)).status_code == 404


async def test_405_and_404_are_public_answers_before_403(gw: httpx.AsyncClient,
                                                         rs_key: SigningKey) -> None:
    """What the server can do is public (/metadata): an interaction it does not offer is 405
    whatever the scopes; one it offers but the scopes do not grant is 403."""
    for scope in ("user/*.read", "user/*.write", "user/*.cruds", "user/Location.read"):
        headers = {"Authorization": "Bearer " + sign(rs_key, claims(scope=scope))}
        for rtype in SERVED:
            created = await gw.post(f"/STU3/{rtype}", json={"resourceType": rtype},
                                    headers=headers)
            updated = await gw.put(f"/STU3/{rtype}/{READ_IDS[rtype]}",
                                   json={"resourceType": rtype, "id": READ_IDS[rtype]},
                                   headers=headers)
            deleted = await gw.delete(f"/STU3/{rtype}/{READ_IDS[rtype]}", headers=headers)
            for r in (created, updated, deleted):
                assert r.status_code == 405 and code(r) == "METHOD_NOT_ALLOWED", (scope, r.url)
        unknown = await gw.get("/STU3/Appointment", headers=headers)  # not served
        assert unknown.status_code == 404 and code(unknown) == "UNKNOWN_RESOURCE_TYPE"


INCLUDES: list[tuple[str, dict[str, str], int]] = [
    ("user/Patient.read", {"_id": "100001", "_include": "Patient:general-practitioner"}, 403),
    ("user/Patient.read user/Practitioner.read",
     {"_id": "100001", "_include": "Patient:general-practitioner"}, 403),  # + Organization
    ("user/Patient.read user/Practitioner.read",
     {"_id": "100001", "_include": "Patient:general-practitioner:Practitioner"}, 200),
    ("user/Patient.read user/Practitioner.r user/Organization.r",
     {"_id": "100001", "_include": "Patient:general-practitioner"}, 200),
    ("user/Patient.read user/Practitioner.s",
     {"_id": "100001", "_include": "Patient:general-practitioner:Practitioner"}, 403),
    ("user/Patient.read", {"_id": "100001", "_revinclude": "Encounter:patient"}, 403),
    ("user/Patient.read user/Encounter.r",
     {"_id": "100001", "_revinclude": "Encounter:patient"}, 403),
    ("user/Patient.read user/Encounter.s",
     {"_id": "100001", "_revinclude": "Encounter:patient"}, 200),
    ("user/Encounter.read", {"_id": "1", "_include": "Encounter:patient"}, 403),
    ("user/Encounter.read user/Patient.r", {"_id": "1", "_include": "Encounter:patient"}, 200),
]


@pytest.mark.parametrize(("scope", "params", "status"), INCLUDES)
async def test_included_types_must_be_allowed_too(gw: httpx.AsyncClient, rs_key: SigningKey,
                                                  scope: str, params: dict[str, str],
                                                  status: int) -> None:
    headers = {"Authorization": "Bearer " + sign(rs_key, claims(scope=scope))}
    rtype = "Encounter" if params["_id"] == "1" else "Patient"
    r = await gw.get(f"/STU3/{rtype}", params=params, headers=headers)
    assert r.status_code == status, r.text
    if status == 200:
        modes = {e["search"]["mode"] for e in r.json()["entry"]}
        assert modes == {"match", "include"}
    else:
        assert code(r) == "ACCESS_DENIED"


VALIDATE: list[tuple[str, str, str, int]] = [
    # scope, method, path, status
    ("user/Patient.r", "POST", "/STU3/Patient/$validate", 200),
    ("user/Patient.c", "POST", "/STU3/Patient/$validate", 200),
    ("user/Patient.u", "POST", "/STU3/Patient/$validate", 200),
    ("user/Patient.s", "POST", "/STU3/Patient/$validate", 403),
    ("user/Encounter.read", "POST", "/STU3/Patient/$validate", 403),
    ("user/Patient.r", "GET", "/STU3/Patient/100001/$validate", 200),
    ("user/Patient.cus", "GET", "/STU3/Patient/100001/$validate", 403),
    ("user/Patient.r", "POST", "/STU3/Patient/100001/$validate", 200),
    ("user/Patient.c", "POST", "/STU3/Patient/100001/$validate", 403),
]


@pytest.mark.parametrize(("scope", "method", "path", "status"), VALIDATE)
async def test_validate(gw: httpx.AsyncClient, rs_key: SigningKey, scope: str, method: str,
                        path: str, status: int) -> None:
    headers = {"Authorization": "Bearer " + sign(rs_key, claims(scope=scope))}
    body = {"resourceType": "Patient", "id": "100001"} if method == "POST" else None
    r = await gw.request(method, path, json=body, headers=headers)
    assert r.status_code == status, r.text


async def test_next_page_links_need_search_too(gw: httpx.AsyncClient,
                                               rs_key: SigningKey) -> None:
    reader = {"Authorization": "Bearer " + sign(rs_key, claims(scope="user/Practitioner.rs"))}
    first = await gw.get("/STU3/Practitioner", params={"_count": "2"}, headers=reader)
    assert first.status_code == 200
    nxt = next(link["url"] for link in first.json()["link"] if link["relation"] == "next")
    assert (await gw.get(nxt, headers=reader)).status_code == 200
    other = {"Authorization": "Bearer " + sign(rs_key, claims(scope="user/Practitioner.r"))}
    assert (await gw.get(nxt, headers=other)).status_code == 403


async def test_a_patient_scoped_token_exposes_its_launch_context(
        gw: httpx.AsyncClient, rs_key: SigningKey) -> None:
    token = sign(rs_key, claims(scope="patient/Patient.read", patient="100001"))
    r = await gw.get("/STU3/Patient/100001", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text


async def test_without_an_authentication_layer_nothing_is_served() -> None:
    """Deny by default: a route reached without a principal (no auth layer) is a 401."""
    from starlette.requests import Request

    from gateway.auth import authorize
    from gateway.auth.errors import AuthenticationRequired

    request = Request({"type": "http", "method": "GET", "path": "/", "headers": [],
                       "query_string": b"", "state": {}})
    with pytest.raises(AuthenticationRequired):
        authorize.require(request, "Patient", "r")


# --- writes, on the HL7 v2 demo (the SQL demo is read-only) -----------------------------------


@pytest.fixture
async def hl7(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Callable[..., str]]]:
    from gateway.app import build_app
    from gateway.demo_pas import ensure_sqlite_demo
    from gateway.demo_pas.hl7v2 import PasSimulator
    from gateway.settings import Settings
    from tests.adapters.hl7v2.test_adapter import MAPPINGS

    path = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    db_url = f"sqlite:///{path}"
    async with PasSimulator(db_url) as sim:
        # The bundled HL7 demo with no auth settings: JWT with the local development key.
        app: Starlette = build_app(Settings(
            mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="t", log_level="warning",
            progress=False, audit_log=str(tmp_path / "audit.jsonl"),
            connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                def token(scope: str) -> str:
                    return mint_dev_token(tmp_path, scope)
                yield c, token


async def test_create_and_update_need_c_and_u(
        hl7: tuple[httpx.AsyncClient, Callable[..., str]]) -> None:
    from tests.adapters.hl7v2.test_adapter import NEW_PATIENT

    c, token = hl7

    def auth(scope: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token(scope)}", **extra}

    fhir = "application/fhir+json"
    denied = await c.post("/STU3/Patient", json=NEW_PATIENT, headers=auth("user/Patient.read"))
    assert denied.status_code == 403 and code(denied) == "ACCESS_DENIED"
    # create-only: created, but the stored representation is not shown
    created = await c.post("/STU3/Patient", json=NEW_PATIENT,
                           headers=auth("user/Patient.c", **{"Content-Type": fhir}))
    assert created.status_code == 201, created.text
    assert created.json()["resourceType"] == "OperationOutcome"
    location = created.headers["location"]
    pid = location.rsplit("/", 1)[1]
    # conditional create searches: it needs s as well as c
    cond = {"If-None-Exist": "identifier=https://fhir.nhs.uk/Id/nhs-number|9991234578",
            "Content-Type": fhir}
    r = await c.post("/STU3/Patient", json=NEW_PATIENT, headers=auth("user/Patient.c", **cond))
    assert r.status_code == 403
    r = await c.post("/STU3/Patient", json=NEW_PATIENT,
                     headers=auth("user/Patient.cs", **cond))
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    r = await c.post("/STU3/Patient", json=NEW_PATIENT,
                     headers=auth("user/Patient.crs", **cond))
    assert r.status_code == 200 and r.json()["id"] == pid
    # update
    current = (await c.get(f"/STU3/Patient/{pid}", headers=auth("user/Patient.r"))).json()
    changed: dict[str, Any] = {**current, "gender": "other"}
    changed.pop("meta", None)
    r = await c.put(f"/STU3/Patient/{pid}", json=changed,
                    headers=auth("user/Patient.read user/Patient.c", **{"Content-Type": fhir}))
    assert r.status_code == 403
    r = await c.put(f"/STU3/Patient/{pid}", json=changed,
                    headers=auth("user/Patient.u", **{"Content-Type": fhir}))
    assert r.status_code == 200 and r.json()["resourceType"] == "OperationOutcome"
    r = await c.put(f"/STU3/Patient/{pid}", json=changed,
                    headers=auth("user/Patient.write user/Patient.read",
                                 **{"Content-Type": fhir}))
    assert r.status_code == 200 and r.json()["gender"] == "other"
    # v1 write covers create and update, not read or search
    w = auth("user/Patient.write")
    assert (await c.get(f"/STU3/Patient/{pid}", headers=w)).status_code == 403
    assert (await c.delete(f"/STU3/Patient/{pid}", headers=w)).status_code == 405
