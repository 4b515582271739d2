"""Two gateway processes (real ``careconnect-gateway serve``, real uvicorn, different ports)
sharing one real Redis: what a trust runs behind a load balancer.

* a client's rate limit holds across both (without Redis each would allow the full burst);
* a token used on one is refused as a replay by the other (``jti`` replay cache);
* a paging link made by one is served by the other (stateless links, one paging secret);
* on SIGTERM a process reports not ready while it drains, still serves, then exits cleanly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from gateway.auth.devkeys import mint_dev_token
from tests.e2e.conftest import Gateway, replicas
from tests.redis_server import TempRedis, free_port

BURST = 4
DRAIN = 4


@pytest.fixture(scope="module")
def pair(redis_server: TempRedis, data_dir: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with replicas(redis_server.url, data_dir, {
            "CCG_JWT_JTI_REPLAY": "true", "CCG_RATE_LIMIT_PER_MINUTE": "1",
            "CCG_RATE_LIMIT_BURST": str(BURST), "CCG_SHUTDOWN_DRAIN_SECONDS": str(DRAIN)}) as two:
        yield two


def token(data_dir: Path, client: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + mint_dev_token(data_dir, "user/*.read",
                                                        client_id=client)}


def test_a_rate_limit_holds_across_both(pair: tuple[Gateway, Gateway], data_dir: Path) -> None:
    client = f"rate-{uuid.uuid4().hex[:8]}"
    codes = [httpx.get(f"{pair[i % 2].url}/STU3/Patient/100001",
                       headers=token(data_dir, client)).status_code for i in range(BURST + 2)]
    # One bucket for the client: the burst is spent across the two processes (each alone
    # would have let BURST through, 2 x BURST in all).
    assert codes == [200] * BURST + [429, 429]
    other = httpx.get(f"{pair[0].url}/STU3/Patient/100001",
                      headers=token(data_dir, f"other-{uuid.uuid4().hex[:8]}"))
    assert other.status_code == 200  # another client is not held back


def test_a_replayed_token_is_refused_by_the_other(pair: tuple[Gateway, Gateway],
                                                   data_dir: Path) -> None:
    headers = token(data_dir, f"replay-{uuid.uuid4().hex[:8]}")
    assert httpx.get(f"{pair[0].url}/STU3/Patient/100001", headers=headers).status_code == 200
    again = httpx.get(f"{pair[1].url}/STU3/Patient/100001", headers=headers)
    assert again.status_code == 401
    assert "invalid_token" in again.headers["www-authenticate"]
    codes = [c["code"] for i in again.json()["issue"] for c in i["details"]["coding"]]
    assert codes == ["INVALID_TOKEN"]
    assert "already been used" in again.text


def test_a_paging_link_from_one_is_served_by_the_other(pair: tuple[Gateway, Gateway],
                                                        data_dir: Path) -> None:
    client = f"pager-{uuid.uuid4().hex[:8]}"
    first = httpx.get(f"{pair[0].url}/STU3/Patient", headers=token(data_dir, client),
                      params={"gender": "female", "birthdate": "ge1900", "_count": "3"})
    assert first.status_code == 200, first.text
    links = {link["relation"]: link["url"] for link in first.json()["link"]}
    parts = urlsplit(links["next"])
    assert parts.netloc == f"127.0.0.1:{pair[0].port}"
    on_other = urlunsplit(parts._replace(netloc=f"127.0.0.1:{pair[1].port}"))
    second = httpx.get(on_other, headers=token(data_dir, client))
    assert second.status_code == 200, second.text
    ids_1 = [e["resource"]["id"] for e in first.json()["entry"]]
    ids_2 = [e["resource"]["id"] for e in second.json()["entry"]]
    assert len(ids_1) == len(ids_2) == 3
    assert not set(ids_1) & set(ids_2)
    assert int(ids_2[0]) > int(ids_1[-1])  # the page after, in id order


def test_sigterm_drains_then_stops(pair: tuple[Gateway, Gateway], data_dir: Path) -> None:
    gw = pair[1]
    signalled = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    ready = httpx.get(f"{gw.url}/_ready")
    while ready.status_code == 200 and time.monotonic() - signalled < DRAIN / 2:
        time.sleep(0.05)  # the signal is handled between two requests
        ready = httpx.get(f"{gw.url}/_ready")
    assert ready.status_code == 503
    assert ready.json()["checks"] == {"shutdown": "draining"}
    # still serving while the load balancer takes it out
    served = httpx.get(f"{gw.url}/STU3/Patient/100001",
                       headers=token(data_dir, f"drain-{uuid.uuid4().hex[:8]}"))
    assert served.status_code == 200
    # uvicorn re-raises the signal once it has shut down gracefully (the default action then
    # ends the process), so the exit status is "terminated by SIGTERM" -- after the drain.
    assert gw.proc.wait(timeout=30) in (0, -signal.SIGTERM)
    assert time.monotonic() - signalled >= DRAIN
    assert f"draining: not ready for {DRAIN} s" in gw.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{gw.url}/_health", timeout=2)


def test_workers_share_a_port_a_paging_secret_and_their_metrics(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """``serve --workers 2`` with no paging secret configured: the parent makes one for both
    workers (every next link opens, whichever worker takes it), and /metrics, from whichever
    worker answers, counts the requests of both."""
    from prometheus_client.parser import text_string_to_metric_families

    data = tmp_path_factory.mktemp("workers")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CCG_", "PROMETHEUS_"))}
    env.update({"CCG_DATA_DIR": str(data), "CCG_DEMO_PATIENTS": "300",
                "CCG_PROGRESS": "false", "CCG_AUTH_MODE": "insecure-demo",
                "CCG_AUDIT_LOG": str(data / "audit.jsonl"), "CCG_LOG_LEVEL": "warning",
                "CCG_HEADER_TIMEOUT_SECONDS": "1"})
    port = free_port()
    with (data / "serve.log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--port", str(port),
             "--workers", "2"], env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT)
    gw = Gateway.__new__(Gateway)
    gw.port, gw.url, gw.log, gw.proc = port, f"http://127.0.0.1:{port}", data / "serve.log", proc
    try:
        gw.wait_ready()
        first = httpx.get(f"{gw.url}/STU3/Patient",
                          params={"gender": "female", "birthdate": "ge1900", "_count": "2"})
        assert first.status_code == 200
        next_url = next(link["url"] for link in first.json()["link"]
                        if link["relation"] == "next")
        n = 20
        # fresh connections: the kernel spreads them over both workers
        codes = [httpx.get(next_url).status_code for _ in range(n)]
        assert codes == [200] * n
        # (which worker served what is not visible from outside; the sum is the same from
        # every scrape, and correct, only if the workers' files are added up)
        totals = []
        for _ in range(6):
            total = 0.0
            text = httpx.get(f"{gw.url}/metrics").text
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if (s.name == "ccg_http_requests_total"
                            and s.labels.get("interaction") == "search"):
                        total += s.value
            totals.append(total)
        assert totals == [n + 1] * 6
        # the header deadline (gateway/server.py) holds in the workers too: their protocol
        # is built in each worker, by name (a run-time class cannot be pickled to them)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /_health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # never finished
            started = time.monotonic()
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
        assert time.monotonic() - started < 8
    finally:
        gw.stop()
