"""Resource limits as ASGI layers: request body size, in-flight requests, per-client rates.

* ``BodyLimit`` — a request whose ``Content-Length`` exceeds ``max_body_bytes`` is 413
  before anything reads it; a body without a length (chunked) is counted as it streams and
  stopped with 413 at the limit. Applies to every request with a body.
* ``ConcurrencyLimit`` — at most ``max_in_flight`` requests are served at once; the next one
  is 503 ``SERVER_BUSY`` with ``Retry-After`` (shedding load early is cheaper than queueing
  behind a slow backend).
* ``RateLimit`` — a token bucket per client: the authenticated principal's ``client_id``,
  else the peer address (the ASGI server's ``client``, which honours X-Forwarded-For only
  where the server is told to trust the proxy). Over the rate it is 429 ``RATE_LIMITED`` with
  ``Retry-After``. The bucket table is bounded (least recently used keys are dropped).

* ``SourceLimit`` — before authentication, per source address: a token bucket for every
  request, and a much smaller one for failed authentications (401). A source whose
  failures use up their bucket is 429 ``RATE_LIMITED`` before its credentials are even
  checked, so a flood of invalid tokens costs neither signature checks nor audit lines.
* ``ClientConcurrency`` — inside authentication: at most ``per_client`` requests of one
  client (``client_key``) at once, 429 ``TOO_MANY_CONCURRENT_REQUESTS`` beyond it, so one
  client's slow requests (slow bodies, costly searches) cannot hold every in-flight slot.
  It also names the client for ``backend_slot``: at most ``per_client_backend`` backend
  calls of one client run at once and the rest wait their turn, so a client's slow
  queries queue behind each other rather than in front of everyone else's.
* ``BodyLimit`` also bounds the time a body may take to arrive: 408 ``REQUEST_TIMEOUT``
  when it is not complete ``timeout`` seconds after the request started.

The limiters' state sits behind two small interfaces (``Buckets``, ``Slots``) with
in-memory implementations here. With ``CCG_REDIS_URL`` the per-client rate and in-flight
caps and the per-address buckets live in Redis instead (``shared``: gateway.state), shared
by every worker and replica; without it nothing on the request path awaits anything extra.
The backend queue (``ClientQueues``) stays per process with Redis too: it bounds this
process's worker threads and connection pool, which no other process shares.

``/_health`` and ``/_ready`` are exempt from the concurrency and rate limits, so probes keep
answering under load. Responses are OperationOutcomes in the negotiated format.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any, Protocol

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.auth.principal import get_principal
from gateway.errors import GatewayError, PayloadTooLarge, RequestTimeout

EXEMPT_PATHS = frozenset({"/_health", "/_ready", "/metrics"})


class TooManyRequests(GatewayError):
    status = 429
    issue_code = "throttled"
    error_code = "RATE_LIMITED"


class ServerBusy(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "SERVER_BUSY"


class TooManyConcurrent(TooManyRequests):
    error_code = "TOO_MANY_CONCURRENT_REQUESTS"


async def _reject(scope: Scope, receive: Receive, send: Send, error: GatewayError) -> None:
    from gateway.middleware import outcome_response

    await outcome_response(Request(scope, receive), error)(scope, receive, send)


async def _slow_down(scope: Scope, receive: Receive, send: Send, who: str, wait: float
                     ) -> None:
    """429 for a rate limit: Retry-After the seconds until a token, rounded up."""
    await _reject(scope, receive, send, TooManyRequests(
        f"too many requests from this {who}; slow down",
        headers={"Retry-After": str(max(1, math.ceil(wait)))}))


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float = 0.0) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout
        """Seconds from the start of a request until its body must have arrived; 0 = none."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.max_bytes <= 0 and self.timeout <= 0):
            await self.app(scope, receive, send)
            return
        for key, value in scope["headers"]:
            if key == b"transfer-encoding" or (key == b"content-length" and value != b"0"):
                break
        else:
            # No body (HTTP/1.1: no Transfer-Encoding, no Content-Length or 0): nothing to
            # count or wait for. Most requests (GET) pass straight through.
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes if self.max_bytes > 0 else math.inf
        deadline = time.monotonic() + self.timeout if self.timeout > 0 else math.inf
        for key, value in scope["headers"]:
            if key == b"content-length":
                if not value.isdigit():
                    from gateway.errors import BadRequest

                    await _reject(scope, receive, send, BadRequest("invalid Content-Length"))
                    return
                if int(value) > limit:
                    await _reject(scope, receive, send, PayloadTooLarge(
                        f"the request body is larger than {limit} bytes"))
                    return
        seen = 0
        started = False

        async def counted() -> Message:
            nonlocal seen
            if deadline == math.inf:
                message = await receive()
            else:
                # A body sent a byte at a time holds a request slot for as long as it lasts:
                # it gets until the deadline, all of it, not a fresh wait per chunk.
                try:
                    async with asyncio.timeout_at(_loop_time(deadline)):
                        message = await receive()
                except TimeoutError:
                    raise RequestTimeout(
                        f"the request body did not arrive within {self.timeout:g} seconds"
                    ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise PayloadTooLarge(f"the request body is larger than {limit} bytes")
            return message

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, watch)
        except (PayloadTooLarge, RequestTimeout) as exc:  # read outside the error handlers
            if started:
                raise
            await _reject(scope, receive, send, exc)


class ConcurrencyLimit:
    def __init__(self, app: ASGIApp, max_in_flight: int, retry_after: int = 1) -> None:
        self.app = app
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.max_in_flight <= 0
                or scope["path"] in EXEMPT_PATHS):
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            metrics.refused("load_shedding")
            await _reject(scope, receive, send, ServerBusy(
                "the server is busy; try again shortly",
                headers={"Retry-After": str(self.retry_after)}))
            return
        self.in_flight += 1  # one event loop: no lock needed between check and increment
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


class Buckets(Protocol):
    """Per-key token buckets (in memory here; a shared store can implement the same)."""

    rate: float
    burst: int

    def take(self, key: str) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""

    def peek(self, key: str) -> float:
        """The seconds until ``key`` has a token (0.0: it has one now); takes nothing."""


class Slots(Protocol):
    """Per-key counters of things in progress, each capped."""

    def acquire(self, key: str) -> bool:
        """Count one more for ``key``, unless it is at its cap (then False)."""

    def release(self, key: str) -> None: ...


class TokenBuckets:
    """``rate`` tokens a second up to ``burst``, per key; at most ``max_keys`` keys kept."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000,
                 clock: Any = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1, burst)
        self.max_keys = max_keys
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token: 0.0 if allowed, else the seconds until one is available."""
        now = self.clock()
        tokens, last = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def peek(self, key: str) -> float:
        found = self._buckets.get(key)
        if found is None:
            return 0.0
        tokens, last = found
        tokens = min(float(self.burst), tokens + (self.clock() - last) * self.rate)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate


class CountedSlots:
    """``limit`` per key at once; keys with nothing in progress are not kept."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._counts: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        n = self._counts.get(key, 0)
        if n >= self.limit:
            return False
        self._counts[key] = n + 1
        return True

    def release(self, key: str) -> None:
        n = self._counts.get(key, 0) - 1
        if n > 0:
            self._counts[key] = n
        else:
            self._counts.pop(key, None)


class RateLimit:
    """Must sit inside authentication so the principal is known (else: per peer address)."""

    def __init__(self, app: ASGIApp, per_minute: int, burst: int, shared: Any = None) -> None:
        self.app = app
        self.buckets = TokenBuckets(per_minute / 60.0, burst) if per_minute > 0 else None
        # gateway.state.SharedState (Redis): the buckets every worker and replica share
        self.shared = shared if per_minute > 0 else None
        self.rate = per_minute / 60.0
        self.burst = max(1, burst)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or self.buckets is None
                or scope["path"] in EXEMPT_PATHS):
            await self.app(scope, receive, send)
            return
        if self.shared is not None:
            wait = await self.shared.take(client_key(scope), self.rate, self.burst)
        else:
            wait = self.buckets.take(client_key(scope))
        if wait > 0:
            metrics.refused("rate_limit")
            await _slow_down(scope, receive, send, "client", wait)
            return
        await self.app(scope, receive, send)


def client_key(scope: Scope) -> str:
    principal = get_principal(scope)
    if principal is not None and principal.client_id:
        return "client:" + principal.client_id
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


def _loop_time(deadline: float) -> float:
    """A ``time.monotonic`` deadline on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())


def source_key(scope: Scope) -> str:
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")


class SourceLimit:
    """Outside authentication: limits by source address, whoever the request claims to be.

    With ``shared`` (gateway.state, Redis) the buckets are Redis's, at the rates and bursts
    of ``requests`` and ``failures``; those tables then serve only as the configuration."""

    def __init__(self, app: ASGIApp, requests: Buckets | None, failures: Buckets | None,
                 shared: Any = None) -> None:
        self.app = app
        self.requests = requests
        self.failures = failures
        self.shared = shared

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["path"] in EXEMPT_PATHS
                or (self.requests is None and self.failures is None)):
            await self.app(scope, receive, send)
            return
        if self.shared is not None:
            await self._shared(scope, receive, send)
            return
        key = source_key(scope)
        wait = self.failures.peek(key) if self.failures is not None else 0.0
        if not wait and self.requests is not None:
            wait = self.requests.take(key)
        if wait > 0:
            await _slow_down(scope, receive, send, "address", wait)
            return
        if self.failures is None:
            await self.app(scope, receive, send)
            return
        failures = self.failures

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                failures.take(key)
            await send(message)

        await self.app(scope, receive, watch)

    async def _shared(self, scope: Scope, receive: Receive, send: Send) -> None:
        shared, key = self.shared, source_key(scope)
        failures, requests = self.failures, self.requests
        if failures is not None and requests is not None:  # one round trip for both
            wait = await shared.admit(key, (failures.rate, failures.burst),
                                      (requests.rate, requests.burst))
        elif failures is not None:
            wait = await shared.peek(key, failures.rate, failures.burst, "authfail")
        else:
            assert requests is not None
            wait = await shared.take(key, requests.rate, requests.burst, "src")
        if wait > 0:
            await _slow_down(scope, receive, send, "address", wait)
            return
        if failures is None:
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                await shared.take(key, failures.rate, failures.burst, "authfail")
            await send(message)

        await self.app(scope, receive, watch)


current_client: ContextVar[str | None] = ContextVar("current_client", default=None)
"""The client (``client_key``) of the request being served, for ``backend_slot``."""


class ClientQueues:
    """At most ``limit`` backend calls per client at once; the others wait in turn (FIFO)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queues: dict[str, asyncio.Semaphore] = {}
        self._users: dict[str, int] = {}

    @asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        sem = self._queues.get(key)
        if sem is None:
            sem = self._queues[key] = asyncio.Semaphore(self.limit)
        self._users[key] = self._users.get(key, 0) + 1
        try:
            async with sem:
                yield
        finally:
            left = self._users[key] - 1
            if left:
                self._users[key] = left
            else:  # nobody holds or waits for it: not kept (the table stays small)
                del self._users[key]
                del self._queues[key]


_backend_queues: ContextVar[ClientQueues | None] = ContextVar("backend_queues", default=None)


class _NoSlot:
    """The slot of a request without a backend queue: nothing to wait for. One shared object,
    not an async generator made and run per backend call."""

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *_exc: object) -> None:
        return None


_NO_SLOT = _NoSlot()


def backend_slot() -> AbstractAsyncContextManager[None]:
    """Around one backend call: wait for one of the client's backend slots."""
    queues = _backend_queues.get()
    if queues is None:
        return _NO_SLOT
    key = current_client.get()
    if key is None:
        return _NO_SLOT
    return queues.slot(key)


class ClientConcurrency:
    """Inside authentication: a cap per client on requests in flight, and the client's
    backend queue for the request's backend calls."""

    def __init__(self, app: ASGIApp, slots: Slots | None, backend: ClientQueues | None,
                 retry_after: int = 1, shared: Any = None, limit: int = 0,
                 lease_seconds: float = 30.0, rate: tuple[float, int] | None = None) -> None:
        self.app = app
        self.slots = slots
        self.backend = backend
        self.retry_after = retry_after
        # gateway.state.SharedState (Redis): leases on ``limit`` slots per client that every
        # worker and replica share; ``slots`` is then unused. The backend queue stays in
        # this process: it guards this process's worker threads and pool.
        self.shared: Any = shared if limit > 0 else None
        self.limit = limit
        self.lease_seconds = lease_seconds
        # (per second, burst): the client's rate limit, checked here in the same Redis call
        # as its lease (the app builder then leaves RateLimit out of the shared path)
        self.rate = rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.shared is not None:
            await self._leased(scope, receive, send)
            return
        key = client_key(scope)
        if self.slots is not None and not self.slots.acquire(key):
            await self._at_capacity(scope, receive, send)
            return
        try:
            await self._as_client(key, scope, receive, send)
        finally:
            if self.slots is not None:
                self.slots.release(key)

    async def _leased(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = client_key(scope)
        if self.rate is not None:
            wait, lease = await self.shared.acquire_rated(key, self.rate[0], self.rate[1],
                                                          self.limit, self.lease_seconds)
            if wait > 0:
                metrics.refused("rate_limit")
                await _slow_down(scope, receive, send, "client", wait)
                return
        else:
            lease = await self.shared.acquire(key, self.limit, self.lease_seconds)
        if lease is None:
            await self._at_capacity(scope, receive, send)
            return
        try:
            await self._as_client(key, scope, receive, send)
        finally:
            await self.shared.release(key, lease)

    async def _at_capacity(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _reject(scope, receive, send, TooManyConcurrent(
            "too many requests from this client at once; wait for some to finish",
            headers={"Retry-After": str(self.retry_after)}))

    async def _as_client(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        """The request, with its client and backend queue set for the backend calls."""
        client_token = current_client.set(key)
        queues_token = _backend_queues.set(self.backend)
        try:
            await self.app(scope, receive, send)
        finally:
            current_client.reset(client_token)
            _backend_queues.reset(queues_token)
