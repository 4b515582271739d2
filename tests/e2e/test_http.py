"""End to end over real HTTP: the gateway behind uvicorn on loopback, driven with httpx.

The README journey, every error path (status, stable code, media type, no leaks), the FHIR
formats, conditional reads and the request id, as a client on the network sees them.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
from collections.abc import Callable, Iterator
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest
from lxml import etree
from starlette.applications import Starlette

from gateway.app import build_app
from gateway.errors import ERROR_CODE_SYSTEM
from tests.conftest import LiveServer, gateway_settings

PATIENT_PROFILE = "https://fhir.hl7.org.uk/STU3/StructureDefinition/CareConnect-Patient-1"
FHIR_NS = "{http://hl7.org/fhir}"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
SMITH_QUERY = {"family": "smith", "gender": "female"}
# Values from the fixture patient 100001 (SMITH, JANE, 9990000018, born 1965-04-12): none of
# them may ever appear in an error response, whatever the request contained.
PHI = ("smith", "jane", "9990000018", "9990000019", "1965-04-12", "19650412", "1965-13-01")
# Python tracebacks, SQL and driver text, source table and column names.
LEAKS = ("traceback", 'file "', "select ", "from patients", "where p.", "sqlalchemy",
         "sqlite3", "psycopg", "operationalerror", "patnt_refno", "surname", "p.nhs_number")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def app(demo_sqlite_url: str, tmp_path_factory: pytest.TempPathFactory) -> Starlette:
    return build_app(gateway_settings(demo_sqlite_url, tmp_path_factory.mktemp("e2e")))


@pytest.fixture(scope="module")
def server(app: Starlette) -> Iterator[LiveServer]:
    """One uvicorn for the module (the per-test ``live_server`` is used by the journey test)."""
    with LiveServer(app) as s:
        yield s


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=15) as c:
        yield c


def media(response: httpx.Response) -> str:
    return response.headers["content-type"].split(";")[0].strip()


def assert_outcome(response: httpx.Response, status: int, code: str,
                   media_type: str = "application/fhir+json") -> dict[str, Any]:
    """An OperationOutcome with the status, stable code and media type, and nothing leaked."""
    assert response.status_code == status, response.text
    assert media(response) == media_type
    assert "charset=utf-8" in response.headers["content-type"]
    text = response.text.lower()
    for leak in (*LEAKS, *PHI):
        assert leak not in text, f"{leak!r} in an error response"
    if "xml" in media_type:
        root = etree.fromstring(response.content)
        assert root.tag == FHIR_NS + "OperationOutcome"
        got = root.find(f"{FHIR_NS}issue/{FHIR_NS}details/{FHIR_NS}coding/{FHIR_NS}code")
        assert got is not None and got.get("value") == code
        return {}
    body: dict[str, Any] = response.json()
    assert body["resourceType"] == "OperationOutcome"
    first = body["issue"][0]
    assert first["severity"] == "error"
    coding = first["details"]["coding"][0]
    assert (coding["system"], coding["code"]) == (ERROR_CODE_SYSTEM, code)
    assert first["diagnostics"]
    return body


# --- the README journey ------------------------------------------------------------------------


def test_readme_journey(live_server: LiveServer) -> None:
    base = live_server.url + "/STU3"
    with httpx.Client(timeout=15) as c:
        r = c.get(f"{base}/Patient", params=SMITH_QUERY)
        assert r.status_code == 200
        assert media(r) == "application/fhir+json"
        bundle = r.json()
        assert bundle["resourceType"] == "Bundle"
        assert bundle["type"] == "searchset"
        self_link = {link["relation"]: link["url"] for link in bundle["link"]}["self"]
        assert self_link.startswith(f"{base}/Patient?")
        assert dict(parse_qsl(urlsplit(self_link).query)) == SMITH_QUERY
        entries = bundle["entry"]
        assert entries
        for e in entries:
            res = e["resource"]
            assert res["resourceType"] == "Patient"
            assert res["meta"]["profile"] == [PATIENT_PROFILE]
            assert res["gender"] == "female"
            assert any(n["family"].lower().startswith("smith") for n in res["name"])
            assert e["fullUrl"] == f"{base}/Patient/{res['id']}"
            assert e["search"]["mode"] == "match"
        assert "100001" in {e["resource"]["id"] for e in entries}

        first = entries[0]["resource"]
        read = c.get(f"{base}/Patient/{first['id']}")
        assert read.status_code == 200
        assert media(read) == "application/fhir+json"
        assert read.json() == first

        meta = c.get(f"{base}/metadata")
        assert meta.status_code == 200
        cs = meta.json()
        assert cs["resourceType"] == "CapabilityStatement"
        assert cs["fhirVersion"] == "3.0.2"
        assert cs["implementation"]["url"] == base
        served = {r["type"]: r for r in cs["rest"][0]["resource"]}
        assert served["Patient"]["profile"]["reference"] == PATIENT_PROFILE


def test_health_and_ready(http: httpx.Client) -> None:
    health = http.get("/_health")
    assert (health.status_code, health.json()) == (200, {"status": "pass"})
    ready = http.get("/_ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "pass", "checks": {"pas": "pass"}}


def test_paging_links_walk_forward_and_back(http: httpx.Client) -> None:
    first = http.get("/STU3/Patient", params={**SMITH_QUERY, "_count": "2"}).json()
    links = {link["relation"]: link["url"] for link in first["link"]}
    assert "previous" not in links
    second = http.get(links["next"])
    assert second.status_code == 200
    page2 = second.json()
    ids1 = [e["resource"]["id"] for e in first["entry"]]
    ids2 = [e["resource"]["id"] for e in page2["entry"]]
    assert len(ids1) == 2 and ids2 and not set(ids1) & set(ids2)
    back = http.get({x["relation"]: x["url"] for x in page2["link"]}["previous"]).json()
    assert [e["resource"]["id"] for e in back["entry"]] == ids1


# --- errors: an OperationOutcome with the right status, code and media type ------------------

ERRORS: list[tuple[str, str, dict[str, str], int, str]] = [
    # 400: the request is wrong
    ("GET", "/STU3/Patient?family=smith&gender=female&colour=red", {"Prefer": "handling=strict"},
     400, "UNKNOWN_PARAMETER"),
    ("GET", "/STU3/Patient?family:sounds=smith&gender=female", {}, 400, "INVALID_PARAMETER"),
    ("GET", "/STU3/Patient?family=smith&gender=female&birthdate=1965-13-01", {}, 400,
     "INVALID_PARAMETER"),
    ("GET", "/STU3/Patient?family=smith&gender=female&birthdate=12/04/1965", {}, 400,
     "INVALID_PARAMETER"),
    ("GET", f"/STU3/Patient?identifier={NHS}|9990000019", {}, 400, "INVALID_NHS_NUMBER"),
    ("GET", "/STU3/Patient?family=smith", {}, 400, "INSUFFICIENT_SEARCH_CRITERIA"),
    ("GET", "/STU3/Patient?family=smith&given=jane", {}, 400, "INSUFFICIENT_SEARCH_CRITERIA"),
    ("GET", "/STU3/Patient?family=smith&gender=female&_count=-1", {}, 400, "INVALID_PARAMETER"),
    ("GET", "/STU3/Patient?family=smith&gender=female&_count=ten", {}, 400,
     "INVALID_PARAMETER"),
    ("GET", "/STU3/Patient?family=smith&gender=female&_page=not-a-token", {}, 400,
     "INVALID_PAGE_TOKEN"),
    ("GET", "/STU3/Patient/" + "9" * 65, {}, 400, "INVALID_RESOURCE_ID"),
    # 404: nothing there
    ("GET", "/STU3/Patient/999999", {}, 404, "RESOURCE_NOT_FOUND"),
    ("GET", "/STU3/Patient/not-a-number", {}, 404, "RESOURCE_NOT_FOUND"),
    ("GET", "/STU3/Foo", {}, 404, "UNKNOWN_RESOURCE_TYPE"),
    ("GET", "/STU3/Foo/1", {}, 404, "UNKNOWN_RESOURCE_TYPE"),
    ("GET", "/STU3/Foo/1/_history", {}, 404, "UNKNOWN_RESOURCE_TYPE"),
    ("GET", "/nope", {}, 404, "RESOURCE_NOT_FOUND"),
    ("GET", "/STU3", {}, 404, "RESOURCE_NOT_FOUND"),
    # 406: only media types the server cannot produce
    ("GET", "/STU3/Patient/100001", {"Accept": "text/html"}, 406, "NOT_ACCEPTABLE"),
    ("GET", "/STU3/Patient?family=smith&gender=female", {"Accept": "text/html"}, 406,
     "NOT_ACCEPTABLE"),
    ("GET", "/STU3/metadata", {"Accept": "image/png, text/plain"}, 406, "NOT_ACCEPTABLE"),
    ("GET", "/STU3/Patient/100001?_format=html", {}, 406, "NOT_ACCEPTABLE"),
    # 501: recognised FHIR interactions this read-only server does not implement
    ("GET", "/STU3/Patient/100001/_history", {}, 501, "NOT_IMPLEMENTED"),
    ("GET", "/STU3/Patient/100001/_history/1", {}, 501, "NOT_IMPLEMENTED"),
    ("GET", "/STU3/Patient/_history", {}, 501, "NOT_IMPLEMENTED"),
    ("GET", "/STU3/Patient/$everything", {}, 501, "NOT_IMPLEMENTED"),
    ("GET", "/STU3/Patient/100001/$lastn", {}, 501, "NOT_IMPLEMENTED"),
    ("GET", "/STU3/Encounter/1/$everything", {}, 501, "NOT_IMPLEMENTED"),
    ("POST", "/STU3/Patient/$match", {}, 501, "NOT_IMPLEMENTED"),
]


@pytest.mark.parametrize(("method", "path", "headers", "status", "code"), ERRORS,
                         ids=[f"{m} {p[:60]} {s}" for m, p, _, s, _ in ERRORS])
def test_error_paths(http: httpx.Client, method: str, path: str, headers: dict[str, str],
                     status: int, code: str) -> None:
    assert_outcome(http.request(method, path, headers=headers), status, code)


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/STU3/Patient"),
    ("PUT", "/STU3/Patient"),
    ("DELETE", "/STU3/Patient/100001"),
    ("PUT", "/STU3/Patient/100001"),
    ("PATCH", "/STU3/Patient/100001"),
    ("POST", "/STU3/Patient/100001"),
    ("POST", "/STU3/metadata"),
])
def test_write_interactions_are_405_with_allow(http: httpx.Client, method: str,
                                               path: str) -> None:
    r = http.request(method, path, content=b'{"resourceType": "Patient"}',
                     headers={"Content-Type": "application/fhir+json"})
    assert_outcome(r, 405, "METHOD_NOT_ALLOWED")
    assert r.headers["allow"] == "GET"


def test_405_from_the_router_is_an_outcome_too(http: httpx.Client) -> None:
    r = http.post("/_health")
    assert_outcome(r, 405, "METHOD_NOT_ALLOWED")
    assert "GET" in r.headers["allow"]


@pytest.mark.parametrize("content_type", ["application/json", "application/fhir+json", None])
def test_post_search_needs_a_form(http: httpx.Client, content_type: str | None) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    r = http.post("/STU3/Patient/_search", content=json.dumps(SMITH_QUERY), headers=headers)
    assert_outcome(r, 415, "UNSUPPORTED_MEDIA_TYPE")


def test_post_search_rejects_oversized_and_non_utf8_forms(http: httpx.Client) -> None:
    big = http.post("/STU3/Patient/_search", data={**SMITH_QUERY, "given": "x" * 70_000})
    assert_outcome(big, 400, "BAD_REQUEST")
    latin1 = http.post("/STU3/Patient/_search", content="family=Bront\xeb&gender=female"
                       .encode("latin-1"),
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_outcome(latin1, 400, "BAD_REQUEST")


def test_page_token_is_bound_to_its_search(http: httpx.Client) -> None:
    page = http.get("/STU3/Patient", params={**SMITH_QUERY, "_count": "1"}).json()
    token = dict(parse_qsl(urlsplit(
        {x["relation"]: x["url"] for x in page["link"]}["next"]).query))["_page"]
    # Pasted onto another search: rejected.
    other = http.get("/STU3/Patient", params={"family": "jones", "gender": "male",
                                              "_count": "1", "_page": token})
    assert_outcome(other, 400, "INVALID_PAGE_TOKEN")
    # Altered: rejected.
    tampered = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    r = http.get("/STU3/Patient", params={**SMITH_QUERY, "_count": "1", "_page": tampered})
    assert_outcome(r, 400, "INVALID_PAGE_TOKEN")
    # As issued: accepted.
    ok = http.get("/STU3/Patient", params={**SMITH_QUERY, "_count": "1", "_page": token})
    assert ok.status_code == 200


def test_errors_follow_the_negotiated_format(http: httpx.Client) -> None:
    xml = {"Accept": "application/fhir+xml"}
    assert_outcome(http.get("/STU3/Patient/999999", headers=xml), 404, "RESOURCE_NOT_FOUND",
                   "application/fhir+xml")
    assert_outcome(http.get("/STU3/Patient?family=smith", headers=xml), 400,
                   "INSUFFICIENT_SEARCH_CRITERIA", "application/fhir+xml")
    assert_outcome(http.get("/STU3/Foo?_format=xml"), 404, "UNKNOWN_RESOURCE_TYPE",
                   "application/fhir+xml")
    # Even where no FHIR route matched.
    assert_outcome(http.get("/nope", headers={"Accept": "application/xml+fhir"}), 404,
                   "RESOURCE_NOT_FOUND", "application/xml+fhir")
    assert_outcome(http.get("/STU3/Patient/100001/_history?_format=xml"), 501,
                   "NOT_IMPLEMENTED", "application/fhir+xml")


def test_backend_timeout_is_504(http: httpx.Client, app: Starlette) -> None:
    adapters = {p.mapping.adapter for p in app.state.registry.sources()}
    saved = {a: a.timeout for a in adapters}
    try:
        for a in adapters:
            a.timeout = 1e-6  # the SQLite progress handler interrupts the statement
        # a name nobody has: a scan long enough to reach the first check (10,000 VM steps)
        r = http.get("/STU3/Patient", params={"name:contains": "zqxj", "gender": "female"})
    finally:
        for a, t in saved.items():
            a.timeout = t
    assert_outcome(r, 504, "BACKEND_TIMEOUT")
    assert http.get("/STU3/Patient", params=SMITH_QUERY).status_code == 200


def test_backend_down_is_503_and_not_ready(tmp_path: Path,
                                           make_app: Callable[..., Starlette]) -> None:
    url = f"postgresql+psycopg://gateway:s3cret-pw@127.0.0.1:{free_port()}/pas"
    with LiveServer(make_app(url)) as down, httpx.Client(base_url=down.url, timeout=15) as c:
        assert c.get("/_health").status_code == 200
        ready = c.get("/_ready")
        assert ready.status_code == 503
        assert ready.json() == {"status": "fail", "checks": {"pas": "fail"}}
        for path in ("/STU3/Patient?family=smith&gender=female", "/STU3/Patient/100001",
                     "/STU3/Encounter?patient=100001"):
            r = c.get(path)
            assert_outcome(r, 503, "BACKEND_UNAVAILABLE")
            assert r.headers["retry-after"].isdigit()
            assert "s3cret" not in r.text and str(urlsplit(url).port) not in r.text
        # The CapabilityStatement needs no backend.
        assert c.get("/STU3/metadata").status_code == 200


# --- POST _search ------------------------------------------------------------------------------


def _ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", [])]


@pytest.mark.parametrize("query", [
    SMITH_QUERY,
    {"family": "smith", "birthdate": "1965-04-12", "_count": "3"},
    {"identifier": f"{NHS}|9990000018"},
    {"family": "bronte", "gender": "female", "_include": "Patient:general-practitioner"},
])
def test_post_search_equals_get(http: httpx.Client, query: dict[str, str]) -> None:
    got = http.get("/STU3/Patient", params=query)
    posted = http.post("/STU3/Patient/_search", data=query)
    assert got.status_code == posted.status_code == 200
    a, b = got.json(), posted.json()
    assert _ids(a)
    assert [e["resource"] for e in a["entry"]] == [e["resource"] for e in b["entry"]]
    assert [e["search"] for e in a["entry"]] == [e["search"] for e in b["entry"]]
    assert a.get("total") == b.get("total")
    # The same self link, and next links to the same page (tokens are encrypted with a
    # random IV, so the token text differs while what it opens is the same).
    assert [ln["relation"] for ln in a["link"]] == [ln["relation"] for ln in b["link"]]
    assert a["link"][0] == b["link"][0]
    nexts = [[ln["url"] for ln in x["link"] if ln["relation"] == "next"] for x in (a, b)]
    if nexts[0]:
        assert _ids(http.get(nexts[0][0]).json()) == _ids(http.get(nexts[1][0]).json())


def test_post_search_merges_url_and_body_parameters(http: httpx.Client) -> None:
    split = http.post("/STU3/Patient/_search?family=smith", data={"gender": "female"},
                      headers={"Content-Type": "application/x-www-form-urlencoded; "
                                               "charset=utf-8"})
    assert split.status_code == 200
    assert _ids(split.json()) == _ids(http.get("/STU3/Patient", params=SMITH_QUERY).json())


def test_get_search_on_the_search_endpoint(http: httpx.Client) -> None:
    r = http.get("/STU3/Patient/_search", params=SMITH_QUERY)
    assert r.status_code == 200
    assert _ids(r.json()) == _ids(http.get("/STU3/Patient", params=SMITH_QUERY).json())


# --- formats -----------------------------------------------------------------------------------


def _parse(r: httpx.Response) -> tuple[str, str]:
    """(resourceType, id) from a JSON or XML body."""
    if "json" in media(r):
        body = r.json()
        return body["resourceType"], body["id"]
    root = etree.fromstring(r.content)
    assert root.tag.startswith(FHIR_NS)
    ident = root.find(FHIR_NS + "id")
    assert ident is not None
    return root.tag.removeprefix(FHIR_NS), str(ident.get("value"))


@pytest.mark.parametrize(("accept", "expected"), [
    (None, "application/fhir+json"),
    ("application/fhir+json", "application/fhir+json"),
    ("application/json+fhir", "application/json+fhir"),
    ("application/json", "application/json"),
    ("application/fhir+xml", "application/fhir+xml"),
    ("application/xml+fhir", "application/xml+fhir"),
    ("application/xml", "application/xml"),
    ("*/*", "application/fhir+json"),
    ("Application/FHIR+XML; fhirVersion=3.0", "application/fhir+xml"),
    ("application/fhir+xml;q=0.5, application/fhir+json;q=0.9", "application/fhir+json"),
    ("application/fhir+json;q=0.5, application/fhir+xml;q=0.9", "application/fhir+xml"),
    ("text/html, application/xml+fhir;q=0.2, */*;q=0.1", "application/xml+fhir"),
    ("application/fhir+json;q=0, application/fhir+xml", "application/fhir+xml"),
])
def test_accept_negotiates_the_media_type(http: httpx.Client, accept: str | None,
                                          expected: str) -> None:
    headers = {"Accept": accept} if accept else {}
    read = http.get("/STU3/Patient/100001", headers=headers)
    assert read.status_code == 200
    assert media(read) == expected
    assert _parse(read) == ("Patient", "100001")
    search = http.get("/STU3/Patient", params={**SMITH_QUERY, "_count": "3"}, headers=headers)
    assert media(search) == expected
    assert _parse(search)[0] == "Bundle"


@pytest.mark.parametrize(("fmt", "expected"), [
    ("json", "application/fhir+json"),
    ("xml", "application/fhir+xml"),
    ("application/fhir+xml", "application/fhir+xml"),
    ("application/json+fhir", "application/json+fhir"),
    ("application/xml+fhir", "application/xml+fhir"),
])
def test_format_parameter_wins_over_accept(http: httpx.Client, fmt: str, expected: str) -> None:
    r = http.get("/STU3/Patient/100001", params={"_format": fmt},
                 headers={"Accept": "text/html"})
    assert r.status_code == 200
    assert media(r) == expected
    assert _parse(r) == ("Patient", "100001")


def test_format_with_an_unencoded_plus(http: httpx.Client) -> None:
    # "+" in a query string means a space; clients that forget to encode it still get XML.
    r = http.get("/STU3/Patient/100001?_format=application/fhir+xml")
    assert r.status_code == 200
    assert media(r) == "application/fhir+xml"


def test_xml_search_bundle_with_includes(http: httpx.Client) -> None:
    r = http.get("/STU3/Patient", params={**SMITH_QUERY, "_format": "xml",
                                          "_include": "Patient:general-practitioner"})
    assert r.status_code == 200
    root = etree.fromstring(r.content)
    assert root.tag == FHIR_NS + "Bundle"
    kinds = {el.tag.removeprefix(FHIR_NS)
             for el in root.iterfind(f"{FHIR_NS}entry/{FHIR_NS}resource/*")}
    assert {"Patient", "Practitioner", "Organization"} <= kinds


def test_pretty(http: httpx.Client) -> None:
    compact = http.get("/STU3/Patient/100001")
    pretty = http.get("/STU3/Patient/100001", params={"_pretty": "true"})
    assert b"\n" not in compact.content
    assert pretty.content.startswith(b'{\n  "resourceType": "Patient"')
    assert pretty.json() == compact.json()
    xml_compact = http.get("/STU3/Patient/100001", params={"_format": "xml"})
    xml_pretty = http.get("/STU3/Patient/100001", params={"_format": "xml", "_pretty": "true"})
    assert b"\n  <id value=\"100001\"/>" in xml_pretty.content
    assert b"\n  <id" not in xml_compact.content
    assert http.get("/STU3/Patient/100001", params={"_pretty": "false"}).content == \
        compact.content


def test_format_parameters_do_not_change_the_search(http: httpx.Client) -> None:
    plain = http.get("/STU3/Patient", params=SMITH_QUERY).json()
    pretty = http.get("/STU3/Patient", params={**SMITH_QUERY, "_pretty": "true",
                                               "_format": "json"}).json()
    assert _ids(plain) == _ids(pretty)
    # _format and _pretty are not part of the search, so not of its links either (the _page
    # token is encrypted with a random IV: compare the links without it)
    links = [{x["relation"]: urlsplit(x["url"]) for x in b["link"]} for b in (plain, pretty)]
    assert links[0]["self"] == links[1]["self"]
    stripped = [[kv for kv in parse_qsl(ln["next"].query) if kv[0] != "_page"] for ln in links]
    assert stripped[0] == stripped[1] == list(SMITH_QUERY.items())


# --- conditional read --------------------------------------------------------------------------


def test_etag_and_last_modified(http: httpx.Client) -> None:
    r = http.get("/STU3/Patient/100001")
    etag, modified = r.headers["etag"], r.headers["last-modified"]
    assert re.fullmatch(r'W/"[0-9a-f]{16}"', etag)
    when = parsedate_to_datetime(modified)
    updated = dt.datetime.fromisoformat(r.json()["meta"]["lastUpdated"])
    assert when == updated.replace(microsecond=0)
    again = http.get("/STU3/Patient/100001", params={"_format": "xml"})
    assert again.headers["etag"] == etag  # the version, not the representation

    for header, value in [
        ("If-None-Match", etag),
        ("If-None-Match", f'W/"0000000000000000", {etag}'),
        ("If-None-Match", "*"),
        ("If-Modified-Since", modified),
        ("If-Modified-Since", format_datetime(when + dt.timedelta(days=1), usegmt=True)),
        ("If-Modified-Since", modified.replace("GMT", "-0000")),
        ("If-Modified-Since", modified.replace("GMT", "+0000")),
    ]:
        cached = http.get("/STU3/Patient/100001", headers={header: value})
        assert cached.status_code == 304, (header, value)
        assert cached.content == b""
        assert cached.headers["etag"] == etag

    for header, value in [
        ("If-None-Match", 'W/"0000000000000000"'),
        ("If-Modified-Since", format_datetime(when - dt.timedelta(seconds=1), usegmt=True)),
        ("If-Modified-Since", "yesterday"),
    ]:
        fresh = http.get("/STU3/Patient/100001", headers={header: value})
        assert fresh.status_code == 200, (header, value)
        assert fresh.json()["id"] == "100001"


# --- request id --------------------------------------------------------------------------------


HEX32 = re.compile(r"[0-9a-f]{32}")


def test_request_id_is_echoed_or_generated(http: httpx.Client) -> None:
    given = "client-req.42:abc"
    assert http.get("/_health", headers={"X-Request-ID": given}).headers["x-request-id"] == given
    longest = "r" * 128
    assert http.get("/_health", headers={"X-Request-ID": longest}).headers[
        "x-request-id"] == longest
    generated = {http.get("/_health").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3 and all(HEX32.fullmatch(g) for g in generated)
    # On error responses too.
    err = http.get("/nope", headers={"X-Request-ID": given})
    assert err.status_code == 404 and err.headers["x-request-id"] == given
    assert HEX32.fullmatch(http.get("/STU3/Patient/999999").headers["x-request-id"])


@pytest.mark.parametrize("bad", ["two words", "tab\there", "r" * 129, "caf\xe9", "", "a/b",
                                 "<script>"])
def test_invalid_request_id_is_replaced(http: httpx.Client, bad: str) -> None:
    r = http.get("/STU3/Patient/100001", headers={"X-Request-ID": bad.encode("latin-1")})
    assert r.status_code == 200
    assert HEX32.fullmatch(r.headers["x-request-id"])
    assert len(r.headers.get_list("x-request-id")) == 1


def test_request_id_with_a_line_break_never_reaches_a_response(server: LiveServer) -> None:
    # A raw CR/LF cannot be sent over HTTP/1.1; a folded header is refused by the server.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"GET /_health HTTP/1.1\r\nHost: x\r\nX-Request-ID: abc\r\n def\r\n"
                  b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].lower()
    assert head.startswith(b"http/1.1 400")
    assert b"def" not in head


def test_a_patient_token_cannot_read_another_patients_record(
        demo_sqlite_url: str, tmp_path: Path) -> None:
    """The demo's real JWT path: a token minted by ``careconnect-gateway dev-token`` for
    patient 100001, sent over HTTP to uvicorn, reads 100001 and nobody else."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CCG_DATA_DIR": str(tmp_path), "CCG_PROGRESS": "false"}
    minted = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "dev-token", "--scope", "patient/*.read",
         "--patient", "100001"], env=env, capture_output=True, text=True, timeout=60, check=True)
    token = minted.stdout.strip()
    assert token.count(".") == 2  # a signed JWT, not an API key
    # the demo's default authentication: JWTs signed by the dev key in the data directory
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, auth_mode=""))
    with LiveServer(app) as server, httpx.Client(
            base_url=server.url, timeout=15,
            headers={"Authorization": f"Bearer {token}"}) as client:
        own = client.get("/STU3/Patient/100001")
        assert own.status_code == 200 and own.json()["id"] == "100001"
        mine = client.get("/STU3/Encounter", params={"patient": "100001"})
        assert mine.status_code == 200
        assert {e["resource"]["subject"]["reference"] for e in mine.json()["entry"]} == {
            "Patient/100001"}
        # another patient's record: a read is refused like a missing one ...
        other = client.get("/STU3/Patient/100002")
        assert_outcome(other, other.status_code, body_code(other))
        assert other.status_code in (403, 404)
        # ... a search about them finds nothing (the compartment contradicts it: nothing is
        # even sent to the PAS), and _include cannot reach past the compartment
        for path, params in (("/STU3/Encounter", {"patient": "100002"}),
                             ("/STU3/Patient", {"_id": "100002"}),
                             ("/STU3/Encounter", {"subject": "Patient/100002",
                                                  "_include": "Encounter:patient"})):
            r = client.get(path, params=params)
            assert r.status_code == 200, (path, r.text)
            bundle = r.json()
            assert bundle["total"] == 0 and not bundle.get("entry"), path
        # and with no token at all nothing is served either
        anonymous = httpx.get(server.url + "/STU3/Patient/100002", timeout=15)
        assert_outcome(anonymous, 401, "AUTHENTICATION_REQUIRED")


def body_code(response: httpx.Response) -> str:
    code: str = response.json()["issue"][0]["details"]["coding"][0]["code"]
    return code
