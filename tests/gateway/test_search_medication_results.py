"""Search on the EPR's medicines and results (Medication, MedicationRequest,
MedicationStatement, Immunization, Observation), on SQLite and PostgreSQL.

Every declared search parameter is tried against an oracle: the same question asked of the
database directly in SQL written here, not through the gateway's query compiler. Soft-deleted
rows are never served; includes and reverse includes follow the declared references.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from tests.conftest import gateway_settings

pytestmark = pytest.mark.anyio

SCT = "http://snomed.info/sct"
DRUG = "https://fhir.demo-trust.nhs.uk/CodeSystem/drug-code"
TEST = "https://fhir.demo-trust.nhs.uk/CodeSystem/test-code"
ORDER = "https://fhir.demo-trust.nhs.uk/Id/prescription-order-number"
P = 100001


@pytest.fixture(scope="module")
def db(demo_url: str) -> Iterator[sa.Connection]:
    engine = sa.create_engine(demo_url)
    with engine.connect() as conn:
        yield conn
    engine.dispose()


@pytest.fixture(scope="module")
async def client(demo_url: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("epr-search")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


_KEYWORDS = {"SELECT", "FROM", "WHERE", "AND", "OR", "IN", "LIKE", "JOIN", "ON", "IS", "NOT",
             "NULL", "MIN"}
_NAME = re.compile(r"\b[A-Z][A-Z0-9_]*[A-Z0-9]\b")


def quoted(sql: str) -> str:
    """The legacy upper-case names quoted (PostgreSQL folds bare names to lower case); string
    literals left alone."""
    parts = sql.split("'")
    for i in range(0, len(parts), 2):  # outside quotes
        parts[i] = _NAME.sub(lambda m: m.group(0) if m.group(0) in _KEYWORDS
                             else f'"{m.group(0)}"', parts[i])
    return "'".join(parts)


def oracle(db: sa.Connection, sql: str, **params: Any) -> set[str]:
    return {str(r[0]) for r in db.execute(sa.text(quoted(sql)), params)}


async def search(client: httpx.AsyncClient, url: str) -> list[dict[str, Any]]:
    """Every match of a search, following the next links."""
    found: list[dict[str, Any]] = []
    next_url: str | None = url + ("&" if "?" in url else "?") + "_count=200"
    while next_url:
        r = await client.get(next_url, headers={"Prefer": "handling=strict"})
        assert r.status_code == 200, (url, r.text[:300])
        page = r.json()
        found += [e["resource"] for e in page.get("entry", ())
                  if e["search"]["mode"] == "match"]
        next_url = next((link["url"] for link in page["link"] if link["relation"] == "next"),
                        None)
    return found


async def ids(client: httpx.AsyncClient, url: str) -> set[str]:
    found = await search(client, url)
    assert len({r["id"] for r in found}) == len(found), "an id served twice"
    return {r["id"] for r in found}


PRESC = "SELECT PRESC_REFNO FROM PRESCRIPTIONS m WHERE m.DEL_FLAG = 'N'"
MEDLS = "SELECT MEDLS_REFNO FROM MEDICATION_LIST l WHERE l.DEL_FLAG = 'N'"
IMMUN = "SELECT IMMUN_REFNO FROM IMMUNISATIONS i WHERE i.DEL_FLAG = 'N'"
RESLT = ("SELECT RESLT_REFNO FROM RESULTS o JOIN RESULT_REPORTS h ON h.REPRT_REFNO = "
         "o.REPRT_REFNO JOIN TEST_CODES t ON t.TEST_CODE = o.TEST_CODE WHERE o.DEL_FLAG = 'N'")

CASES: list[tuple[str, str, dict[str, Any]]] = [
    # Medication
    ("Medication?code=http://snomed.info/sct|322236009",
     "SELECT DRUG_REFNO FROM DRUGS WHERE DMD_CODE = '322236009'", {}),
    (f"Medication?code={DRUG}|OXYB15L",
     "SELECT DRUG_REFNO FROM DRUGS WHERE DRUG_CODE = 'OXYB15L'", {}),
    ("Medication?code=http://snomed.info/sct|", "SELECT DRUG_REFNO FROM DRUGS WHERE "
     "DMD_CODE IS NOT NULL", {}),
    ("Medication?form=http://snomed.info/sct|385049006",
     "SELECT DRUG_REFNO FROM DRUGS WHERE FORM_CODE = 'CAP'", {}),
    ("Medication?status=inactive", "SELECT DRUG_REFNO FROM DRUGS WHERE ACTIVE_FLAG = 'N'", {}),
    # MedicationRequest
    (f"MedicationRequest?patient={P}", PRESC + " AND m.PATNT_REFNO = :p", {"p": P}),
    (f"MedicationRequest?subject=Patient/{P}&status=stopped",
     PRESC + " AND m.PATNT_REFNO = :p AND m.STATUS_CODE = 'S'", {"p": P}),
    (f"MedicationRequest?patient={P}&code=http://snomed.info/sct|323440000",
     PRESC + " AND m.PATNT_REFNO = :p AND m.DRUG_REFNO IN (SELECT DRUG_REFNO FROM DRUGS "
     "WHERE DMD_CODE = '323440000')", {"p": P}),
    (f"MedicationRequest?code={DRUG}|FENT12P&authoredon=ge2025-01-01",
     PRESC + " AND m.DRUG_REFNO IN (SELECT DRUG_REFNO FROM DRUGS WHERE DRUG_CODE = 'FENT12P') "
     "AND m.ORDER_DTTM >= '202501010000'", {}),
    ("MedicationRequest?medication=Medication/1&authoredon=2024",
     PRESC + " AND m.DRUG_REFNO = 1 AND m.ORDER_DTTM LIKE '2024%'", {}),
    ("MedicationRequest?category=discharge&authoredon=lt2022-03",
     PRESC + " AND m.PRSTY_CODE = 'DIS' AND m.ORDER_DTTM < '202203010000'", {}),
    ("MedicationRequest?context=Encounter/1", PRESC + " AND m.PRVSP_REFNO = 1", {}),
    (f"MedicationRequest?requester=Practitioner/34&patient={P}",
     PRESC + " AND m.PROCA_REFNO = 34 AND m.PATNT_REFNO = :p", {"p": P}),
    (f"MedicationRequest?identifier={ORDER}|RX00000013",
     PRESC + " AND m.ORDER_NUMBER = 'RX00000013'", {}),
    # MedicationStatement
    (f"MedicationStatement?patient={P}", MEDLS + " AND l.PATNT_REFNO = :p", {"p": P}),
    (f"MedicationStatement?subject={P}&status=active,on-hold",
     MEDLS + " AND l.PATNT_REFNO = :p AND l.STATUS_CODE IN ('C', 'H')", {"p": P}),
    ("MedicationStatement?effective=sa2025-01-01",
     MEDLS + " AND l.START_DATE >= '20250102'", {}),
    (f"MedicationStatement?medication=Medication/25&patient={P}",
     MEDLS + " AND l.DRUG_REFNO = 25 AND l.PATNT_REFNO = :p", {"p": P}),
    ("MedicationStatement?code=http://snomed.info/sct|320000009&status=stopped",
     MEDLS + " AND l.STATUS_CODE = 'S' AND l.DRUG_REFNO IN (SELECT DRUG_REFNO FROM DRUGS "
     "WHERE DMD_CODE = '320000009')", {}),
    (f"MedicationStatement?source=Practitioner/1&patient={P}",
     MEDLS + " AND l.PROCA_REFNO = 1 AND l.PATNT_REFNO = :p", {"p": P}),
    # Immunization
    (f"Immunization?patient={P}", IMMUN + " AND i.PATNT_REFNO = :p", {"p": P}),
    (f"Immunization?patient={P}&date=lt2020", IMMUN + " AND i.PATNT_REFNO = :p AND "
     "i.GIVEN_DTTM < '202001010000'", {"p": P}),
    ("Immunization?notgiven=true", IMMUN + " AND i.NOT_GIVEN = 'Y'", {}),
    ("Immunization?vaccine-code=http://snomed.info/sct|39114911000001105&date=2025",
     IMMUN + " AND i.VACC_CODE = 'FLU' AND i.GIVEN_DTTM LIKE '2025%'", {}),
    ("Immunization?reason-not-given=PATOBJ", IMMUN + " AND i.NOT_GIVEN_CODE = 'PATO'", {}),
    ("Immunization?reason=8", IMMUN + " AND i.REASON_CODE = 'M'", {}),
    ("Immunization?lot-number=ab", IMMUN + " AND i.BATCH_NO LIKE 'AB%'", {}),
    (f"Immunization?practitioner=Practitioner/1&patient={P}",
     IMMUN + " AND i.PROCA_REFNO = 1 AND i.PATNT_REFNO = :p", {"p": P}),
    (f"Immunization?status=completed&patient={P}", IMMUN + " AND i.PATNT_REFNO = :p",
     {"p": P}),
    ("Immunization?status=entered-in-error", IMMUN + " AND 1 = 0", {}),
    # Observation
    (f"Observation?patient={P}", RESLT + " AND o.PATNT_REFNO = :p", {"p": P}),
    (f"Observation?patient={P}&category=vital-signs",
     RESLT + " AND o.PATNT_REFNO = :p AND t.OBSCT_CODE = 'VS'", {"p": P}),
    (f"Observation?subject=Patient/{P}&category=laboratory&code={SCT}|1022431000000105",
     RESLT + " AND o.PATNT_REFNO = :p AND t.OBSCT_CODE = 'LAB' AND o.TEST_CODE = 'HB'",
     {"p": P}),
    (f"Observation?patient={P}&category=laboratory&code={TEST}|UREA&date=ge2024-01-01",
     RESLT + " AND o.PATNT_REFNO = :p AND o.TEST_CODE = 'UREA' AND h.COLLECTED_DTTM >= "
     "'202401010000'", {"p": P}),
    ("Observation?code=1104051000000101&date=2026-11",
     RESLT + " AND t.SNOMED_CODE = '1104051000000101' AND h.COLLECTED_DTTM LIKE '202611%'", {}),
    ("Observation?status=preliminary", RESLT + " AND o.RESULT_STATUS = 'P'", {}),
    ("Observation?encounter=Encounter/1&category=survey",
     RESLT + " AND h.PRVSP_REFNO = 1 AND t.OBSCT_CODE = 'SURV'", {}),
    (f"Observation?context=Encounter/1&patient={P}",
     RESLT + " AND h.PRVSP_REFNO = 1 AND o.PATNT_REFNO = :p", {"p": P}),
    (f"Observation?performer=Organization/1&patient={P}&date=lt2023",
     RESLT + " AND h.ORGAN_REFNO = 1 AND o.PATNT_REFNO = :p AND h.COLLECTED_DTTM < "
     "'202301010000'", {"p": P}),
    ("Observation?value-string=mrsa%20i", RESLT + " AND o.VALUE_TEXT LIKE 'MRSA i%'", {}),
]


@pytest.mark.parametrize(("url", "sql", "params"), CASES, ids=[c[0] for c in CASES])
async def test_search_matches_the_oracle(client: httpx.AsyncClient, db: sa.Connection,
                                         url: str, sql: str, params: dict[str, Any]) -> None:
    expected = oracle(db, sql, **params)
    found = await ids(client, "/STU3/" + url)
    assert found == expected
    if "1 = 0" not in sql:  # not vacuous: the question has answers
        assert expected, url


async def test_the_rich_patient_has_well_over_a_hundred_of_these_resources(
        client: httpx.AsyncClient) -> None:
    counts = {}
    for rtype in ("MedicationRequest", "MedicationStatement", "Immunization", "Observation"):
        r = await client.get(f"/STU3/{rtype}?patient={P}&_summary=count")
        counts[rtype] = r.json()["total"]
    assert all(n >= 12 for n in counts.values()), counts
    assert sum(counts.values()) >= 200, counts


async def test_observations_sort_by_date_both_ways(client: httpx.AsyncClient) -> None:
    for sort, reverse in (("date", False), ("-date", True)):
        found = await search(client, f"/STU3/Observation?patient={P}&_sort={sort}")
        dates = [r["effectiveDateTime"] for r in found]
        assert len(dates) > 100
        assert dates == sorted(dates, reverse=reverse)


async def test_soft_deleted_rows_are_not_served(client: httpx.AsyncClient,
                                                db: sa.Connection) -> None:
    for rtype, table, key in (("MedicationRequest", "PRESCRIPTIONS", "PRESC_REFNO"),
                              ("MedicationStatement", "MEDICATION_LIST", "MEDLS_REFNO"),
                              ("Immunization", "IMMUNISATIONS", "IMMUN_REFNO"),
                              ("Observation", "RESULTS", "RESLT_REFNO")):
        deleted = db.execute(sa.text(quoted(
            f"SELECT MIN({key}) FROM {table} WHERE DEL_FLAG = 'Y'"))).scalar()
        kept = db.execute(sa.text(quoted(
            f"SELECT MIN({key}) FROM {table} WHERE DEL_FLAG = 'N'"))).scalar()
        assert deleted is not None and kept is not None, table
        assert (await client.get(f"/STU3/{rtype}/{deleted}")).status_code == 404
        assert (await client.get(f"/STU3/{rtype}/{kept}")).status_code == 200


async def test_include_and_revinclude_follow_the_references(client: httpx.AsyncClient) -> None:
    r = await client.get(f"/STU3/MedicationRequest?patient={P}&_count=20"
                         "&_include=MedicationRequest:medication")
    page = r.json()
    matches = [e["resource"] for e in page["entry"] if e["search"]["mode"] == "match"]
    included = {f"Medication/{e['resource']['id']}" for e in page["entry"]
                if e["search"]["mode"] == "include"}
    assert {m["medicationReference"]["reference"] for m in matches} == included
    for rtype in ("Observation", "Immunization", "MedicationStatement", "MedicationRequest"):
        r = await client.get(f"/STU3/Patient?_id={P}&_revinclude={rtype}:patient")
        assert r.status_code == 200, r.text[:300]
        entries = r.json()["entry"]
        included = [e["resource"] for e in entries if e["search"]["mode"] == "include"]
        assert included and {x["resourceType"] for x in included} == {rtype}


async def test_capability_statement_lists_the_new_types(client: httpx.AsyncClient) -> None:
    statement = (await client.get("/STU3/metadata")).json()
    served = {r["type"]: r for r in statement["rest"][0]["resource"]}
    expected = {
        "Medication": {"code", "form", "status"},
        "MedicationRequest": {"patient", "subject", "medication", "code", "authoredon",
                              "status", "category", "context", "requester", "identifier"},
        "MedicationStatement": {"patient", "subject", "effective", "status", "medication",
                                "code", "source"},
        "Immunization": {"patient", "date", "status", "notgiven", "vaccine-code",
                         "lot-number", "practitioner", "location", "reason",
                         "reason-not-given"},
        "Observation": {"patient", "subject", "category", "code", "date", "status", "context",
                        "encounter", "performer", "value-string", "value-quantity"},
    }
    for rtype, params in expected.items():
        resource = served[rtype]
        assert resource["profile"]["reference"] == (
            f"https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-{rtype}-1")
        assert {p["name"] for p in resource["searchParam"]} == params | {"_id"}
    assert "MedicationRequest:medication" in served["MedicationRequest"]["searchInclude"]
    assert "Observation:patient" in served["Patient"]["searchRevInclude"]
