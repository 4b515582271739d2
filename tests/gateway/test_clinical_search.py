"""Searching the EPR half (Condition, AllergyIntolerance, Flag, Procedure, PractitionerRole) on
SQLite and PostgreSQL, each answer checked against an oracle computed here from the database
and the code map YAML (sharing no code with the gateway's plan or SQL adapter)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import create_engine, text

from gateway.app import build_app
from tests.conftest import gateway_settings

pytestmark = pytest.mark.anyio

CODEMAPS = Path(__file__).resolve().parents[2] / "mappings" / "codemaps"
SNOMED = "http://snomed.info/sct"
READ2 = "http://read.info/readv2"
CTV3 = "http://read.info/ctv3"
OPCS = yaml.safe_load((CODEMAPS / "opcs4.yaml").read_text())["target_system"]


def locals_for(codemap: str, code: str) -> set[str]:
    doc = yaml.safe_load((CODEMAPS / f"{codemap}.yaml").read_text())
    return {k for k, v in doc["map"].items() if v is not None and v["code"] == code}


@pytest.fixture(scope="module")
def db(demo_url: str) -> Iterator[Any]:
    engine = create_engine(demo_url)
    with engine.connect() as conn:
        yield conn
    engine.dispose()


def ids(db: Any, sql: str, **params: Any) -> set[str]:
    return {str(r[0]) for r in db.execute(text(sql), params)}


@pytest.fixture(scope="module")
async def client(demo_url: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("clinical")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


async def found(client: httpx.AsyncClient, path: str, **params: str | list[str]
                ) -> set[str]:
    """Ids of every match, following next links."""
    out: set[str] = set()
    url: str | None = path
    query: dict[str, str | list[str]] | None = {**params, "_count": "100"}
    while url:
        r = await client.get(url, params=query)
        assert r.status_code == 200, r.text
        body = r.json()
        out |= {e["resource"]["id"] for e in body.get("entry", ())
                if e["search"]["mode"] == "match"}
        url = next((link["url"] for link in body["link"] if link["relation"] == "next"), None)
        query = None
    return out


# --- Condition -----------------------------------------------------------------------------------

async def test_condition_by_snomed_finds_read_v2_and_ctv3_entries(client: httpx.AsyncClient,
                                                                 db: Any) -> None:
    read2, ctv3 = locals_for("readv2-snomed", "44054006"), locals_for("ctv3-snomed", "44054006")
    assert read2 == {"C10F."} and ctv3 == {"X40J5"}
    expected = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                   AND ("READ_CODE" = 'C10F.' OR "CTV3_CODE" = 'X40J5')""")
    got = await found(client, "/STU3/Condition", code=f"{SNOMED}|44054006")
    assert got == expected and len(got) > 20
    # Both schemes are among the matches, each with its own coding beside the SNOMED one.
    r = await client.get("/STU3/Condition", params={"code": f"{SNOMED}|44054006",
                                                    "patient": "100001"})
    systems = [{c["system"] for c in e["resource"]["code"]["coding"]}
               for e in r.json()["entry"]]
    assert {READ2, SNOMED} in systems and {CTV3, SNOMED} in systems


async def test_condition_code_in_its_own_scheme(client: httpx.AsyncClient, db: Any) -> None:
    # G20.. is a Read v2 code and a CTV3 code: the system says which column is meant.
    read2 = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                AND "READ_CODE" = 'G20..'""")
    ctv3 = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
               AND "CTV3_CODE" = 'G20..'""")
    assert read2 and ctv3 and not read2 & ctv3
    assert await found(client, "/STU3/Condition", code=f"{READ2}|G20..") == read2
    assert await found(client, "/STU3/Condition", code=f"{CTV3}|G20..") == ctv3
    assert await found(client, "/STU3/Condition", code="G20..") == read2 | ctv3
    # A code the trust has not mapped is found in its own system, never as SNOMED CT.
    unmapped = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                   AND "READ_CODE" = '1Z12.'""")
    assert unmapped and await found(client, "/STU3/Condition", code=f"{READ2}|1Z12.") == unmapped
    assert await found(client, "/STU3/Condition", code=f"{SNOMED}|1Z12.") == set()
    # "Has a SNOMED CT code": everything but the codes the trust has not mapped.
    mapped = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                 AND "READ_CODE" <> '1Z12.' AND "CTV3_CODE" IS NULL""") | ids(
        db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
        AND "CTV3_CODE" <> 'XaIIt' AND "READ_CODE" IS NULL""")
    got = await found(client, "/STU3/Condition", code=f"{SNOMED}|", patient="100001")
    assert got == mapped & await found(client, "/STU3/Condition", patient="100001")
    assert got and not got & unmapped


async def test_condition_status_category_and_dates(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                   AND "PATNT_REFNO" = 100001 AND "PROBL_STATUS" = 'R'""")
    got = await found(client, "/STU3/Condition", patient="100001", **{"clinical-status":
                                                                      "resolved"})
    assert got == expected and got
    expected = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                   AND "PATNT_REFNO" = 100001 AND "PROBL_TYPE" = 'DX'""")
    got = await found(client, "/STU3/Condition", patient="100001", category=(
        "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-ConditionCategory-1"
        "|encounter-diagnosis"))
    assert got == expected and got
    expected = ids(db, """SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = 'N'
                   AND "PATNT_REFNO" = 100001 AND "ONSET_DATE" >= '20200101'""")
    got = await found(client, "/STU3/Condition", patient="100001",
                      **{"onset-date": "ge2020-01-01"})
    assert got == expected and got


async def test_soft_deleted_rows_are_not_served(client: httpx.AsyncClient, db: Any) -> None:
    for table, key, flag, rtype in (("PROBLEMS", "PROBL_REFNO", "DELETED_FLAG", "Condition"),
                                    ("ALLERGIES", "ALLGY_REFNO", "DELETED_FLAG",
                                     "AllergyIntolerance"),
                                    ("ALERTS", "ALERT_REFNO", "ARCHV_FLAG", "Flag"),
                                    ("PROCEDURES", "PROCD_REFNO", "DELETED_FLAG", "Procedure")):
        deleted = sorted(ids(db, f'SELECT "{key}" FROM "{table}" WHERE "{flag}" = \'Y\''))
        assert deleted, table
        assert (await client.get(f"/STU3/{rtype}/{deleted[0]}")).status_code == 404
        live = ids(db, f'SELECT "{key}" FROM "{table}" WHERE "{flag}" = \'N\' '
                       'AND "PATNT_REFNO" = 100001')
        assert await found(client, f"/STU3/{rtype}", patient="100001") == live


# --- AllergyIntolerance ----------------------------------------------------------------------

async def test_no_known_allergies_is_distinct_from_not_asked(client: httpx.AsyncClient) -> None:
    r = await client.get("/STU3/AllergyIntolerance", params={"patient": "100002"})
    [entry] = r.json()["entry"]
    assert entry["resource"]["code"]["coding"] == [
        {"system": SNOMED, "code": "716186003", "display": "No known allergy"}]
    assert entry["resource"]["verificationStatus"] == "confirmed"
    r = await client.get("/STU3/AllergyIntolerance", params={"patient": "100004"})
    assert "entry" not in r.json()  # never asked: nothing at all


async def test_allergy_by_substance_and_by_reaction(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, """SELECT "ALLGY_REFNO" FROM "ALLERGIES" WHERE "DELETED_FLAG" = 'N'
                   AND "SUBST_CODE" = 'PEN'""")
    assert await found(client, "/STU3/AllergyIntolerance", code=f"{SNOMED}|764146007") == expected
    # A child column: any live reaction with that manifestation.
    expected = ids(db, """SELECT a."ALLGY_REFNO" FROM "ALLERGIES" a WHERE a."DELETED_FLAG" = 'N'
                   AND EXISTS (SELECT 1 FROM "ALLERGY_REACTIONS" r
                   WHERE r."ALLGY_REFNO" = a."ALLGY_REFNO" AND r."DELETED_FLAG" = 'N'
                   AND r."MANIF_CODE" = 'RASH')""")
    got = await found(client, "/STU3/AllergyIntolerance", manifestation=f"{SNOMED}|271807003")
    assert got == expected and len(got) > 20
    expected = ids(db, """SELECT "ALLGY_REFNO" FROM "ALLERGIES" WHERE "DELETED_FLAG" = 'N'
                   AND "ALLGY_STATUS" IN ('I', 'R') AND "PATNT_REFNO" = 100001""")
    got = await found(client, "/STU3/AllergyIntolerance", patient="100001",
                      **{"clinical-status": "inactive,resolved"})
    assert got == expected and got


# --- Flag and Procedure -------------------------------------------------------------------------

async def test_flags_by_status_and_period(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, """SELECT "ALERT_REFNO" FROM "ALERTS" WHERE "ARCHV_FLAG" = 'N'
                   AND "ALERT_STATUS" = 'A'""")
    assert await found(client, "/STU3/Flag", status="active") == expected
    # On a period, lt is "started before": alerts raised before 2020, ended or not.
    expected = ids(db, """SELECT "ALERT_REFNO" FROM "ALERTS" WHERE "ARCHV_FLAG" = 'N'
                   AND "START_DTTM" < '202001010000'""")
    got = await found(client, "/STU3/Flag", date="lt2020-01-01")
    assert got == expected and got
    # ...and ge is "still going on, or ended on or after": active at some time since 2024.
    expected = ids(db, """SELECT "ALERT_REFNO" FROM "ALERTS" WHERE "ARCHV_FLAG" = 'N'
                   AND ("END_DTTM" IS NULL OR "END_DTTM" >= '202401010000')""")
    got = await found(client, "/STU3/Flag", date="ge2024-01-01")
    assert got == expected and got


async def test_procedure_by_opcs_snomed_and_date(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, """SELECT "PROCD_REFNO" FROM "PROCEDURES" WHERE "DELETED_FLAG" = 'N'
                   AND "OPCS_CODE" = 'W371'""")
    assert expected
    assert await found(client, "/STU3/Procedure", code=f"{OPCS}|W37.1") == expected
    assert await found(client, "/STU3/Procedure", code=f"{SNOMED}|52734007") == expected
    assert await found(client, "/STU3/Procedure", code=f"{OPCS}|W371") == set()  # local form
    # Care Connect's SHALL combination: patient + date.
    expected = ids(db, """SELECT "PROCD_REFNO" FROM "PROCEDURES" WHERE "DELETED_FLAG" = 'N'
                   AND "PATNT_REFNO" = 100001 AND "PROC_DTTM" >= '201501010000'
                   AND "PROC_DTTM" < '202001010000'""")
    got = await found(client, "/STU3/Procedure", patient="100001",
                      date=["ge2015-01-01", "lt2020-01-01"])
    assert got == expected and got


# --- PractitionerRole and the patient's record ---------------------------------------------------

async def test_practitioner_roles(client: httpx.AsyncClient, db: Any) -> None:
    gps = ids(db, """SELECT "PROCA_REFNO" FROM "CLINICIANS" WHERE "PRTYP_CODE" = 'GP'""")
    assert await found(client, "/STU3/PractitionerRole", role="R0260") == gps
    at_trust = ids(db, """SELECT "PROCA_REFNO" FROM "CLINICIANS" WHERE "ORGAN_REFNO" = 1""")
    assert await found(client, "/STU3/PractitionerRole", organization="Organization/1") == at_trust
    r = await client.get("/STU3/PractitionerRole", params={"practitioner": "1"})
    [entry] = r.json()["entry"]
    assert entry["resource"]["practitioner"] == {"reference": "Practitioner/1"}


async def test_revinclude_of_the_record_onto_the_patient(client: httpx.AsyncClient,
                                                         db: Any) -> None:
    params = [("_id", "100001")] + [("_revinclude", f"{t}:patient") for t in (
        "Condition", "AllergyIntolerance", "Flag", "Procedure")]
    r = await client.get("/STU3/Patient", params=params)
    assert r.status_code == 200
    included = [e["resource"] for e in r.json()["entry"] if e["search"]["mode"] == "include"]
    counts: dict[str, int] = {}
    for res in included:
        counts[res["resourceType"]] = counts.get(res["resourceType"], 0) + 1
    for rtype, table, flag in (("Condition", "PROBLEMS", "DELETED_FLAG"),
                               ("AllergyIntolerance", "ALLERGIES", "DELETED_FLAG"),
                               ("Flag", "ALERTS", "ARCHV_FLAG"),
                               ("Procedure", "PROCEDURES", "DELETED_FLAG")):
        n = db.execute(text(f'SELECT COUNT(*) FROM "{table}" WHERE "PATNT_REFNO" = 100001 '
                            f'AND "{flag}" = \'N\'')).scalar()
        assert n and counts.get(rtype) == n, rtype


# --- a patient/ token sees its own record and nothing else ---------------------------------------

async def test_patient_tokens_are_confined_to_their_own_record(
        demo_url: str, tmp_path: Path, db: Any) -> None:
    from tests.security.principals import as_, install, patient_token

    app = build_app(gateway_settings(demo_url, tmp_path, auth_mode="insecure-demo"))
    install(app, {"P": patient_token("100001")})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            for rtype, table, key, flag in (
                    ("Condition", "PROBLEMS", "PROBL_REFNO", "DELETED_FLAG"),
                    ("AllergyIntolerance", "ALLERGIES", "ALLGY_REFNO", "DELETED_FLAG"),
                    ("Flag", "ALERTS", "ALERT_REFNO", "ARCHV_FLAG"),
                    ("Procedure", "PROCEDURES", "PROCD_REFNO", "DELETED_FLAG")):
                own = ids(db, f'SELECT "{key}" FROM "{table}" WHERE "PATNT_REFNO" = 100001 '
                              f'AND "{flag}" = \'N\'')
                other = min(int(i) for i in ids(
                    db, f'SELECT "{key}" FROM "{table}" WHERE "PATNT_REFNO" <> 100001 '
                        f'AND "{flag}" = \'N\''))
                # No patient filter at all: still only the token's patient.
                r = await c.get(f"/STU3/{rtype}", params={"_count": "100"}, headers=as_("P"))
                assert r.status_code == 200, r.text
                got = {e["resource"]["id"] for e in r.json().get("entry", ())
                       if e["search"]["mode"] == "match"}
                assert got == own and own, rtype
                # Another patient's record by id is simply not there.
                r = await c.get(f"/STU3/{rtype}/{other}", headers=as_("P"))
                assert r.status_code == 404, rtype
