"""Availability under hostile and careless clients (issue 13): one client must not take the
service down for the others. Most of these need a real server and real sockets: a slow body
or headers that never end only exist on a real connection."""

from __future__ import annotations

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
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    assert not [x for x in lines if x.get("level") == "error"], lines
    assert not any("stack" in x for x in lines)
    assert [x["status"] for x in lines if x.get("event") == "request"] == [499]
