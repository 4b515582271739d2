"""Delivering asynchronous responses: the outbox, posted to each ``response-url``.

At least once: a response leaves the outbox only when its receiver answered 2xx; a failed
attempt is retried with exponential backoff (capped, with jitter: gateway.retry.Backoff), up
to ``max_attempts``, then kept as dead with its last error (never deleted). The outbox is in
the store, so a restart resumes where it stopped; a post stopped by our own shutdown records
nothing (sent again after the restart). A failure of the store itself is logged and the
outbox goes on (a response whose delivery could not be recorded is posted again). Only URLs
on the configured allow-list are ever accepted (checked when the message arrives, and again
here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from urllib.parse import urlsplit

import httpx
import structlog

from gateway import metrics
from gateway.messaging.store import MessageStore
from gateway.retry import Backoff

log = structlog.get_logger("gateway.messaging")


def allowed(url: str, allow_list: list[str]) -> bool:
    """``url`` is http(s) and its origin is on the list (an entry without a port: any port
    of that host)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username:
        return False
    for entry in allow_list:
        want = urlsplit(entry.strip())
        if (want.scheme == parts.scheme and want.hostname == parts.hostname
                and (want.port is None or want.port == port)):
            return True
    return False


class Outbox:
    def __init__(self, store: MessageStore, allow_list: list[str], *, max_attempts: int = 8,
                 backoff_base: float = 1.0, backoff_max: float = 300.0, poll: float = 0.5,
                 timeout: float = 10.0, retention_seconds: float = 30 * 86_400,
                 holder: str | None = None) -> None:
        self.retention_seconds = retention_seconds
        self.store = store
        self.allow_list = allow_list
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.poll = poll
        self.timeout = timeout
        self._wake = asyncio.Event()
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This deliverer, in the store's ``outbox`` lease: processes sharing the store
        (workers on one data directory) take turns, so no response is posted twice at once.
        Renewed before each post, for longer than one post can take."""
        self.lease_ttl = timeout + 30.0
        self._troubled: dict[int, tuple[int, float]] = {}
        """Outbox rows whose attempt could not be recorded: (failures, not before)."""

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False,
                                     trust_env=False) as client:
            purged_at = 0.0
            while True:
                try:
                    if time.monotonic() - purged_at > 3600:  # hourly: the file stays bounded
                        purged_at = time.monotonic()
                        await self.store.purge(self.retention_seconds)
                    for item in await self.store.due():
                        if self._troubled.get(item.seq, (0, 0.0))[1] > time.monotonic():
                            continue
                        # held (taken or renewed) before each post: another process that
                        # took the outbox over after this one stalled posts the rest, not
                        # this one too
                        if not await self.store.lease("outbox", self.holder, self.lease_ttl):
                            break
                        try:
                            await self._send(client, item.seq, item.url, item.body,
                                             item.attempts)
                            self._troubled.pop(item.seq, None)
                        except Exception as exc:  # this one's record failed: the rest go on
                            self._trouble(item.seq, exc)
                except Exception as exc:  # the store failing: the outbox goes on (no PHI)
                    log.error("message_outbox_failed", error=type(exc).__name__)
                    metrics.message_worker_error("outbox")
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    def _trouble(self, seq: int, exc: Exception) -> None:
        """A response whose attempt could not be recorded: tried again after a backoff of its
        own (in memory: the store is what failed), the others meanwhile."""
        count = self._troubled.get(seq, (0, 0.0))[0] + 1
        delay = Backoff(self.backoff_base, self.backoff_max, 0).delay(count)
        self._troubled[seq] = (count, time.monotonic() + delay)
        log.error("message_outbox_failed", seq=seq, error=type(exc).__name__,
                  retry_in_seconds=round(delay, 1))
        metrics.message_worker_error("outbox")

    async def _send(self, client: httpx.AsyncClient, seq: int, url: str, body: bytes,
                    attempts: int) -> None:
        error = ""
        if not allowed(url, self.allow_list):
            await self.store.failed(seq, "response-url no longer on the allow-list", None)
            return
        try:
            r = await client.post(url, content=body,
                                  headers={"Content-Type": "application/fhir+json"})
        except asyncio.CancelledError:  # our shutdown: not known to have arrived, not failed
            log.info("message_response_interrupted", seq=seq, attempts=attempts)
            metrics.delivery("message_response", "interrupted")
            raise
        except httpx.HTTPError as exc:
            r, error = None, type(exc).__name__
        if r is not None:
            if 200 <= r.status_code < 300:
                await self.store.delivered(seq)
                log.info("message_response_delivered", seq=seq, attempts=attempts + 1)
                metrics.delivery("message_response", "delivered")
                return
            error = f"HTTP {r.status_code}"
        done = attempts + 1
        if done >= self.max_attempts:
            metrics.delivery("message_response", "dead_letter")
            await self.store.failed(seq, error, None)
            log.warning("message_response_dead", seq=seq, attempts=done, error=error)
            return
        metrics.delivery("message_response", "retry")
        delay = Backoff(self.backoff_base, self.backoff_max, self.max_attempts).delay(done)
        await self.store.failed(seq, error, time.time() + delay)
