"""Application-restricted API keys: hashed in the keys file, compared in constant time."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from starlette.applications import Starlette

from gateway.auth.apikeys import sha256_hex
from gateway.auth.config import load_api_keys
from gateway.auth.errors import AuthConfigError
from tests.conftest import gateway_settings
from tests.gateway.auth.helpers import code

pytestmark = pytest.mark.anyio

KEY = "k3y-Of-ward-dashboard-8f1c2d0e9a7b6c5d4e3f2a1b0c9d8e7f"
OTHER = "k3y-Of-reporting-0123456789abcdef0123456789abcdef"


def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys.yaml"
    path.write_text(yaml.safe_dump({"keys": [
        {"client_id": "ward-dashboard", "sha256": sha256_hex(KEY),
         "scopes": "system/Patient.read system/Encounter.r", "role": "dashboard"},
        {"client_id": "reporting", "sha256": sha256_hex(OTHER), "scopes": "system/*.s"},
    ]}))
    return path


@pytest.fixture
async def gw(demo_sqlite_url: str, tmp_path: Path,
             serve: Callable[[Starlette], Any]) -> AsyncIterator[httpx.AsyncClient]:
    from gateway.app import build_app

    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, auth_mode="api-key",
                                     api_keys_file=str(keys_file(tmp_path)),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    async with serve(app) as client:
        yield client


async def test_the_right_key(gw: httpx.AsyncClient) -> None:
    for header in ("X-API-Key", "apikey"):
        r = await gw.get("/STU3/Patient/100001", headers={header: KEY})
        assert r.status_code == 200, r.text
    r = await gw.get("/STU3/Encounter/1", headers={"X-API-Key": KEY})
    assert r.status_code == 200
    r = await gw.get("/STU3/Encounter", params={"_id": "1"}, headers={"X-API-Key": KEY})
    assert r.status_code == 403 and code(r) == "ACCESS_DENIED"  # .r only: no search
    assert (await gw.get("/STU3/Location/1", headers={"X-API-Key": KEY})).status_code == 403
    r = await gw.get("/STU3/Location", params={"_id": "1"}, headers={"X-API-Key": OTHER})
    assert r.status_code == 200
    assert (await gw.get("/STU3/Location/1", headers={"X-API-Key": OTHER})).status_code == 403


@pytest.mark.parametrize("value", [KEY + "x", KEY[:-1], KEY.upper(), sha256_hex(KEY), "x" * 600,
                                   " ", "Bearer " + KEY])
async def test_a_wrong_key(gw: httpx.AsyncClient, value: str) -> None:
    r = await gw.get("/STU3/Patient/100001", headers={"X-API-Key": value})
    assert r.status_code == 401
    assert code(r) == "INVALID_API_KEY"
    assert r.headers["www-authenticate"].startswith("APIKey ")
    assert value.strip() not in r.text or not value.strip()


async def test_a_missing_key(gw: httpx.AsyncClient) -> None:
    r = await gw.get("/STU3/Patient/100001")
    assert r.status_code == 401 and code(r) == "AUTHENTICATION_REQUIRED"
    assert r.headers["www-authenticate"] == 'APIKey realm="careconnect-gateway", header="X-API-Key"'
    bearer = await gw.get("/STU3/Patient/100001", headers={"Authorization": f"Bearer {KEY}"})
    assert bearer.status_code == 401  # a key is not a bearer token
    assert (await gw.get("/STU3/metadata")).status_code == 200


async def test_two_keys_are_refused(gw: httpx.AsyncClient) -> None:
    r = await gw.get("/STU3/Patient/100001", headers=[("X-API-Key", KEY), ("apikey", OTHER)])
    assert r.status_code == 401 and code(r) == "INVALID_API_KEY"


@pytest.mark.parametrize(("content", "message"), [
    ("keys: []", "no keys"),
    ("nothing: 1", "top-level 'keys:'"),
    ("keys: [{client_id: a, sha256: abc, scopes: system/*.read}]", "64-hex-digit"),
    ("keys: [{sha256: " + "a" * 64 + ", scopes: system/*.read}]", "client_id"),
    ("keys: [{client_id: a, sha256: " + "a" * 64 + "}]", "scopes"),
    ("keys: [{client_id: a, sha256: " + "a" * 64 + ", scopes: 'system/*.read openid'}]",
     "not a valid SMART"),
    ("keys: [{client_id: a, sha256: " + "a" * 64 + ", scopes: patient/*.read}]",
     "patient launch context"),
    ("keys: [{client_id: a, sha256: " + "a" * 64 + ", scopes: system/*.read},"
     " {client_id: b, sha256: " + "a" * 64 + ", scopes: system/*.read}]", "duplicate"),
    ("keys: [", "not valid YAML"),
])
def test_bad_keys_files_refuse_to_start(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        load_api_keys(str(path))
    with pytest.raises(AuthConfigError, match="CCG_API_KEYS_FILE must be set"):
        load_api_keys("")


def test_api_key_new_prints_a_key_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    from gateway import cli

    assert cli.main(["api-key", "new", "--client-id", "pas-sync",
                     "--scope", "system/*.read"]) == 0
    out, err = capsys.readouterr()
    key = err.splitlines()[1]
    [entry] = yaml.safe_load(out)
    assert entry == {"client_id": "pas-sync", "sha256": sha256_hex(key), "scopes": "system/*.read"}
    assert len(key) >= 43 and key not in out
