"""Per-client in-flight caps and per-address limits across two gateway processes (real
``careconnect-gateway serve``, real uvicorn, different ports) sharing one real Redis.

* a client's in-flight cap holds across both: two requests held open, one on each process,
  use up a cap of 2 — a third is 429 on either process, another client is served;
* a held slot outlives its lease time while its request runs (its process renews it), and
  comes back when the request ends;
* failed authentications of one address, spread over both processes, use up one bucket;
* a process killed (SIGKILL) with requests in flight: its slots come back after the lease
  time, not never.

A request is held in flight the way a slow client holds one: ``POST _search`` with its
headers sent (authenticated, counted) and its body not yet complete.
"""

from __future__ import annotations

import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth.devkeys import mint_dev_token
from tests.e2e.conftest import Gateway, replicas
from tests.redis_server import TempRedis

CAP = 2
LEASE = 2  # seconds


@pytest.fixture(scope="module")
def pair(redis_server: TempRedis, data_dir: Path) -> Iterator[tuple[Gateway, Gateway]]:
    with replicas(redis_server.url, data_dir, {
            "CCG_MAX_IN_FLIGHT_PER_CLIENT": str(CAP),
            "CCG_CONCURRENCY_LEASE_SECONDS": str(LEASE), "CCG_BODY_TIMEOUT_SECONDS": "60",
            "CCG_AUTH_FAILURES_PER_MINUTE": "1", "CCG_AUTH_FAILURES_BURST": "3",
            "CCG_SHUTDOWN_DRAIN_SECONDS": "0"}) as two:
        yield two


def bearer(data_dir: Path, client: str) -> str:
    return "Bearer " + mint_dev_token(data_dir, "user/*.read", client_id=client)


def hold(gw: Gateway, authorization: str) -> socket.socket:
    """A POST _search whose body never completes: in flight until the socket closes."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=10)
    sock.sendall((f"POST /STU3/Patient/_search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  f"Authorization: {authorization}\r\n"
                  "Content-Type: application/x-www-form-urlencoded\r\n"
                  "Content-Length: 100\r\n\r\ngender=fe").encode())
    return sock


def get(gw: Gateway, authorization: str, source: str = "127.0.0.1") -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(local_address=source)) as c:
        return c.get(f"{gw.url}/STU3/Patient/100001", headers={"Authorization": authorization})


def error_codes(r: httpx.Response) -> list[str]:
    return [c["code"] for i in r.json()["issue"] for c in i["details"]["coding"]]


def wait_for(gw: Gateway, authorization: str, status: int, within: float) -> float:
    """Seconds until a GET answers ``status`` (asked every 0.1 s); fails after ``within``."""
    started = time.monotonic()
    while True:
        r = get(gw, authorization)
        if r.status_code == status:
            return time.monotonic() - started
        assert time.monotonic() - started < within, (r.status_code, r.text[:300])
        time.sleep(0.1)


def test_an_in_flight_cap_holds_across_both(pair: tuple[Gateway, Gateway],
                                            data_dir: Path) -> None:
    a, b = pair
    auth = bearer(data_dir, f"cap-{uuid.uuid4().hex[:8]}")
    held = [hold(a, auth), hold(b, auth)]
    try:
        # both slots taken once both requests are in (a deadline, not a speed: generous for
        # a loaded machine, where 5 s once ran out)
        wait_for(a, auth, 429, within=30)
        for gw in pair:  # each process alone would still have a free slot
            r = get(gw, auth)
            assert r.status_code == 429
            assert error_codes(r) == ["TOO_MANY_CONCURRENT_REQUESTS"]
            assert r.headers["retry-after"] == "1"
        other = get(b, bearer(data_dir, f"other-{uuid.uuid4().hex[:8]}"))
        assert other.status_code == 200  # another client is not held back
        time.sleep(LEASE * 1.5)  # longer than a lease: renewed while the requests run
        assert get(a, auth).status_code == 429
        held.pop().close()  # one request ends (its client went away): its slot comes back
        wait_for(a, auth, 200, within=30)
    finally:
        for s in held:
            s.close()


def test_failed_authentications_of_one_address_are_counted_across_both(
        pair: tuple[Gateway, Gateway], data_dir: Path) -> None:
    a, b = pair
    bad = "Bearer not-a-token"
    source = "127.0.0.2"  # its own address: 127.0.0.1 keeps its failures bucket full
    codes = [get(pair[i % 2], bad, source).status_code for i in range(5)]
    # burst 3 for the address, whichever process it asks (each alone would allow 3)
    assert codes == [401, 401, 401, 429, 429]
    refused = get(b, bearer(data_dir, f"good-{uuid.uuid4().hex[:8]}"), source)
    assert refused.status_code == 429  # refused before its credentials are even checked
    assert get(a, bearer(data_dir, f"good-{uuid.uuid4().hex[:8]}"), "127.0.0.3"
               ).status_code == 200  # another address is not


def test_a_killed_process_gives_its_slots_back_after_the_lease(
        pair: tuple[Gateway, Gateway], data_dir: Path) -> None:
    a, b = pair
    auth = bearer(data_dir, f"killed-{uuid.uuid4().hex[:8]}")
    held = [hold(b, auth), hold(b, auth)]
    try:
        wait_for(a, auth, 429, within=30)
        b.proc.send_signal(signal.SIGKILL)  # no finally, no release: only the lease ends
        b.proc.wait(timeout=10)
        assert get(a, auth).status_code == 429  # still held: the lease has not ended yet
        back_after = wait_for(a, auth, 200, within=LEASE * 3)
        assert 0 < back_after <= LEASE * 1.5
    finally:
        for s in held:
            s.close()
