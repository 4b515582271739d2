"""State that several gateway processes must share: per-client rate limits, per-client
concurrency (requests in flight) and the JWT ``jti`` replay cache.

Two stores behind one small interface:

* ``LocalState`` (the default): in this process's memory. Correct for ONE process only —
  with ``--workers N`` or several replicas each process keeps its own buckets (a client gets
  N times its rate) and its own replay cache (a token can be replayed once per process).
* ``RedisState`` (``CCG_REDIS_URL`` set): in Redis, shared by every worker and replica.
  Atomic (a Lua script per token-bucket take; ``SET NX`` with an expiry per ``jti``), every
  key bounded in size and living only as long as it matters (TTL).

When Redis cannot be reached (connection refused, timeout — ``CCG_REDIS_TIMEOUT_MS``), the
behaviour is fixed and declared:

* replay protection fails CLOSED: the request is refused with 503 ``SHARED_STATE_UNAVAILABLE``
  (a token that cannot be checked for replay is not accepted);
* rate limiting degrades to this process's local buckets, with a warning in the log (at most
  one a minute) and ``ccg_shared_state_fallbacks_total{store="rate_limit",action="local"}``;
* per-client concurrency degrades to this process's own counts the same way
  (``store="concurrency"``).

Concurrency is counted in leases: ``acquire`` takes one (or answers None at the limit) and
``release`` gives it back. In Redis a lease also ends by itself after ``lease_seconds``, so a
process that dies with requests in flight does not hold its client's slots for ever.

After a failure Redis is not asked again for ``RETRY_AFTER_FAILURE`` seconds, so an outage
costs each request nothing but the fallback, not a timeout.
"""

from __future__ import annotations

from typing import Protocol

from gateway.errors import GatewayError


class SharedStateUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "SHARED_STATE_UNAVAILABLE"

    def __init__(self, message: str = "the gateway's shared state store cannot be reached; "
                 "the token cannot be checked for replay") -> None:
        super().__init__(message, headers={"Retry-After": "1"})


class SharedState(Protocol):
    async def take(self, key: str, rate: float, burst: int) -> float:
        """Take one token from ``key``'s bucket (``rate``/s up to ``burst``): 0.0 if
        allowed, else the seconds until a token is available."""

    async def seen(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (Unix time); True if it was already there.
        Raises SharedStateUnavailable when that cannot be known."""

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        """A lease on one of ``limit`` slots for ``key``, or None when all are taken."""

    async def release(self, key: str, lease: str) -> None:
        """Give a lease back (a lease already expired is ignored)."""

    async def aclose(self) -> None: ...


def create(redis_url: str, timeout_ms: int = 250) -> SharedState:
    if redis_url:
        from gateway.state.redis import RedisState

        return RedisState(redis_url, timeout=timeout_ms / 1000)
    from gateway.state.local import LocalState

    return LocalState()
