"""Chained search over real HTTP (uvicorn on a loopback port, SQLite demo): the chain survives
URL encoding both ways (the ``|`` in a token, the ``:`` and ``.`` in a parameter name) and
through the self and next links."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import httpx
import sqlalchemy as sa

from tests.conftest import LiveServer

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def test_chain_and_has_over_http(live_server: LiveServer, demo_sqlite_url: str) -> None:
    engine = sa.create_engine(demo_sqlite_url)
    try:
        with engine.connect() as conn:
            nhs, n = conn.execute(sa.text(
                'SELECT p."NHS_NUMBER", count(*) FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."NHS_NUMBER" IS NOT NULL '
                'GROUP BY p."NHS_NUMBER" ORDER BY count(*) DESC, p."NHS_NUMBER" LIMIT 1')).one()
            spells = {str(r[0]) for r in conn.execute(sa.text(
                'SELECT s."PRVSP_REFNO" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."NHS_NUMBER" = :n'), {"n": nhs})}
            # Encounter's other two sources: outpatient and A&E attendances (served rows)
            pid = 'SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n'
            others = {f"{pre}{r[0]}" for pre, sql in (
                ("op-", f'SELECT "OPATT_REFNO" FROM "OUTPATIENT_ATTENDANCES" '
                        f'WHERE "PATNT_REFNO" IN ({pid})'),
                ("ae-", f'SELECT "AEATT_REFNO" FROM "AE_ATTENDANCES" WHERE "PATNT_REFNO" '
                        f"IN ({pid}) AND \"DEL_FLAG\" = 'N'"))
                for r in conn.execute(sa.text(sql), {"n": nhs})}
    finally:
        engine.dispose()
    assert n >= 2 and len(spells) == n
    base = live_server.url + "/STU3"
    query = {"subject:Patient.identifier": f"{NHS}|{nhs}", "_count": "1"}
    with httpx.Client(timeout=15) as c:
        r = c.get(f"{base}/Encounter", params=query)
        seen: set[str] = set()
        while True:
            assert r.status_code == 200, r.text
            bundle = r.json()
            links = {x["relation"]: x["url"] for x in bundle["link"]}
            assert dict(parse_qsl(urlsplit(links["self"]).query)).get(
                "subject:Patient.identifier") == f"{NHS}|{nhs}"
            seen |= {e["resource"]["id"] for e in bundle["entry"]}
            if "next" not in links:
                break
            r = c.get(links["next"])
        assert seen == spells | others

        r = c.get(f"{base}/Patient", params={"_has:Encounter:patient:status": "finished"})
        assert r.status_code == 400
        assert r.headers["content-type"].startswith("application/fhir+json")
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == (
            "INSUFFICIENT_SEARCH_CRITERIA")
        r = c.get(f"{base}/Encounter", params={"patient.general-practitioner.family": "x"})
        assert r.status_code == 400
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "CHAIN_TOO_DEEP"
