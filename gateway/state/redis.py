"""Shared state in Redis (redis-py's asyncio client): see the package doc for the contract."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
import time
from typing import Any

import structlog

from gateway import metrics
from gateway.state import SharedStateUnavailable
from gateway.state.local import LocalState

log = structlog.get_logger("gateway.state")

RETRY_AFTER_FAILURE = 1.0
RELEASE_DELAY = 0.002
"""Seconds a given-back lease waits to be sent with others (another process may see the slot
taken that much longer; this process's own next acquire on the key sends it at once)."""
WARN_EVERY = 60.0

# Every script is composed of these pieces (plain Lua text: the one copy of each rule).
# Redis's own clock, so replicas' clocks do not matter: ``now`` in seconds, ``nowms`` in ms.
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local nowms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A token bucket (a hash: tokens ``t`` at time ``ts``): refilled by the time since the last
# take; a missing key IS a full bucket. ``take`` takes one if there is one and keeps the key
# only until the bucket would be full again; ``peek`` takes nothing. Both answer the wait in
# seconds (0: a token was there).
_BUCKET = """
local function refill(key, rate, burst)
  local v = redis.call('HMGET', key, 't', 'ts')
  if not v[1] then return burst, false end
  return math.min(burst, tonumber(v[1]) + math.max(0, now - tonumber(v[2])) * rate), true
end
local function take(key, rate, burst)
  local tokens = refill(key, rate, burst)
  local wait = 0
  if tokens >= 1 then tokens = tokens - 1 else wait = (1 - tokens) / rate end
  redis.call('HSET', key, 't', tostring(tokens), 'ts', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
  return wait
end
local function peek(key, rate, burst)
  local tokens, found = refill(key, rate, burst)
  if not found or tokens >= 1 then return 0 end
  return (1 - tokens) / rate
end
"""

# Leases on a client's concurrency slots: a sorted set of lease ids scored by when each
# ends (ms). ``lease`` drops the ended ones, then takes one of ``limit`` slots (1) or none
# (0); the key lives as long as its newest lease. ``drop`` first removes this process's
# leases given back but not yet sent (ARGV[from..]).
_LEASE = """
local function drop(key, from)
  for i = from, #ARGV do redis.call('ZREM', key, ARGV[i]) end
end
local function lease(key, limit, ttl, id)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', nowms)
  if redis.call('ZCARD', key) >= limit then return 0 end
  redis.call('ZADD', key, nowms + ttl, id)
  redis.call('PEXPIRE', key, ttl)
  return 1
end
"""

# Take a token from KEYS[1] (ARGV: rate, burst). Returns the wait in seconds as a string (a
# Lua number would come back truncated to an integer).
TOKEN_BUCKET = _CLOCK + _BUCKET + """
return tostring(take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])))
"""

# A lease on KEYS[1] (ARGV: limit, ttl ms, lease id, leases given back...): 1, or 0 at the limit.
ACQUIRE = _CLOCK + _LEASE + """
drop(KEYS[1], 4)
return lease(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3])
"""

# Renew this process's leases of one key that still exist (an ended one is not brought back:
# its slot may already be someone else's); the key lives as long as its newest lease.
RENEW = _CLOCK + """
local ttl = tonumber(ARGV[1])
local kept = 0
for i = 2, #ARGV do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], nowms + ttl, ARGV[i])
    kept = kept + 1
  end
end
if kept > 0 and redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return kept
"""

# How long until ``key``'s bucket has a token, taking nothing.
PEEK = _CLOCK + _BUCKET + """
return tostring(peek(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2])))
"""


# Before authentication, one call per request: the address's failed-authentication bucket
# is looked at (KEYS[1], nothing taken) and, if it has a token, one is taken from its request
# bucket (KEYS[2]), in one round trip.
ADMIT = _CLOCK + _BUCKET + """
local wait = peek(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return tostring(wait) end
return tostring(take(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4])))
"""


# After authentication, one call per request: the client's rate (a token from KEYS[1]) and,
# if a token was taken, a lease on one of its in-flight slots (KEYS[2]). ARGV: rate, burst,
# limit, ttl ms, lease id, then this process's leases on KEYS[2] given back but not yet sent
# (removed first, as in ACQUIRE). Returns {wait (a string, as TOKEN_BUCKET), 1 if a lease
# was taken else 0}.
ACQUIRE_RATED = _CLOCK + _BUCKET + _LEASE + """
drop(KEYS[2], 6)
local wait = take(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {tostring(wait), 0} end
return {'0', lease(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5])}
"""


_STORES = {"rl": "rate_limit", "src": "source_limit", "authfail": "auth_failures"}
"""Bucket kinds (key prefixes) and their ``store`` label on the fallback metric."""


def _key(kind: str, raw: str) -> str:
    # Fixed length whatever the client sent; no client string in Redis's key space.
    return f"ccg:{kind}:{hashlib.sha256(raw.encode()).hexdigest()[:40]}"


class RedisState:
    def __init__(self, url: str, timeout: float = 0.25) -> None:
        import redis.asyncio as aioredis
        from redis import exceptions

        self.client: Any = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout,
            retry_on_timeout=False, health_check_interval=30)
        self._bucket = self.client.register_script(TOKEN_BUCKET)
        self._acquire = self.client.register_script(ACQUIRE)
        self._renew = self.client.register_script(RENEW)
        self._peek = self.client.register_script(PEEK)
        self._admit = self.client.register_script(ADMIT)
        self._acquire_rated = self.client.register_script(ACQUIRE_RATED)
        self._held: dict[str, tuple[str, float]] = {}
        """This process's leases in Redis (lease -> key, seconds), renewed while held."""
        self._renewer: asyncio.Task[None] | None = None
        self._releasing: dict[str, list[str]] = {}
        """Leases given back, by key, not yet sent: sent together RELEASE_DELAY later (one
        call for every request that ended meanwhile), or with this process's next acquire
        on the same key, whichever is first."""
        self._releaser: asyncio.Task[None] | None = None
        self._errors = (exceptions.RedisError, OSError, TimeoutError)
        self._down_until = 0.0
        self._warned_at: dict[str, float] = {}
        self.local = LocalState()
        """The fallback for rate limits while Redis cannot be reached."""

    def _available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _failed(self, store: str, action: str, exc: BaseException | None) -> None:
        now = time.monotonic()
        if exc is not None:
            self._down_until = now + RETRY_AFTER_FAILURE
        metrics.SHARED_STATE_FALLBACKS.labels(store, action).inc()
        if now - self._warned_at.get(store, -WARN_EVERY) >= WARN_EVERY:  # a minute per store
            self._warned_at[store] = now
            log.warning("shared_state_unavailable", store=store, action=action,
                        error=type(exc).__name__ if exc else "recently_failed")

    async def take(self, key: str, rate: float, burst: int, kind: str = "rl") -> float:
        if self._available():
            try:
                wait = await self._bucket(keys=[_key(kind, key)], args=[repr(rate), burst])
                return float(wait)
            except self._errors as exc:
                self._failed(_STORES[kind], "local", exc)
        else:
            self._failed(_STORES[kind], "local", None)
        return self.local.take_now(key, rate, burst, kind)

    async def peek(self, key: str, rate: float, burst: int, kind: str) -> float:
        if self._available():
            try:
                return float(await self._peek(keys=[_key(kind, key)],
                                              args=[repr(rate), burst]))
            except self._errors as exc:
                self._failed(_STORES[kind], "local", exc)
        else:
            self._failed(_STORES[kind], "local", None)
        return self.local.peek_now(key, rate, burst, kind)

    async def admit(self, key: str, failures: tuple[float, int],
                    requests: tuple[float, int]) -> float:
        if self._available():
            try:
                return float(await self._admit(
                    keys=[_key("authfail", key), _key("src", key)],
                    args=[repr(failures[0]), failures[1], repr(requests[0]), requests[1]]))
            except self._errors as exc:
                self._failed("source_limit", "local", exc)
        else:
            self._failed("source_limit", "local", None)
        return self.local.admit_now(key, failures, requests)

    async def acquire_rated(self, key: str, rate: float, burst: int, limit: int,
                            lease_seconds: float) -> tuple[float, str | None]:
        if self._available():
            lease = "r:" + secrets.token_hex(8)
            try:
                rkey = _key("cc", key)
                wait, got = await self._acquire_rated(
                    keys=[_key("rl", key), rkey],
                    args=[repr(rate), burst, limit, max(1, int(lease_seconds * 1000)), lease,
                          *self._releasing.pop(rkey, ())])
                if float(wait) > 0:
                    return float(wait), None
                if int(got) != 1:
                    return 0.0, None
                self._hold(lease, key, lease_seconds)
                return 0.0, lease
            except self._errors as exc:
                self._failed("rate_limit", "local", exc)
                self._failed("concurrency", "local", None)
        else:
            self._failed("rate_limit", "local", None)
            self._failed("concurrency", "local", None)
        wait = self.local.take_now(key, rate, burst)
        if wait > 0:
            return wait, None
        local = self.local.acquire_now(key, limit)
        return 0.0, None if local is None else "l:" + local

    def _hold(self, lease: str, key: str, lease_seconds: float) -> None:
        self._held[lease] = (_key("cc", key), lease_seconds)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.create_task(self._renew_held(lease_seconds))

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        if self._available():
            lease = "r:" + secrets.token_hex(8)
            try:
                rkey = _key("cc", key)
                got = await self._acquire(keys=[rkey],
                                          args=[limit, max(1, int(lease_seconds * 1000)), lease,
                                                *self._releasing.pop(rkey, ())])
                if int(got) != 1:
                    return None
                self._hold(lease, key, lease_seconds)
                return lease
            except self._errors as exc:
                self._failed("concurrency", "local", exc)
        else:
            self._failed("concurrency", "local", None)
        local = self.local.acquire_now(key, limit)
        return None if local is None else "l:" + local

    async def release(self, key: str, lease: str) -> None:
        if lease.startswith("l:"):  # taken locally while Redis was away
            self.local.release_now(key)
            return
        self._held.pop(lease, None)
        self._releasing.setdefault(_key("cc", key), []).append(lease)
        if self._releaser is None or self._releaser.done():
            self._releaser = asyncio.create_task(self._send_releases(RELEASE_DELAY))

    async def _send_releases(self, delay: float) -> None:
        await asyncio.sleep(delay)
        batch, self._releasing = self._releasing, {}
        if not batch:
            return
        with contextlib.suppress(*self._errors):  # else the leases end by themselves
            async with self.client.pipeline(transaction=False) as pipe:
                for rkey, leases in batch.items():
                    pipe.zrem(rkey, *leases)
                await pipe.execute()

    async def _renew_held(self, lease_seconds: float) -> None:
        """While this process holds leases, push their ends out every third of their
        lifetime: a long request keeps its slot, a dead process's slots end with it."""
        while self._held:
            await asyncio.sleep(max(0.05, lease_seconds / 3))
            by_key: dict[tuple[str, float], list[str]] = {}
            for lease, (rkey, seconds) in list(self._held.items()):
                by_key.setdefault((rkey, seconds), []).append(lease)
            with contextlib.suppress(*self._errors):  # Redis away: they end by themselves
                async with self.client.pipeline(transaction=False) as pipe:
                    for (rkey, seconds), leases in by_key.items():
                        await self._renew(keys=[rkey], args=[max(1, int(seconds * 1000)),
                                                             *leases], client=pipe)
                    await pipe.execute()

    async def seen(self, key: str, expires_at: float) -> bool:
        if not self._available():
            self._failed("replay", "refused", None)
            raise SharedStateUnavailable()
        ttl_ms = max(1, int((expires_at - time.time()) * 1000))
        try:
            stored = await self.client.set(_key("jti", key), b"1", nx=True, px=ttl_ms)
        except self._errors as exc:
            self._failed("replay", "refused", exc)
            raise SharedStateUnavailable() from None
        return stored is None

    async def ping(self) -> None:
        await self.client.ping()

    async def aclose(self) -> None:
        if self._releaser is not None:
            self._releaser.cancel()
        await self._send_releases(0)
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
        await self.client.aclose()
