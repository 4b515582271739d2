"""Several processes on one message store (``serve --workers N`` on one data directory):
the store's leases let one of them post each response and apply each asynchronous message.

Two real OS processes each run an outbox over the same SQLite file, against a real HTTP
receiver that counts every post: each response arrives once, not once per process."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.messaging.store import MessageStore
from tests.conftest import LiveServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[3]

OUTBOX_PROCESS = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from gateway.messaging.delivery import Outbox
    from gateway.messaging.store import MessageStore

    async def main() -> None:
        store = MessageStore(Path(sys.argv[1]))
        outbox = Outbox(store, ["http://127.0.0.1"], poll=0.02, backoff_base=0.05)
        task = asyncio.create_task(outbox.run())
        await asyncio.sleep(float(sys.argv[2]))
        task.cancel()

    asyncio.run(main())
""")


def test_a_lease_is_held_by_one_holder_until_it_ends(tmp_path: Path) -> None:
    store = MessageStore(tmp_path / "m.sqlite")
    other = MessageStore(tmp_path / "m.sqlite")  # another connection, as another process has
    try:
        assert store.acquire_lease("outbox", "a", 30)
        assert not other.acquire_lease("outbox", "b", 30)
        assert store.acquire_lease("outbox", "a", 30)  # renewed by its holder
        store.release_lease("outbox", "b")  # not b's to give back
        assert not other.acquire_lease("outbox", "b", 30)
        store.release_lease("outbox", "a")
        assert other.acquire_lease("outbox", "b", 0.2)
        time.sleep(0.3)  # b stopped renewing (died): it ends by itself
        assert store.acquire_lease("outbox", "a", 30)
    finally:
        store.close()
        other.close()


async def test_two_processes_post_each_response_once(tmp_path: Path) -> None:
    got: collections.Counter[bytes] = collections.Counter()
    lock = threading.Lock()

    async def post(request: Request) -> Response:
        body = await request.body()
        with lock:
            got[body] += 1
        await asyncio.sleep(0.02)  # a receiver that takes a moment: rounds overlap
        return Response(status_code=204)

    path = tmp_path / "messages.sqlite"
    store = MessageStore(path)
    n = 30
    with LiveServer(Starlette(routes=[Route("/r", post, methods=["POST"])])) as server:
        for i in range(n):
            url = f"{server.url}/r"
            await store.put(f"m{i}", "d", "accepted", response_url=url)
            await store.finish(f"m{i}", {"resourceType": "Bundle", "id": f"r{i}"}, url)
        procs = [subprocess.Popen([sys.executable, "-c", OUTBOX_PROCESS, str(path), "6"],
                                  cwd=REPO, stderr=subprocess.PIPE) for _ in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()[-2000:]
    rows = store.outbox_rows()
    store.close()
    assert all(r[2] is not None for r in rows)  # every response delivered
    assert len(got) == n
    assert set(got.values()) == {1}, {k: v for k, v in got.items() if v > 1}
