"""Declared structured-record operations: loaded from ``operations/*.yaml`` with file:line
checks, answered as a ``collection`` Bundle with a CareConnect-List-1 per section, each empty
List saying why; the OperationDefinition served where the CapabilityStatement points."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import yaml
from starlette.applications import Starlette

from adapters.registry import create
from gateway.auth.apikeys import sha256_hex
from gateway.mapping.loader import MappingError, load_directory
from gateway.operations.structured import CC_EMPTY, FHIR_EMPTY, LIST_PROFILE, load_operations
from gateway.profiles.validator import validate
from gateway.providers import Provider
from gateway.registry import Registry
from tests.gateway.test_conformance import model_errors, schema_errors
from tests.gateway.test_multisource import encounters
from tests.security.principals import as_, install, user_token

pytestmark = pytest.mark.anyio
REPO = Path(__file__).resolve().parents[3]
DEMO = REPO / "mappings" / "demo-pas"
CLINICAL = ["Allergies and adverse reactions", "Problems", "Medication", "Prescriptions",
            "Immunisations"]
SECTION_TYPES = {"Encounter", "AllergyIntolerance", "Condition", "MedicationStatement",
                 "MedicationRequest", "Immunization"}


@pytest.fixture
async def gw(demo_url: str, make_app: Callable[..., Starlette]
             ) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = make_app(demo_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, demo_url


def lists(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["resource"]["title"]: e["resource"] for e in bundle["entry"]
            if e["resource"]["resourceType"] == "List"}


def items(lst: dict[str, Any]) -> list[str]:
    return [i["item"]["reference"] for i in lst.get("entry", [])]


async def test_a_list_per_section_most_recent_first(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    rows = [r for r in encounters(url) if r["patient"] == "100001"]
    r = await c.get("/STU3/Patient/100001/$structured-record?recentEncounters=1")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["type"] == "collection"
    assert bundle["entry"][0]["resource"]["resourceType"] == "Patient"
    by_title = lists(bundle)
    assert list(by_title) == [*CLINICAL, "Hospital stays", "A&E attendances",
                              "Outpatient appointments"]
    for title, source in (("Hospital stays", 2), ("A&E attendances", 0),
                          ("Outpatient appointments", 1)):
        newest = max((x for x in rows if x["source"] == source), key=lambda x: x["at"])
        assert items(by_title[title]) == [f"Encounter/{newest['id']}"], title
    listed = {ref for lst in by_title.values() for ref in items(lst)}
    served = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in bundle["entry"]
              if e["resource"]["resourceType"] in SECTION_TYPES}
    assert listed == served  # every listed resource is in the Bundle, and only those
    kinds = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert {"Practitioner", "Organization", "Location", "Medication"} <= kinds
    # The whole collection against the STU3 JSON schema and the fhir.resources models, and
    # every List against CareConnect-List-1 with the gateway's own validator.
    assert schema_errors(bundle) == [] and model_errors(bundle) == []
    for lst in by_title.values():
        assert lst["meta"]["profile"] == [LIST_PROFILE]
        assert [i.message for i in validate(lst, LIST_PROFILE)] == []


async def test_parameters_shape_the_extract(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    rows = [r for r in encounters(url) if r["patient"] == "100001"]
    r = await c.get("/STU3/Patient/100001/$structured-record?includeAppointments=false"
                    "&recentEncounters=100")
    by_title = lists(r.json())
    assert list(by_title) == [*CLINICAL, "Hospital stays", "A&E attendances"]
    assert len(items(by_title["A&E attendances"])) == len([x for x in rows if x["source"] == 0])
    r = await c.get("/STU3/Patient/100001/$structured-record?encounterSearchFromDate=2024-01-01")
    ae = items(lists(r.json())["A&E attendances"])
    assert ae and len(ae) < len([x for x in rows if x["source"] == 0])
    for bad in ("recentEncounters=0", "recentEncounters=x", "includeAppointments=yes",
                "encounterSearchFromDate=2024-13"):
        assert (await c.get(f"/STU3/Patient/100001/$structured-record?{bad}")).status_code == 400
    r = await c.get("/STU3/Patient/100001/$structured-record?colour=red",
                    headers={"Prefer": "handling=strict"})
    assert r.status_code == 400
    assert (await c.get("/STU3/Patient/999999999/$structured-record")).status_code == 404


async def test_an_empty_section_says_nothing_is_recorded(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    rows = encounters(url)
    has_ae = {r["patient"] for r in rows if r["source"] == 0}
    pid = next(r["patient"] for r in rows if r["patient"] not in has_ae)
    lst = lists((await c.get(f"/STU3/Patient/{pid}/$structured-record")).json())[
        "A&E attendances"]
    assert "entry" not in lst
    assert lst["emptyReason"]["coding"] == [{"system": CC_EMPTY, "code": "no-content-recorded",
                                             "display": "No Content Recorded"}]
    assert schema_errors(lst) == [] and model_errors(lst) == []


async def test_a_type_the_scopes_do_not_allow_is_withheld(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    app = make_app(demo_sqlite_url, auth_mode="insecure-demo")
    install(app, {"patient-only": user_token("user/Patient.read")})
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        r = await c.get("/STU3/Patient/100001/$structured-record", headers=as_("patient-only"))
    assert r.status_code == 200
    for lst in lists(r.json()).values():
        assert lst["emptyReason"]["coding"][0]["code"] == "withheld"
    assert {e["resource"]["resourceType"] for e in r.json()["entry"]} == {"Patient", "List"}


async def test_referenced_types_the_scopes_do_not_allow_are_said(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    app = make_app(demo_sqlite_url, auth_mode="insecure-demo")
    every = " ".join(f"user/{t}.read" for t in (
        "Patient", "Encounter", "AllergyIntolerance", "Condition", "MedicationStatement",
        "MedicationRequest", "Immunization"))
    install(app, {"no-staff": user_token(every),
                  "staff": user_token(every + " user/Practitioner.read user/Organization.read"
                                      " user/Location.read user/Medication.read")})
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        bare = (await c.get("/STU3/Patient/100001/$structured-record",
                            headers=as_("no-staff"))).json()
        full = (await c.get("/STU3/Patient/100001/$structured-record",
                            headers=as_("staff"))).json()
    kinds = {e["resource"]["resourceType"] for e in full["entry"]}
    left_out = [t for t in ("Practitioner", "Organization", "Location", "Medication")
                if t in kinds]
    assert left_out  # the extract refers to some: the staff token gets them
    assert "OperationOutcome" not in kinds
    said = [i for e in bare["entry"] if e["resource"]["resourceType"] == "OperationOutcome"
            for i in e["resource"]["issue"]
            if i["details"]["coding"][0]["code"] == "NOT_INCLUDED"]
    assert [i["diagnostics"] for i in said] == [
        "resources referred to not included, as the client's scopes do not allow reading "
        f"them: {', '.join(left_out)}"]
    assert not {e["resource"]["resourceType"] for e in bare["entry"]} & set(left_out)


async def test_a_source_that_fails_is_an_unavailable_section(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """As a multi-source search: with the A&E source gone the extract still comes, its A&E
    List empty with ``unavailable`` and a warning naming the section (no patient data); the
    other sections whole. Under ``Prefer: handling=strict`` the source's 502 is the answer."""
    from tests.gateway.operations.test_everything import broken_copy

    rows = encounters(demo_sqlite_url)
    with_ae = {r["patient"] for r in rows if r["id"].startswith("ae-")}
    pid = next(r["patient"] for r in rows if r["patient"] in with_ae
               and r["id"][:3] not in ("ae-", "op-"))  # A&E attendances and hospital stays
    app = make_app(broken_copy(demo_sqlite_url, tmp_path, "AE_ATTENDANCES"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        strict = await c.get(f"/STU3/Patient/{pid}/$structured-record",
                             headers={"Prefer": "handling=strict"})
        r = await c.get(f"/STU3/Patient/{pid}/$structured-record")
    assert strict.status_code == 502
    assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
    assert r.status_code == 200, r.text
    by_title = lists(r.json())
    ae = by_title["A&E attendances"]
    assert "entry" not in ae
    assert ae["emptyReason"]["coding"] == [{"system": FHIR_EMPTY, "code": "unavailable",
                                            "display": "Unavailable"}]
    assert "note" not in ae  # the emptyReason says it
    # Every section asks each Encounter source: the ones that found records say they may
    # lack the A&E source's, in the List itself and in a warning.
    stays = by_title["Hospital stays"]
    assert items(stays) and "emptyReason" not in stays
    assert stays["note"] == [{"text": "Incomplete: section 'Hospital stays': Encounter source "
                                      "'Encounter.ae.sql' did not answer (BACKEND_ERROR)"}]
    for lst in by_title.values():
        assert schema_errors(lst) == [] and model_errors(lst) == []
    issues = [i for e in r.json()["entry"] if e["resource"]["resourceType"] == "OperationOutcome"
              for i in e["resource"]["issue"]]
    assert {(i["severity"], i["details"]["coding"][0]["code"]) for i in issues} == {
        ("warning", "SOURCE_UNAVAILABLE")}
    # only the Encounter sections ask the A&E source; the clinical ones are whole
    encounter_sections = ["Hospital stays", "A&E attendances", "Outpatient appointments"]
    assert [t for t in by_title if t in encounter_sections] == encounter_sections
    assert [i["diagnostics"] for i in issues] == [
        f"section '{t}': Encounter source 'Encounter.ae.sql' did not answer (BACKEND_ERROR)"
        for t in encounter_sections]
    for t in set(by_title) - set(encounter_sections):
        assert "note" not in by_title[t] and by_title[t].get("emptyReason", {}).get(
            "coding", [{}])[0].get("code") != "unavailable", t


async def test_definition_and_capability(gw: tuple[httpx.AsyncClient, str]) -> None:
    c, _ = gw
    cs = (await c.get("/STU3/metadata")).json()
    ref = next(o["definition"]["reference"] for o in cs["rest"][0]["operation"]
               if o["name"] == "structured-record")
    assert ref == "http://gw/STU3/OperationDefinition/structured-record"
    r = await c.get(ref.removeprefix("http://gw"))
    assert r.status_code == 200
    od = r.json()
    assert od["resourceType"] == "OperationDefinition" and od["url"] == ref
    assert (od["code"], od["instance"], od["type"], od["system"]) == (
        "structured-record", True, False, False)
    names = {p["name"]: p["type"] for p in od["parameter"]}
    assert names == {"recentEncounters": "integer", "includeAppointments": "boolean",
                     "encounterSearchFromDate": "date", "includeAllergies": "boolean",
                     "includeProblems": "boolean", "includeMedication": "boolean",
                     "medicationSearchFromDate": "date", "includeImmunisations": "boolean",
                     "return": "Bundle"}
    assert (await c.get("/STU3/OperationDefinition/nope")).status_code == 404


# --- the file: checked at load, file:line --------------------------------------------------------


@pytest.fixture
def demo_copy(tmp_path: Path) -> Path:
    shutil.copytree(DEMO, tmp_path / "demo-pas")
    shutil.copytree(REPO / "mappings" / "codemaps", tmp_path / "codemaps")
    return tmp_path / "demo-pas"


def registry_of(directory: Path, url: str) -> Registry:
    loaded = load_directory(directory, create, urls={"pas": url})
    return Registry(Provider(m) for m in loaded.mappings)


def test_problems_name_file_and_line(demo_copy: Path, demo_sqlite_url: str) -> None:
    f = demo_copy / "operations" / "structured-record.yaml"
    text = f.read_text()
    # Appointment: a STU3 type the demo does not serve (Condition once was; it is now)
    text = text.replace("    resource: Encounter\n    search: {class: EMER}",
                        "    resource: Appointment\n    search: {class: EMER}")
    text = text.replace("    include_if: includeAppointments", "    include_if: recentEncounters")
    text = text.replace("    sort: -date\n    from_date: encounterSearchFromDate\n  - title: A&E",
                        "    sort: -family\n    from_date: encounterSearchFromDate\n  - title: A&E")
    f.write_text(text)
    lines = text.splitlines()

    def line(needle: str) -> int:
        return next(n for n, ln in enumerate(lines, 1) if needle in ln)

    with pytest.raises(MappingError) as info:
        load_operations(demo_copy, registry_of(demo_copy, demo_sqlite_url))
    got = [(p.file.name, p.line, p.message) for p in info.value.problems]
    assert got == [
        ("structured-record.yaml", line("sort: -family"),
         "sections.5.sort: Encounter cannot be sorted by 'family' (sortable: date)"),
        ("structured-record.yaml", line("resource: Appointment"),
         "sections.6.resource: Appointment is not served by this mapping directory"),
        ("structured-record.yaml", line("include_if: recentEncounters"),
         "sections.7.include_if: 'recentEncounters' is not a declared boolean parameter"),
    ]


def test_schema_problems_name_the_key(demo_copy: Path, demo_sqlite_url: str) -> None:
    f = demo_copy / "operations" / "structured-record.yaml"
    f.write_text(f.read_text().replace("    count: recentEncounters\n    sort: -date\n"
                                       "    from_date: encounterSearchFromDate\n  - title: A&E",
                                       "    count: recentEncounters\n    colour: red\n"
                                       "    sort: -date\n    from_date: encounterSearchFromDate"
                                       "\n  - title: A&E"))
    with pytest.raises(MappingError) as info:
        load_operations(demo_copy, registry_of(demo_copy, demo_sqlite_url))
    [p] = info.value.problems
    assert p.message == "sections.5.colour: unknown key"
    assert "colour: red" in f.read_text().splitlines()[p.line - 1]


def oracle(url: str, sql: str, **params: Any) -> list[str]:
    """Keys the database itself gives for ``sql`` (the first column, as text, in order)."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [str(row[0]) for row in conn.execute(sa.text(sql), params)]
    finally:
        engine.dispose()


def ids(lst: dict[str, Any]) -> list[str]:
    return [ref.split("/")[1] for ref in items(lst)]


async def test_clinical_sections_are_the_patients_record(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    c, url = gw
    r = await c.get("/STU3/Patient/100001/$structured-record?includeAppointments=false")
    assert r.status_code == 200, r.text
    by_title = lists(r.json())
    allergies = oracle(url, 'SELECT "ALLGY_REFNO" FROM "ALLERGIES" WHERE "PATNT_REFNO" = 100001 '
                            'AND "DELETED_FLAG" = \'N\' AND "ALLGY_STATUS" = \'A\'')
    assert sorted(ids(by_title["Allergies and adverse reactions"])) == sorted(allergies)
    problems = oracle(url, 'SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "PATNT_REFNO" = 100001 '
                           'AND "DELETED_FLAG" = \'N\' AND "PROBL_STATUS" = \'A\' '
                           'ORDER BY "RECORDED_DTTM" DESC, "PROBL_REFNO"')  # ties: key order
    assert ids(by_title["Problems"]) == problems  # most recently recorded first
    statements = oracle(url, 'SELECT "MEDLS_REFNO" FROM "MEDICATION_LIST" WHERE '
                             '"PATNT_REFNO" = 100001 AND "DEL_FLAG" = \'N\'')
    assert sorted(ids(by_title["Medication"])) == sorted(statements)
    orders = oracle(url, 'SELECT "PRESC_REFNO" FROM "PRESCRIPTIONS" WHERE "PATNT_REFNO" = 100001'
                         ' AND "DEL_FLAG" = \'N\' ORDER BY "ORDER_DTTM" DESC, "PRESC_REFNO"')
    assert ids(by_title["Prescriptions"]) == orders
    jabs = oracle(url, 'SELECT "IMMUN_REFNO" FROM "IMMUNISATIONS" WHERE "PATNT_REFNO" = 100001 '
                       'AND "DEL_FLAG" = \'N\'')
    assert sorted(ids(by_title["Immunisations"])) == sorted(jabs)
    assert all(len(x) > 5 for x in (allergies, problems, statements, orders, jabs))

    # medicationSearchFromDate narrows prescriptions by when they were written, statements by
    # when the medicine was taken (a period: on or after the date, or not ended)
    since = "2023-01-01"
    r = await c.get("/STU3/Patient/100001/$structured-record?includeAppointments=false"
                    f"&medicationSearchFromDate={since}&includeAllergies=false")
    by_title = lists(r.json())
    assert "Allergies and adverse reactions" not in by_title
    recent = oracle(url, 'SELECT "PRESC_REFNO" FROM "PRESCRIPTIONS" WHERE "PATNT_REFNO" = 100001'
                         ' AND "DEL_FLAG" = \'N\' AND "ORDER_DTTM" >= \'202301010000\' '
                         'ORDER BY "ORDER_DTTM" DESC, "PRESC_REFNO"')
    assert ids(by_title["Prescriptions"]) == recent and 0 < len(recent) < len(orders)
    taking = oracle(url, 'SELECT "MEDLS_REFNO" FROM "MEDICATION_LIST" WHERE "PATNT_REFNO" = '
                         '100001 AND "DEL_FLAG" = \'N\' AND ("END_DATE" IS NULL OR '
                         '"END_DATE" >= \'20230101\')')
    assert sorted(ids(by_title["Medication"])) == sorted(taking)
    assert 0 < len(taking) < len(statements)


async def test_no_known_allergies_is_told_apart_from_not_asked(
        gw: tuple[httpx.AsyncClient, str]) -> None:
    # 100002: "no known allergies" recorded explicitly (and nothing else);
    # 100004: no allergy record at all — never asked.
    c, url = gw
    assert oracle(url, 'SELECT "SUBST_CODE" FROM "ALLERGIES" WHERE "PATNT_REFNO" = 100002 '
                       'AND "DELETED_FLAG" = \'N\'') == ["NKA"]
    assert oracle(url, 'SELECT "SUBST_CODE" FROM "ALLERGIES" WHERE "PATNT_REFNO" = 100004') == []
    known = (await c.get("/STU3/Patient/100002/$structured-record")).json()
    lst = lists(known)["Allergies and adverse reactions"]
    assert "entry" not in lst
    assert lst["emptyReason"]["coding"] == [{"system": FHIR_EMPTY, "code": "nilknown",
                                             "display": "Nil Known"}]
    # the "no known allergies" record itself travels with the List
    [nka] = [e["resource"] for e in known["entry"]
             if e["resource"]["resourceType"] == "AllergyIntolerance"]
    assert {"system": "http://snomed.info/sct", "code": "716186003"}.items() <= \
        nka["code"]["coding"][0].items()
    never = (await c.get("/STU3/Patient/100004/$structured-record")).json()
    lst = lists(never)["Allergies and adverse reactions"]
    assert "entry" not in lst
    assert lst["emptyReason"]["coding"] == [{"system": FHIR_EMPTY, "code": "notasked",
                                             "display": "Not Asked"}]
    assert not [e for e in never["entry"] if e["resource"]["resourceType"] ==
                "AllergyIntolerance"]
    for body in (known, never):
        for x in lists(body).values():
            assert [i.message for i in validate(x, LIST_PROFILE)] == []
        assert schema_errors(body) == [] and model_errors(body) == []


RESOLVED_ONLY = """\
name: past-allergies
title: Past allergies
parameters: {}
sections:
  - title: Resolved allergies
    resource: AllergyIntolerance
    search: {clinical-status: resolved}
    sort: -date
    nothing_known: {element: code, system: "http://snomed.info/sct", code: "716186003"}
"""


async def test_records_the_filters_leave_out_are_not_not_asked(
        demo_copy: Path, demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    # 100002 was asked (an active "no known allergies" record): a section that asks only for
    # resolved allergies finds nothing, and says nothing is recorded — not "not asked".
    (demo_copy / "operations" / "past.yaml").write_text(RESOLVED_ONLY)
    # Not the bundled demo directory: a real client credential (an API key) is needed.
    key = "k3y-structured-record-test-0123456789abcdef0123456789"
    keys = demo_copy.parent / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"client_id": "t", "sha256": sha256_hex(key),
                                              "scopes": "system/*.read"}]}))
    app = make_app(demo_sqlite_url, mappings_dir=demo_copy, auth_mode="api-key",
                   api_keys_file=str(keys), audit_log=str(demo_copy.parent / "audit.jsonl"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw",
            headers={"X-API-Key": key}) as c:
        asked = (await c.get("/STU3/Patient/100002/$past-allergies")).json()
        never = (await c.get("/STU3/Patient/100004/$past-allergies")).json()
    [lst] = lists(asked).values()
    assert lst["emptyReason"]["coding"][0]["code"] == "no-content-recorded"
    [lst] = lists(never).values()
    assert lst["emptyReason"]["coding"][0]["code"] == "notasked"
