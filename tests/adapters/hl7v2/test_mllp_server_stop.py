"""MllpServer.stop(grace): what a graceful stop does to each connection. The client is plain
asyncio streams with its own framing (no code shared with adapters/hl7v2/mllp.py)."""

from __future__ import annotations

import asyncio

import pytest

from adapters.hl7v2.mllp_server import MllpServer

pytestmark = pytest.mark.anyio

SB, EB, CR = b"\x0b", b"\x1c", b"\x0d"


class Slow:
    """A handler that answers each message once ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = asyncio.Event()
        self.calls = 0
        self.cancelled = 0

    async def __call__(self, raw: bytes) -> bytes:
        self.calls += 1
        self.started.set()
        try:
            await self.go.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return b"ACK " + raw


async def connect(server: MllpServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", server.port)


async def rest(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes the connection."""
    return await asyncio.wait_for(reader.read(), 5)


async def test_a_message_being_answered_is_answered_then_the_connection_closes() -> None:
    handler = Slow()
    server = MllpServer(handler)
    await server.start()
    port = server.port
    reader, writer = await connect(server)
    writer.write(SB + b"MSG1" + EB + CR)
    await asyncio.wait_for(handler.started.wait(), 5)
    stopping = asyncio.ensure_future(server.stop(grace=10))
    await asyncio.sleep(0.2)
    assert not stopping.done()  # waiting for the answer
    with pytest.raises(OSError):  # no new connection meanwhile
        await asyncio.open_connection("127.0.0.1", port)
    handler.go.set()
    assert await rest(reader) == SB + b"ACK MSG1" + EB + CR
    await asyncio.wait_for(stopping, 5)
    assert handler.cancelled == 0
    writer.close()


async def test_idle_and_half_received_connections_close_at_once() -> None:
    handler = Slow()
    server = MllpServer(handler)
    await server.start()
    idle_r, idle_w = await connect(server)
    half_r, half_w = await connect(server)
    half_w.write(SB + b"MSG-HALF")  # the rest never comes before the stop
    await half_w.drain()
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(server.stop(grace=10), 5)
    assert loop.time() - t0 < 2  # nothing was being answered: no wait for the grace
    assert await rest(idle_r) == b"" and await rest(half_r) == b""
    assert handler.calls == 0
    idle_w.close()
    half_w.close()


async def test_past_the_grace_the_answer_is_cancelled_and_nothing_is_sent() -> None:
    handler = Slow()
    server = MllpServer(handler)
    await server.start()
    reader, writer = await connect(server)
    writer.write(SB + b"MSG2" + EB + CR)
    await asyncio.wait_for(handler.started.wait(), 5)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.wait_for(server.stop(grace=0.3), 5)
    assert 0.3 <= loop.time() - t0 < 2
    assert await rest(reader) == b""  # no reply: the sender resends
    assert handler.cancelled == 1
    writer.close()


async def test_a_stop_cancelled_during_the_grace_closes_everything_at_once() -> None:
    handler = Slow()
    server = MllpServer(handler)
    await server.start()
    reader, writer = await connect(server)
    writer.write(SB + b"MSG3" + EB + CR)
    await asyncio.wait_for(handler.started.wait(), 5)
    stopping = asyncio.ensure_future(server.stop(grace=30))
    await asyncio.sleep(0.1)
    stopping.cancel()  # a second signal
    with pytest.raises(asyncio.CancelledError):
        await stopping
    assert server.active_connections == 0 and handler.cancelled == 1
    assert await rest(reader) == b""
    writer.close()
