"""The worker threads a blocking driver runs on: results, errors, context, backstop, close."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from adapters.threads import Workers

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_results_errors_and_context_cross_the_hop() -> None:
    w = Workers(2, "test")
    try:
        assert await w.run(5, lambda a, b: a + b, 2, 3) == 5
        value, name = await w.run(5, lambda: (42, threading.current_thread().name))
        assert value == 42 and name.startswith("test-") and name != threading.current_thread().name
        empty: dict[str, int] = {}
        with pytest.raises(KeyError, match="missing"):
            await w.run(5, lambda: empty["missing"])
        request_id.set("r-1")
        assert await w.run(5, request_id.get) == "r-1"  # the caller's context goes along
        results = await asyncio.gather(*(w.run(5, lambda i=i: i * i) for i in range(200)))
        assert results == [i * i for i in range(200)]
    finally:
        w.close()


async def test_backstop_and_cancellation() -> None:
    w = Workers(1, "test")
    try:
        block = 2.0  # the blocked call: the caller must be let go long before it ends
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await w.run(0.1, time.sleep, block)
        assert time.monotonic() - started < block
        # the late result of the expired call is dropped; the thread serves the next call
        assert await w.run(5, lambda: "next") == "next"
        task = asyncio.ensure_future(w.run(5, time.sleep, 0.2))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await w.run(5, lambda: "still serving") == "still serving"
    finally:
        w.close()


async def test_close_stops_the_threads() -> None:
    w = Workers(3, "closing")
    await w.run(5, int)
    threads = [t for t in threading.enumerate() if t.name.startswith("closing-")]
    assert len(threads) == 3
    w.close()
    for t in threads:
        t.join(timeout=2)
        assert not t.is_alive()
