"""The asynchronous worker's retries are bounded: after ``CCG_MESSAGING_PROCESS_MAX_ATTEMPTS``
(or ``..._MAX_AGE_SECONDS``) it gives up, keeps a dead letter and delivers a final
transient-error response (MESSAGE_RETRIES_EXHAUSTED) to the response-url. A write that may
have reached the PAS stays "unknown" (WRITE_OUTCOME_UNKNOWN kept, never reported failed) and
a resend of the same message still finds it first; a message that never reached the PAS is
forgotten, so the same message can be sent again.

Real uvicorn, real MLLP to the PAS simulator (or to a port nobody listens on), a real HTTP
receiver for the responses; the store read back with its own functions.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette

from adapters.hl7v2.mllp_server import Reply
from gateway.app import build_app
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.messaging.store import dead_letters
from gateway.retry import Backoff
from tests.conftest import LiveServer
from tests.e2e.conftest import Receiver, settings, wait_for
from tests.e2e.test_messaging import message, new_patient, response_of, rows
from tests.redis_server import free_port

pytestmark = pytest.mark.anyio


def gateway(tmp: Path, url: str, mllp_port: int) -> Starlette:
    app = build_app(settings(tmp, url, mllp_port, messaging_response_urls="http://127.0.0.1",
                             messaging_retry_seconds=1, messaging_process_max_attempts=3))
    assert app.state.messaging.retry.max_attempts == 3  # the setting reaches the worker
    # the same bound, shorter delays: the test waits tenths of a second, not minutes
    app.state.messaging.retry = Backoff(0.05, 0.2, 3, 0)
    adapter = next(p.mapping.adapter for p in app.state.registry
                   if p.resource_type == "Patient")
    adapter.client.reply_timeout = 0.5
    adapter.client.backoff_base = 0.01
    adapter.options = adapter.options.model_copy(update={"deadline": 1.0})
    return app


async def test_a_pas_never_reached_gives_up_then_the_same_message_is_taken_again(
        pas_url: str, receiver: tuple[Receiver, LiveServer], tmp_path: Path) -> None:
    rec, rserver = receiver
    app = gateway(tmp_path, pas_url, free_port())  # nothing listens there: nothing is sent
    store = app.state.messaging.store
    msg = message("msg-retry-1", "patient-registration", new_patient("9430001086"))
    params = {"async": "true", "response-url": f"{rserver.url}/responses"}
    with LiveServer(app) as server:
        async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
            r = await c.post("/$process-message", json=msg, params=params)
            assert r.status_code == 202, r.text
            await wait_for(lambda: rec.got != [], 30, "no final response")
            await asyncio.sleep(0.5)  # no more attempts, no second response
            assert len(rec.got) == 1
            code, errors = response_of(rec.got[0])
            assert code == "transient-error"  # not fatal: nothing wrong with the message
            assert errors[-1] == "MESSAGE_RETRIES_EXHAUSTED"
            assert "WRITE_OUTCOME_UNKNOWN" not in errors
            assert "nothing was applied" in rec.got[0]["entry"][1]["resource"]["issue"][-1][
                "diagnostics"]
            [dead] = dead_letters(store)
            assert (dead["message_id"], dead["outcome"], dead["attempts"]) == (
                "msg-retry-1", "unsent", 3)
            assert await store.get("msg-retry-1") is None  # forgotten: may be sent again
            # the same message again is processed again (and given up on again, as its own
            # response message: a receiver deduplicating by id keeps both)
            r = await c.post("/$process-message", json=msg, params=params)
            assert r.status_code == 202, r.text
            await wait_for(lambda: len(rec.got) == 2, 30, "the resend was not processed")
            assert rec.got[1]["id"] != rec.got[0]["id"]
            assert rec.got[1]["entry"][0]["resource"]["response"]["identifier"] == \
                "msg-retry-1"
            assert len(dead_letters(store)) == 2
    assert rows(pas_url, "9430001086") == []


class Silent:
    """The simulator's handler; ADT^A28s are received and neither applied nor answered while
    ``silent`` (the gateway cannot tell whether they were applied)."""

    def __init__(self, sim: PasSimulator) -> None:
        self.handler = sim._server.handler
        self.silent = True
        self.a28s = 0

    async def __call__(self, data: bytes) -> bytes | Reply | None:
        if b"ADT^A28" in data:
            self.a28s += 1
            if self.silent:
                return None
        return await self.handler(data)


async def test_an_unacknowledged_write_is_given_up_on_as_unknown_never_failed(
        pas_url: str, receiver: tuple[Receiver, LiveServer], tmp_path: Path) -> None:
    rec, rserver = receiver
    async with PasSimulator(pas_url, dialect="itk") as sim:
        silent = Silent(sim)
        sim._server.handler = silent
        app = gateway(tmp_path, pas_url, sim.port)
        store = app.state.messaging.store
        msg = message("msg-retry-2", "patient-registration", new_patient("9430001094"))
        params = {"async": "true", "response-url": f"{rserver.url}/responses"}
        with LiveServer(app) as server:
            async with httpx.AsyncClient(base_url=server.url + "/STU3", timeout=30) as c:
                r = await c.post("/$process-message", json=msg, params=params)
                assert r.status_code == 202, r.text
                await wait_for(lambda: rec.got != [], 60, "no final response")
                code, errors = response_of(rec.got[0])
                assert code == "transient-error"
                assert "WRITE_OUTCOME_UNKNOWN" in errors  # may have been applied: said so
                assert errors[-1] == "MESSAGE_RETRIES_EXHAUSTED"
                assert "MAY HAVE BEEN APPLIED" in rec.got[0]["entry"][1]["resource"][
                    "issue"][-1]["diagnostics"]
                [dead] = dead_letters(store)
                assert (dead["outcome"], dead["attempts"]) == ("unknown", 3)
                kept = await store.get("msg-retry-2")
                assert kept is not None and kept.state == "unknown"  # not failed, not done
                assert kept.body is None and kept.response is None
                assert silent.a28s == 3
                # the PAS answers again; the sender resends the same message, async
                silent.silent = False
                r = await c.post("/$process-message", json=msg, params=params)
                assert r.status_code == 202, r.text
                await wait_for(lambda: len(rec.got) == 2, 30, "the resend was not processed")
                assert response_of(rec.got[1])[0] == "ok"
                assert len(rows(pas_url, "9430001094")) == 1
                done = await store.get("msg-retry-2")
                assert done is not None and done.state == "done"
                assert len(dead_letters(store)) == 1  # the dead letter stays


def test_backoff_is_bounded_exponential_with_jitter() -> None:
    policy = Backoff(base=1.0, cap=8.0, max_attempts=5, max_age=60.0)
    for attempts, plain in ((1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (9, 8.0)):
        delays = {policy.delay(attempts) for _ in range(50)}
        assert all(0.8 * plain <= d <= 1.2 * plain for d in delays)
        assert len(delays) > 1  # spread, not all at one instant
    assert not policy.exhausted(4, 59.0)
    assert policy.exhausted(5, 0.0) and policy.exhausted(1, 60.0)
    assert not Backoff(max_attempts=0, max_age=0).exhausted(10_000, 1e9)
