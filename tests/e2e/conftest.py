"""What the end-to-end tests share: the messaging gateway on the PAS simulator (with faults
chosen per message), the sender's endpoint for asynchronous responses, and replicas — real
``careconnect-gateway serve`` processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp_server import Reply
from gateway.app import build_app
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.settings import Settings
from tests.conftest import LiveServer
from tests.redis_server import free_port
from tests.security.principals import install, user_token

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"

# --- messaging: the demo-hl7v2 gateway and the PAS simulator ----------------------------------


def settings(tmp: Path, url: str, port: int, **more: Any) -> Settings:
    """The demo-hl7v2 mappings over the PAS at ``url`` (SQL) and its MLLP ``port``."""
    options: dict[str, Any] = {"log_level": "error", **more}
    return Settings(mappings_dir=MAPPINGS, data_dir=tmp, paging_secret="t", progress=False,
                    auth_mode="insecure-demo", connection_urls={
                        "pas": url, "pas-hl7": f"mllp://127.0.0.1:{port}"}, **options)


@pytest.fixture
def pas_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh demo PAS (200 patients) in SQLite: the test's writes are its own."""
    db = tmp_path_factory.mktemp("pas") / "pas.sqlite"
    ensure_sqlite_demo(db, patients=200, progress=False)
    return f"sqlite:///{db}"


class Faults:
    """The simulator's MLLP handler, with a fault chosen for the next ADT^A28s."""

    def __init__(self, sim: PasSimulator) -> None:
        self.handler = sim._server.handler
        self.next: list[str] = []
        self.a28s = 0

    async def __call__(self, data: bytes) -> bytes | Reply | None:
        if b"ADT^A28" not in data:
            return await self.handler(data)
        self.a28s += 1
        fault = self.next.pop(0) if self.next else None
        control = er7.parse(data).control_id or ""
        if fault == "nak":
            return messages.ack(messages.Header(sending_application="PAS"),
                                messages.new_control_id(), acknowledges=control, code="AE",
                                text="rejected", error=("207", "rejected"))
        reply = await self.handler(data)  # applied
        if fault == "late":
            return Reply(reply, delay=1.5)  # past the reply timeout: AA never seen in time
        return reply


@pytest.fixture
async def pas(pas_url: str) -> AsyncIterator[tuple[PasSimulator, str, Faults]]:
    async with PasSimulator(pas_url, dialect="itk") as sim:
        faults = Faults(sim)
        sim._server.handler = faults
        yield sim, pas_url, faults


@pytest.fixture
async def gw_app(pas: tuple[PasSimulator, str, Faults], tmp_path: Path
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, str, Faults, Starlette]]:
    """The gateway over real HTTP on the faulty PAS (short MLLP timeouts): a client on its
    base URL, the PAS database URL, its faults, the app."""
    sim, url, faults = pas
    app = build_app(settings(tmp_path, url, sim.port))
    install(app, {"reader": user_token("user/*.read")})
    adapter = next(p.mapping.adapter for p in app.state.registry if p.resource_type == "Patient")
    adapter.client.reply_timeout = 1.0
    adapter.client.backoff_base = 0.01
    adapter.options = adapter.options.model_copy(update={"deadline": 2.0})
    with LiveServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
            yield c, url, faults, app


@pytest.fixture
async def gw(gw_app: tuple[httpx.AsyncClient, str, Faults, Starlette]
             ) -> tuple[httpx.AsyncClient, str, Faults]:
    """``gw_app`` without the app (a module with another gateway defines its own ``gw``)."""
    c, url, faults, _ = gw_app
    return c, url, faults


class Receiver:
    """The sender's endpoint for asynchronous responses; while not ``accepting``, 503."""

    def __init__(self) -> None:
        self.accepting = True
        self.got: list[dict[str, Any]] = []
        self.refused = 0

        async def post(request: Request) -> Response:
            if not self.accepting:
                self.refused += 1
                return Response(status_code=503)
            self.got.append(orjson.loads(await request.body()))
            return Response(status_code=204)

        self.app = Starlette(routes=[Route("/responses", post, methods=["POST"])])


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, LiveServer]]:
    rec = Receiver()
    with LiveServer(rec.app) as server:
        yield rec, server


async def wait_for(check: Callable[[], Any], seconds: float, what: str) -> None:
    """Until ``check()`` is true; fails with ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


# --- replicas: gateway processes sharing one Redis --------------------------------------------


class Gateway:
    """``careconnect-gateway serve`` in a subprocess on a free port; its output in ``log``."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "serve", "--port", str(self.port)],
                env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/_ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"gateway not ready: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def data_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data directory a module's replicas share (demo PAS, dev key, audit trails)."""
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


@contextmanager
def replicas(redis_url: str, data_dir: Path, env: dict[str, str]
             ) -> Iterator[tuple[Gateway, Gateway]]:
    """Two replicas on one data directory and one Redis (``env``: more CCG_ settings), each
    with its own audit trail; stopped on exit."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CCG_", "PROMETHEUS_"))}
    base.update({
        "CCG_DATA_DIR": str(data_dir), "CCG_DEMO_PATIENTS": "300", "CCG_PROGRESS": "false",
        "CCG_REDIS_URL": redis_url, "CCG_PAGING_SECRET": "one-secret-for-all",
        "CCG_LOG_LEVEL": "warning", **env})
    first = Gateway({**base, "CCG_AUDIT_LOG": str(data_dir / "audit-a.jsonl")},
                    data_dir / "a.log")
    second: Gateway | None = None
    try:
        first.wait_ready()  # it built the demo PAS and the dev key: the second shares them
        second = Gateway({**base, "CCG_AUDIT_LOG": str(data_dir / "audit-b.jsonl")},
                         data_dir / "b.log")
        second.wait_ready()
        yield first, second
    finally:
        first.stop()
        if second is not None:
            second.stop()
