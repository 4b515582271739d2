"""The CapabilityStatement advertises how to authenticate, and stays public."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.auth.capability import OAUTH_URIS, SERVICE_SYSTEM
from tests.conftest import LiveServer, gateway_settings
from tests.gateway.auth.helpers import jwt_app

pytestmark = pytest.mark.anyio
TOKEN_URL = "https://auth.example-trust.nhs.uk/realms/fhir/protocol/openid-connect/token"
AUTHORIZE_URL = "https://auth.example-trust.nhs.uk/realms/fhir/protocol/openid-connect/auth"


async def metadata(app: Starlette, serve: Callable[[Starlette], Any]) -> dict[str, Any]:
    async with serve(app) as c:
        r = await c.get("/STU3/metadata")  # no token
        assert r.status_code == 200
        xml = await c.get("/STU3/metadata", params={"_format": "xml"})
        assert xml.status_code == 200
        if "security" in r.json()["rest"][0]:
            assert "<security>" in xml.text
        body: dict[str, Any] = r.json()
        return body


async def test_smart_extension_when_configured(demo_sqlite_url: str, tmp_path: Path,
                                               jwks_file: Path,
                                               serve: Callable[[Starlette], Any]) -> None:
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file, oauth_token_url=TOKEN_URL,
                  oauth_authorize_url=AUTHORIZE_URL)
    security = (await metadata(app, serve))["rest"][0]["security"]
    [service] = security["service"]
    assert service["coding"][0]["system"] == SERVICE_SYSTEM
    assert service["coding"][0]["code"] == "SMART-on-FHIR"
    [ext] = security["extension"]
    assert ext["url"] == OAUTH_URIS
    assert {e["url"]: e["valueUri"] for e in ext["extension"]} == {
        "token": TOKEN_URL, "authorize": AUTHORIZE_URL}


async def test_no_oauth_uris_unless_configured(demo_sqlite_url: str, tmp_path: Path,
                                               jwks_file: Path,
                                               serve: Callable[[Starlette], Any]) -> None:
    security = (await metadata(jwt_app(demo_sqlite_url, tmp_path, jwks_file), serve)
                )["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert "extension" not in security
    only_token = jwt_app(demo_sqlite_url, tmp_path, jwks_file, oauth_token_url=TOKEN_URL)
    [ext] = (await metadata(only_token, serve))["rest"][0]["security"]["extension"]
    assert [e["url"] for e in ext["extension"]] == ["token"]


async def test_insecure_demo_claims_no_security(demo_sqlite_url: str, tmp_path: Path,
                                                serve: Callable[[Starlette], Any]) -> None:
    from gateway.app import build_app

    app = build_app(gateway_settings(demo_sqlite_url, tmp_path,
                                     audit_log=str(tmp_path / "audit.jsonl")))
    assert "security" not in (await metadata(app, serve))["rest"][0]


def test_insecure_demo_warns_loudly_at_startup(demo_sqlite_url: str, tmp_path: Path,
                                              capfd: pytest.CaptureFixture[str]) -> None:
    from gateway.app import build_app

    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, log_level="info",
                                     audit_log=str(tmp_path / "audit.jsonl")))
    capfd.readouterr()
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as c:
        assert c.get("/STU3/Patient/100001").status_code == 200  # no credentials at all
        assert c.get("/STU3/Patient/100002").status_code == 200
    out = capfd.readouterr().out
    assert out.count('"event":"insecure_demo_auth"') == 1
    assert '"level":"warning"' in out and "AUTHENTICATION IS OFF" in out
