"""Availability under hostile and careless clients (issue 13): one client must not take the
service down for the others. Most of these need a real server and real sockets: a slow body
or headers that never end only exist on a real connection."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.conftest import LiveServer
from tests.gateway.auth.helpers import claims, jwt_app, rsa_key, sign
from tests.gateway.auth.helpers import jwks as jwks_of
from tests.security.principals import as_, install, user_token


def _code(r: httpx.Response) -> str:
    value: str = r.json()["issue"][0]["details"]["coding"][0]["code"]
    return value


def _raw(port: int, data: bytes, wait: float = 5.0) -> bytes:
    """Send ``data`` on a new connection and read what comes back within ``wait`` seconds."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        deadline = time.monotonic() + wait
        while b"\r\n\r\n" not in out and time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            out += chunk
        return out


@pytest.fixture
def served(demo_sqlite_url: str, make_app: Callable[..., Starlette]
           ) -> Iterator[Callable[..., LiveServer]]:
    """``served(**settings)``: the demo on a real uvicorn, with test principals (as_)."""
    started: list[LiveServer] = []

    def start(**settings: Any) -> LiveServer:
        app = make_app(demo_sqlite_url, **settings)
        install(app, {"a": user_token(client_id="client-a"),
                      "b": user_token(client_id="client-b"),
                      "noscope": user_token("user/Practitioner.read", client_id="no-scope")})
        server = LiveServer(app).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


# --- small defects (item 7) -------------------------------------------------------------------


def test_phi_responses_are_not_cached(served: Callable[..., LiveServer]) -> None:
    server = served()
    with httpx.Client(base_url=server.url, headers=as_("a")) as http:
        for path in ("/STU3/Patient/100001", "/STU3/Patient?family=smith&gender=female",
                     "/STU3/Patient/999999999", "/STU3/Encounter?bad=1"):
            r = http.get(path)
            assert r.headers["cache-control"] == "no-store", path
            assert r.headers["pragma"] == "no-cache", path
        # what holds no patient data stays cacheable
        assert "cache-control" not in http.get("/STU3/metadata").headers
        assert "cache-control" not in http.get("/_health").headers


def test_a_patient_claim_that_cannot_be_a_patient_id_is_refused_at_authentication(
        demo_sqlite_url: str, tmp_path: Path) -> None:
    key = rsa_key("rsa-1")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(key)))
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as http:
        for claim in ("0100001", "1e5", "abc"):
            token = sign(key, claims(scope="patient/*.read", patient=claim))
            for path in ("/STU3/Patient/100001", "/STU3/Encounter?patient=100001",
                         "/STU3/Practitioner?family=a"):
                r = http.get(path, headers={"Authorization": f"Bearer {token}"})
                assert r.status_code == 401, (claim, path, r.text)
                assert _code(r) == "INVALID_TOKEN"
        good = sign(key, claims(scope="patient/*.read", patient="100001"))
        r = http.get("/STU3/Patient/100001", headers={"Authorization": f"Bearer {good}"})
        assert r.status_code == 200


# --- slow bodies (item 2) ---------------------------------------------------------------------


def test_search_scope_is_checked_before_the_body_is_read(
        served: Callable[..., LiveServer]) -> None:
    server = served()
    # headers announce a body that never comes: without the scope, the answer is 403 now
    request = (b"POST /STU3/Patient/_search HTTP/1.1\r\nHost: x\r\nX-Test-As: noscope\r\n"
               b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\n")
    started = time.monotonic()
    answer = _raw(server.port, request, wait=5.0)
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert time.monotonic() - started < 3.0


def test_a_client_that_leaves_mid_upload_is_not_a_server_error(
        served: Callable[..., LiveServer], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    audit = tmp_path / "audit.jsonl"
    server = served(audit_log=str(audit), log_level="info")
    body = b'{"resourceType": "Patient", "gender": "fem'
    request = (b"POST /STU3/Patient/$validate HTTP/1.1\r\nHost: x\r\nX-Test-As: a\r\n"
               b"Content-Type: application/fhir+json\r\nContent-Length: 1000\r\n\r\n" + body)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(request)
        time.sleep(0.3)
    deadline = time.monotonic() + 5
    records: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        records = [json.loads(line) for line in audit.read_text().splitlines()]
        if records:
            break
        time.sleep(0.05)
    assert len(records) == 1
    assert records[0]["outcome"]["status"] == 499
    assert records[0]["outcome"]["code"] == "CLIENT_CLOSED_REQUEST"
    time.sleep(0.5)  # the request has left every layer
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    assert not [x for x in lines if x.get("level") == "error"], lines
    assert not any("stack" in x for x in lines)
    requests = [x for x in lines if x.get("event") == "request"]
    assert [(x["route"], x["status"]) for x in requests] == [("/STU3/{type}/{op}", 499)], lines
    # (The request line's status 499 is written too, seen with `pytest -s`; under pytest's
    # default fd capture it is not captured since the branches were merged: to look into.)


def test_headers_that_never_complete_are_closed_after_the_deadline(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    from gateway.server import uvicorn_options

    app = make_app(demo_sqlite_url)
    with LiveServer(app, **uvicorn_options(1.0)) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=6) as s:
            started = time.monotonic()
            s.sendall(b"GET /STU3/Patient/100001 HTTP/1.1\r\nHost: x\r\n")
            answer = b""
            for i in range(20):  # a header byte every 0.25 s: never finished
                try:
                    s.sendall(b"X-Slow-%d: y\r\n" % i)
                except OSError:
                    break
                time.sleep(0.25)
                s.settimeout(0.01)
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    break
                answer += chunk
                if not chunk:
                    break
            elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
        assert b"REQUEST_TIMEOUT" in answer
        assert elapsed < 3.0
        # ordinary requests, kept-alive ones too, are not affected
        with httpx.Client(base_url=server.url) as http:
            for _ in range(3):
                assert http.get("/STU3/Patient/100001").status_code == 200
            time.sleep(1.2)  # idle past the header deadline between requests: still fine
            assert http.get("/STU3/Patient/100001").status_code == 200


def test_slow_headers_of_a_kept_alive_connections_next_request_meet_the_deadline(
        demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> None:
    """The deadline's timer starts only when a chunk leaves the headers incomplete (a whole
    request in one chunk costs no timer): the second request of a connection, dripped."""
    from gateway.server import uvicorn_options

    app = make_app(demo_sqlite_url)
    with LiveServer(app, **uvicorn_options(1.0)) as server, \
            socket.create_connection(("127.0.0.1", server.port), timeout=6) as s:
        s.sendall(b"GET /STU3/Patient/100001 HTTP/1.1\r\nHost: x\r\n\r\n")
        first = b""
        while b"\r\n\r\n" not in first:
            first += s.recv(65536)
        head, _, body = first.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:100]
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            body += s.recv(65536)
        started = time.monotonic()
        s.sendall(b"GET /STU3/Patient/100001 HTTP/1.1\r\n")  # then a header now and then
        answer = b""
        for i in range(20):
            with contextlib.suppress(OSError):
                s.sendall(b"X-Slow-%d: y\r\n" % i)
            time.sleep(0.25)
            s.settimeout(0.01)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            answer += chunk
            if not chunk:
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    assert elapsed < 3.0


def _drip_search(port: int, who: str, length: int = 200) -> socket.socket:
    """A POST _search whose body never arrives (headers only)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"POST /STU3/Patient/_search HTTP/1.1\r\nHost: x\r\nX-Test-As: " + who.encode()
              + b"\r\nContent-Type: application/x-www-form-urlencoded\r\n"
              + b"Content-Length: %d\r\n\r\nfam" % length)
    return s


def _answer(s: socket.socket, wait: float) -> bytes:
    s.settimeout(wait)
    out = b""
    try:
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except TimeoutError:
        pass
    return out


def test_a_body_that_does_not_arrive_in_time_is_408(served: Callable[..., LiveServer]) -> None:
    server = served(body_timeout_seconds=1)
    s = _drip_search(server.port, "a")
    started = time.monotonic()
    try:
        for _ in range(3):  # a byte now and then does not extend the deadline
            time.sleep(0.3)
            s.sendall(b"i")
        answer = _answer(s, 3.0)
    finally:
        s.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 2.5


def test_one_client_cannot_hold_every_slot(served: Callable[..., LiveServer]) -> None:
    server = served(max_in_flight_per_client=3, body_timeout_seconds=5)
    held = [_drip_search(server.port, "a") for _ in range(3)]
    try:
        time.sleep(0.3)
        with httpx.Client(base_url=server.url) as http:
            r = http.get("/STU3/Patient/100001", headers=as_("a"))
            assert r.status_code == 429 and _code(r) == "TOO_MANY_CONCURRENT_REQUESTS"
            assert r.headers["retry-after"] == "1"
            # everyone else is served at once
            r = http.get("/STU3/Patient/100001", headers=as_("b"))
            assert r.status_code == 200
    finally:
        for s in held:
            s.close()
    time.sleep(0.3)
    with httpx.Client(base_url=server.url) as http:  # the slots came back
        assert http.get("/STU3/Patient/100001", headers=as_("a")).status_code == 200


def test_invalid_tokens_are_limited_by_address_and_counted_in_the_audit(
        demo_sqlite_url: str, tmp_path: Path) -> None:
    key = rsa_key("rsa-1")
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks_of(key)))
    audit = tmp_path / "audit.jsonl"
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file, audit_log=str(audit),
                  auth_failures_per_minute=60, auth_failures_burst=10,
                  audit_denial_window_seconds=1)
    sent = 200
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as http:
        started = time.monotonic()
        statuses = [http.get("/STU3/Patient/100001",
                             headers={"Authorization": f"Bearer not-a-token-{i}"}).status_code
                    for i in range(sent)]
        elapsed = time.monotonic() - started
        assert statuses[:10] == [401] * 10
        # before the token is even looked at; the bucket refills one failure a second, so a
        # slow (loaded) machine may see that many more 401s, never more
        assert set(statuses[10:]) <= {401, 429}
        assert statuses[10:].count(401) <= int(elapsed) + 1
        assert statuses[10:].count(429) >= sent - 10 - int(elapsed) - 1
        r = http.get("/STU3/Patient/100001", headers={"Authorization": "Bearer x"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        sent += 1
        time.sleep(1.6)  # the window ends: its counts are written
        records = [json.loads(line) for line in audit.read_text().splitlines()]
    # a line or two per window and kind, not one per request; every request counted
    assert len(records) <= 8, [r["event"] for r in records]
    total = sum(r.get("count", 1) for r in records)
    assert total == sent
    summaries = [r for r in records if r["event"] == "denied_repeated"]
    assert summaries and all(r["source_ip"] == "127.0.0.1" for r in summaries)
    assert {r["outcome"]["code"] for r in records} == {"INVALID_TOKEN", "RATE_LIMITED"}


@pytest.mark.anyio
async def test_backend_calls_of_one_client_queue_behind_each_other() -> None:
    import asyncio

    from gateway.limits import ClientQueues

    queues = ClientQueues(2)
    running: dict[str, int] = {"a": 0, "b": 0}
    most: dict[str, int] = {"a": 0, "b": 0}
    order: list[str] = []

    async def call(client: str, name: str) -> None:
        async with queues.slot(client):
            running[client] += 1
            most[client] = max(most[client], running[client])
            order.append(name)
            await asyncio.sleep(0.05)
            running[client] -= 1

    await asyncio.gather(*(call("a", f"a{i}") for i in range(6)),
                         *(call("b", f"b{i}") for i in range(2)))
    assert most == {"a": 2, "b": 2}
    # b's calls did not wait behind a's queue: both started in the first round
    assert order.index("b0") < 4 and order.index("b1") < 4
    assert order[:2] == ["a0", "a1"] and queues._queues == {}

