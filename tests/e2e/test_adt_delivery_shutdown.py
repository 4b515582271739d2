"""A real ``careconnect-gateway adt-listener`` process stopped (SIGINT: its graceful stop)
while a notification's POST is in flight, the subscriber not answering within the stop's
bound (CCG_SHUTDOWN_TIMEOUT, 1 s here; the POST's own timeout is 10 s): the notification is
neither delivered nor dead (one attempt allowed: a failure counted would have made it dead),
and the restarted process sends it again with the same X-Notification-Id — at least once,
never "delivered" without a 2xx, never "dead" because of our own stop. (SIGTERM, and a
subscriber answering within the bound: tests/e2e/test_command_stop.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import sqlalchemy as sa

from gateway.adt.store import AdtStore, notifications
from tests.e2e.test_adt_feed import ListenerProcess, free_port
from tests.gateway.adt.conftest import adt_settings
from tests.gateway.adt.test_delivery import event, subscribe
from tests.gateway.adt.test_delivery_interrupted import holding_server


def state(store: AdtStore) -> tuple[str, int]:
    with store.engine.connect() as conn:
        [row] = conn.execute(sa.select(notifications.c.status, notifications.c.attempts)).all()
    return str(row.status), int(row.attempts)


def wait(check: object, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_listener_stopped_mid_send_sends_it_again_after_the_restart(
        demo_sqlite_url: str, tmp_path: Path) -> None:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'adt.sqlite'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    env.update({"CCG_DATA_DIR": str(tmp_path), "CCG_PAS_URL": demo_sqlite_url,
                "CCG_ADT_MODE": "api", "CCG_ADT_STORE_URL": url,
                "CCG_ADT_LISTEN": f"127.0.0.1:{port}",
                "CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS": "http://127.0.0.1:*",
                "CCG_SUBSCRIPTION_MAX_ATTEMPTS": "1", "CCG_LOG_LEVEL": "info",
                "CCG_SHUTDOWN_TIMEOUT": "1"})
    store = AdtStore(url)
    with holding_server() as receiver:
        subscribe(store, adt_settings(tmp_path), receiver.url)
        store.record(event("P1", 0))
        log = tmp_path / "listener.log"
        listener = ListenerProcess(env, port, log)
        listener.start()
        try:
            wait(lambda: receiver.arrived != [], "the notification was not sent")
            assert listener.proc is not None
            listener.proc.send_signal(signal.SIGINT)  # stopped, the POST unanswered
            # (how long the stop takes is not this test's subject: a generous bound)
            try:
                code = listener.proc.wait(90)
            except subprocess.TimeoutExpired:
                raise AssertionError(log.read_text()[-2000:]) from None
            assert code == 0, log.read_text()[-2000:]
            assert state(store) == ("pending", 0)  # not delivered, not dead
            assert "notification_interrupted" in log.read_text()
            receiver.release.set()  # the subscriber answers from now on
            listener.start()  # the restart
            wait(lambda: state(store) == ("delivered", 1), "not sent again after the restart")
        finally:
            listener.stop()
        assert receiver.arrived == [receiver.arrived[0]] * 2  # the same notification id
    store.close()
