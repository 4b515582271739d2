"""Request bodies and parameters whose JSON types are wrong, to every endpoint that takes one.

Each case starts from a body the endpoint accepts; hypothesis replaces one node at a time (at
any depth, the root included) with a value of another JSON type, or removes it. The answer
must never be a 500: a 4xx OperationOutcome with a gateway error code, or the operation's
normal answer. The apps are the real ones, in process over real HTTP (the demo SQL PAS; the
HL7 v2 demo over real MLLP to the PAS simulator); deterministic (derandomize) and bounded.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from anyio.from_thread import start_blocking_portal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import build_app
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT
from tests.conftest import LiveServer, gateway_settings
from tests.e2e.conftest import settings as hl7_settings

ERRORS = "https://careconnect-gateway.github.io/fhir/CodeSystem/gateway-error-code"
EVENTS = "https://careconnect-gateway.github.io/fhir/CodeSystem/message-event"
JSON = {"Content-Type": "application/fhir+json"}
DELETE = object()
ODD: tuple[Any, ...] = (0, -1, 1.5, True, False, None, "", "x", {}, [], [None], [7], [{}],
                        {"reference": 7}, DELETE)

Path_ = tuple[str | int, ...]


def nodes(value: Any, at: Path_ = ()) -> Iterator[Path_]:
    yield at
    if isinstance(value, dict):
        for k, v in value.items():
            yield from nodes(v, (*at, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from nodes(v, (*at, i))


def mutated(doc: Any, at: Path_, new: Any) -> Any:
    if not at:
        return {} if new is DELETE else new
    out = copy.deepcopy(doc)
    parent = out
    for step in at[:-1]:
        parent = parent[step]
    if new is DELETE:
        del parent[at[-1]]
    else:
        parent[at[-1]] = copy.deepcopy(new)
    return out


def mutants(doc: Any) -> st.SearchStrategy[tuple[Path_, Any]]:
    return st.tuples(st.sampled_from(list(nodes(doc))), st.sampled_from(ODD))


def check(r: Any, what: object) -> None:
    assert r.status_code < 500 or r.status_code in (501, 502, 503, 504), \
        (r.status_code, what, r.text[:1500])
    if r.status_code == 204:
        return
    body = r.json()
    assert isinstance(body, dict) and "resourceType" in body, (what, r.text[:500])
    if r.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome", (what, r.text[:500])
        codes = [c["code"] for i in body["issue"]
                 for c in i.get("details", {}).get("coding", ()) if c.get("system") == ERRORS]
        assert codes, (what, r.text[:500])


FUZZ = settings(max_examples=60, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# --- the apps --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sql_app(demo_sqlite_url: str, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[httpx.Client]:
    """The demo SQL PAS, with the ADT API (Subscription) on."""
    tmp = tmp_path_factory.mktemp("fuzz-sql")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CCG_ADT_MODE", "api")
        mp.setenv("CCG_ADT_STORE_URL", f"sqlite:///{tmp / 'adt.sqlite'}")
        mp.setenv("CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS", "http://127.0.0.1:*")
        app = build_app(gateway_settings(demo_sqlite_url, tmp, rate_limit_per_minute=0,
                                         source_rate_limit_per_minute=0))
        with LiveServer(app) as server, httpx.Client(base_url=server.url + "/STU3",
                                                      timeout=30) as c:
            yield c


@pytest.fixture(scope="module")
def hl7_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """The HL7 v2 demo on the PAS simulator (over real MLLP, in a thread of its own)."""
    tmp = tmp_path_factory.mktemp("fuzz-hl7")
    db = tmp / "pas.sqlite"
    ensure_sqlite_demo(db, patients=50, progress=False)
    with ExitStack() as stack:
        portal = stack.enter_context(start_blocking_portal())
        sim = stack.enter_context(portal.wrap_async_context_manager(
            PasSimulator(f"sqlite:///{db}", dialect="itk")))
        app = build_app(hl7_settings(tmp, f"sqlite:///{db}", sim.port,
                                     rate_limit_per_minute=0, source_rate_limit_per_minute=0))
        adapter = next(p.mapping.adapter for p in app.state.registry
                       if p.resource_type == "Patient")
        adapter.client.reply_timeout = 1.0
        adapter.options = adapter.options.model_copy(update={"deadline": 2.0})
        server = stack.enter_context(LiveServer(app))
        yield stack.enter_context(httpx.Client(base_url=server.url + "/STU3", timeout=30))


# --- the bodies ------------------------------------------------------------------------------


def message(event: str, focus: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": "message", "entry": [
        {"fullUrl": "urn:uuid:m-1", "resource": {
            "resourceType": "MessageHeader", "id": "fuzz-1",
            "event": {"system": EVENTS, "code": event},
            "timestamp": "2026-12-07T09:00:00+00:00",
            "source": {"endpoint": "https://ehr.example.nhs.uk/fhir"},
            "focus": [{"reference": "urn:uuid:f-1"}]}},
        {"fullUrl": "urn:uuid:f-1", "resource": focus}]}


def patient(number: str) -> dict[str, Any]:
    """NEW_PATIENT with another NHS number: each registering case its own patient."""
    p = copy.deepcopy(NEW_PATIENT)
    p["identifier"][0]["value"] = number
    return p


ADMISSION = {"resourceType": "Encounter", "status": "in-progress",
             "class": {"system": "http://hl7.org/fhir/v3/ActCode", "code": "IMP"},
             "subject": {"reference": "Patient/D0000001"},
             "period": {"start": "2026-12-07T09:30:00Z"},
             "location": [{"location": {"identifier": {
                 "system": "https://fhir.demo-trust.nhs.uk/Id/location-code", "value": "W10"}}}]}


def params(*ps: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Parameters", "parameter": list(ps)}


SUBSCRIPTION = {"resourceType": "Subscription", "status": "requested", "reason": "ward",
                "criteria": "Encounter?patient=D0000001",
                "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook",
                            "payload": "application/fhir+json",
                            "header": ["Authorization: Bearer x"]}}

# (app, method, path, the valid body)
SQL_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/Patient/100001/$everything", params(
        {"name": "start", "valueDate": "2000-01-01"}, {"name": "_count", "valueInteger": 5})),
    ("POST", "/Patient/100001/$structured-record", params(
        {"name": "recentEncounters", "valueInteger": 2},
        {"name": "includeAppointments", "valueBoolean": False},
        {"name": "encounterSearchFromDate", "valueDate": "2000-01-01"})),
    ("POST", "/Patient/$validate", params({"name": "resource", "resource": NEW_PATIENT},
                                          {"name": "mode", "valueCode": "create"})),
    ("POST", "/Patient/$validate", NEW_PATIENT),
    ("POST", "/Patient/100001/$document", params({"name": "type",
                                                  "valueCode": "patient-summary"},
                                                 {"name": "persist", "valueBoolean": False})),
    ("POST", "/Encounter/1/$document", params({"name": "persist", "valueBoolean": False})),
    ("POST", "/Subscription", SUBSCRIPTION),
    ("PUT", "/Subscription/{sub}", {**SUBSCRIPTION, "id": "{sub}"}),
    ("POST", "/Patient/100001/$validate", params({"name": "resource", "resource": {
        **NEW_PATIENT, "id": "100001"}}, {"name": "mode", "valueCode": "update"})),
    ("POST", "/ConceptMap/$translate", params(
        {"name": "targetsystem", "valueUri": "http://snomed.info/sct"},
        {"name": "coding", "valueCoding": {"system": "http://read.info/ctv3", "code": "X40J4"}},
        {"name": "reverse", "valueBoolean": False})),
    ("POST", "/ConceptMap/$translate", params(
        {"name": "system", "valueUri": "http://read.info/ctv3"},
        {"name": "codeableConcept", "valueCodeableConcept": {"coding": [
            {"system": "http://read.info/ctv3", "code": "X40J4"}]}},
        {"name": "targetsystem", "valueUri": "http://snomed.info/sct"})),
    ("POST", "/ValueSet/$expand", params(
        {"name": "url",
         "valueUri": "https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-AdministrativeGender-1"},
        {"name": "count", "valueInteger": 2}, {"name": "filter", "valueString": "ma"})),
    ("POST", "/ValueSet/$validate-code", params(
        {"name": "url",
         "valueUri": "https://fhir.hl7.org.uk/STU3/ValueSet/CareConnect-AdministrativeGender-1"},
        {"name": "coding", "valueCoding": {"system": "http://hl7.org/fhir/administrative-gender",
                                           "code": "male"}})),
    ("POST", "/CodeSystem/$lookup", params(
        {"name": "system",
         "valueUri": "https://fhir.hl7.org.uk/STU3/CodeSystem/CareConnect-EthnicCategory-1"},
        {"name": "code", "valueCode": "A"})),
]

HL7_CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/$process-message", message("patient-registration", patient("9430001000"))),
    ("POST", "/$process-message", message("admit-inpatient", ADMISSION)),
    ("POST", "/$process-message", params(
        {"name": "content", "resource": message("patient-registration",
                                                patient("9430001019"))},
        {"name": "async", "valueBoolean": False})),
    ("POST", "/Patient", NEW_PATIENT),
    ("PUT", "/Patient/D0000001", {**patient("9430001027"), "id": "D0000001"}),
    ("POST", "/Encounter", ADMISSION),
]


_IDS = itertools.count()


def fresh_ids(doc: Any) -> None:
    """A new MessageHeader id in each variant, else every one is the same id reused."""
    if isinstance(doc, dict):
        if doc.get("resourceType") == "MessageHeader" and isinstance(doc.get("id"), str):
            doc["id"] = f"fuzz-{next(_IDS)}"
        for v in doc.values():
            fresh_ids(v)
    elif isinstance(doc, list):
        for v in doc:
            fresh_ids(v)


def send(c: httpx.Client, method: str, path: str, doc: Any) -> httpx.Response:
    if "{sub}" in path:
        path = path.format(sub=_subscription(c))
        if isinstance(doc, dict) and doc.get("id") == "{sub}":
            doc = {**doc, "id": path.rsplit("/", 1)[1]}
    r = c.request(method, path, json=doc, headers=JSON)
    if path == "/Subscription" and r.status_code == 201:  # under the per-client limit
        assert c.delete(r.headers["location"]).status_code == 204
    return r


def _subscription(c: httpx.Client) -> str:
    """The one Subscription the PUT cases update (created once)."""
    if "sub" not in _SUB:
        r = c.post("/Subscription", json=SUBSCRIPTION, headers=JSON)
        assert r.status_code == 201, r.text
        _SUB["sub"] = r.json()["id"]
    return _SUB["sub"]


_SUB: dict[str, str] = {}


def _fuzz(c: httpx.Client, method: str, path: str, body: dict[str, Any],
          data: st.DataObject) -> None:
    at, new = data.draw(mutants(body))
    doc = mutated(body, at, new)
    fresh_ids(doc)
    check(send(c, method, path, doc), (method, path, at, new))


def test_unmutated_bodies_accepted(sql_app: httpx.Client, hl7_app: httpx.Client) -> None:
    """The bodies the variants start from are accepted: the variants test something."""
    for c, cases in ((sql_app, SQL_CASES), (hl7_app, HL7_CASES)):
        for method, path, body in cases:
            doc = copy.deepcopy(body)
            fresh_ids(doc)
            r = send(c, method, path, doc)
            assert r.status_code < 300, (path, r.text[:1000])
            if path == "/$process-message" and "entry" in r.json():
                assert r.json()["entry"][0]["resource"]["response"]["code"] == "ok", r.text


@pytest.mark.parametrize(("method", "path", "body"), SQL_CASES,
                         ids=[f"{m} {p}" for m, p, _ in SQL_CASES])
@FUZZ
@given(data=st.data())
def test_sql_bodies(sql_app: httpx.Client, method: str, path: str, body: dict[str, Any],
                    data: st.DataObject) -> None:
    _fuzz(sql_app, method, path, body, data)


@pytest.mark.parametrize(("method", "path", "body"), HL7_CASES,
                         ids=[f"{m} {p}" for m, p, _ in HL7_CASES])
@FUZZ
@given(data=st.data())
def test_hl7_bodies(hl7_app: httpx.Client, method: str, path: str, body: dict[str, Any],
                    data: st.DataObject) -> None:
    _fuzz(hl7_app, method, path, body, data)


QUERY_VALUES = ("", " ", "null", "true", "[]", "{}", "-1", "0", "1e999", "9" * 40, "x|",
                "|", ",", "a,,b", "2026-13-45", "ge", "%00")
QUERIES: list[tuple[str, tuple[str, ...]]] = [
    ("/Patient", ("family", "gender", "birthdate", "identifier", "_count", "_sort",
                  "_include", "_revinclude", "_id", "_lastUpdated", "name:exact", "_elements",
                  "_summary", "_format", "_total")),
    ("/Encounter", ("patient", "date", "status", "_count", "patient.family", "_has")),
    ("/Patient/100001/_history", ("_count", "_since", "_at")),
    ("/Patient/_history", ("_count", "_since")),
    ("/Patient/100001/$everything", ("start", "end", "_count", "_since", "_type")),
    ("/Patient/100001/$structured-record", ("recentEncounters", "includeAppointments",
                                            "encounterSearchFromDate", "includeAllergies")),
    ("/Patient/100001/$document", ("type", "persist")),
    ("/ConceptMap/$translate", ("system", "code", "url", "targetsystem", "reverse",
                                "display")),
    ("/ValueSet/$expand", ("url", "count", "offset", "filter")),
    ("/CodeSystem/$lookup", ("system", "code", "version", "property")),
    ("/ValueSet/$validate-code", ("url", "system", "code", "display")),
    ("/Subscription", ("status", "_count", "criteria")),
]


@pytest.mark.parametrize(("path", "names"), QUERIES, ids=[p for p, _ in QUERIES])
@FUZZ
@given(data=st.data())
def test_sql_queries(sql_app: httpx.Client, path: str, names: tuple[str, ...],
                     data: st.DataObject) -> None:
    """Repeated, empty and odd parameters (GET and as a form)."""
    pairs = data.draw(st.lists(st.tuples(st.sampled_from(names), st.sampled_from(QUERY_VALUES)),
                               max_size=4))
    if data.draw(st.booleans()) and ("$" in path or path.count("/") == 1):
        r = sql_app.post(path if "$" in path else path + "/_search", content=urlencode(pairs),
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
    else:
        r = sql_app.get(f"{path}?{urlencode(pairs)}")
    check(r, (path, pairs))
