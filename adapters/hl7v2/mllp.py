"""MLLP (Minimal Lower Layer Protocol) transport: framing and a pooled asyncio client.

(The listener side, for the demo PAS and tests, is ``gateway.demo_pas.hl7v2.mllp_server``:
a production gateway only ever connects out.)

A frame is ``0x0B payload 0x1C 0x0D``. One connection carries one request at a time and the
reply to a request is the next frame on that connection, so the client pools persistent
connections (each busy with at most one exchange) rather than multiplexing.

The client trusts nothing it did not ask for: the reply must acknowledge our MSH-10 in MSA-2,
and a connection that timed out, failed, or received bytes outside an exchange is closed,
never reused, because a late or stray reply on it would be read as the answer to the next
request (another patient's data).

Retries resend the same bytes (same MSH-10) on a fresh connection, only after the connection
was lost or timed out, and only for a message the caller marks idempotent (a query, a full
update): a message that is not (ADT^A28 adds a person) is resent only when it never left
this side, since a PAS need not recognise a resent MSH-10. A protocol error (a reply for
another message) is never retried. Every error says whether the message may have reached the
PAS (``sent``), so a write's caller can tell "not applied" from "outcome unknown". An optional
``deadline`` (event-loop time) bounds the whole call: the wait for a pooled connection,
connecting, each attempt and the pauses between them.

Errors never contain message content (PHI): only endpoints, control ids and error types.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import socket
import ssl as _ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from ssl import SSLContext
from typing import cast

import structlog

from adapters import observe
from adapters.hl7v2 import er7

__all__ = [
    "CARRIAGE_RETURN",
    "END_BLOCK",
    "START_BLOCK",
    "Endpoint",
    "FrameDecoder",
    "MllpClient",
    "MllpError",
    "MllpProtocolError",
    "MllpTimeout",
    "MllpUnavailable",
    "client_ssl_context",
    "frame",
]

log = structlog.get_logger("adapters.hl7v2.mllp")

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
DEFAULT_MAX_FRAME_BYTES = 8 * 1024 * 1024

_START = START_BLOCK[0]
_END = END_BLOCK[0]
_CR = CARRIAGE_RETURN[0]

# --- errors -----------------------------------------------------------------------------------


class MllpError(Exception):
    """Base of the transport's errors. Messages never contain message content (PHI).

    ``sent`` is True when the message's bytes were handed to a connection before the failure:
    the peer may have received and processed it."""

    sent: bool = False


class MllpUnavailable(MllpError):
    """Could not connect, or the connection was refused, reset or closed before the reply."""


class MllpTimeout(MllpError):
    """Connecting, or waiting for the reply, took longer than allowed."""


class MllpProtocolError(MllpError):
    """Bad framing, a reply that is not HL7, has no MSA, or acknowledges another message."""


def _sent(exc: MllpError, sent: bool) -> MllpError:
    exc.sent = sent
    return exc


# --- framing ----------------------------------------------------------------------------------


def frame(payload: bytes) -> bytes:
    """Wrap one message in an MLLP frame.

    A payload holding a frame byte would end (or restart) the frame early and desynchronise
    the connection, so it is refused; ``er7.encode`` escapes them in values.
    """
    if START_BLOCK in payload or END_BLOCK in payload:
        raise MllpProtocolError("payload contains an MLLP frame byte (0x0B or 0x1C)")
    return b"".join((START_BLOCK, payload, END_BLOCK, CARRIAGE_RETURN))


class FrameDecoder:
    """Incremental MLLP frame reader.

    Tolerant of what real peers send: frames split across reads, several frames in one read,
    a missing CR after 0x1C (0x1C followed by 0x0B, or by nothing), and bytes outside frames
    (discarded). A 0x0B inside a frame means the sender started over: the partial frame is
    dropped. A frame longer than ``max_frame_bytes`` raises MllpProtocolError, and the
    connection should then be closed: the decoder does not resynchronise after it.
    """

    def __init__(self, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buf = bytearray()
        self._in_frame = False
        self._scanned = 0  # bytes of the current frame already searched for 0x1C

    @property
    def in_frame(self) -> bool:
        """Whether part of a frame has been read (bytes are owed by the peer)."""
        return self._in_frame

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames: list[bytes] = []
        while True:
            if not self._in_frame:
                start = buf.find(_START)
                if start < 0:
                    buf.clear()  # noise between frames (including the CR after 0x1C)
                    return frames
                del buf[: start + 1]
                self._in_frame = True
                self._scanned = 0
            # buf now holds the payload read so far (without its 0x0B)
            end = buf.find(_END, self._scanned)
            restart = buf.find(_START, self._scanned, len(buf) if end < 0 else end)
            if restart >= 0:
                del buf[: restart + 1]
                self._scanned = 0
                continue
            if end < 0:
                if len(buf) > self.max_frame_bytes:
                    self._reset()
                    raise MllpProtocolError(
                        f"frame larger than {self.max_frame_bytes} bytes")
                self._scanned = len(buf)
                return frames
            if end > self.max_frame_bytes:
                self._reset()
                raise MllpProtocolError(f"frame larger than {self.max_frame_bytes} bytes")
            frames.append(bytes(buf[:end]))
            cut = end + 1
            if cut < len(buf) and buf[cut] == _CR:
                cut += 1
            del buf[:cut]
            self._in_frame = False

    def _reset(self) -> None:
        self._buf.clear()
        self._in_frame = False
        self._scanned = 0


# --- TLS --------------------------------------------------------------------------------------


def _load(action: Callable[[], None], what: str) -> None:
    try:
        action()
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise MllpError(f"cannot load TLS {what} ({type(exc).__name__})") from exc


def client_ssl_context(
    *,
    ca_file: str | None,
    cert_file: str | None = None,
    key_file: str | None = None,
    verify: bool = True,
) -> SSLContext:
    """TLS 1.2+ for connecting to a PAS. ``ca_file`` None trusts the system's CAs;
    ``cert_file`` (and ``key_file``, unless the key is in the cert file) enables mutual TLS.
    ``verify=False`` turns off certificate and host name checks — for test rigs only."""
    ctx = _ssl.create_default_context(_ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = _ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        _load(lambda: ctx.load_verify_locations(cafile=ca_file), "CA file")
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = _ssl.CERT_NONE
    if key_file is not None and cert_file is None:
        raise MllpError("a TLS client key needs its certificate (cert_file)")
    if cert_file is not None:
        _load(lambda: ctx.load_cert_chain(cert_file, key_file), "client certificate or key")
    return ctx


# --- client -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    ssl: SSLContext | None = None
    server_hostname: str | None = None
    """Name to check the server certificate against (default: ``host``)."""

    def __str__(self) -> str:
        return f"{'mllps' if self.ssl else 'mllp'}://{self.host}:{self.port}"


class _Connection(asyncio.Protocol):
    """One client connection: frames arrive into a queue; an exchange waits for one."""

    def __init__(self, max_frame_bytes: int) -> None:
        loop = asyncio.get_running_loop()
        self.decoder = FrameDecoder(max_frame_bytes)
        self.frames: deque[bytes] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: asyncio.Future[None] = loop.create_future()
        self.error: MllpError | None = None
        self.idle_since = 0.0
        self._waiter: asyncio.Future[None] | None = None

    # protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (TCP/TLS)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Long-lived pooled connections cross firewalls that drop idle flows silently.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        # Frames arriving outside an exchange stay queued: they mark the connection unusable.
        try:
            self.frames.extend(self.decoder.feed(data))
        except MllpProtocolError as exc:
            self.error = exc
            self.abort()
        self._wake()

    def eof_received(self) -> bool:
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)
        self._wake()

    # used by the client

    @property
    def closed(self) -> bool:
        return self.lost.done() or self.transport is None or self.transport.is_closing()

    def reusable(self) -> bool:
        """Open, and nothing received beyond the last reply (no stray or partial frame)."""
        return not (self.closed or self.error or self.frames or self.decoder.in_frame)

    def write(self, data: bytes) -> None:
        if self.closed or self.transport is None:
            raise MllpUnavailable("connection closed")
        self.transport.write(data)

    async def next_frame(self) -> bytes:
        while not self.frames:
            if self.error is not None:
                raise self.error
            if self.closed:
                raise MllpUnavailable("connection closed before the reply")
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.frames.popleft()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def close(self, grace: float = 1.0) -> None:
        """Close politely (TLS close_notify), abort if the peer does not let go in time."""
        if self.transport is None:
            return
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self.lost), grace)
        except TimeoutError:
            self.transport.abort()
            await asyncio.shield(self.lost)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


_LOGGABLE_ID = re.compile(r"[A-Za-z0-9._@:/+-]{1,64}")


def _loggable_id(value: str | None) -> str | None:
    """A received control id as logged: only if it looks like one (it could be anything)."""
    if value is None:
        return None
    return value if _LOGGABLE_ID.fullmatch(value) else "(not an id)"


class MllpClient:
    """Sends messages to one MLLP endpoint over a pool of persistent connections.

    At most ``pool_size`` exchanges run at once, each on its own connection; more callers
    wait their turn (each exchange is bounded by the timeouts, so the wait is too). Idle
    connections are kept up to ``idle_timeout`` seconds, then reconnected, so that a
    connection a firewall dropped silently is not found out by a reply timeout.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        pool_size: int = 2,
        connect_timeout: float = 5.0,
        reply_timeout: float = 15.0,
        retries: int = 2,
        backoff_base: float = 0.1,
        backoff_cap: float = 2.0,
        rng: random.Random | None = None,
        idle_timeout: float = 60.0,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        label: str = "mllp",
    ) -> None:
        if pool_size < 1:
            raise ValueError("pool_size must be at least 1")
        if retries < 0:
            raise ValueError("retries must not be negative")
        self.endpoint = endpoint
        self.label = label
        """The connection's name in the mappings (for metrics)."""
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.reply_timeout = reply_timeout
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.idle_timeout = idle_timeout
        self.max_frame_bytes = max_frame_bytes
        self._rng = rng or random.Random()
        self._slots = asyncio.Semaphore(pool_size)
        self._idle: deque[_Connection] = deque()
        self._open: set[_Connection] = set()
        self._closed = False

    async def __aenter__(self) -> MllpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def send(self, message: bytes, control_id: str, *, idempotent: bool = True,
                   deadline: float | None = None) -> bytes:
        """Send one message and return the raw reply payload (unframed bytes).

        The reply's MSA-2 must equal ``control_id`` (this message's MSH-10). On
        MllpUnavailable or MllpTimeout the same bytes are resent on a fresh connection up to
        ``retries`` times, after a full-jitter exponential backoff — for a message that is
        not ``idempotent`` only if it was never sent; MllpProtocolError is raised at once.
        ``deadline`` (``loop.time()``) ends all of it: past it, MllpTimeout.
        """
        framed = frame(message)
        attempt = 0
        sent = False
        loop = asyncio.get_running_loop()
        while True:
            if self._closed:
                raise MllpUnavailable("MLLP client is closed")
            try:
                return await self._exchange(framed, control_id, fresh=attempt > 0,
                                            deadline=deadline)
            except (MllpUnavailable, MllpTimeout) as exc:
                sent = sent or exc.sent
                exc.sent = sent
                if attempt >= self.retries or self._closed or (sent and not idempotent):
                    raise
                delay = self._rng.uniform(
                    0.0, min(self.backoff_cap, self.backoff_base * 2**attempt))
                if deadline is not None and loop.time() + delay >= deadline:
                    raise
                attempt += 1
                if observe.event is not None:
                    observe.event(self.label, "mllp_retry")
                log.info("mllp_retry", endpoint=str(self.endpoint), control_id=control_id,
                         attempt=attempt, error=type(exc).__name__, delay=round(delay, 3))
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        """Close every connection; sends in flight fail with MllpUnavailable."""
        self._closed = True
        self._idle.clear()
        conns = list(self._open)
        await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)

    # internals

    async def _exchange(self, framed: bytes, control_id: str, *, fresh: bool,
                        deadline: float | None = None) -> bytes:
        loop = asyncio.get_running_loop()

        def left(limit: float) -> float:
            return limit if deadline is None else max(0.0, min(limit, deadline - loop.time()))

        queued = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise MllpTimeout(f"no connection to {self.endpoint} free before the deadline"
                              ) from None
        if observe.pool_wait is not None:  # waited for one of pool_size connections
            observe.pool_wait(self.label, time.perf_counter() - queued)
        try:
            if self._closed:  # closed while this send waited for a slot
                raise MllpUnavailable("MLLP client is closed")
            conn = None if fresh else self._take_idle()
            if conn is None:
                conn = await self._connect(left(self.connect_timeout))
                if self._closed:  # closed while connecting: aclose() did not see this one
                    conn.abort()
                    raise MllpUnavailable("MLLP client is closed")
            keep = False
            written = False
            timeout = left(self.reply_timeout)
            if timeout <= 0:  # the deadline passed while connecting: do not send at all
                conn.abort()
                raise MllpTimeout(f"the deadline passed before sending to {self.endpoint}")
            try:
                try:
                    async with asyncio.timeout(timeout):
                        conn.write(framed)
                        written = True
                        reply = await conn.next_frame()
                except TimeoutError:
                    raise _sent(MllpTimeout(
                        f"no reply from {self.endpoint} within {timeout:g} s"), written
                    ) from None
                except MllpError as exc:
                    raise _sent(exc, written) from None
                try:
                    self._check_reply(reply, control_id)
                except MllpError as exc:
                    raise _sent(exc, True) from None
                keep = True
                return reply
            finally:
                if keep and not self._closed and conn.reusable():
                    conn.idle_since = asyncio.get_running_loop().time()
                    self._idle.append(conn)
                else:
                    self._discard(conn, report=keep)
        finally:
            self._slots.release()

    def _take_idle(self) -> _Connection | None:
        now = asyncio.get_running_loop().time()
        while self._idle:
            conn = self._idle.pop()  # most recently used: the least likely to be stale
            if conn.reusable() and now - conn.idle_since < self.idle_timeout:
                return conn
            self._discard(conn, report=True)
        return None

    def _discard(self, conn: _Connection, *, report: bool) -> None:
        if report and (conn.frames or conn.decoder.in_frame):
            # More than one reply to one request, or data between requests: the peer is
            # confused, and what it sent is no answer to anything we will ask.
            log.warning("mllp_unsolicited_data", endpoint=str(self.endpoint))
        conn.abort()

    async def _connect(self, timeout: float | None = None) -> _Connection:
        ep = self.endpoint
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(timeout):
                if ep.ssl is not None:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self.max_frame_bytes), ep.host, ep.port,
                        ssl=ep.ssl, server_hostname=ep.server_hostname or ep.host)
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(self.max_frame_bytes), ep.host, ep.port)
        except TimeoutError:
            raise MllpTimeout(f"could not connect to {ep} within {timeout:g} s") from None
        except _ssl.SSLCertVerificationError as exc:
            raise MllpUnavailable(
                f"TLS handshake with {ep} failed: certificate not trusted") from exc
        except OSError as exc:  # refused, unreachable, reset, TLS alerts (ssl.SSLError)
            raise MllpUnavailable(f"cannot connect to {ep} ({type(exc).__name__})") from exc
        self._open.add(conn)
        conn.lost.add_done_callback(lambda _: self._open.discard(conn))
        return conn

    def _check_reply(self, reply: bytes, control_id: str) -> None:
        try:
            message = er7.parse(reply)
        except er7.Er7Error as exc:
            raise MllpProtocolError(f"reply from {self.endpoint} is not HL7 v2: {exc}") from None
        msa = message.segment("MSA")
        if msa is None:
            raise MllpProtocolError(f"reply from {self.endpoint} has no MSA segment")
        acknowledged = msa.value(2)
        if acknowledged != control_id:
            log.warning("mllp_reply_mismatch", endpoint=str(self.endpoint),
                        expected=control_id, received=_loggable_id(acknowledged),
                        reply_control_id=_loggable_id(message.control_id))
            raise MllpProtocolError(
                f"reply from {self.endpoint} acknowledges another message (MSA-2)")
