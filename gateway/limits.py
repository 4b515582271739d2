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

``/_health`` and ``/_ready`` are exempt from the concurrency and rate limits, so probes keep
answering under load. Responses are OperationOutcomes in the negotiated format.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import metrics
from gateway.auth.principal import get_principal
from gateway.errors import GatewayError, PayloadTooLarge

EXEMPT_PATHS = frozenset({"/_health", "/_ready", "/metrics"})


class TooManyRequests(GatewayError):
    status = 429
    issue_code = "throttled"
    error_code = "RATE_LIMITED"


class ServerBusy(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "SERVER_BUSY"


async def _reject(scope: Scope, receive: Receive, send: Send, error: GatewayError) -> None:
    from gateway.middleware import outcome_response

    await outcome_response(Request(scope, receive), error)(scope, receive, send)


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
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
            message = await receive()
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
        except PayloadTooLarge as exc:  # read by a layer outside the error handlers
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
            await _reject(scope, receive, send, TooManyRequests(
                "too many requests from this client; slow down",
                headers={"Retry-After": str(max(1, math.ceil(wait)))}))
            return
        await self.app(scope, receive, send)


def client_key(scope: Scope) -> str:
    principal = get_principal(scope)
    if principal is not None and principal.client_id:
        return "client:" + principal.client_id
    client = scope.get("client")
    return "ip:" + (client[0] if client else "unknown")
