"""State that several gateway processes must share: per-client rate limits, per-client
concurrency (requests in flight), the per-address limits before authentication (requests
and failed authentications) and the JWT ``jti`` replay cache.

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
  one a minute) and ``ccg_shared_state_fallbacks_total{store="rate_limit",action="local"}``
  (``store="source_limit"`` and ``"auth_failures"`` for the per-address limits);
* per-client concurrency degrades to this process's own counts the same way
  (``store="concurrency"``).

Concurrency is counted in leases: ``acquire`` takes one (or answers None at the limit) and
``release`` gives it back. In Redis a lease also ends by itself after ``lease_seconds``
unless its process renews it (one task per process renews all its leases every third of
that), so a long request keeps its slot and a process that dies with requests in flight
gives its client's slots back ``lease_seconds`` later.

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
    async def take(self, key: str, rate: float, burst: int, kind: str = "rl") -> float:
        """Take one token from ``key``'s bucket (``rate``/s up to ``burst``): 0.0 if
        allowed, else the seconds until a token is available. ``kind`` names the limit
        (``rl`` per client, ``src`` per address, ``authfail`` failed authentications)."""

    async def peek(self, key: str, rate: float, burst: int, kind: str) -> float:
        """The seconds until ``key``'s bucket has a token (0.0: now); takes nothing."""

    async def seen(self, key: str, expires_at: float) -> bool:
        """Record ``key`` until ``expires_at`` (Unix time); True if it was already there.
        Raises SharedStateUnavailable when that cannot be known."""

    async def admit(self, key: str, failures: tuple[float, int],
                    requests: tuple[float, int]) -> float:
        """``peek`` the ``authfail`` bucket (rate, burst) and, if it has a token, ``take``
        from the ``src`` bucket, in one call: the wait, 0.0 if admitted."""

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        """A lease on one of ``limit`` slots for ``key``, or None when all are taken. The
        lease is renewed while it is held (every third of ``lease_seconds``) and ends by
        itself ``lease_seconds`` after its holder stops renewing it (the process died)."""

    async def acquire_rated(self, key: str, rate: float, burst: int, limit: int,
                            lease_seconds: float) -> tuple[float, str | None]:
        """``take`` (kind ``rl``) then, if a token was taken, ``acquire``, in one call:
        (the wait, None) when over the rate; (0.0, the lease or None at the cap)."""

    async def release(self, key: str, lease: str) -> None:
        """Give a lease back (a lease already expired is ignored)."""

    async def aclose(self) -> None: ...


def create(redis_url: str, timeout_ms: int = 250) -> SharedState:
    if redis_url:
        from gateway.state.redis import RedisState

        return RedisState(redis_url, timeout=timeout_ms / 1000)
    from gateway.state.local import LocalState

    return LocalState()
