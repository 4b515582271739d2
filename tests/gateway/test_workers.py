"""``serve --workers N``: a worker that dies and whose replacement cannot start (here: a bad
mapping left on disk after the parent checked the good one) does not take the service down.
The surviving worker keeps serving; the failure is logged (no request data), counted in
``/metrics`` and reported by ``/_health`` (``warn``); the slot is started again with backoff
and serves once the cause is gone. Only when no worker is left does the parent stop (exit 3).

Real ``careconnect-gateway serve`` processes (uvicorn's supervisor, spawned workers), real
HTTP, a real SIGKILL.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.gateway.test_reload import (
    FEMALE_SMITHS,
    HEADERS,
    TITLE,
    Server,
    copy_mappings,
    edit,
    families,
)

BROKEN = "      family: {column: p.SURNAME, transform: shout}"
FAST_RETRY = {"CCG_WORKER_RESTART_SECONDS": "0.5", "CCG_WORKER_RESTART_MAX_SECONDS": "2"}


@pytest.fixture
def server_dir(tmp_path: Path) -> Iterator[tuple[Path, list[Server]]]:
    started: list[Server] = []
    yield copy_mappings(tmp_path, "demo-pas"), started
    for s in started:
        s.stop()


def wait(what: str, done: Callable[[], bool], server: Server, timeout: float = 90.0,
         alive: bool = True) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if alive:
            assert server.proc.poll() is None, f"the service stopped ({what}): " + \
                server.err.read_text()[-2000:]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def serving(server: Server) -> int:
    """Workers the supervisor has seen ready (every worker's /_health says)."""
    return int(httpx.get(server.url + "/_health", timeout=10).json()["workers"]["serving"])


def pids(server: Server) -> set[int]:
    return {e["pid"] for e in server.events("started")}


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    found = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_replacement_that_cannot_start_leaves_the_others_serving(
        server_dir: tuple[Path, list[Server]], tmp_path: Path) -> None:
    directory, started = server_dir
    server = Server(tmp_path, directory, "--workers", "2", **FAST_RETRY)
    started.append(server)
    wait("both workers", lambda: len(pids(server)) == 2 and serving(server) == 2, server)
    first = pids(server)

    patient = directory / "Patient.sql.yaml"
    edit(patient, TITLE, BROKEN)  # what the parent checked is no longer what a worker reads
    victim = min(first)
    os.kill(victim, signal.SIGKILL)

    # retried, with backoff, and still failing: the parent stays up meanwhile
    wait("two failed starts", lambda: len(server.events("worker_start_failed")) >= 2, server)
    failed = server.events("worker_start_failed")
    assert [f["attempts"] for f in failed[:2]] == [1, 2]
    assert all(f["level"] == "error" and f["exitcode"] == 3 and f["serving"] == 1
               and f["retry_in_seconds"] > 0 for f in failed)
    # nothing about any request or patient in them: the supervisor's own facts only
    assert {k for f in failed for k in f} <= {
        "event", "level", "timestamp", "logger", "slot", "pid", "exitcode", "attempts",
        "retry_in_seconds", "serving"}
    refused = server.events("worker_cannot_start")
    assert refused and all(r["error"] == "MappingError" for r in refused)
    assert any(str(patient) in p for p in refused[0]["problems"])

    with httpx.Client(base_url=server.url, headers=HEADERS, timeout=15) as c:
        for _ in range(8):  # fresh connections: only the survivor takes them
            r = httpx.get(server.url + "/STU3/Patient", params=FEMALE_SMITHS, headers=HEADERS,
                          timeout=15)
            assert r.status_code == 200 and families(r.json()) == ["Smith", "Smith"]
        health = c.get("/_health")
        assert health.status_code == 200, health.text
        body = health.json()
        assert body["status"] == "warn" and body["checks"] == {"workers": "warn"}
        assert body["workers"]["workers"] == 2 and body["workers"]["serving"] == 1
        assert body["workers"]["start_failures"] >= 2
    assert metric(server, "ccg_worker_start_failures_total") >= 2
    assert metric(server, 'ccg_workers{state="serving"}') == 1

    # the cause goes: the slot's next start serves, and all is well again
    edit(patient, BROKEN, TITLE)
    wait("the slot serving again", lambda: bool(server.events("worker_recovered")), server)
    assert len(pids(server) - first) == 1  # one new worker; the survivor never restarted
    wait("health pass", lambda: httpx.get(server.url + "/_health", timeout=10).json()[
        "status"] == "pass", server)
    assert metric(server, 'ccg_workers{state="serving"}') == 2
    assert metric(server, 'ccg_workers{state="restart_pending"}') == 0
    assert server.proc.poll() is None


def test_the_parent_stops_when_no_worker_can_serve(
        server_dir: tuple[Path, list[Server]], tmp_path: Path) -> None:
    """Every worker gone and none can start: the parent exits with STARTUP_FAILURE (3), so
    the service manager restarts it (and alerts) instead of a socket nobody answers."""
    directory, started = server_dir
    server = Server(tmp_path, directory, "--workers", "2", **FAST_RETRY)
    started.append(server)
    wait("both workers", lambda: len(pids(server)) == 2 and serving(server) == 2, server)
    edit(directory / "Patient.sql.yaml", TITLE, BROKEN)
    for pid in pids(server):
        os.kill(pid, signal.SIGKILL)
    wait("the parent to stop", lambda: server.proc.poll() is not None, server, alive=False)
    assert server.proc.returncode == 3
    gave_up = server.events("workers_failed_to_start")
    assert len(gave_up) == 1 and gave_up[0]["level"] == "error"
