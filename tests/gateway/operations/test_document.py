"""``$document``: discharge summaries and patient summaries as FHIR document Bundles.

The oracle for a discharge summary's sections is the database, read with plain SQL. Every
document is checked by the STU3 JSON Schema, the fhir.resources STU3 models, the gateway's
own profile validator and the STU3 narrative rules; the HTML rendering is opened in a real
headless Chromium (tests/browser.py: fails under CI without one).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fhir.resources.STU3 import get_fhir_model_class
from jsonschema import Draft6Validator
from starlette.applications import Starlette

from gateway.operations.narrative import narrative_problems
from gateway.profiles.validator import validate
from tests.browser import Browser, require_chromium
from tests.conftest import LiveServer
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio
SCHEMA_FILE = Path(__file__).resolve().parents[3].parent / "shared" / "fhir-stu3" / \
    "fhir.schema.json"


@pytest.fixture
async def gw(demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path
             ) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    app = make_app(demo_sqlite_url, audit_log=str(tmp_path / "audit.jsonl"))
    install(app, {
        "own": patient_token("100001"),
        "other": patient_token("100002"),
        "no-allergies": user_token("user/Encounter.read user/Patient.read user/Condition.read "
                                   "user/Procedure.read user/MedicationRequest.read"),
        "no-staff": user_token("user/Encounter.read user/Patient.read user/Condition.read "
                               "user/Procedure.read user/MedicationRequest.read "
                               "user/AllergyIntolerance.read"),
    })
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, app


def _spell(url: str) -> tuple[str, str]:
    """A spell with diagnoses, procedures and discharge medication (and its patient)."""
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        row = conn.execute(sa.text(
            'SELECT s."PRVSP_REFNO", s."PATNT_REFNO" FROM "PROVIDER_SPELLS" s '
            'WHERE EXISTS (SELECT 1 FROM "PROBLEMS" c WHERE c."PRVSP_REFNO" = s."PRVSP_REFNO" '
            'AND c."DELETED_FLAG" = \'N\') AND EXISTS (SELECT 1 FROM "PROCEDURES" x WHERE '
            'x."PRVSP_REFNO" = s."PRVSP_REFNO" AND x."DELETED_FLAG" = \'N\' AND '
            'x."PROCD_STATUS" IS NOT NULL) '
            'ORDER BY s."PRVSP_REFNO" LIMIT 1')).one()
    engine.dispose()
    return str(row[0]), str(row[1])


def _oracle(url: str, spell: str) -> set[str]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            'SELECT "PROBL_REFNO" FROM "PROBLEMS" WHERE "PRVSP_REFNO" = :s AND '
            '"DELETED_FLAG" = \'N\''), {"s": int(spell)}).all()
    engine.dispose()
    return {f"Condition/{r[0]}" for r in rows}


def check_document(doc: dict[str, Any]) -> None:
    """Everything a reader of a document may rely on; fails with what is wrong."""
    assert doc["resourceType"] == "Bundle" and doc["type"] == "document"
    assert doc["identifier"]["system"] and doc["identifier"]["value"]
    comp = doc["entry"][0]["resource"]
    assert comp["resourceType"] == "Composition"
    assert comp["meta"]["profile"] == [
        "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Composition-1"]
    # every reference in the Composition resolves inside the Bundle
    urls = {e["fullUrl"] for e in doc["entry"]}
    local = {f"{e['resource']['resourceType']}/{e['resource']['id']}" for e in doc["entry"]}
    refs = [comp["subject"]["reference"], *(a["reference"] for a in comp["author"])]
    refs += [e["reference"] for s in comp["section"] for e in s.get("entry", [])]
    if "encounter" in comp:
        refs.append(comp["encounter"]["reference"])
    for ref in refs:
        assert ref in urls or ref in local, ref
    # narratives: the STU3 rules
    assert narrative_problems(comp["text"]["div"]) == []
    for sec in comp["section"]:
        assert narrative_problems(sec["text"]["div"]) == [], sec["title"]
    # the STU3 JSON Schema, the STU3 models, the gateway's profile validator
    schema = json.loads(SCHEMA_FILE.read_text())
    errors = sorted(Draft6Validator(schema).iter_errors(doc), key=str)
    assert not errors, [e.message[:200] for e in errors[:5]]
    get_fhir_model_class("Bundle").model_validate(doc)
    for e in doc["entry"]:
        problems = [i for i in validate(e["resource"]) if i.severity == "error"]
        assert not problems, (e["resource"]["resourceType"], problems[:3])


async def test_discharge_summary(gw: tuple[httpx.AsyncClient, Starlette], demo_sqlite_url: str,
                                 tmp_path: Path) -> None:
    c, _ = gw
    spell, patient = _spell(demo_sqlite_url)
    r = await c.get(f"/STU3/Encounter/{spell}/$document")
    assert r.status_code == 200, r.text
    doc = r.json()
    check_document(doc)
    comp = doc["entry"][0]["resource"]
    assert comp["subject"] == {"reference": f"Patient/{patient}"}
    assert comp["encounter"] == {"reference": f"Encounter/{spell}"}
    assert comp["type"]["coding"][0]["code"] == "18842-5"
    titles = [s["title"] for s in comp["section"]]
    assert titles == ["Diagnoses", "Procedures", "Medications on discharge",
                      "Allergies and adverse reactions"]
    diagnoses = {e["reference"] for e in comp["section"][0].get("entry", [])}
    assert diagnoses == _oracle(demo_sqlite_url, spell)
    for sec in comp["section"]:  # an empty section says why; a full one lists its entries
        assert ("entry" in sec) != ("emptyReason" in sec)
    # each diagnosis is shown in the narrative by its display
    conds = {f"Condition/{e['resource']['id']}": e["resource"] for e in doc["entry"]
             if e["resource"]["resourceType"] == "Condition"}
    for ref in diagnoses:
        shown = conds[ref]["code"].get("text") or conds[ref]["code"]["coding"][0]["display"]
        assert shown.replace("&", "&amp;").replace("<", "&lt;") in comp["section"][0]["text"][
            "div"]
    # the procedure section holds only completed ones
    procs = [e["resource"] for e in doc["entry"] if e["resource"]["resourceType"] == "Procedure"]
    assert all(p["status"] == "completed" for p in procs)
    # audited as one access to the patient, naming the types
    rec = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()
           if "$document" in line][-1]
    assert rec["operation"]["name"] == "document" and rec["patient"] == patient
    assert {"Patient", "Encounter", "Condition"} <= set(rec["operation"]["types"])


async def test_no_known_allergies_is_told_apart_from_not_asked(
        gw: tuple[httpx.AsyncClient, Starlette], demo_sqlite_url: str) -> None:
    """As the structured record's Lists: 100002's only allergy record is "no known
    allergies" — the section says ``nilknown``, lists no entry (cmp-2) and the record
    travels in the Bundle; 100004 has no allergy record at all — ``notasked``, not "no
    content recorded". Both documents pass the gateway's validator (cmp-1, cmp-2 included)."""
    c, _ = gw
    engine = sa.create_engine(demo_sqlite_url)
    with engine.connect() as conn:
        def codes(pid: int) -> list[str]:
            return [r[0] for r in conn.execute(sa.text(
                'SELECT "SUBST_CODE" FROM "ALLERGIES" WHERE "PATNT_REFNO" = :p '
                'AND "DELETED_FLAG" = \'N\''), {"p": pid})]
        assert codes(100002) == ["NKA"] and codes(100004) == []
    engine.dispose()
    fhir_empty = "http://hl7.org/fhir/list-empty-reason"
    known = (await c.get("/STU3/Patient/100002/$document")).json()
    never = (await c.get("/STU3/Patient/100004/$document")).json()
    for doc, code, display in ((known, "nilknown", "Nil Known"),
                               (never, "notasked", "Not Asked")):
        check_document(doc)
        comp = doc["entry"][0]["resource"]
        [sec] = [s for s in comp["section"] if s["title"] == "Allergies and adverse reactions"]
        assert "entry" not in sec
        assert sec["emptyReason"]["coding"] == [{"system": fhir_empty, "code": code,
                                                 "display": display}]
        assert [i for i in validate(comp) if i.severity == "error"] == []
    allergies = [e["resource"] for e in known["entry"]
                 if e["resource"]["resourceType"] == "AllergyIntolerance"]
    [nka] = allergies  # the "no known allergies" record itself travels with the document
    assert {"system": "http://snomed.info/sct", "code": "716186003"}.items() <= \
        nka["code"]["coding"][0].items()
    assert not [e for e in never["entry"]
                if e["resource"]["resourceType"] == "AllergyIntolerance"]
    # the same reasons as the structured record gives the same patients
    for pid, doc in (("100002", known), ("100004", never)):
        rec = (await c.get(f"/STU3/Patient/{pid}/$structured-record")).json()
        [lst] = [e["resource"] for e in rec["entry"] if e["resource"]["resourceType"] == "List"
                 and e["resource"]["title"] == "Allergies and adverse reactions"]
        [sec] = [s for s in doc["entry"][0]["resource"]["section"]
                 if s["title"] == "Allergies and adverse reactions"]
        assert lst["emptyReason"]["coding"] == sec["emptyReason"]["coding"]


async def test_document_is_deterministic(gw: tuple[httpx.AsyncClient, Starlette],
                                         demo_sqlite_url: str) -> None:
    c, _ = gw
    spell, _ = _spell(demo_sqlite_url)
    first = await c.get(f"/STU3/Encounter/{spell}/$document")
    second = await c.get(f"/STU3/Encounter/{spell}/$document?persist=false")
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    doc = first.json()
    comp = doc["entry"][0]["resource"]
    # the date comes from the data: the latest lastUpdated of what it holds
    stamps = [e["resource"].get("meta", {}).get("lastUpdated") for e in doc["entry"][2:]]
    assert comp["date"] == doc["meta"]["lastUpdated"]
    assert comp["date"][:19] >= max(s for s in stamps if s)[:10]
    # another encounter is another document
    other = await c.get("/STU3/Encounter/1/$document")
    assert other.json()["id"] != doc["id"] or spell == "1"


async def test_patient_summary(gw: tuple[httpx.AsyncClient, Starlette]) -> None:
    c, _ = gw
    r = await c.get("/STU3/Patient/100001/$document")
    assert r.status_code == 200, r.text
    doc = r.json()
    check_document(doc)
    comp = doc["entry"][0]["resource"]
    assert comp["type"]["coding"][0]["code"] == "60591-5"
    assert [s["title"] for s in comp["section"]] == [
        "Problems", "Current medication", "Allergies and adverse reactions", "Immunisations"]
    named = await c.get("/STU3/Patient/100001/$document?type=patient-summary")
    assert named.content == r.content


async def test_bad_requests(gw: tuple[httpx.AsyncClient, Starlette]) -> None:
    c, _ = gw
    r = await c.get("/STU3/Encounter/1/$document?persist=true")
    assert r.status_code == 422
    assert "persist" in r.text and r.json()["resourceType"] == "OperationOutcome"
    r = await c.post("/STU3/Encounter/1/$document", data={"persist": "true"})
    assert r.status_code == 422
    r = await c.get("/STU3/Encounter/1/$document?type=nonsense")
    assert r.status_code == 400
    r = await c.get("/STU3/Encounter/999999999/$document")
    assert r.status_code == 404
    r = await c.get("/STU3/Patient/999999999/$document")
    assert r.status_code == 404
    r = await c.get("/STU3/Condition/1/$document")
    assert r.status_code == 501


async def test_authorisation(gw: tuple[httpx.AsyncClient, Starlette],
                             demo_sqlite_url: str) -> None:
    c, _ = gw
    assert (await c.get("/STU3/Patient/100001/$document", headers=as_("own"))).status_code == 200
    assert (await c.get("/STU3/Patient/100001/$document",
                        headers=as_("other"))).status_code == 404
    # an encounter of another patient is not found for a patient-context token
    spell, patient = _spell(demo_sqlite_url)
    if patient != "100002":
        r = await c.get(f"/STU3/Encounter/{spell}/$document", headers=as_("other"))
        assert r.status_code == 404
    # every type the document holds needs read: no AllergyIntolerance scope, no document
    r = await c.get(f"/STU3/Encounter/{spell}/$document", headers=as_("no-allergies"))
    assert r.status_code == 403 and "AllergyIntolerance" in r.text
    # ... and every type it refers to (the spell's consultant, ward, trust): no document with
    # references silently left dangling
    r = await c.get(f"/STU3/Encounter/{spell}/$document", headers=as_("no-staff"))
    assert r.status_code == 403, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert any(t in r.text for t in ("Practitioner", "Organization", "Location"))


async def test_capability_lists_document(gw: tuple[httpx.AsyncClient, Starlette]) -> None:
    c, _ = gw
    cs = (await c.get("/STU3/metadata")).json()
    assert "document" in [o["name"] for o in cs["rest"][0]["operation"]]
    od = (await c.get("/STU3/OperationDefinition/document")).json()
    assert od["resource"] == ["Encounter", "Patient"] and od["instance"] is True


async def test_html_negotiation(gw: tuple[httpx.AsyncClient, Starlette],
                                demo_sqlite_url: str) -> None:
    c, _ = gw
    spell, _ = _spell(demo_sqlite_url)
    r = await c.get(f"/STU3/Encounter/{spell}/$document?_format=html")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.text.startswith("<!DOCTYPE html>") and "<script" not in r.text
    browser_accept = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
    r2 = await c.get(f"/STU3/Encounter/{spell}/$document", headers={"Accept": browser_accept})
    assert r2.headers["content-type"].startswith("text/html") and r2.content == r.content
    r3 = await c.get(f"/STU3/Encounter/{spell}/$document",
                     headers={"Accept": "application/fhir+json"})
    assert r3.headers["content-type"].startswith("application/fhir+json")
    r4 = await c.get(f"/STU3/Encounter/{spell}/$document?_format=xml")
    assert r4.status_code == 200 and r4.headers["content-type"].startswith(
        "application/fhir+xml")
    assert b"<Composition" in r4.content and b'<div xmlns="http://www.w3.org/1999/xhtml">' \
        in r4.content
    # _format=html elsewhere is still not acceptable
    assert (await c.get("/STU3/Patient/100001?_format=html")).status_code == 406


def test_html_in_a_real_browser(demo_sqlite_url: str, make_app: Callable[..., Starlette],
                                tmp_path: Path) -> None:
    binary = require_chromium()
    spell, _ = _spell(demo_sqlite_url)
    with LiveServer(make_app(demo_sqlite_url)) as server:
        doc = httpx.get(f"{server.url}/STU3/Encounter/{spell}/$document").json()
        comp = doc["entry"][0]["resource"]
        profile = tmp_path / "chromium"
        profile.mkdir()
        with Browser(binary, profile) as b:
            b.open(f"{server.url}/STU3/Encounter/{spell}/$document?_format=html")
            assert b.js("document.title") == "Inpatient discharge summary"
            headings = b.js("[...document.querySelectorAll('h2')].map(h => h.textContent)")
            assert headings == [s["title"] for s in comp["section"]]
            # the diagnoses table shows a row per diagnosis, as the Composition lists them
            rows = b.js("document.querySelectorAll('section')[0]"
                        ".querySelectorAll('tbody tr').length")
            assert rows == len(comp["section"][0].get("entry", []))
            text = b.js("document.body.innerText")
            assert "Jane" in text or comp["subject"]["reference"] not in text
            assert b.js("document.querySelectorAll('script').length") == 0
            # laid out: the page has a visible table, not raw markup
            width = b.js("document.querySelector('table').getBoundingClientRect().width")
            assert width > 100
            shot = b.screenshot(tmp_path / "document.png")
            assert shot[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_is_pure_and_dated_from_the_data() -> None:
    """The same inputs give the same Bundle; other content gives another id; with no time in
    the data the date is a date (and no meta.lastUpdated, which must be an instant)."""
    from gateway.operations.document import DocSection, DocumentFile, build

    spec = DocumentFile.model_validate({
        "name": "t", "title": "T", "subject": "Patient",
        "type": {"system": "http://loinc.org", "code": "60591-5"},
        "sections": [{"title": "Problems", "resource": "Condition",
                      "columns": [{"header": "Problem", "element": "code"}]}]})
    sec: DocSection = spec.sections[0]
    patient = {"resourceType": "Patient", "id": "1", "birthDate": "1970-01-02",
               "name": [{"family": "<b>Smith</b> & Co"}]}
    cond = {"resourceType": "Condition", "id": "7", "subject": {"reference": "Patient/1"},
            "code": {"text": "Asthma <script>alert(1)</script>"}}
    one = build(spec, "http://x/STU3", patient, None, [(sec, [cond], None)], [cond], [], [])
    two = build(spec, "http://x/STU3", patient, None, [(sec, [cond], None)], [cond], [], [])
    assert one == two
    assert "meta" not in one and one["entry"][0]["resource"]["date"] == "1970-01-02"
    div = one["entry"][0]["resource"]["section"][0]["text"]["div"]
    assert "&lt;script&gt;" in div and "<script" not in div  # escaped, not markup
    assert narrative_problems(div) == []
    changed = {**cond, "code": {"text": "Asthma, resolved"}}
    three = build(spec, "http://x/STU3", patient, None, [(sec, [changed], None)], [changed],
                  [], [])
    assert three["id"] != one["id"]
    assert narrative_problems('<div xmlns="http://www.w3.org/1999/xhtml"><script/>x</div>')
    assert narrative_problems('<div xmlns="http://www.w3.org/1999/xhtml"><p onclick="x">y'
                              '</p></div>')
    assert narrative_problems("<div><p>no namespace</p></div>")


async def test_a_source_that_fails_is_said_in_its_section(
        demo_sqlite_url: str, make_app: Callable[..., Starlette], tmp_path: Path) -> None:
    """As a multi-source search and ``$everything``: with the immunisations table gone the
    patient summary still comes — a valid document whose Immunisations section says
    ``unavailable`` (not "nothing recorded"), whose Composition is ``preliminary`` and names
    what is missing; the other sections are as with every source up. Under ``Prefer:
    handling=strict`` the source's 502 is the answer."""
    from tests.gateway.operations.test_everything import broken_copy

    healthy = make_app(demo_sqlite_url)
    async with healthy.router.lifespan_context(healthy), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=healthy), base_url="http://gw") as c:
        whole = (await c.get("/STU3/Patient/100001/$document")).json()
    app = make_app(broken_copy(demo_sqlite_url, tmp_path, "IMMUNISATIONS"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        strict = await c.get("/STU3/Patient/100001/$document",
                             headers={"Prefer": "handling=strict"})
        r = await c.get("/STU3/Patient/100001/$document")
    assert strict.status_code == 502
    assert strict.json()["issue"][0]["details"]["coding"][0]["code"] == "BACKEND_ERROR"
    assert r.status_code == 200, r.text
    doc = r.json()
    check_document(doc)
    comp = doc["entry"][0]["resource"]
    assert whole["entry"][0]["resource"]["status"] == "final"
    assert comp["status"] == "preliminary"
    assert "Incomplete" in comp["text"]["div"] and "Immunization did not answer" in (
        comp["text"]["div"])
    by_title = {s["title"]: s for s in comp["section"]}
    imm = by_title["Immunisations"]
    assert "entry" not in imm
    assert imm["emptyReason"]["coding"][0]["code"] == "unavailable"
    assert "Unavailable" in imm["text"]["div"]
    before = {s["title"]: s for s in whole["entry"][0]["resource"]["section"]}
    assert before["Immunisations"].get("entry")  # the gap is real: the patient has some
    for title in ("Problems", "Current medication", "Allergies and adverse reactions"):
        assert by_title[title] == before[title]


def test_a_section_missing_a_source_says_so_in_its_narrative() -> None:
    """A section that has entries but lacks a source's (a type with several sources) says so
    in its own narrative, and the Composition is preliminary; without a failure, neither."""
    from gateway.operations.document import DocumentFile, build

    spec = DocumentFile.model_validate({
        "name": "t", "title": "T", "subject": "Patient",
        "type": {"system": "http://loinc.org", "code": "60591-5"},
        "sections": [{"title": "Problems", "resource": "Condition",
                      "columns": [{"header": "Problem", "element": "code"}]},
                     {"title": "Other", "resource": "Condition",
                      "columns": [{"header": "Problem", "element": "code"}]}]})
    first, second = spec.sections
    patient = {"resourceType": "Patient", "id": "1", "birthDate": "1970-01-02"}
    cond = {"resourceType": "Condition", "id": "7", "subject": {"reference": "Patient/1"},
            "code": {"text": "Asthma"}}
    found = [(first, [cond], None), (second, [cond], None)]
    missing = "section 'Problems': a Condition source did not answer (BACKEND_ERROR)"
    doc = build(spec, "http://x/STU3", patient, None, found, [cond], [], [missing])
    comp = doc["entry"][0]["resource"]
    assert comp["status"] == "preliminary"
    problems, other = comp["section"]
    assert f"Incomplete: {missing}" in problems["text"]["div"]
    assert "Incomplete" not in other["text"]["div"]
    assert narrative_problems(problems["text"]["div"]) == []
    ok = build(spec, "http://x/STU3", patient, None, found, [cond], [], [])["entry"][0]
    assert ok["resource"]["status"] == "final"
    assert "Incomplete" not in ok["resource"]["text"]["div"]
