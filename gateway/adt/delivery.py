"""Rest-hook delivery of Subscription notifications from the store's outbox.

At least once, in order per (subscription, patient): only the head of each patient's queue is
sent; it leaves the queue when the subscriber answers 2xx, or after ``max_attempts`` failures
(exponential backoff with jitter, capped), when it becomes a dead letter (status ``dead``, the
Subscription's ``status`` turns ``error``) and the patient's next notification follows.
A crash between the subscriber's 2xx and our commit resends the same notification: the
``X-Notification-Id`` header and the Bundle id (``<subscription>-<seq>``) are the same every
time, for the subscriber to deduplicate on. A send stopped by our own shutdown or
cancellation records nothing (neither delivered: no 2xx was seen, nor a failed attempt: the
failure was ours): it stays pending and is sent again after the restart; an outcome already
seen is recorded before the stop completes. A notification cancelled meanwhile (its
Subscription turned off or deleted) stays cancelled whatever the attempt's outcome.

One process delivers per store at a time (a lease in the store): two could otherwise send a
patient's notifications out of order.

Nothing is sent to an endpoint outside the configured allow-list (checked again before each
attempt, so narrowing the list stops delivery) and redirects are not followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import structlog

from gateway import metrics
from gateway.adt.config import AdtSettings
from gateway.adt.store import AdtStore, Due
from gateway.retry import Backoff

log = structlog.get_logger("gateway.adt.delivery")

FHIR_JSON = "application/fhir+json"


def notification_bundle(due: Due, base_url: str) -> dict[str, Any]:
    entries = [{"fullUrl": f"{base_url}/{r['resourceType']}/{r['id']}", "resource": r}
               for r in due.resources]
    return {
        "resourceType": "Bundle",
        "id": due.notification_id,
        "meta": {"lastUpdated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")},
        "type": "collection",
        "entry": entries,
    }


class Deliverer:
    def __init__(self, store: AdtStore, settings: AdtSettings, *, base_url: str = "",
                 clock: Callable[[], float] = time.time, holder: str | None = None) -> None:
        self.store = store
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        """Who delivers (the lease holder): host and listen address for the listener."""
        # long enough to cover one round of attempts, each up to the timeout
        self.lease_ttl = settings.delivery_timeout * 9 + 30
        self.settings = settings
        self.base_url = base_url.rstrip("/")
        self.clock = clock
        self._wake = asyncio.Event()
        self._client = httpx.AsyncClient(timeout=settings.delivery_timeout,
                                         follow_redirects=False, trust_env=False)
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._closing = False
        """A stop has begun: no new attempt is started."""
        self._recording: set[asyncio.Future[None]] = set()
        """Outcomes being recorded: a stop waits for them."""

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self, grace: float = 0.0) -> None:
        """Stop delivering. With ``grace``, no attempt is started any more and those in
        flight may finish, their outcomes recorded (at most ``grace`` seconds); any still in
        flight then is interrupted (left pending, sent again after the restart). Then the
        lease is given back, so another process on the store (a replacement pod on another
        host) delivers at once instead of waiting for it to expire."""
        self._closing = True
        self._wake.set()
        try:
            if self._task is not None and grace > 0:
                await asyncio.wait({self._task}, timeout=grace)
        finally:
            self._stopping = True  # from here, a failed send may be our own doing: not counted
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
            if self._recording:
                await asyncio.gather(*self._recording, return_exceptions=True)
            await self._client.aclose()
            try:
                await asyncio.to_thread(self.store.release_lease, "delivery", self.holder)
            except Exception as exc:  # it expires on its own (lease_ttl)
                log.warning("delivery_lease_not_released", error=type(exc).__name__)

    async def _run(self) -> None:
        pruned_at = 0.0
        while not self._closing:
            try:
                if self.clock() - pruned_at > 3600:  # hourly: the store's disk is bounded
                    pruned_at = self.clock()
                    await asyncio.to_thread(self.store.prune, pruned_at
                                            - self.settings.retention_days * 86400)
                held = await asyncio.to_thread(self.store.acquire_lease, "delivery",
                                               self.holder, self.lease_ttl)
                n = await self.run_once() if held else 0
            except Exception as exc:  # the store is briefly unavailable: try again
                log.error("delivery_loop_failed", error=type(exc).__name__)
                n = 0
            if n == 0 and not self._closing:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)

    async def run_once(self) -> int:
        """Attempt every due head-of-queue notification once; how many were attempted."""
        due = await asyncio.to_thread(self.store.due, self.clock(),
                                      self.settings.delivery_concurrency * 8)
        if not due:
            return 0
        sem = asyncio.Semaphore(self.settings.delivery_concurrency)

        async def one(d: Due) -> None:
            async with sem:
                if not self._closing:  # stopping: those not begun stay pending
                    await self._attempt(d)

        # every attempt ends before the next round (or the client closes): one failing to
        # record its outcome must not leave the others running unawaited
        results = await asyncio.gather(*(one(d) for d in due), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        for r in failed:
            if isinstance(r, asyncio.CancelledError):
                raise r
        if failed:
            raise failed[0]
        return len(due)

    async def _attempt(self, due: Due) -> None:
        try:
            error = await self._post(due)
        except asyncio.CancelledError:
            self._interrupted(due)
            raise
        if error is not None and self._stopping:  # the client closed under it: unknown
            self._interrupted(due)
            return
        # The outcome is known: recorded even if we are cancelled meanwhile (the thread
        # runs to the end; a 2xx is never lost to a shutdown, nor a failure counted twice).
        task = asyncio.ensure_future(self._record(due, error))
        self._recording.add(task)
        task.add_done_callback(self._recording.discard)
        await asyncio.shield(task)

    def _interrupted(self, due: Due) -> None:
        """Stopped mid-send (shutdown, cancellation): whether the subscriber has it is not
        known, so nothing is recorded — the notification stays pending with its attempts
        unchanged, and is sent again (same X-Notification-Id) after the restart."""
        log.info("notification_interrupted", notification=due.notification_id,
                 attempts=due.attempts)
        metrics.delivery("subscription", "interrupted")

    async def _record(self, due: Due, error: str | None) -> None:
        if error is None:
            await asyncio.to_thread(self.store.delivered, due.id, due.subscription_id,
                                    recovered=due.subscription.get("status") == "error")
            log.info("notification_delivered", notification=due.notification_id,
                     attempts=due.attempts + 1)
            metrics.delivery("subscription", "delivered")
            return
        attempts = due.attempts + 1
        policy = Backoff(self.settings.backoff_seconds, self.settings.backoff_max_seconds,
                         self.settings.max_attempts)
        if policy.exhausted(attempts):
            retry_at = None
            log.warning("notification_dead_lettered", notification=due.notification_id,
                        attempts=attempts, error=error)
        else:
            retry_at = self.clock() + policy.delay(attempts)
            log.info("notification_retry", notification=due.notification_id,
                     attempts=attempts, error=error)
        metrics.delivery("subscription", "retry" if retry_at is not None else "dead_letter")
        await asyncio.to_thread(self.store.failed, due.id, due.subscription_id, error, retry_at)

    async def _post(self, due: Due) -> str | None:
        """None on success, else why not (no PHI: status codes and error types only)."""
        if not self.settings.endpoint_allowed(due.endpoint):
            return "endpoint not in the allow-list"
        channel = due.subscription.get("channel") or {}
        headers = {"X-Notification-Id": due.notification_id,
                   "X-Subscription-Id": due.subscription_id,
                   "X-ADT-Event": due.event}
        for h in channel.get("header") or []:
            name, sep, value = str(h).partition(":")
            if sep and name.strip():
                headers[name.strip()] = value.strip()
        payload = channel.get("payload")
        content = b""
        if payload:
            headers["Content-Type"] = FHIR_JSON
            content = orjson.dumps(notification_bundle(due, self.base_url))
        try:
            resp = await self._client.post(due.endpoint, content=content, headers=headers)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError as exc:
            return f"connection failed ({type(exc).__name__})"
        if 200 <= resp.status_code < 300:
            return None
        return f"HTTP {resp.status_code}"
