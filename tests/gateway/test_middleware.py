"""The outermost layer: request id, exactly one PHI-free log line per request, and errors.

Log lines are captured from stdout (capfd) as the real configuration writes them. capfd's
stream is only in place while the test itself runs, so each test (re)configures logging with
gateway.logging.configure before it makes requests.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import Message, Receive, Scope, Send

from gateway import logging as gateway_logging
from gateway.errors import ERROR_CODE_SYSTEM, BadRequest
from gateway.formats import Format
from gateway.middleware import RequestContext, http_error_handler, outcome_response
from gateway.providers import Provider, adapter_seconds

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"
# The fixture patient 100001: SMITH, JANE ELIZABETH, NHS number 9990000018, born 1965-04-12.
PHI = ("smith", "jane", "elizabeth", "9990000018", "9990000019", "1965-04-12", "19650412")
# Built at run time, so no source line shown in a logged stack can contain it.
PHI_MESSAGE = " ".join(["SMITH", "9990000018"])
REQUEST_KEYS = {"event", "level", "timestamp", "request_id", "method", "route", "status",
                "duration_ms", "adapter_ms"}
HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.contextvars.clear_contextvars()
    structlog.configure(**saved)


def start_log(capfd: pytest.CaptureFixture[str], level: str = "info") -> None:
    """Point the gateway's logging at capfd's stdout (as build_app does) and drop old output."""
    gateway_logging.configure(level)
    capfd.readouterr()


def read_log(capfd: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out, _ = capfd.readouterr()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


AUDIT = '"logger":"gateway.audit"'


def without_audit(text: str) -> str:
    """Output minus the audit trail's lines (gateway/audit.py: a separate, protected stream)."""
    return "\n".join(line for line in text.splitlines() if AUDIT not in line)


def requests_in(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line["event"] == "request"]


@pytest.fixture
async def gw(demo_sqlite_url: str,
             make_app: Callable[..., Starlette]) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app(demo_sqlite_url, log_level="info")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


REQUESTS: list[tuple[str, str, dict[str, str], str, int, bool]] = [
    # method, url, form body, route template, status, touches the backend
    ("GET", "/STU3/Patient?family=smith&gender=female", {}, "/STU3/{type}", 200, True),
    ("GET", "/STU3/Patient/100001", {}, "/STU3/{type}/{id}", 200, True),
    ("GET", "/STU3/Patient/999999", {}, "/STU3/{type}/{id}", 404, True),
    ("POST", "/STU3/Patient/_search", {"family": "smith", "gender": "female"},
     "/STU3/{type}/_search", 200, True),
    ("GET", "/STU3/Encounter?patient=100001&_count=0", {}, "/STU3/{type}", 200, True),
    ("GET", "/STU3/Patient?family=smith", {}, "/STU3/{type}", 400, False),
    ("DELETE", "/STU3/Patient/100001", {}, "/STU3/{type}/{id}", 405, False),
    ("GET", "/STU3/Patient/100001/_history", {}, "/STU3/{type}/{id}/{rest}", 501, False),
    ("GET", "/STU3/metadata", {}, "/STU3/metadata", 200, False),
    ("GET", "/_health", {}, "/_health", 200, False),
    ("GET", "/nope", {}, "unmatched", 404, False),
    ("GET", "/STU3/Foo", {}, "/STU3/{type}", 404, False),
]


async def test_exactly_one_request_line_per_request(
        gw: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)
    for method, url, form, route, status, backend in REQUESTS:
        r = await gw.request(method, url, data=form or None)
        assert r.status_code == status, (url, r.text)
        (line,) = requests_in(read_log(capfd))
        assert set(line) == REQUEST_KEYS, url  # and nothing else: no path, no query
        assert line["level"] == "info"
        assert line["request_id"] == r.headers["x-request-id"]
        assert (line["method"], line["route"], line["status"]) == (method, route, status)
        assert isinstance(line["duration_ms"], float)
        assert line["duration_ms"] >= line["adapter_ms"] >= 0
        if backend:
            assert line["adapter_ms"] > 0, url
        else:
            assert line["adapter_ms"] == 0, url


async def test_request_ids_differ_and_a_valid_one_is_kept(
        gw: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)
    await gw.get("/_health")
    await gw.get("/_health")
    await gw.get("/_health", headers={"X-Request-ID": "upstream-7"})
    ids = [line["request_id"] for line in requests_in(read_log(capfd))]
    assert HEX32.fullmatch(ids[0]) and HEX32.fullmatch(ids[1]) and ids[0] != ids[1]
    assert ids[2] == "upstream-7"
    assert "request_id" not in structlog.contextvars.get_contextvars()
    assert gateway_logging.current_request_id.get() is None  # reset after each request


async def test_generated_request_ids_are_random_and_unique() -> None:
    ids = set()
    for _ in range(2000):
        sent = await call(RequestContext(ok_app), http_scope())
        (rid,) = header(sent[0], b"x-request-id")
        assert HEX32.fullmatch(rid.decode())
        ids.add(rid)
    assert len(ids) == 2000
    # 128 random bits each: every hex digit position varies (no counter, no fixed prefix)
    assert all(len({rid[i] for rid in ids}) > 8 for i in range(32))


async def test_no_phi_in_the_log_at_info_level(
        gw: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)
    searches: list[dict[str, str]] = [
        {"family": "smith", "gender": "female"},
        {"family": "SMITH", "given": "jane", "birthdate": "1965-04-12"},
        {"identifier": f"{NHS}|9990000018"},
        {"identifier": "9990000018", "_include": "Patient:general-practitioner"},
        {"name": "elizabeth", "birthdate": "eq1965-04-12", "_count": "1"},
        {"identifier": f"{NHS}|9990000019"},  # invalid NHS number: a 400
        {"family": "smith", "birthdate": "19650412"},  # invalid date: a 400
    ]
    for params in searches:
        await gw.get("/STU3/Patient", params=params)
        await gw.post("/STU3/Patient/_search", data=params)
    found = await gw.get("/STU3/Patient/100001")
    assert "SMITH" in found.text.upper()  # the response has it; the log must not
    await gw.get("/STU3/Encounter", params={"patient": "100001"})
    out, err = capfd.readouterr()
    assert len(requests_in([json.loads(x) for x in out.splitlines()])) == 2 * len(searches) + 2
    # The audit trail (its own stream, on stderr) records identifiers by design; the log not.
    assert AUDIT not in out
    text = (out + without_audit(err)).lower()
    for value in PHI:
        assert value not in text, value


async def test_backend_failure_lines_carry_the_request_id(
        make_app: Callable[..., Starlette], capfd: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = make_app(f"postgresql+psycopg://gw:s3cret@127.0.0.1:{port}/pas", log_level="info")
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            start_log(capfd)
            r = await c.get("/STU3/Patient", params={"family": "smith", "gender": "female"})
    assert r.status_code == 503
    lines = read_log(capfd)
    rid = r.headers["x-request-id"]
    by_event = {line["event"]: line for line in lines if line.get("request_id") == rid}
    assert set(by_event) == {"sql_error", "backend_error", "request"}
    assert by_event["backend_error"]["level"] == "warning"
    assert by_event["backend_error"]["code"] == "BACKEND_UNAVAILABLE"
    assert by_event["request"]["status"] == 503
    text = json.dumps(lines).lower()
    assert "s3cret" not in text and "smith" not in text


async def test_501_is_not_logged_as_a_backend_error(
        gw: httpx.AsyncClient, capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)
    r = await gw.get("/STU3/Patient/$everything")
    assert r.status_code == 501
    assert [line["event"] for line in read_log(capfd)] == ["request"]


@pytest.mark.parametrize(("method", "url"), [
    ("search", "/STU3/Patient?family=smith&gender=female"),
    ("read", "/STU3/Patient/100001"),
    ("read", "/STU3/Patient/100001?_format=xml"),
])
async def test_unexpected_exception_is_a_500_without_data(
        gw: httpx.AsyncClient, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch, method: str, url: str) -> None:
    async def broken(self: Provider, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(PHI_MESSAGE)

    monkeypatch.setattr(Provider, method, broken)
    start_log(capfd)
    r = await gw.get(url)
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/fhir+json")
    body = r.json()
    coding = body["issue"][0]["details"]["coding"][0]
    assert body["resourceType"] == "OperationOutcome"
    assert (coding["system"], coding["code"]) == (ERROR_CODE_SYSTEM, "INTERNAL_SERVER_ERROR")
    assert body["issue"][0]["code"] == "exception"
    for text in (r.text, str(r.headers)):
        assert "SMITH" not in text.upper() and "9990000018" not in text
        assert "Traceback" not in text and "RuntimeError" not in text

    out, err = capfd.readouterr()
    err = without_audit(err)
    assert "SMITH" not in (out + err).upper() and "9990000018" not in out + err
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    rid = r.headers["x-request-id"]
    (crash,) = [x for x in lines if x["event"] == "unhandled_error"]
    assert (crash["level"], crash["error"], crash["request_id"]) == ("error", "RuntimeError", rid)
    assert "broken" in crash["stack"]  # where it happened, for the operator
    (request,) = requests_in(lines)
    assert (request["status"], request["request_id"]) == (500, rid)

    monkeypatch.undo()
    assert (await gw.get(url)).status_code == 200  # the server carries on


# --- RequestContext as a bare ASGI middleware ---------------------------------------------------


async def call(app: Any, scope: Scope) -> list[Message]:
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http_scope(headers: list[tuple[bytes, bytes]] | None = None) -> Scope:
    return {"type": "http", "method": "GET", "path": "/x", "raw_path": b"/x",
            "query_string": b"", "headers": headers or [], "scheme": "http",
            "server": ("t", 80), "client": ("c", 1), "http_version": "1.1",
            "root_path": "", "asgi": {"version": "3.0"}}


def header(message: Message, name: bytes) -> list[bytes]:
    return [v for k, v in message["headers"] if k == name]


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"x-seen", scope["state"]["request_id"].encode())]})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("bad", [b"abc\ndef", b"abc\r\nSet-Cookie: x=1", b"a b", b"",
                                 b"x" * 129, b"caf\xe9", b"a\x00b"])
async def test_invalid_request_ids_are_replaced(bad: bytes) -> None:
    sent = await call(RequestContext(ok_app), http_scope([(b"x-request-id", bad)]))
    (rid,) = header(sent[0], b"x-request-id")
    assert HEX32.fullmatch(rid.decode())
    assert header(sent[0], b"x-seen") == [rid]  # the app saw the same id in scope state


async def test_the_first_request_id_header_counts() -> None:
    sent = await call(RequestContext(ok_app), http_scope(
        [(b"x-request-id", b"first-1"), (b"x-request-id", b"second-2")]))
    assert header(sent[0], b"x-request-id") == [b"first-1"]


async def test_adapter_time_is_per_request() -> None:
    async def slow_backend(scope: Scope, receive: Receive, send: Send) -> None:
        adapter_seconds.set(adapter_seconds.get() + 0.25)
        await ok_app(scope, receive, send)

    before = adapter_seconds.get()
    await call(RequestContext(slow_backend), http_scope())
    assert adapter_seconds.get() == before


async def test_failure_after_the_response_started_is_not_answered_twice(
        capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)

    async def half(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"par", "more_body": True})
        raise RuntimeError(PHI_MESSAGE)

    sent = await call(RequestContext(half), http_scope())
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    lines = read_log(capfd)
    assert [x["event"] for x in lines] == ["unhandled_error", "request"]
    assert lines[1]["status"] == 500 and lines[1]["route"] == "unmatched"
    assert "SMITH" not in json.dumps(lines)


async def test_other_scopes_pass_through(capfd: pytest.CaptureFixture[str]) -> None:
    start_log(capfd)
    seen: list[Scope] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)

    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await RequestContext(inner)(scope, None, None)  # type: ignore[arg-type]
    assert seen == [scope] and "state" not in scope
    assert read_log(capfd) == []


# --- the exception handlers ---------------------------------------------------------------------


def request_with(fmt: Format | None = None, query: bytes = b"",
                 headers: list[tuple[bytes, bytes]] | None = None) -> Request:
    scope = http_scope(headers)
    scope["query_string"] = query
    request = Request(scope)
    if fmt is not None:
        request.state.format = fmt
    return request


async def test_other_http_errors_become_outcomes() -> None:
    r = await http_error_handler(request_with(), HTTPException(400, "malformed body"))
    assert r.status_code == 400
    body = json.loads(bytes(r.body))
    assert body["issue"][0]["details"]["coding"][0]["code"] == "HTTP_ERROR"
    assert body["issue"][0]["diagnostics"] == "malformed body"


async def test_router_errors_use_the_requested_format() -> None:
    r = await http_error_handler(request_with(query=b"_format=xml"), HTTPException(404))
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/fhir+xml")
    unacceptable = request_with(headers=[(b"accept", b"text/html")])
    r = await http_error_handler(unacceptable, HTTPException(405, headers={"Allow": "GET"}))
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    assert r.headers["content-type"].startswith("application/fhir+json")


async def test_outcome_falls_back_to_json_when_xml_cannot_carry_it() -> None:
    xml = Format("xml", "application/fhir+xml")
    r = outcome_response(request_with(xml), BadRequest("a control \x01 character"))
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/fhir+json")
    assert json.loads(bytes(r.body))["issue"][0]["details"]["coding"][0]["code"] == "BAD_REQUEST"
    fine = outcome_response(request_with(xml), BadRequest("plain"))
    assert fine.headers["content-type"].startswith("application/fhir+xml")
