"""Searching DocumentReference (the demo EDMS) on SQLite and PostgreSQL, each answer checked
against an oracle computed here from the database and the code map YAML, and a patient/ token
confined to its own documents."""

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
from tests.gateway.test_clinical_search import found
from tests.security.principals import as_, install, patient_token

pytestmark = pytest.mark.anyio

CODEMAPS = Path(__file__).resolve().parents[2] / "mappings" / "codemaps"
SNOMED = "http://snomed.info/sct"
LOCAL = yaml.safe_load((CODEMAPS / "document-type.yaml").read_text())["target_system"]
LIVE = """SELECT "DOCMT_REFNO" FROM "DOCUMENTS" WHERE "DELETED_FLAG" = 'N' """


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
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("documents")))
    install(app, {"P": patient_token("100001"), "Q": patient_token("100003")})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


async def test_by_patient(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, LIVE + 'AND "PATNT_REFNO" = 100001')
    assert len(expected) >= 10
    assert await found(client, "/STU3/DocumentReference", patient="100001") == expected
    assert await found(client, "/STU3/DocumentReference", subject="Patient/100001") == expected


async def test_by_type_in_snomed_and_the_trusts_system(client: httpx.AsyncClient,
                                                       db: Any) -> None:
    assert locals_for("document-type-snomed", "373942005") == {"DS"}
    expected = ids(db, LIVE + """AND "DOCTY_CODE" = 'DS'""")
    assert expected
    assert await found(client, "/STU3/DocumentReference", type=f"{SNOMED}|373942005") == expected
    assert await found(client, "/STU3/DocumentReference", type="373942005") == expected
    referrals = ids(db, LIVE + """AND "DOCTY_CODE" = 'REF'""")
    assert referrals
    assert await found(client, "/STU3/DocumentReference", type=f"{LOCAL}|REF") == referrals
    # REF has no SNOMED CT map: a SNOMED code cannot find it, and no other type's code does
    opl = locals_for("document-type-snomed", "823681000000100")
    assert opl == {"OPL"}
    assert not referrals & await found(client, "/STU3/DocumentReference",
                                       type=f"{SNOMED}|823681000000100")


async def test_by_status(client: httpx.AsyncClient, db: Any) -> None:
    assert locals_for("document-reference-status", "current") == {"F", "P", "A"}
    current = ids(db, LIVE + """AND "DOC_STATUS" IN ('F', 'P', 'A')""")
    superseded = ids(db, LIVE + """AND "DOC_STATUS" = 'S'""")
    in_error = ids(db, LIVE + """AND "DOC_STATUS" = 'E'""")
    assert superseded and in_error
    got = await found(client, "/STU3/DocumentReference", patient="100001", status="current")
    assert got == current & ids(db, LIVE + 'AND "PATNT_REFNO" = 100001')
    assert await found(client, "/STU3/DocumentReference", status="superseded") == superseded
    assert await found(client, "/STU3/DocumentReference",
                       status="entered-in-error") == in_error


async def test_by_created_and_period(client: httpx.AsyncClient, db: Any) -> None:
    expected = ids(db, LIVE + """AND "CREATED_DTTM" >= '202301010000'
                   AND "CREATED_DTTM" < '202401010000'""")
    assert expected
    got = await found(client, "/STU3/DocumentReference", created=["ge2023-01-01", "lt2024-01-01"])
    assert got == expected
    # period: the spell or the clinic the document is about, entirely within 2022
    within = ids(db, LIVE + """AND "SERVICE_START_DTTM" >= '202201010000'
                 AND "SERVICE_END_DTTM" IS NOT NULL AND "SERVICE_END_DTTM" < '202301010000'""")
    assert within
    assert await found(client, "/STU3/DocumentReference", period="2022") == within


async def test_the_explore_page_combination(client: httpx.AsyncClient, db: Any) -> None:
    """patient + type + period, as the Care Connect page says systems SHOULD support."""
    expected = ids(db, LIVE + """AND "PATNT_REFNO" = 100001 AND "DOCTY_CODE" = 'DS'
                   AND (("SERVICE_END_DTTM" IS NULL AND "SERVICE_START_DTTM" IS NOT NULL)
                        OR "SERVICE_END_DTTM" >= '201001010000')""")
    assert expected
    got = await found(client, "/STU3/DocumentReference", patient="100001",
                      type=f"{SNOMED}|373942005", period="ge2010-01-01")
    assert got == expected


@pytest.mark.parametrize("period", ["ge1900-01-01", "gt1900-01-01", "ap2022", "le2100"])
async def test_a_document_without_a_period_matches_no_period_range(
        client: httpx.AsyncClient, db: Any, period: str) -> None:
    """No period is not an ongoing one (begun, not ended): it is in no range."""
    none = ids(db, LIVE + """AND "SERVICE_START_DTTM" IS NULL AND "SERVICE_END_DTTM" IS NULL""")
    assert none
    got = await found(client, "/STU3/DocumentReference", period=period)
    assert got and not got & none


async def test_by_setting_author_and_encounter(client: httpx.AsyncClient, db: Any) -> None:
    cardiology = ids(db, LIVE + """AND "SPECT_CODE" = '320'""")
    assert cardiology
    assert await found(client, "/STU3/DocumentReference", setting="320") == cardiology
    row = db.execute(text(LIVE.replace('"DOCMT_REFNO"', '"AUTHOR_REFNO", "PRVSP_REFNO"')
                          + 'AND "PRVSP_REFNO" IS NOT NULL ORDER BY "DOCMT_REFNO"')).first()
    by_author = ids(db, LIVE + 'AND "AUTHOR_REFNO" = :a', a=row[0])
    assert await found(client, "/STU3/DocumentReference", author=f"Practitioner/{row[0]}"
                       ) == by_author
    by_spell = ids(db, LIVE + 'AND "PRVSP_REFNO" = :s', s=row[1])
    assert await found(client, "/STU3/DocumentReference", encounter=str(row[1])) == by_spell


async def test_soft_deleted_rows_are_not_served(client: httpx.AsyncClient, db: Any) -> None:
    deleted = ids(db, """SELECT "DOCMT_REFNO" FROM "DOCUMENTS" WHERE "DELETED_FLAG" = 'Y'""")
    assert deleted
    rid = sorted(deleted)[0]
    assert (await client.get(f"/STU3/DocumentReference/{rid}")).status_code == 404
    assert (await client.get(f"/STU3/Binary/{rid}")).status_code == 404


async def test_a_patient_token_sees_only_its_own_documents(client: httpx.AsyncClient,
                                                           db: Any) -> None:
    own = ids(db, LIVE + 'AND "PATNT_REFNO" = 100001')
    r = await client.get("/STU3/DocumentReference", params={"_count": "500"}, headers=as_("P"))
    assert r.status_code == 200
    assert {e["resource"]["id"] for e in r.json()["entry"]
            if e["search"]["mode"] == "match"} == own
    r = await client.get("/STU3/DocumentReference", params={"patient": "100001"},
                         headers=as_("Q"))
    assert r.status_code == 200 and not [e for e in r.json().get("entry", [])
                                         if e["search"]["mode"] == "match"]
    rid = sorted(own)[0]
    assert (await client.get(f"/STU3/DocumentReference/{rid}", headers=as_("P"))
            ).status_code == 200
    assert (await client.get(f"/STU3/DocumentReference/{rid}", headers=as_("Q"))
            ).status_code == 404
