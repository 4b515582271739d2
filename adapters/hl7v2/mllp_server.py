"""An MLLP listener: the gateway's inbound ADT feed (gateway.adt), the demo PAS and the tests.

Framing is the adapter's own (``adapters.hl7v2.mllp.FrameDecoder`` / ``frame``), so what this
server reads and writes is exactly what the gateway's client does.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from ssl import SSLContext
from types import TracebackType

import structlog

from adapters.hl7v2.mllp import (
    DEFAULT_MAX_FRAME_BYTES,
    FrameDecoder,
    MllpProtocolError,
    _load,
    frame,
)

__all__ = ["Handler", "MllpServer", "Reply", "server_ssl_context"]

log = structlog.get_logger("gateway.demo_pas.hl7v2.mllp_server")


def server_ssl_context(
    *, cert_file: str, key_file: str, client_ca_file: str | None = None
) -> SSLContext:
    """TLS 1.2+ for an MLLP listener; with ``client_ca_file``, clients must present a
    certificate issued by that CA (mutual TLS)."""
    ctx = _ssl.create_default_context(_ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    _load(lambda: ctx.load_cert_chain(cert_file, key_file), "server certificate or key")
    if client_ca_file is not None:
        _load(lambda: ctx.load_verify_locations(cafile=client_ca_file), "client CA file")
        ctx.verify_mode = _ssl.CERT_REQUIRED
    return ctx


@dataclass
class Reply:
    """What a server handler may return instead of bytes: further messages, or faults.

    The server waits ``delay`` seconds, then (if ``payload`` is not None) writes it framed —
    in ``split_into`` writes ``chunk_pause`` seconds apart, without the final CR if
    ``omit_final_cr`` — followed by each of ``more`` framed (an enhanced-mode application
    ACK after the accept ACK), and then closes the connection if ``drop_connection``.
    """

    payload: bytes | None = None
    delay: float = 0.0
    drop_connection: bool = False
    split_into: int = 1
    omit_final_cr: bool = False
    chunk_pause: float = 0.005
    more: tuple[bytes, ...] = ()


Handler = Callable[[bytes], Awaitable[bytes | Reply | None]]
"""Called once per received message; returns the reply payload (``None``: send nothing)."""


class MllpServer:
    """An MLLP listener calling ``handler`` for each message, one at a time per connection.

    A handler that raises closes that connection (its client sees the connection close
    rather than waiting for a timeout); the error type is logged, not the message.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ssl: SSLContext | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    ) -> None:
        self.handler = handler
        self.host = host
        self._port = port
        self.ssl = ssl
        self.max_frame_bytes = max_frame_bytes
        self.connections_accepted = 0
        """Connections accepted since start (for tests and the simulator)."""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: set[asyncio.Task[None]] = set()
        """Connections answering a message (a graceful stop lets them finish)."""
        self._stopping = False

    @property
    def port(self) -> int:
        """The port actually bound (useful with ``port=0``)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("MLLP server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def active_connections(self) -> int:
        return len(self._tasks)

    async def start(self) -> None:
        if self._server is not None:
            return
        self._stopping = False
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, ssl=self.ssl)

    async def stop(self, grace: float = 0.0) -> None:
        """Stop listening and close every connection. With ``grace``, a connection whose
        message is being answered first finishes that answer (the handler returns and its
        reply is written), for at most ``grace`` seconds; idle connections, and those with a
        message only partly received, close at once (the sender resends what it did not see
        acknowledged). Cancelled meanwhile, it closes them all at once."""
        server, self._server = self._server, None
        if server is None:
            return
        self._stopping = True
        server.close()  # stops listening; open connections are ours to close
        await asyncio.sleep(0)  # let connections accepted just now register their tasks
        try:
            for task in self._tasks - self._busy:
                task.cancel()
            if grace > 0 and self._busy:
                # each ends after its answer: _serve reads nothing more once stopping
                await asyncio.wait(set(self._busy), timeout=grace)
        finally:
            while self._tasks:
                tasks = list(self._tasks)
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    async def __aenter__(self) -> MllpServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections_accepted += 1
        decoder = FrameDecoder(self.max_frame_bytes)
        try:
            while not self._stopping:
                data = await reader.read(64 * 1024)
                if not data:
                    break
                for payload in decoder.feed(data):
                    self._busy.add(task)
                    try:
                        if not await self._answer(payload, writer) or self._stopping:
                            return
                    finally:
                        self._busy.discard(task)
        except MllpProtocolError as exc:
            log.warning("mllp_server_bad_frame", error=str(exc))
        except OSError:
            pass  # the client went away (reset, TLS alert): nothing to answer
        except asyncio.CancelledError:
            # closed by stop(): end normally, or asyncio's own done-callback (3.11) calls
            # exception() on the cancelled task and prints a traceback for every connection
            if not self._stopping:
                raise
        finally:
            self._tasks.discard(task)
            self._busy.discard(task)
            await _close_writer(writer)

    async def _answer(self, payload: bytes, writer: asyncio.StreamWriter) -> bool:
        """Reply to one message; False when the connection must close."""
        try:
            result = await self.handler(payload)
            reply = result if isinstance(result, Reply) else Reply(payload=result)
            data = b""
            if reply.payload is not None:
                data = frame(reply.payload)
                if reply.omit_final_cr:
                    data = data[:-1]
            data += b"".join(frame(m) for m in reply.more)
        except Exception as exc:  # a failing handler must not take the listener down
            log.error("mllp_handler_failed", error=type(exc).__name__)
            return False
        if reply.delay > 0:
            await asyncio.sleep(reply.delay)
        if data:
            parts = max(1, min(reply.split_into, len(data)))
            size = -(-len(data) // parts)
            for i in range(0, len(data), size):
                if i:
                    # separate writes with a pause, so they arrive as separate reads
                    await asyncio.sleep(reply.chunk_pause)
                writer.write(data[i : i + size])
                await writer.drain()
        return not reply.drop_connection


async def _close_writer(writer: asyncio.StreamWriter, grace: float = 1.0) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), grace)
    except TimeoutError:
        writer.transport.abort()
    except OSError:
        pass  # already reset by the peer
    except asyncio.CancelledError:
        writer.transport.abort()
        raise
