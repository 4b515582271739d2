"""A real gateway process under attack, and a well-behaved client timing it.

The gateway runs as ``careconnect-gateway serve`` in a subprocess (uvicorn with the options
``serve`` uses, JWT authentication against a test key), on a free loopback port. Each
attacker connects from its own loopback address (127.0.0.2, 127.0.0.3, ...: Linux routes all
of 127/8 to lo), so the per-address limits see attackers and the well-behaved client
(127.0.0.1) apart, as they would see different hosts.
"""

from __future__ import annotations

import json
import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.gateway.auth.helpers import AUDIENCE, ISSUER, SigningKey, claims, jwks, rsa_key, sign

GOOD = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def executable() -> list[str]:
    # the module, not the console script: PYTHONPATH then chooses which gateway runs (the
    # README figures for the code before issue 13 were measured so)
    return [sys.executable, "-m", "gateway.cli"]


@dataclass
class Gateway:
    port: int
    proc: subprocess.Popen[bytes]
    audit: Path
    key: SigningKey
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self, client_id: str, scope: str = "user/*.read") -> str:
        return sign(self.key, claims(scope=scope, client_id=client_id,
                                     exp=int(time.time()) + 3600))

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]


@contextmanager
def gateway(tmp: Path, demo_url: str, **settings: str) -> Iterator[Gateway]:
    key = rsa_key("load-1")
    jwks_file = tmp / "jwks.json"
    jwks_file.write_text(json.dumps(jwks(key)))
    audit = tmp / "audit.jsonl"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    env.update({"CCG_PAS_URL": demo_url, "CCG_AUTH_MODE": "jwt", "CCG_JWT_ISSUER": ISSUER,
                "CCG_JWT_AUDIENCE": AUDIENCE, "CCG_JWT_JWKS_FILE": str(jwks_file),
                "CCG_AUDIT_LOG": str(audit), "CCG_PAGING_SECRET": "load",
                "CCG_LOG_LEVEL": "warning", "CCG_PROGRESS": "false"})
    env.update({f"CCG_{k.upper()}": v for k, v in settings.items()})
    err = tmp / "stderr"
    with (tmp / "stdout").open("wb") as o, err.open("wb") as e:
        proc = subprocess.Popen([*executable(), "serve", "--port", str(port), "--data-dir",
                                 str(tmp / "data")], stdout=o, stderr=e, env=env, cwd=tmp)
    gw = Gateway(port, proc, audit, key, err)
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(base_url=gw.url, timeout=5) as c:
            while True:
                assert proc.poll() is None, err.read_text()
                try:
                    if c.get("/_health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the gateway did not start in 30 s"
                time.sleep(0.1)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client(gw: Gateway, source: str, token: str | None = None, timeout: float = 30
           ) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=gw.url, headers=headers, timeout=timeout,
                        transport=httpx.HTTPTransport(local_address=source))


@dataclass
class Probe:
    """The well-behaved client: a read and a search in turn, ``rate`` a second."""

    gw: Gateway
    client_id: str = "good-client"
    rate: float = 15.0
    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    REQUESTS = (("/STU3/Patient/100001", {}),
                ("/STU3/Patient", {"family": "smith", "gender": "female"}),
                ("/STU3/Encounter", {"patient": "100002"}))

    def run(self) -> None:
        token = self.gw.token(self.client_id)
        with client(self.gw, GOOD, token) as http:
            i = 0
            while not self._stop.is_set():
                path, params = self.REQUESTS[i % len(self.REQUESTS)]
                started = time.perf_counter()
                try:
                    status = http.get(path, params=params).status_code
                except httpx.TransportError:
                    status = 0
                self.latencies.append(time.perf_counter() - started)
                self.statuses.append(status)
                i += 1
                time.sleep(max(0.0, 1 / self.rate - (time.perf_counter() - started)))

    def __enter__(self) -> Probe:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=60)

    def p99(self) -> float:
        """Nearest rank: with fewer than 100 requests, the slowest one."""
        ordered = sorted(self.latencies)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]

    def summary(self) -> str:
        return (f"{len(self.latencies)} requests, p50 {statistics.median(self.latencies):.3f} s, "
                f"p99 {self.p99():.3f} s, max {max(self.latencies):.3f} s, "
                f"not 200: {len([s for s in self.statuses if s != 200])}")


def in_threads(n: int, work: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)


class MemoryWatch:
    """The gateway's RSS, sampled every 0.2 s while it runs: the peak."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.peak = gw.rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.gw.rss_mb())

    def __enter__(self) -> MemoryWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
