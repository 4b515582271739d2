"""Everything the demo serves is valid FHIR STU3 and claims its Care Connect profile honestly.

For each resource type, over many records and on both databases: the official FHIR STU3 JSON
Schema and the fhir.resources STU3 models accept every resource; meta.profile names the
CareConnect-*-1 profile; NHS numbers pass Modulus 11 and carry their verification status;
every reference can be read back. Searchset Bundles and OperationOutcomes validate too, and
the XML rendering parses and round-trips to the same content as the JSON.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fhir.resources.STU3 import get_fhir_model_class
from jsonschema import Draft6Validator
from lxml import etree

from gateway.app import build_app
from tests.conftest import LIMITS_OFF, gateway_settings
from tests.reference import SHARED, unavailable

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
SCHEMA_FILE = SHARED / "fhir-stu3" / "fhir.schema.json"
FHIR_NS = "http://hl7.org/fhir"
PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-{}-1"
BASE_PROFILES = {"DocumentReference": "http://hl7.org/fhir/StructureDefinition/DocumentReference"}
NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"
VERIFICATION_URL = ("https://fhir.hl7.org.uk/STU3/StructureDefinition/"
                    "Extension-CareConnect-NHSNumberVerificationStatus-1")
VERIFICATION_SYSTEM = ("https://fhir.hl7.org.uk/STU3/CodeSystem/"
                       "CareConnect-NHSNumberVerificationStatus-1")
FIXTURE_PATIENTS = [str(n) for n in range(100001, 100007)]

# (resource type, first page, how many records to check; None: all of them)
SAMPLES: list[tuple[str, str, int | None]] = [
    # A Patient search needs two parameters of different types: these match everyone.
    ("Patient", "/STU3/Patient?gender=male,female,other,unknown&birthdate=ge1800&_count=100", 300),
    ("Practitioner", "/STU3/Practitioner?_count=100", 300),
    # sorted by date, so the page mixes Encounter's three sources (unsorted, the merge gives
    # the first source's - A&E's - records first, and the sample would hold no other)
    ("Encounter", "/STU3/Encounter?_sort=date&_count=100", 300),
    ("Organization", "/STU3/Organization?_count=100", None),
    ("Location", "/STU3/Location?_count=100", None),
    ("Condition", "/STU3/Condition?_count=100", 300),
    ("AllergyIntolerance", "/STU3/AllergyIntolerance?_count=100", 300),
    ("Flag", "/STU3/Flag?_count=100", 300),
    ("Procedure", "/STU3/Procedure?_count=100", 300),
    ("PractitionerRole", "/STU3/PractitionerRole?_count=100", None),
    ("DocumentReference", "/STU3/DocumentReference?_count=100", None),
    # The EPR half: medicines and results (the first records, and the rich patient's all).
    ("Medication", "/STU3/Medication?_count=100", None),
    ("MedicationRequest", "/STU3/MedicationRequest?_count=100", 300),
    ("MedicationStatement", "/STU3/MedicationStatement?_count=100", 300),
    ("Immunization", "/STU3/Immunization?_count=100", 300),
    ("Observation", "/STU3/Observation?_count=100", 400),
]
TYPES = [rtype for rtype, _, _ in SAMPLES]


# --- the official schema ----------------------------------------------------------------------


@functools.cache
def _schema() -> dict[str, Any] | None:
    if not SCHEMA_FILE.is_file():
        return None
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded = _schema()
    if loaded is None:
        unavailable(f"the FHIR STU3 JSON schema is missing: {SCHEMA_FILE}")
    return loaded


@functools.cache
def _validator(definition: str) -> Draft6Validator:
    """A validator for one definition, sharing the schema's definitions for $ref."""
    schema = _schema()
    assert schema is not None
    root = {k: v for k, v in schema.items() if k not in ("oneOf", "discriminator")}
    return Draft6Validator({**root, "$ref": f"#/definitions/{definition}"})


def schema_errors(resource: dict[str, Any], definition: str | None = None) -> list[str]:
    validator = _validator(definition or resource.get("resourceType", "?"))
    return [f"{resource.get('resourceType')}/{resource.get('id')} "
            f"{'/'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(resource)]


def model_errors(resource: dict[str, Any]) -> list[str]:
    try:
        get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception as exc:  # pydantic's ValidationError, or any model failure
        return [f"{resource['resourceType']}/{resource.get('id')}: {exc}"]
    return []


# --- what the demo serves, fetched once per database ------------------------------------------


@dataclass
class Served:
    client: httpx.AsyncClient
    resources: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)
    pages: list[dict[str, Any]] = field(default_factory=list)
    fixtures: list[dict[str, Any]] = field(default_factory=list)

    def everything(self) -> Iterator[dict[str, Any]]:
        for resources in self.resources.values():
            yield from resources
        yield from self.fixtures


async def _get_json(client: httpx.AsyncClient, url: str,
                    headers: dict[str, str] | None = None) -> dict[str, Any]:
    response = await client.get(url, headers=headers)
    assert response.status_code == 200, (url, response.text[:500])
    assert response.headers["content-type"].startswith("application/fhir+json")
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
async def served(demo_url: str, tmp_path_factory: pytest.TempPathFactory
                 ) -> AsyncIterator[Served]:
    # One client reads back every reference the sample holds (over a thousand): a burst the
    # per-client and per-address rate limits (tested in test_limits) would rightly refuse.
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("conformance"),
                                     **LIMITS_OFF))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
            out = Served(client)
            for rtype, url, limit in SAMPLES:
                found: list[dict[str, Any]] = []
                next_url: str | None = url
                while next_url and (limit is None or len(found) < limit):
                    page = await _get_json(client, next_url)
                    out.pages.append(page)
                    found += [e["resource"] for e in page.get("entry", ())]
                    next_url = next((link["url"] for link in page["link"]
                                     if link["relation"] == "next"), None)
                out.resources[rtype] = found[:limit]
                count = await _get_json(client, f"/STU3/{rtype}?_summary=count"
                                        if rtype != "Patient" else url + "&_summary=count")
                out.totals[rtype] = count["total"]
            out.fixtures = [await _get_json(client, f"/STU3/Patient/{i}")
                            for i in FIXTURE_PATIENTS]
            yield out


async def test_the_samples_are_what_they_claim(served: Served) -> None:
    for rtype, _, limit in SAMPLES:
        resources = served.resources[rtype]
        expected = min(served.totals[rtype], limit) if limit else served.totals[rtype]
        assert len(resources) == expected, rtype
        assert len({r["id"] for r in resources}) == len(resources), f"{rtype}: repeated ids"
        assert all(r["resourceType"] == rtype for r in resources)
    assert served.totals["Patient"] >= 300
    assert served.totals["Encounter"] >= 300
    sources = {r["id"].partition("-")[0] if "-" in r["id"] else "" for r in
               served.resources["Encounter"]}
    assert sources == {"", "op", "ae"}  # inpatient spells, outpatient and A&E attendances
    assert [p["id"] for p in served.fixtures] == FIXTURE_PATIENTS


# --- (a) the official JSON schema -------------------------------------------------------------


@pytest.mark.parametrize("rtype", TYPES)
async def test_resources_validate_against_the_fhir_schema(served: Served, schema: dict[str, Any],
                                                    rtype: str) -> None:
    errors = [e for r in served.resources[rtype] for e in schema_errors(r)]
    assert errors == []


def test_the_schema_validator_does_reject_bad_resources(schema: dict[str, Any]) -> None:
    # Guard against validators that accept anything (a wrong $ref would do that).
    bad = {"resourceType": "Patient", "id": "1", "gender": "F", "nickname": "Jen"}
    assert sorted(schema_errors(bad)) == [
        "Patient/1 : Additional properties are not allowed ('nickname' was unexpected)",
        "Patient/1 gender: 'F' is not one of ['male', 'female', 'other', 'unknown']"]
    assert schema_errors({"resourceType": "OperationOutcome", "id": "1"}) == [
        "OperationOutcome/1 : 'issue' is a required property"]
    assert schema_errors({"resourceType": "Encounter", "id": "1", "status": "done"}) == [
        "Encounter/1 status: 'done' is not one of ['planned', 'arrived', 'triaged', "
        "'in-progress', 'onleave', 'finished', 'cancelled', 'entered-in-error', 'unknown']"]
    # The schema's patterns are not anchored, so it misses a malformed date; the models do not.
    malformed = {"resourceType": "Patient", "id": "1", "birthDate": "12/04/1965"}
    assert schema_errors(malformed) == []
    assert model_errors(malformed) != []
    assert model_errors(bad) != []
    # Required primitives (Encounter.status) are the models' job too: the schema allows _status.
    assert schema_errors({"resourceType": "Encounter", "id": "1"}) == []
    assert model_errors({"resourceType": "Encounter", "id": "1"}) != []


async def test_fixture_patients_validate(served: Served, schema: dict[str, Any]) -> None:
    assert [e for r in served.fixtures for e in schema_errors(r) + model_errors(r)] == []
    in_search = {r["id"]: r for r in served.resources["Patient"]}
    for patient in served.fixtures:  # a read serves what the search served
        assert in_search[patient["id"]] == patient


# --- (b) the fhir.resources STU3 models -------------------------------------------------------


@pytest.mark.parametrize("rtype", TYPES)
async def test_resources_validate_as_fhir_resources_models(served: Served, rtype: str) -> None:
    errors = [e for r in served.resources[rtype] for e in model_errors(r)]
    assert errors == []


# --- (c) the Care Connect profile -------------------------------------------------------------


@pytest.mark.parametrize("rtype", TYPES)
async def test_meta_profile_is_the_care_connect_profile(served: Served, rtype: str) -> None:
    # Care Connect publishes no DocumentReference profile: the STU3 base one, said plainly.
    claimed = BASE_PROFILES.get(rtype) or PROFILE.format(rtype)
    wrong = [r["id"] for r in served.resources[rtype] if r["meta"]["profile"] != [claimed]]
    assert wrong == []


# --- (d) NHS numbers --------------------------------------------------------------------------


def modulus_11_ok(number: str) -> bool:
    """The NHS number check digit, written out independently of the gateway's own."""
    if len(number) != 10 or not number.isdigit():
        return False
    total = sum(int(digit) * weight for digit, weight in zip(number[:9], range(10, 1, -1),
                                                             strict=True))
    check = (11 - total % 11) % 11
    return check != 10 and check == int(number[9])


def test_modulus_11_itself() -> None:
    assert modulus_11_ok("9434765919")  # the NHS Data Dictionary's worked example
    assert not modulus_11_ok("9434765918")
    assert not modulus_11_ok("943476591")


async def test_nhs_numbers_are_valid_and_carry_their_verification_status(served: Served) -> None:
    patients = served.resources["Patient"] + served.fixtures
    with_number = 0
    for patient in patients:
        nhs = [i for i in patient.get("identifier", ()) if i.get("system") == NHS_SYSTEM]
        assert len(nhs) <= 1, patient["id"]  # the nhsNumber slice is 0..1
        if not nhs:
            continue
        with_number += 1
        [identifier] = nhs
        assert modulus_11_ok(identifier["value"]), patient["id"]
        [status] = [x for x in identifier.get("extension", ()) if x["url"] == VERIFICATION_URL]
        [coding] = status["valueCodeableConcept"]["coding"]
        assert coding["system"] == VERIFICATION_SYSTEM
        assert coding["code"] in {f"{n:02d}" for n in range(1, 9)}
        assert coding["display"]
    assert with_number >= 0.8 * len(patients)  # not vacuous: most patients have one
    no_number = next(p for p in served.fixtures if p["id"] == "100002")
    assert NHS_SYSTEM not in {i["system"] for i in no_number["identifier"]}


# --- (e) references resolve -------------------------------------------------------------------


def _references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "reference" and isinstance(value, str):
                yield value
            else:
                yield from _references(value)
    elif isinstance(node, list):
        for item in node:
            yield from _references(item)


async def test_every_reference_resolves(served: Served) -> None:
    references = sorted({ref for r in served.everything() for ref in _references(r)})
    targets = {ref.split("/")[0] for ref in references}
    # Patients point at GPs and practices; encounters at patients, consultants and wards;
    # conditions and procedures at the spell they were recorded in; orders at medicines and
    # spells, statements at the orders they came from...
    assert targets == {"Patient", "Practitioner", "Organization", "Location", "Encounter",
                       "Medication", "MedicationRequest"}
    failed = []
    for ref in references:
        rtype, rid = ref.split("/")
        response = await served.client.get(f"/STU3/{ref}")
        if response.status_code != 200:
            failed.append((ref, response.status_code))
            continue
        body = response.json()
        assert (body["resourceType"], body["id"]) == (rtype, rid)
    assert failed == []


# --- Bundles and OperationOutcomes ------------------------------------------------------------


async def test_searchset_pages_validate(served: Served, schema: dict[str, Any]) -> None:
    errors = []
    for page in served.pages:
        # Entries were checked one by one above; the Bundle around them is checked here.
        shell = {**page, "entry": [{k: v for k, v in e.items() if k != "resource"}
                                   for e in page.get("entry", ())]}
        errors += schema_errors(shell, "Bundle")
        for entry in page.get("entry", ()):
            resource = entry["resource"]
            assert entry["fullUrl"] == (
                f"http://gateway/STU3/{resource['resourceType']}/{resource['id']}")
            assert entry["search"] == {"mode": "match"}
    assert errors == []
    assert all(p["type"] == "searchset" for p in served.pages)


BUNDLES = [
    "/STU3/Patient?family=smith&birthdate=1965-04-12&_include=Patient:general-practitioner",
    "/STU3/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|9990000018"
    "&_revinclude=Encounter:patient&_total=accurate",
    "/STU3/Encounter?_count=5&_include=Encounter:practitioner&_include=Encounter:location",
    "/STU3/Location?_count=3&unknown-parameter=1",  # lenient: an outcome entry
    "/STU3/Organization?name=no-such-organisation",
    "/STU3/Patient?family=smith&gender=female&_summary=count",
]


@pytest.mark.parametrize("url", BUNDLES)
async def test_whole_bundles_validate(served: Served, schema: dict[str, Any], url: str) -> None:
    # lenient: an unknown parameter gives a Bundle with an outcome entry (strict: a 400)
    bundle = await _get_json(served.client, url, headers={"Prefer": "handling=lenient"})
    assert bundle["resourceType"] == "Bundle"
    assert bundle["type"] == "searchset"
    full = Draft6Validator(schema)  # the root schema: every entry against its own type
    assert [e.message for e in full.iter_errors(bundle)] == []
    assert model_errors(bundle) == []


OUTCOMES = [
    ("/STU3/Patient/999999999", 404),
    ("/STU3/Patient/not..a..valid..id..because..it..is..far..too..long..for..fhir..ids", 400),
    ("/STU3/Patient?family=smith", 400),  # Care Connect: two parameters needed
    ("/STU3/Patient?birthdate=yesterday&family=x", 400),
    ("/STU3/Spaceship", 404),
    ("/STU3/Patient/100001/_history", 501),
]


@pytest.mark.parametrize(("url", "status"), OUTCOMES)
async def test_operation_outcomes_validate(served: Served, schema: dict[str, Any], url: str,
                                           status: int) -> None:
    response = await served.client.get(url)
    assert response.status_code == status
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert schema_errors(outcome) == []
    assert model_errors(outcome) == []


# --- XML --------------------------------------------------------------------------------------


def _json_model(resource: dict[str, Any]) -> dict[str, Any]:
    dumped: dict[str, Any] = get_fhir_model_class(resource["resourceType"]).model_validate(
        resource).model_dump(mode="json")
    return dumped


def _xml_model(rtype: str, body: bytes) -> dict[str, Any]:
    dumped: dict[str, Any] = get_fhir_model_class(rtype).model_validate_xml(body).model_dump(
        mode="json")
    return dumped


async def _get_xml(client: httpx.AsyncClient, url: str, status: int = 200) -> etree._Element:
    response = await client.get(url)
    assert response.status_code == status, (url, response.text[:300])
    assert response.headers["content-type"] == "application/fhir+xml; charset=utf-8"
    root = etree.fromstring(response.content)
    assert etree.QName(root).namespace == FHIR_NS
    return root


@pytest.mark.parametrize("rtype", TYPES)
async def test_xml_reads_round_trip_to_the_json(served: Served, rtype: str) -> None:
    sample = served.resources[rtype][:4]
    if rtype == "Patient":
        sample += served.fixtures
    for resource in sample:
        url = f"/STU3/{rtype}/{resource['id']}?_format=xml"
        root = await _get_xml(served.client, url)
        assert etree.QName(root).localname == rtype
        assert root.find(f"{{{FHIR_NS}}}id").get("value") == resource["id"]
        body = etree.tostring(root)
        assert _xml_model(rtype, body) == _json_model(resource), url


async def test_an_xml_searchset_round_trips(served: Served) -> None:
    url = BUNDLES[0]
    as_json = await _get_json(served.client, url)
    root = await _get_xml(served.client, url + "&_format=xml")
    assert etree.QName(root).localname == "Bundle"
    from_xml = _xml_model("Bundle", etree.tostring(root))
    from_json = _json_model(as_json)
    for volatile in ("id", "meta"):  # a fresh Bundle id and time per response
        from_xml.pop(volatile)
        from_json.pop(volatile)
    assert from_xml == from_json
    assert len(from_json["entry"]) >= 3  # the two Jane Smiths and their GP's practitioner


async def test_an_xml_operation_outcome(served: Served) -> None:
    root = await _get_xml(served.client, "/STU3/Patient/999999999?_format=xml", status=404)
    assert etree.QName(root).localname == "OperationOutcome"
    outcome = _xml_model("OperationOutcome", etree.tostring(root))
    assert outcome["issue"][0]["code"] == "not-found"
