"""Shared pytest fixtures for the careconnect-gateway test suite."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from gateway.settings import Settings
from tests.pg import TempPostgres, require_pg_bin
from tests.redis_server import TempRedis, require_redis_server

# ---------------------------------------------------------------------------
# PostgreSQL server (real server started by the test suite; see tests/pg.py)
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[TempPostgres]:
    """A throw-away PostgreSQL server for the whole test session.

    Skips when no PostgreSQL server binaries are installed, except when
    ``CI=true``: then it fails, so CI can never silently skip PostgreSQL tests.
    Use ``postgres_server.create_database(name)`` to get a fresh database URL.
    """
    bindir = require_pg_bin()
    with TempPostgres(bindir) as server:
        yield server


# --------------------------- end PostgreSQL section ------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[TempRedis]:
    """A throw-away Redis server for the session (skipped locally without redis-server,
    a failure under CI=true, like PostgreSQL)."""
    binary = require_redis_server()
    with TempRedis(binary) as server:
        yield server


# ---------------------------------------------------------------------------
# Demo PAS databases and gateway apps (shared by the search, mapping and HTTP tests)
# ---------------------------------------------------------------------------

DEMO_PATIENTS = 1500


@pytest.fixture(scope="session")
def demo_sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A demo PAS in SQLite with DEMO_PATIENTS patients, built once per session."""
    from gateway.demo_pas import ensure_sqlite_demo

    path = tmp_path_factory.mktemp("demo") / "demo-pas.sqlite"
    ensure_sqlite_demo(path, patients=DEMO_PATIENTS, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def demo_pg_url(postgres_server: TempPostgres) -> str:
    """The same demo PAS rows in a real PostgreSQL database."""
    from gateway.demo_pas import build_database

    url = postgres_server.create_database("demo_pas")
    build_database(url, patients=DEMO_PATIENTS)
    return url


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def demo_url(request: pytest.FixtureRequest) -> str:
    """Parametrised over both databases: tests using it run on SQLite and PostgreSQL."""
    name = "demo_sqlite_url" if request.param == "sqlite" else "demo_pg_url"
    url: str = request.getfixturevalue(name)
    return url


LIMITS_OFF: Mapping[str, Any] = MappingProxyType({
    "rate_limit_per_minute": 0, "source_rate_limit_per_minute": 0})
"""Settings that turn the request-rate limits off (per client, per source address), for a
test whose one client sends more than they allow and is not about them (they are tested in
tests/gateway/test_limits.py). The in-flight caps stay: one request at a time never meets
them."""


def gateway_settings(url: str, tmp: Path, **overrides: object) -> Settings:
    """Settings serving the demo mappings from the database at ``url``."""
    values: dict[str, object] = {
        "data_dir": tmp,
        "connection_urls": {"pas": url},
        "paging_secret": "test-secret",
        "log_level": "warning",
        "progress": False,
        "auth_mode": "insecure-demo",  # auth itself is tested in tests/gateway/auth
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def make_app(tmp_path: Path) -> Callable[..., Starlette]:
    from gateway.app import build_app

    def make(url: str, **overrides: object) -> Starlette:
        return build_app(gateway_settings(url, tmp_path, **overrides))

    return make


@pytest.fixture
async def client(
    demo_url: str, make_app: Callable[..., Starlette]
) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process HTTP client on the demo app (both databases)."""
    app = make_app(demo_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app: Starlette, **options: Any) -> None:
        """``options``: more uvicorn.Config options (``serve``'s: gateway.server)."""
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, lifespan="on", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def live_server(demo_sqlite_url: str, make_app: Callable[..., Starlette]) -> Iterator[LiveServer]:
    """The gateway on the SQLite demo behind a real uvicorn (end-to-end HTTP tests)."""
    with LiveServer(make_app(demo_sqlite_url)) as server:
        yield server


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run with anyio's pytest plugin (``pytest.mark.anyio``) on asyncio."""
    return "asyncio"


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Apps configure structlog globally (level, stream): undo it so tests stay independent."""
    yield
    import structlog

    structlog.reset_defaults()
