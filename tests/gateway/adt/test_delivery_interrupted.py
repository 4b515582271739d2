"""A notification whose delivery is interrupted while the POST is in flight.

* Our own shutdown (the deliverer stopped, its task cancelled) mid-send: whether the
  subscriber has it is unknown, so it is neither delivered nor a failed attempt (with one
  attempt left, a failure would make it dead): still pending, attempts unchanged, sent again
  (same X-Notification-Id) by the next deliverer on the store — at least once.
* The Subscription deleted (its pending notifications cancelled) mid-send: the notification
  stays cancelled whatever the subscriber answers — not dead, not delivered — and the
  Subscription is not turned to error by it.

A real HTTP receiver that holds each request until the test lets it answer; real SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from gateway.adt.delivery import Deliverer
from gateway.adt.store import AdtStore
from tests.gateway.adt.conftest import Receiver, adt_settings
from tests.gateway.adt.test_delivery import event, subscribe

pytestmark = pytest.mark.anyio


@dataclass
class Holding:
    """Receives a notification, then answers ``status`` only once ``release`` is set."""

    port: int = 0
    status: int = 200
    arrived: list[str] = field(default_factory=list)
    answered: list[tuple[str, int]] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@pytest.fixture
def holding() -> Iterator[Holding]:
    with holding_server() as state:
        yield state


@contextlib.contextmanager
def holding_server() -> Iterator[Holding]:
    state = Holding()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            nid = self.headers.get("x-notification-id", "")
            state.arrived.append(nid)
            state.release.wait(30)
            try:
                self.send_response(state.status)
                self.send_header("content-length", "0")
                self.end_headers()
                state.answered.append((nid, state.status))
            except OSError:  # the gateway hung up first
                pass

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.release.set()
    server.shutdown()
    server.server_close()


async def wait_until(check: Any, what: str, seconds: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not check():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.02)


def row(store: AdtStore) -> dict[str, Any]:
    import sqlalchemy as sa

    from gateway.adt.store import notifications

    with store.engine.connect() as conn:
        [found] = conn.execute(sa.select(notifications)).mappings().all()
    return dict(found)


async def test_a_shutdown_mid_send_leaves_it_pending_and_it_is_sent_again(
        tmp_path: Path, store: AdtStore, holding: Holding) -> None:
    settings = adt_settings(tmp_path, max_attempts=2)
    subscribe(store, settings, holding.url)
    store.record(event("P1", 0))
    store.failed(row(store)["id"], row(store)["subscription_id"], "HTTP 503", 0.0)
    assert row(store)["attempts"] == 1  # one attempt left: a failure now would be final

    first = Deliverer(store, settings, holder="me")
    await first.start()
    await wait_until(lambda: holding.arrived != [], "the notification was not sent")
    await first.stop()  # shutdown while the subscriber has not answered
    after = row(store)
    assert (after["status"], after["attempts"], after["last_error"]) == (
        "pending", 1, "HTTP 503")  # neither delivered nor dead: not known
    sub = store.get_subscription(after["subscription_id"])
    assert sub is not None and sub["status"] == "active"

    holding.release.set()  # the subscriber answers from now on
    again = Deliverer(store, settings, holder="me")  # the restarted process
    await again.start()
    try:
        await wait_until(lambda: row(store)["status"] == "delivered", "not sent again")
    finally:
        await again.stop()
    assert holding.arrived == [holding.arrived[0]] * 2  # the same X-Notification-Id twice
    assert row(store)["attempts"] == 2


async def test_a_notification_cancelled_mid_send_stays_cancelled(
        tmp_path: Path, store: AdtStore, holding: Holding) -> None:
    settings = adt_settings(tmp_path, max_attempts=1)
    sid = subscribe(store, settings, holding.url)
    other = subscribe(store, settings, holding.url)
    store.record(event("P1", 0))  # one notification for each Subscription
    holding.status = 503
    d = Deliverer(store, settings)
    try:
        attempts = asyncio.create_task(d.run_once())  # one round: both sent at once
        await wait_until(lambda: len(holding.arrived) == 2, "not sent")
        assert store.delete_subscription(sid)  # its pending notification is cancelled
        holding.release.set()  # ... and the receiver fails both: the last attempt
        assert await attempts == 2  # both outcomes recorded
    finally:
        await d.stop()
    assert store.outbox_counts() == {"cancelled": 1, "dead": 1}  # the other's: really dead
    [dead] = store.dead_letters()
    assert dead["subscription_id"] == other
    sub = store.get_subscription(other)
    assert sub is not None and sub["status"] == "error"


async def test_a_failing_record_does_not_orphan_a_send_in_flight(
        tmp_path: Path, store: AdtStore, holding: Holding, receiver: Receiver) -> None:
    """One notification's outcome cannot be recorded (the store refuses that row) while
    another's POST is in flight: the round waits for the one in flight instead of starting
    the next round beside it (which sent it a second time, concurrently, and left it running
    unawaited when the deliverer stopped, its client closed under it)."""
    settings = adt_settings(tmp_path, max_attempts=1)
    refused = subscribe(store, settings, receiver.url)
    held = subscribe(store, settings, holding.url)
    with store.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER refuse BEFORE UPDATE ON subscription_notification WHEN "
            f"OLD.subscription_id = '{refused}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
    store.record(event("P1", 0))
    d = Deliverer(store, settings)
    await d.start()
    try:
        await wait_until(lambda: receiver.got != [] and holding.arrived != [], "not sent")
        await asyncio.sleep(1.5)  # rounds every 0.5 s while idle
        assert len(holding.arrived) == 1  # not sent again while the first is in flight
    finally:
        await d.stop()  # shutdown with it still in flight
    with store.engine.connect() as conn:
        found = conn.exec_driver_sql(
            "SELECT status, attempts FROM subscription_notification WHERE subscription_id = ?",
            (held,)).all()
    assert [tuple(r) for r in found] == [("pending", 0)]  # not dead: the stop was ours


async def test_a_graceful_stop_lets_the_send_in_flight_finish_and_gives_the_lease_back(
        tmp_path: Path, store: AdtStore, holding: Holding) -> None:
    """stop(grace): no attempt is started any more, the one in flight may finish (its 2xx
    recorded, not sent again), and the lease is given back — another holder (a replacement
    process on another host) takes it at once instead of after lease_ttl."""
    settings = adt_settings(tmp_path)
    subscribe(store, settings, holding.url)
    store.record(event("P1", 0))
    d = Deliverer(store, settings, holder="old-pod")
    await d.start()
    await wait_until(lambda: holding.arrived != [], "not sent")
    stopping = asyncio.ensure_future(d.stop(grace=10))
    await asyncio.sleep(0.3)
    assert not stopping.done()  # waiting for the subscriber
    store.record(event("P1", 1))  # arrives during the stop: not started now
    d.wake()
    holding.release.set()
    await asyncio.wait_for(stopping, 5)
    assert [(r["status"], r["attempts"]) for r in rows(store)] == [
        ("delivered", 1), ("pending", 0)]
    assert len(holding.arrived) == 1
    assert store.acquire_lease("delivery", "new-pod", 60)  # given back, not left to expire


async def test_a_graceful_stop_past_its_grace_interrupts_the_send(
        tmp_path: Path, store: AdtStore, holding: Holding) -> None:
    settings = adt_settings(tmp_path, max_attempts=1)
    subscribe(store, settings, holding.url)
    store.record(event("P1", 0))
    d = Deliverer(store, settings, holder="old-pod")
    await d.start()
    await wait_until(lambda: holding.arrived != [], "not sent")
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await d.stop(grace=0.3)
    assert 0.3 <= loop.time() - t0 < 3
    assert (row(store)["status"], row(store)["attempts"]) == ("pending", 0)  # not dead
    assert store.acquire_lease("delivery", "new-pod", 60)


def rows(store: AdtStore) -> list[dict[str, Any]]:
    import sqlalchemy as sa

    from gateway.adt.store import notifications

    with store.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            sa.select(notifications).order_by(notifications.c.seq)).mappings()]
