"""End to end: a PAS-side sender → the ``adt-listener`` process (real TCP) → a Subscription
created through the FHIR API (real uvicorn) → a real HTTP receiver; the listener is killed
(SIGKILL) mid-stream and restarted. Nothing is lost, nothing arrives out of order per patient,
and a notification seen twice (the at-least-once contract) has the same id and content.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.app import build_app
from gateway.auth.devkeys import mint_dev_token
from tests.conftest import LiveServer, gateway_settings
from tests.gateway.adt.conftest import Receiver, Sender, adt_message, msa, receiver

__all__ = ["receiver"]  # the fixture, used below

PATIENTS = [f"D000000{i}" for i in range(1, 7)]
MESSAGES = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class ListenerProcess:
    def __init__(self, env: dict[str, str], port: int, log: Path) -> None:
        self.env, self.port, self.log = env, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway.cli", "adt-listener"],
                env=self.env, stdout=out, stderr=subprocess.STDOUT,
                # SIGINT as a terminal would send it: a runner started in the background
                # (CI) passes it on ignored, and the listener would never see the stop
                preexec_fn=_default_sigint)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("the listener did not start")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def visit(p: int, n: int) -> str:
    return f"9{p}{n:05d}"


class PasSender(threading.Thread):
    """Sends MESSAGES ADT^A08s round-robin over the patients, each until it is ACKed: a
    connection lost before the ACK means reconnect and resend the same message (same MSH-10),
    as a PAS does."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acked = 0
        self.reconnects = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            sender: Sender | None = None
            for n in range(MESSAGES):
                p = n % len(PATIENTS)
                msg = adt_message(f"E2E-{n:05d}", PATIENTS[p], "A08", visit=visit(p, n))
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if sender is None:
                            sender = Sender(self.port, timeout=5)
                        reply = sender.send(msg)
                        assert reply is not None and msa(reply)[1] == "AA", reply
                        break
                    except (OSError, ConnectionError):
                        if sender is not None:
                            sender.close()
                            sender = None
                        self.reconnects += 1
                        if time.monotonic() > deadline:
                            raise
                        time.sleep(0.05)
                self.acked = n + 1
            if sender is not None:
                sender.close()
        except BaseException as exc:
            self.error = exc


@pytest.fixture
def env(demo_sqlite_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("CCG_")}
    e.update({
        "CCG_DATA_DIR": str(tmp_path),
        "CCG_PAS_URL": demo_sqlite_url,
        "CCG_ADT_MODE": "api",
        "CCG_ADT_STORE_URL": f"sqlite:///{tmp_path / 'adt.sqlite'}",
        "CCG_ADT_LISTEN": f"127.0.0.1:{free_port()}",
        "CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS": "http://127.0.0.1:*",
        "CCG_SUBSCRIPTION_BACKOFF_SECONDS": "0.05",
        "CCG_SUBSCRIPTION_BACKOFF_MAX_SECONDS": "0.5",
        "CCG_LOG_LEVEL": "warning",
    })
    yield e


def test_kill_and_restart_mid_stream(env: dict[str, str], receiver: Receiver, tmp_path: Path,
                                     demo_sqlite_url: str, monkeypatch: pytest.MonkeyPatch
                                     ) -> None:
    for k in ("CCG_ADT_MODE", "CCG_ADT_STORE_URL", "CCG_SUBSCRIPTION_ALLOWED_ENDPOINTS"):
        monkeypatch.setenv(k, env[k])
    port = int(env["CCG_ADT_LISTEN"].rpartition(":")[2])
    # The Subscriptions are made through the gateway's FHIR API, which shares the store.
    app = build_app(gateway_settings(demo_sqlite_url, tmp_path, auth_mode=""))
    headers = {"Authorization": f"Bearer {mint_dev_token(tmp_path, 'user/Subscription.c')}",
               "Content-Type": "application/fhir+json"}
    with LiveServer(app) as gw:
        ids = []
        for criteria in ("Patient", f"Encounter?patient={PATIENTS[0]}"):
            r = httpx.post(f"{gw.url}/STU3/Subscription", headers=headers, content=json.dumps({
                "resourceType": "Subscription", "status": "requested", "reason": "e2e",
                "criteria": criteria, "channel": {"type": "rest-hook", "endpoint": receiver.url,
                                                  "payload": "application/fhir+json"}}))
            assert r.status_code == 201, r.text
            # create-only scope: the body is an OperationOutcome, the Location names it
            ids.append(r.headers["location"].rpartition("/")[2])
    all_sub, enc_sub = ids
    listener = ListenerProcess(env, port, tmp_path / "listener.log")
    listener.start()
    sender = PasSender(port)
    try:
        sender.start()
        kills = 0
        for threshold in (MESSAGES // 3, 2 * MESSAGES // 3):
            deadline = time.monotonic() + 60
            while sender.acked < threshold and sender.is_alive():
                assert time.monotonic() < deadline, "the sender stalled"
                time.sleep(0.01)
            listener.kill()  # mid-stream: messages in flight, notifications being delivered
            kills += 1
            time.sleep(0.2)
            listener.start()
        sender.join(120)
        assert sender.error is None, repr(sender.error)
        assert sender.acked == MESSAGES
        expected = MESSAGES + MESSAGES // len(PATIENTS)
        deadline = time.monotonic() + 60
        while len({g.notification_id for g in receiver.got}) < expected:
            assert time.monotonic() < deadline, (len(receiver.got), expected)
            time.sleep(0.05)
    finally:
        listener.stop()

    got = list(receiver.got)
    by_id: dict[str, list[str]] = defaultdict(list)
    per_patient: dict[tuple[str, str], list[int]] = defaultdict(list)
    for g in got:
        assert g.body is not None and g.body["id"] == g.notification_id
        by_id[g.notification_id].append(json.dumps(g.body["entry"], sort_keys=True))
        sub_id = g.headers["x-subscription-id"]
        enc = next(e["resource"] for e in g.body["entry"]
                   if e["resource"]["resourceType"] == "Encounter")
        patient = enc["subject"]["reference"]
        per_patient[(sub_id, patient)].append(int(enc["id"][2:]))  # the sender's n
    # 0 lost: every message the PAS sent is notified, to each matching Subscription
    sent = {n for n in range(MESSAGES)}
    assert {n for (s, _), ns in per_patient.items() if s == all_sub for n in ns} == sent
    assert {n for (s, _), ns in per_patient.items() if s == enc_sub for n in ns} == {
        n for n in range(MESSAGES) if n % len(PATIENTS) == 0}
    # 0 out of order per patient (a duplicate repeats the one before, never an older one)
    for ns in per_patient.values():
        assert ns == sorted(ns)
    # duplicates only as the same notification: same id, same content
    for bodies in by_id.values():
        assert len(set(bodies)) == 1
    assert kills == 2
    print(f"\nsent {MESSAGES}, reconnect attempts {sender.reconnects}, notifications "
          f"{len(got)} ({len(got) - len(by_id)} duplicates)")
