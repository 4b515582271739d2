"""One demo app for the terminology tests (terminology touches no database: SQLite only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from gateway.app import build_app
from tests.conftest import LIMITS_OFF, gateway_settings

REPO = Path(__file__).resolve().parents[3]
SHARED = REPO.parent / "shared" / "careconnect"
CODEMAPS = REPO / "mappings" / "codemaps"


@pytest.fixture
def app(demo_sqlite_url: str, tmp_path: Path) -> Starlette:
    return build_app(gateway_settings(demo_sqlite_url, tmp_path, **LIMITS_OFF,
                                      audit_log=str(tmp_path / "audit.jsonl")))


@pytest.fixture
async def fhir(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway/STU3") as c:
            yield c


@pytest.fixture
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the Care Connect reference data is missing: {SHARED}")
    return SHARED
