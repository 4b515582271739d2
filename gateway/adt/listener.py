"""The inbound MLLP listener for the PAS's ADT feed.

Each message is parsed, mapped and recorded in one store transaction, and only then ACKed:
a message the PAS saw ACKed is on disk with its notifications. A message it did not see
ACKed (the gateway died first) it resends with the same MSH-10, and the store answers that
as a duplicate — AA again, recorded once. One connection is served one message at a time
(MLLP is synchronous), so the PAS's order per connection is the order of record; writes go
through a single writer, so it is also the order of the sequence numbers delivery follows.
Messages arriving on several connections at once share a transaction (group commit): one
fsync for the batch, each ACKed when it is committed.

In enhanced mode the accept ACK and the application ACK (events.replies) go back on the same
connection, one after the other, once the message is processed: processing is recording, so
both are known at the commit. A message refused after its header was accepted (AE) is
recorded as a refusal first, so its CA is as durable as an AA's. An ACK the sender sends back
(an accept ACK of our application ACK) is never answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog

from adapters.hl7v2 import er7
from adapters.hl7v2.mllp_server import MllpServer, Reply
from gateway import metrics
from gateway.adt.events import Mapper, Refused, ack_mode, answer, replies
from gateway.adt.store import AdtStore, Incoming, Recorded

log = structlog.get_logger("gateway.adt.listener")


class AdtListener:
    def __init__(self, mapper: Mapper, store: AdtStore, *, host: str = "127.0.0.1",
                 port: int = 0, ssl: Any = None) -> None:
        self.mapper = mapper
        self.store = store
        self.server = MllpServer(self._counted, host=host, port=port, ssl=ssl)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adt-store")
        self._queue: asyncio.Queue[tuple[Incoming, asyncio.Future[Recorded]]] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self.max_batch = 256
        self.on_recorded: list[Any] = []
        """Callbacks (no arguments) after each new message is committed (wakes delivery)."""

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._batcher = asyncio.create_task(self._write_batches())
        await self.server.start()

    async def stop(self, grace: float = 0.0) -> None:
        """Stop accepting messages. With ``grace``, a message being recorded is finished
        and ACKed first (at most ``grace`` seconds); one still unfinished then is not ACKed
        (recorded or not, the PAS resends it and the store knows a resend)."""
        try:
            await self.server.stop(grace)
        finally:
            if self._batcher is not None:
                self._batcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._batcher
            # off the loop: a write the store holds up must not stop the deliverer's own stop
            await asyncio.to_thread(self._writer.shutdown, wait=True)

    async def _write_batches(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await loop.run_in_executor(
                    self._writer, self.store.record_many, [m for m, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), rec in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(rec)

    async def _record(self, incoming: Incoming) -> Recorded:
        assert self._queue is not None
        fut: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        await self._queue.put((incoming, fut))
        return await fut

    async def _counted(self, raw: bytes) -> bytes | Reply | None:
        reply = await self.handle(raw)
        # counted by the last acknowledgement sent: in enhanced mode the application ACK,
        # which says what became of the message (the accept ACK only that it was kept)
        last = (reply.more[-1] if reply.more else reply.payload) \
            if isinstance(reply, Reply) else reply
        metrics.adt_message(_field(raw, b"MSH", 9, 2), self.mapper.events,
                            _field(last, b"MSA", 1) if last is not None else None)
        return reply

    async def handle(self, raw: bytes) -> bytes | Reply | None:
        try:
            msg = er7.parse(raw)
        except er7.Er7Error:
            log.warning("adt_refused", code="AR", error="100", reason="unreadable message")
            return answer(None, "AR", error="100", text="the message could not be read")
        if msg.segments[0].value(9, 1) == "ACK":
            # a sender's accept ACK of our application ACK: never acknowledge an ACK
            log.debug("adt_ack_received", control_id=msg.control_id)
            return None
        try:
            incoming = self.mapper.incoming(raw, msg)
        except Refused as exc:
            log.warning("adt_refused", code=exc.code, error=exc.error, reason=exc.text,
                        control_id=msg.control_id, message_type=msg.message_type)
            if exc.code == "AR":  # the header is refused: not accepted, not processed
                return _send(replies(msg, "AR", commit="CR", error=exc.error, text=exc.text))
            # understood, not applicable: recorded as a refusal (the commit), then reported
            try:
                await self._refusal(raw, msg, exc)
            except Exception as store_exc:
                log.error("adt_store_failed", error=type(store_exc).__name__,
                          control_id=msg.control_id)
                return _send(replies(msg, "AE", commit="CE", error=exc.error, text=exc.text)
                             if ack_mode(msg)[0] == "original" else
                             replies(msg, None, commit="CE", error="207",
                                     text="the message could not be recorded; resend it"))
            return _send(replies(msg, "AE", commit="CA", error=exc.error, text=exc.text))
        try:
            rec = await self._record(incoming)
        except Exception as exc:  # the store is down: refuse, so the PAS resends later
            log.error("adt_store_failed", error=type(exc).__name__, control_id=incoming.control_id)
            return _send(replies(msg, None, commit="CE", error="207",
                                 text="the message could not be recorded; resend it"))
        if rec.conflict:
            return _send(replies(msg, "AE", commit="CA", error="205",
                                 text="this message control id was received before with "
                                 "different content"))
        log.info("adt_recorded", adt_event=incoming.event, control_id=incoming.control_id,
                 seq=rec.seq, duplicate=rec.duplicate, notifications=rec.notifications)
        if rec.notifications:
            for cb in self.on_recorded:
                cb()
        return _send(replies(msg, "AA", commit="CA"))

    async def _refusal(self, raw: bytes, msg: er7.Message, exc: Refused) -> None:
        msh = msg.segments[0]
        await asyncio.get_running_loop().run_in_executor(
            self._writer, self.store.record_refusal,
            f"{msh.value(3) or ''}^{msh.value(4) or ''}", msg.control_id or "",
            hashlib.sha256(raw).hexdigest(), msh.value(9, 2) or "", exc.code, exc.error,
            exc.text)


def _send(acks: list[bytes]) -> bytes | Reply | None:
    """The acknowledgements as the MLLP server sends them: one, several in order, or none."""
    if not acks:
        return None
    if len(acks) == 1:
        return acks[0]
    return Reply(payload=acks[0], more=tuple(acks[1:]))


def _field(raw: bytes, segment: bytes, field: int, component: int = 1) -> str:
    """One component of one field of the first ``segment`` of an ER7 message, read without
    parsing the message (for metric labels only: the caller bounds the value); ''."""
    if len(raw) < 8 or not raw.startswith(b"MSH"):
        return ""
    sep, comp = raw[3:4], raw[4:5]
    for line in raw.replace(b"\n", b"\r").split(b"\r"):
        if line[:3] == segment:
            fields = line.split(sep)
            at = field if segment != b"MSH" else field - 1  # MSH-1 is the separator itself
            if at >= len(fields):
                return ""
            parts = fields[at].split(comp)
            return parts[component - 1].decode("ascii", "replace") if component <= len(
                parts) else ""
    return ""
