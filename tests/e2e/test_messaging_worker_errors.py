"""An unexpected error in the asynchronous ``$process-message`` worker (not a transient error
the code foresaw: here the message store refusing one message's update) is retried on the
worker's bound without waiting for a restart, the messages behind it are processed
meanwhile, and when it persists the message is given up on like a transient failure: a dead
letter, a final transient-error MESSAGE_RETRIES_EXHAUSTED to the response-url, never "failed"
for a write the PAS acknowledged. Logged without message content, counted in /metrics.

Real uvicorn, real MLLP to the PAS simulator, a real HTTP receiver, the real SQLite store
(the fault is a trigger in its file, installed through a second connection, as a broken or
foreign writer would behave).
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.messaging.store import dead_letters
from gateway.retry import Backoff
from tests.conftest import LiveServer
from tests.e2e.test_messaging import Receiver, message, new_patient, response_of, rows
from tests.e2e.test_messaging_retries import gateway, wait_for

pytestmark = pytest.mark.anyio

POISON = """CREATE TRIGGER poison BEFORE UPDATE OF state ON message
WHEN NEW.id = '{mid}' AND NEW.state = 'done' BEGIN SELECT RAISE(ABORT, 'refused'); END"""
"""The store refuses to record this message's answer (after the PAS applied it)."""


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, LiveServer]]:
    rec = Receiver()
    rec.accepting = True
    with LiveServer(rec.app) as server:
        yield rec, server


@pytest.fixture
def pas_db(tmp_path_factory: pytest.TempPathFactory) -> str:
    db = tmp_path_factory.mktemp("workerpas") / "pas.sqlite"
    ensure_sqlite_demo(db, patients=200, progress=False)
    return f"sqlite:///{db}"


def sql(store_path: Path, statement: str) -> None:
    with sqlite3.connect(store_path) as db:
        db.execute(statement)


def worker_errors(base: str, outcome: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    found = re.search(rf'^ccg_message_worker_errors_total{{outcome="{outcome}"}} ([0-9.e+]+)$',
                      text, re.M)
    return float(found.group(1)) if found else 0.0


def by_identifier(got: list[dict[str, object]], mid: str) -> list[dict[str, object]]:
    return [b for b in got if b["entry"][0]["resource"]["response"]["identifier"] == mid]  # type: ignore[index]


async def test_an_unexpected_error_is_retried_without_a_restart_and_stalls_nothing(
        pas_db: str, receiver: tuple[Receiver, LiveServer], tmp_path: Path,
        capfd: pytest.CaptureFixture[str]) -> None:
    rec, rserver = receiver
    params = {"async": "true", "response-url": f"{rserver.url}/responses"}
    async with PasSimulator(pas_db, dialect="itk") as sim:
        app = gateway(tmp_path, pas_db, sim.port)
        app.state.messaging.retry = Backoff(0.2, 0.5, 20, 0)  # retried while the test looks
        store = app.state.messaging.store
        sql(store.path, POISON.format(mid="msg-bug-1"))
        with LiveServer(app) as server:
            before = worker_errors(server.url, "retry")
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                first = message("msg-bug-1", "patient-registration",
                                new_patient("9430001159", family="Poisson"))
                second = message("msg-ok-2", "patient-registration",
                                 new_patient("9430001167"))
                for msg in (first, second):
                    r = await c.post("/$process-message", json=msg, params=params)
                    assert r.status_code == 202, r.text
                # the message behind the failing one is not held up by it
                await wait_for(lambda: by_identifier(rec.got, "msg-ok-2") != [], 30,
                               "the next message was not processed")
                assert response_of(by_identifier(rec.got, "msg-ok-2")[0])[0] == "ok"
                # the PAS applied the first; the store refused to record its answer
                await wait_for(lambda: len(rows(pas_db, "9430001159")) == 1, 30,
                               "the first message was not sent")
                await asyncio.sleep(0.5)
                assert by_identifier(rec.got, "msg-bug-1") == []  # not answered yet
                # the cause goes away: the next attempt (no restart) answers it, applied once
                sql(store.path, "DROP TRIGGER poison")
                await wait_for(lambda: by_identifier(rec.got, "msg-bug-1") != [], 30,
                               "the failed message was not tried again")
                [answer] = by_identifier(rec.got, "msg-bug-1")
                assert response_of(answer)[0] == "ok"
                assert len(rows(pas_db, "9430001159")) == 1
                assert dead_letters(store) == []
                done = await store.get("msg-bug-1")
                assert done is not None and done.state == "done"
                assert worker_errors(server.url, "retry") > before
    lines = [json.loads(x) for x in capfd.readouterr().out.splitlines() if x.startswith("{")]
    failed = [x for x in lines if x.get("event") == "message_processing_failed"]
    assert failed and failed[0]["error"] == "IntegrityError"
    assert failed[0]["where"].endswith(tuple(f".py:{n}" for n in range(1, 10_000)))
    text = json.dumps(failed)
    assert "Poisson" not in text and "9430001159" not in text and "Traceback" not in text


async def test_an_error_that_persists_ends_in_a_dead_letter_never_failed(
        pas_db: str, receiver: tuple[Receiver, LiveServer], tmp_path: Path) -> None:
    rec, rserver = receiver
    params = {"async": "true", "response-url": f"{rserver.url}/responses"}
    async with PasSimulator(pas_db, dialect="itk") as sim:
        app = gateway(tmp_path, pas_db, sim.port)  # at most 3 attempts
        store = app.state.messaging.store
        sql(store.path, POISON.format(mid="msg-bug-3"))
        with LiveServer(app) as server:
            before = worker_errors(server.url, "dead_letter")
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                r = await c.post("/$process-message", params=params, json=message(
                    "msg-bug-3", "patient-registration", new_patient("9430001175")))
                assert r.status_code == 202, r.text
                await wait_for(lambda: by_identifier(rec.got, "msg-bug-3") != [], 30,
                               "no final response")
                [final] = by_identifier(rec.got, "msg-bug-3")
                code, errors = response_of(final)
                assert code == "transient-error"  # never fatal: the PAS applied it
                assert "MESSAGE_PROCESSING_FAILED" in errors
                assert errors[-1] == "MESSAGE_RETRIES_EXHAUSTED"
                assert "MAY HAVE BEEN APPLIED" in final["entry"][1]["resource"]["issue"][-1][
                    "diagnostics"]
                [dead] = dead_letters(store)
                assert (dead["message_id"], dead["outcome"], dead["attempts"]) == (
                    "msg-bug-3", "unknown", 3)
                assert dead["last_error"] == "unexpected IntegrityError"
                assert worker_errors(server.url, "dead_letter") == before + 1
                assert len(rows(pas_db, "9430001175")) == 1  # applied once in 3 attempts
                # the worker goes on: the next message is processed
                r = await c.post("/$process-message", params=params, json=message(
                    "msg-ok-4", "patient-registration", new_patient("9430001183")))
                assert r.status_code == 202, r.text
                await wait_for(lambda: by_identifier(rec.got, "msg-ok-4") != [], 30,
                               "the worker stopped")
                assert response_of(by_identifier(rec.got, "msg-ok-4")[0])[0] == "ok"


async def test_the_outbox_goes_on_when_one_delivery_cannot_be_recorded(
        pas_db: str, receiver: tuple[Receiver, LiveServer], tmp_path: Path) -> None:
    """The store refuses to record one response as delivered: that response is posted again
    later (at least once), and the responses after it are delivered meanwhile."""
    rec, rserver = receiver
    params = {"async": "true", "response-url": f"{rserver.url}/responses"}
    async with PasSimulator(pas_db, dialect="itk") as sim:
        app = gateway(tmp_path, pas_db, sim.port)
        store = app.state.messaging.store
        app.state.messaging.outbox.backoff_base = 0.2
        sql(store.path, "CREATE TRIGGER refuse BEFORE UPDATE OF delivered ON outbox WHEN "
                        "OLD.message_id = 'msg-out-5' BEGIN SELECT RAISE(ABORT, 'refused'); END")
        with LiveServer(app) as server:
            before = worker_errors(server.url, "outbox")
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                for mid, number in (("msg-out-5", "9430002007"), ("msg-out-6", "9430002015")):
                    r = await c.post("/$process-message", params=params, json=message(
                        mid, "patient-registration", new_patient(number)))
                    assert r.status_code == 202, r.text
                await wait_for(lambda: by_identifier(rec.got, "msg-out-6") != [], 30,
                               "the outbox stopped at the response it could not record")
                assert by_identifier(rec.got, "msg-out-5") != []
                assert worker_errors(server.url, "outbox") > before
                sql(store.path, "DROP TRIGGER refuse")
                await wait_for(lambda: all(row[2] is not None for row in store.outbox_rows()),
                               30, "the response was not recorded as delivered in the end")
                assert all(response_of(b)[0] == "ok" for b in rec.got)
