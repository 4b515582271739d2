"""The outbox: the allow-list, retries with backoff, and a dead record (never deleted),
against a real HTTP receiver (uvicorn) and a real SQLite store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.messaging.delivery import Outbox, allowed
from gateway.messaging.store import MessageStore
from tests.conftest import LiveServer

pytestmark = pytest.mark.anyio


def test_allow_list() -> None:
    allow = ["http://127.0.0.1", "https://ehr.trust.nhs.uk:8443"]
    assert allowed("http://127.0.0.1:9000/r", allow)
    assert allowed("https://ehr.trust.nhs.uk:8443/fhir/responses", allow)
    assert not allowed("https://ehr.trust.nhs.uk/fhir", allow)  # another port
    assert not allowed("https://127.0.0.1:9000/r", allow)  # another scheme
    assert not allowed("http://127.0.0.1.evil.example/r", allow)
    assert not allowed("http://user@127.0.0.1/r", allow)
    assert not allowed("file:///etc/passwd", allow)
    assert not allowed("http://[::1/r", allow)
    assert not allowed("http://127.0.0.1/r", [])


async def test_retries_then_delivers_and_gives_up_on_a_dead_receiver(tmp_path: Path) -> None:
    statuses = [500, 503]  # two failures, then 204
    got: list[bytes] = []

    async def post(request: Request) -> Response:
        got.append(await request.body())
        return Response(status_code=statuses.pop(0) if statuses else 204)

    app = Starlette(routes=[Route("/r", post, methods=["POST"])])
    store = MessageStore(tmp_path / "m.sqlite")
    with LiveServer(app) as server:
        outbox = Outbox(store, ["http://127.0.0.1"], max_attempts=3, backoff_base=0.05,
                        poll=0.02)
        await store.put("m1", "d", "accepted", response_url=f"{server.url}/r")
        await store.finish("m1", {"resourceType": "Bundle", "type": "message"},
                           f"{server.url}/r")
        await store.put("m2", "d", "accepted", response_url="http://127.0.0.1:9/none")
        await store.finish("m2", {"resourceType": "Bundle"}, "http://127.0.0.1:9/none")
        task = asyncio.create_task(outbox.run())
        try:
            for _ in range(200):
                rows = {r[0]: r for r in store.outbox_rows()}
                if rows["m1"][2] is not None and rows["m2"][3] == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
    rows = {r[0]: r for r in store.outbox_rows()}
    assert len(got) == 3 and rows["m1"][1] == 3 and rows["m1"][2] is not None
    assert rows["m2"][1] == 3 and rows["m2"][3] == 1 and rows["m2"][4]  # dead, kept, why
    store.close()


async def test_retention_forgets_answered_and_delivered_only(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "m.sqlite")
    await store.put("done-delivered", "d", "accepted", response_url="http://127.0.0.1/r")
    await store.finish("done-delivered", {"resourceType": "Bundle"}, "http://127.0.0.1/r")
    [item] = await store.due()
    await store.delivered(item.seq)
    await store.put("done-sync", "d", "processing")
    await store.finish("done-sync", {"resourceType": "Bundle"}, None)
    await store.put("dead", "d", "accepted", response_url="http://127.0.0.1/r")
    await store.finish("dead", {"resourceType": "Bundle"}, "http://127.0.0.1/r")
    [dead] = await store.due()
    await store.failed(dead.seq, "HTTP 500", None)
    await store.put("waiting", "d", "accepted", body={"message": {}}, response_url="x")
    assert await store.purge(3600) == 0  # nothing is old enough
    assert await store.purge(-1) == 3  # delivered row, its message, the sync one
    assert await store.get("done-sync") is None and await store.get("done-delivered") is None
    assert (await store.get("dead")) is not None and (await store.get("waiting")) is not None
    assert [r[0] for r in store.outbox_rows()] == ["dead"]
    store.close()
