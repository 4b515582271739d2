"""Fixtures for the authentication tests: keys, a JWKS file, an app trusting it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from tests.gateway.auth.helpers import SigningKey, ec_key, jwks, jwt_app, rsa_key


@pytest.fixture(scope="session")
def rs_key() -> SigningKey:
    return rsa_key("rsa-1")


@pytest.fixture(scope="session")
def es_key() -> SigningKey:
    return ec_key("ec-1")


@pytest.fixture(scope="session")
def ps_key() -> SigningKey:
    return rsa_key("ps-1", "PS256")


@pytest.fixture
def jwks_file(tmp_path: Path, rs_key: SigningKey, es_key: SigningKey,
              ps_key: SigningKey) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(rs_key, es_key, ps_key)))
    return path


@pytest.fixture
def serve() -> Callable[[Starlette], Any]:
    """``async with serve(app) as client``: the app's lifespan and an in-process client."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def run(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
                yield c

    return run


@pytest.fixture
async def gw(demo_sqlite_url: str, tmp_path: Path, jwks_file: Path,
             serve: Callable[[Starlette], Any]) -> AsyncIterator[httpx.AsyncClient]:
    """The demo gateway in JWT mode, trusting ``jwks_file``."""
    async with serve(jwt_app(demo_sqlite_url, tmp_path, jwks_file)) as client:
        yield client
