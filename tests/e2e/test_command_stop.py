"""The long-running commands other than ``serve`` stopped as systemd, Docker and Kubernetes
stop them: SIGTERM (and SIGINT, Ctrl-C). Real ``careconnect-gateway adt-listener`` and
``pas-simulator`` processes, real TCP MLLP (a sender sharing no code with the listener), a
real store (SQLite; PostgreSQL where a write must be held up from outside) and real HTTP
subscribers.

What a trust expects of the ADT listener: it stops accepting, finishes the message it is
recording (stored and ACKed — or, past the bound, not ACKed, and the PAS resends it: never
an ACK for a message not stored), lets the notifications being sent finish (or leaves them
pending for after the restart), gives the delivery lease back (a replacement on another
address delivers at once), closes the store, logs one line and exits 0 within
``CCG_SHUTDOWN_TIMEOUT``; a second signal stops at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from gateway.adt.store import AdtStore, leases, messages, notifications
from tests.e2e.test_adt_feed import ListenerProcess, _default_sigint, free_port
from tests.gateway.adt.conftest import (
    CR,
    EB,
    SB,
    Receiver,
    Sender,
    adt_message,
    adt_settings,
    msa,
    receiver,
)
from tests.gateway.adt.test_delivery import event, subscribe
from tests.gateway.adt.test_delivery_interrupted import Holding, holding
from tests.pg import TempPostgres

__all__ = ["holding", "receiver"]  # fixtures, used below

PATIENT = "D0000001"


def wait(check: Callable[[], object], what: str, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


class Feed:
    """The listener's environment on one store; each ``listener()`` a process on a port of
    its own (a replacement on another address: another delivery lease holder)."""

    def __init__(self, base: dict[str, str], tmp: Path, store_url: str) -> None:
        self.base, self.tmp, self.url = base, tmp, store_url
        self.store = AdtStore(store_url)
        self.started: list[ListenerProcess] = []

    def listener(self, **env: str) -> ListenerProcess:
        port = free_port()
        e = {**self.base, "CCG_ADT_STORE_URL": self.url, "CCG_ADT_LISTEN": f"127.0.0.1:{port}",
             **env}
        proc = ListenerProcess(e, port, self.tmp / f"listener-{len(self.started)}.log")
        self.started.append(proc)
        proc.start()
        return proc

    def lease_holders(self) -> list[str]:
        with self.store.engine.connect() as conn:
            return [str(r.holder) for r in conn.execute(sa.select(leases.c.holder))]

    def stored(self, control_id: str) -> int:
        with self.store.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(messages)
                                    .where(messages.c.control_id == control_id)).scalar_one())

    def states(self) -> list[tuple[str, int]]:
        with self.store.engine.connect() as conn:
            return [(str(r.status), int(r.attempts)) for r in conn.execute(
                sa.select(notifications.c.status, notifications.c.attempts)
                .order_by(notifications.c.id))]

    def close(self) -> None:
        for proc in self.started:
            proc.stop()
        self.store.close()


def base_env(demo_sqlite_url: str, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    env.update({"CCG_DATA_DIR": str(tmp), "CCG_PAS_URL": demo_sqlite_url,
                "CCG_ADT_MODE": "api", "CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS": "http://127.0.0.1:*",
                "CCG_SUBSCRIPTION_BACKOFF_SECONDS": "0.05",
                "CCG_SUBSCRIPTION_BACKOFF_MAX_SECONDS": "0.2", "CCG_LOG_LEVEL": "info"})
    return env


@pytest.fixture
def feed(demo_sqlite_url: str, tmp_path: Path) -> Iterator[Feed]:
    f = Feed(base_env(demo_sqlite_url, tmp_path), tmp_path,
             f"sqlite:///{tmp_path / 'adt.sqlite'}")
    yield f
    f.close()


@pytest.fixture
def pg_feed(demo_sqlite_url: str, tmp_path: Path, postgres_server: TempPostgres
            ) -> Iterator[Feed]:
    url = postgres_server.create_database(f"stop_{tmp_path.name[-12:].lower().replace('-', '_')}")
    f = Feed(base_env(demo_sqlite_url, tmp_path), tmp_path, url)
    yield f
    f.close()


def signalled(proc: ListenerProcess, sig: signal.Signals, within: float) -> tuple[int, float]:
    """Send ``sig``; the exit status and how long the process took to end."""
    assert proc.proc is not None and proc.proc.poll() is None
    t0 = time.monotonic()
    proc.proc.send_signal(sig)
    try:
        code = proc.proc.wait(within)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running {within} s after {sig.name}:\n"
                             + proc.log.read_text()[-3000:]) from None
    return code, time.monotonic() - t0


def stopped_line(proc: ListenerProcess) -> dict[str, Any]:
    """The one ``adt_listener_stopped`` line (JSON); no traceback anywhere in the log."""
    text = proc.log.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [json.loads(line) for line in text.splitlines()
             if line.startswith("{") and '"adt_listener_stopped"' in line]
    assert len(lines) == 1, text[-3000:]
    return lines[0]


def ack_or_none(sender: Sender) -> bytes | None:
    """The reply to what was sent, or None when the connection closed without one."""
    try:
        while EB not in sender.buf:
            chunk = sender.sock.recv(65536)
            if not chunk:
                return None
            sender.buf += chunk
    except OSError:  # reset
        return None
    return sender.buf[sender.buf.index(SB) + 1:sender.buf.index(EB)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_idle_listener_stops_at_once_exit_0_and_gives_the_lease_back(
        feed: Feed, sig: signal.Signals) -> None:
    proc = feed.listener()  # the default bound (30 s): an idle listener does not wait it out
    wait(lambda: feed.lease_holders() != [], "the deliverer never took the lease")
    code, took = signalled(proc, sig, 20)
    assert code == 0, proc.log.read_text()[-3000:]
    assert took < 5, took
    line = stopped_line(proc)
    assert (line["level"], line["signal"], line["at_once"]) == ("info", sig.name, False)
    # given back: a replacement on another host need not wait for it to expire
    assert feed.lease_holders() == []


def test_sigterm_mid_message_no_ack_without_the_message_stored(
        feed: Feed, receiver: Receiver) -> None:
    subscribe(feed.store, adt_settings(feed.tmp), receiver.url)
    proc = feed.listener()
    msg = adt_message("STOP-MID-1", PATIENT, "A08", visit="9100001")
    sender = Sender(proc.port, timeout=10)
    sender.sock.sendall(SB + msg[:len(msg) // 2])  # the PAS is mid-send
    time.sleep(0.2)
    code, took = signalled(proc, signal.SIGTERM, 20)
    assert code == 0 and took < 5, (code, took, proc.log.read_text()[-3000:])
    with contextlib.suppress(OSError):  # already closed: the PAS will resend
        sender.sock.sendall(msg[len(msg) // 2:] + EB + CR)
    reply = ack_or_none(sender)
    sender.close()
    if reply is not None:  # an ACK: the message must be on disk
        assert msa(reply)[1] == "AA" and feed.stored("STOP-MID-1") == 1
    stopped_line(proc)
    # the PAS resends what it saw no ACK for (a resend of an ACKed one is a duplicate, AA)
    again = feed.listener()
    resend = Sender(again.port, timeout=10)
    assert msa(resend.send(msg) or b"")[1] == "AA"
    resend.close()
    assert feed.stored("STOP-MID-1") == 1
    [got] = receiver.wait_for(1)
    assert got.headers["x-adt-event"] == "A08"
    wait(lambda: feed.states() == [("delivered", 1)], "not delivered once")


def _hold_the_message_table(engine: sa.Engine) -> sa.Connection:
    """A transaction elsewhere holding the message table: the listener's insert waits."""
    conn = engine.connect()
    conn.execute(sa.text("LOCK TABLE adt_message IN EXCLUSIVE MODE"))
    return conn


def _insert_waiting(engine: sa.Engine) -> bool:
    with engine.connect() as conn:
        return bool(conn.execute(sa.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO adt_message%'"
        )).scalar_one())


def test_sigterm_while_a_message_is_being_stored_finishes_it_acks_and_delivers(
        pg_feed: Feed, receiver: Receiver) -> None:
    feed = pg_feed
    subscribe(feed.store, adt_settings(feed.tmp), receiver.url)
    proc = feed.listener(CCG_SHUTDOWN_TIMEOUT="20")
    holder = _hold_the_message_table(feed.store.engine)
    try:
        sender = Sender(proc.port, timeout=20)
        sender.sock.sendall(SB + adt_message("STOP-REC-1", PATIENT, "A08", visit="9100002")
                            + EB + CR)
        wait(lambda: _insert_waiting(feed.store.engine), "the insert never waited")
        assert proc.proc is not None
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.proc.poll() is None, "did not wait for the message being stored"
    finally:
        holder.rollback()  # the store answers again
        holder.close()
    reply = ack_or_none(sender)
    sender.close()
    assert reply is not None and msa(reply)[1] == "AA", proc.log.read_text()[-3000:]
    assert proc.proc.wait(20) == 0, proc.log.read_text()[-3000:]
    assert feed.stored("STOP-REC-1") == 1
    stopped_line(proc)
    feed.listener()  # restarted (another address): the notification is sent
    receiver.wait_for(1)
    wait(lambda: feed.states() == [("delivered", 1)], "not delivered once")


def test_a_store_that_does_not_answer_bounds_the_stop_and_nothing_acked_is_lost(
        pg_feed: Feed, receiver: Receiver) -> None:
    feed = pg_feed
    subscribe(feed.store, adt_settings(feed.tmp), receiver.url)
    proc = feed.listener(CCG_SHUTDOWN_TIMEOUT="1")
    msg = adt_message("STOP-STUCK-1", PATIENT, "A08", visit="9100003")
    holder = _hold_the_message_table(feed.store.engine)
    try:
        sender = Sender(proc.port, timeout=20)
        sender.sock.sendall(SB + msg + EB + CR)
        wait(lambda: _insert_waiting(feed.store.engine), "the insert never waited")
        # the bound (1 s) passes with the write stuck: no ACK; the thread that does not
        # return cannot hold the process past the bound and the margin (5 s): status 1
        code, took = signalled(proc, signal.SIGTERM, 30)
        reply = ack_or_none(sender)
        sender.close()
    finally:
        holder.rollback()
        holder.close()
    assert reply is None
    assert code == 1 and 5 <= took < 15, (code, took)
    assert "adt_listener_stop_timed_out" in proc.log.read_text()
    assert feed.stored("STOP-STUCK-1") == 0  # never an ACK for a message not stored
    again = feed.listener()
    resend = Sender(again.port, timeout=10)
    assert msa(resend.send(msg) or b"")[1] == "AA"
    resend.close()
    assert feed.stored("STOP-STUCK-1") == 1
    receiver.wait_for(1)


def test_sigterm_lets_a_delivery_in_flight_finish(feed: Feed, holding: Holding) -> None:
    subscribe(feed.store, adt_settings(feed.tmp), holding.url)
    feed.store.record(event(PATIENT, 1))
    proc = feed.listener(CCG_SHUTDOWN_TIMEOUT="20")
    wait(lambda: holding.arrived != [], "the notification was not sent")
    assert proc.proc is not None
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.proc.poll() is None, "did not wait for the delivery in flight"
    holding.release.set()  # the subscriber answers during the drain
    assert proc.proc.wait(20) == 0, proc.log.read_text()[-3000:]
    assert time.monotonic() - t0 < 10
    assert feed.states() == [("delivered", 1)]  # recorded before the exit: not sent again
    stopped_line(proc)
    feed.store.record(event(PATIENT, 2))  # the patient's next: sent after the first only
    feed.listener()
    wait(lambda: len(holding.arrived) == 2, "the next notification was not sent")
    assert len(set(holding.arrived)) == 2  # the first was not sent twice
    wait(lambda: feed.states() == [("delivered", 1)] * 2, "the next was not delivered")


@pytest.mark.parametrize("second", [False, True], ids=["bound", "second-signal"])
def test_a_slow_subscriber_bounds_the_stop_and_gets_it_after_the_restart(
        feed: Feed, holding: Holding, second: bool) -> None:
    subscribe(feed.store, adt_settings(feed.tmp), holding.url)
    feed.store.record(event(PATIENT, 1))
    # the bound (2 s) passes before the subscriber answers (or a second signal comes first)
    proc = feed.listener(CCG_SHUTDOWN_TIMEOUT="2" if not second else "30",
                         CCG_SUBSCRIPTION_MAX_ATTEMPTS="1")
    wait(lambda: holding.arrived != [], "the notification was not sent")
    assert proc.proc is not None
    t0 = time.monotonic()
    proc.proc.send_signal(signal.SIGTERM)
    if second:
        time.sleep(0.5)
        assert proc.proc.poll() is None
        proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(20) == 0, proc.log.read_text()[-3000:]
    took = time.monotonic() - t0
    assert (took < 2 if second else 2 <= took < 6), took
    assert stopped_line(proc)["at_once"] is second
    assert "notification_interrupted" in proc.log.read_text()
    # interrupted by our stop: not delivered, not a failed attempt (one allowed: not dead)
    assert feed.states() == [("pending", 0)]
    assert feed.lease_holders() == []
    holding.release.set()
    feed.listener()  # a replacement on another address takes the lease at once
    wait(lambda: feed.states() == [("delivered", 1)], "not sent after the restart", 15)
    assert holding.arrived == [holding.arrived[0]] * 2  # the same notification id


def test_pas_simulator_stops_on_sigterm(demo_sqlite_url: str, tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    env["CCG_DATA_DIR"] = str(tmp_path)
    log = tmp_path / "sim.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "pas-simulator", "--port", str(port),
             "--db", demo_sqlite_url.removeprefix("sqlite:///")],
            env=env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_default_sigint)
    try:
        def up() -> bool:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return True
            except OSError:
                return False

        wait(up, "the simulator did not start", 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, log.read_text()[-3000:]
        assert time.monotonic() - t0 < 5
        text = log.read_text()
        assert "pas_simulator_stopped" in text and "Traceback" not in text, text[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
