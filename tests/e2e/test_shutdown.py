"""Graceful shutdown of a real ``careconnect-gateway serve`` process: a request waiting on a
slow MLLP reply when SIGTERM arrives is still answered, in full; then the process exits."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.redis_server import free_port

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"


class SimulatorThread:
    """The PAS simulator on its own event loop in a thread (the gateway is another process)."""

    def __init__(self, db_url: str) -> None:
        self.db_url = db_url
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sim: PasSimulator | None = None
        self._stop: asyncio.Event | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with PasSimulator(self.db_url) as sim:
            self.sim = sim
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> PasSimulator:
        self.thread.start()
        assert self.ready.wait(30)
        assert self.sim is not None
        return self.sim

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None and self._stop is not None
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(timeout=30)


@pytest.fixture
def simulator(tmp_path: Path) -> Iterator[tuple[PasSimulator, str]]:
    db = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(db, patients=300, progress=False)
    with SimulatorThread(f"sqlite:///{db}") as sim:
        yield sim, f"sqlite:///{db}"


def test_sigterm_finishes_the_request_waiting_on_mllp(
        simulator: tuple[PasSimulator, str], tmp_path: Path) -> None:
    sim, db_url = simulator
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCG_", "PROMETHEUS_"))}
    env.update({"CCG_MAPPINGS_DIR": str(MAPPINGS), "CCG_PAS_URL": db_url,
                "CCG_PAS_HL7_URL": f"mllp://127.0.0.1:{sim.port}",
                "CCG_AUTH_MODE": "insecure-demo", "CCG_DATA_DIR": str(tmp_path / "data"),
                "CCG_AUDIT_LOG": str(tmp_path / "audit.jsonl"), "CCG_LOG_LEVEL": "warning",
                "CCG_SHUTDOWN_DRAIN_SECONDS": "0", "CCG_SHUTDOWN_TIMEOUT": "20"})
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway.cli", "serve", "--port", str(port)],
                            env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(f"{base}/_ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        sim.faults.delay_seconds = 3.0  # within the reply timeout (10 s): slow, not failed
        sim.faults.delay_count = 1
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            slow: Future[httpx.Response] = pool.submit(
                httpx.get, f"{base}/STU3/Patient",
                params={"family": "smith", "gender": "female"}, timeout=30)
            while not sim.received:  # the query is at the PAS, its reply held back
                assert time.monotonic() - started < 20
                time.sleep(0.05)
            proc.send_signal(signal.SIGTERM)
            response = slow.result(timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["resourceType"] == "Bundle"
        assert time.monotonic() - started >= 3.0  # it really waited for the held reply
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
