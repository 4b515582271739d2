"""``$process-message`` and its response outbox in /metrics: messages by event and response
code, response deliveries by outcome — bounded labels (an event the server does not declare
is 'other'), no message id or patient data in any label. Real HTTP, real MLLP (the PAS
simulator), a real HTTP receiver for the responses."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.messaging.delivery import Outbox
from gateway.messaging.store import MessageStore
from tests.conftest import LiveServer
from tests.e2e.conftest import Faults
from tests.e2e.test_messaging import message, new_patient, response_of

pytestmark = pytest.mark.anyio


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_messages_are_counted_by_event_and_outcome(
        gw: tuple[httpx.AsyncClient, str, Faults]) -> None:
    c, _, _ = gw
    name = "ccg_messages_processed_total"
    keys = [("patient-registration", "ok"), ("other", "fatal-error"),
            ("patient-registration", "fatal-error")]
    before = {k: value(name, event=k[0], outcome=k[1]) for k in keys}
    sent = [message("msg-m-1", "patient-registration", new_patient("9430001051")),
            message("msg-m-2", "no-such-event", new_patient("9430001051")),
            message("msg-m-3", "patient-registration", {**new_patient("9430001078"),
                                                        "gender": "sometimes"})]
    codes = [response_of((await c.post("/$process-message", json=m)).json())[0] for m in sent]
    assert codes == ["ok", "fatal-error", "fatal-error"]
    # answered again from the store: not processed (nor counted) twice
    assert response_of((await c.post("/$process-message", json=sent[0])).json())[0] == "ok"
    after = {k: value(name, event=k[0], outcome=k[1]) for k in keys}
    assert {k: after[k] - before[k] for k in keys} == dict.fromkeys(keys, 1)
    text = generate_latest(REGISTRY).decode()
    for leak in ("no-such-event", "msg-m-", "9430001051", "O'Connor"):
        assert leak not in text


async def test_response_deliveries_are_counted_by_outcome(tmp_path: Path) -> None:
    statuses = [500]  # one failure, then 204

    async def post(request: Request) -> Response:
        await request.body()
        return Response(status_code=statuses.pop(0) if statuses else 204)

    name = "ccg_deliveries_total"
    outcomes = ("delivered", "retry", "dead_letter")
    before = [value(name, channel="message_response", outcome=o) for o in outcomes]
    store = MessageStore(tmp_path / "m.sqlite")
    app = Starlette(routes=[Route("/r", post, methods=["POST"])])
    with LiveServer(app) as server:
        outbox = Outbox(store, ["http://127.0.0.1"], max_attempts=2, backoff_base=0.05,
                        poll=0.02)
        for mid, url in (("m1", f"{server.url}/r"), ("m2", "http://127.0.0.1:9/none")):
            await store.put(mid, "d", "accepted", response_url=url)
            await store.finish(mid, {"resourceType": "Bundle", "type": "message"}, url)
        task = asyncio.create_task(outbox.run())
        try:
            for _ in range(200):
                rows = {r[0]: r for r in store.outbox_rows()}
                if rows["m1"][2] is not None and rows["m2"][3] == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
    store.close()
    after = [value(name, channel="message_response", outcome=o) for o in outcomes]
    # m1: a retry, then delivered; m2: a retry, then dead
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 2, 1]


async def test_a_message_another_worker_holds_is_not_applied_twice(
        gw_app: tuple[httpx.AsyncClient, str, Faults, Starlette],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers sharing a data directory share messages.sqlite: while another worker holds a
    message's lease (it is applying it), this one does not apply it too; it answers
    transient-error MESSAGE_IN_PROGRESS (send the same message again), and nothing reaches
    the PAS. Once the lease is given back the message is processed."""
    from gateway.messaging import process

    c, _, faults, app = gw_app
    monkeypatch.setattr(process, "MESSAGE_WAIT_SECONDS", 0.3)
    store = app.state.messaging.store
    msg = message("msg-lease-1", "patient-registration", new_patient("9430001094"))
    assert store.acquire_lease("message:msg-lease-1", "another-worker", 30)
    r = await c.post("/$process-message", json=msg)
    assert r.status_code == 200
    assert response_of(r.json()) == ("transient-error", ["MESSAGE_IN_PROGRESS"])
    assert faults.a28s == 0
    store.release_lease("message:msg-lease-1", "another-worker")
    r = await c.post("/$process-message", json=msg)
    assert response_of(r.json())[0] == "ok"
    assert faults.a28s == 1
    assert store._run("SELECT count(*) FROM lease")[0][0] == 0  # given back after use
