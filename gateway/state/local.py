"""Shared state in this process's memory: for a single process only (see the package doc)."""

from __future__ import annotations

import time

from gateway.auth.tokens import ReplayCache
from gateway.limits import TokenBuckets


class LocalState:
    def __init__(self, max_keys: int = 10_000, max_replay_entries: int = 100_000) -> None:
        self.max_keys = max_keys
        self._buckets: dict[tuple[str, float, int], TokenBuckets] = {}
        self._replay = ReplayCache(max_replay_entries)
        self._in_flight: dict[str, int] = {}

    async def take(self, key: str, rate: float, burst: int, kind: str = "rl") -> float:
        return self.take_now(key, rate, burst, kind)

    def _table(self, rate: float, burst: int, kind: str) -> TokenBuckets:
        buckets = self._buckets.get((kind, rate, burst))
        if buckets is None:
            buckets = self._buckets[(kind, rate, burst)] = TokenBuckets(rate, burst,
                                                                        self.max_keys)
        return buckets

    def take_now(self, key: str, rate: float, burst: int, kind: str = "rl") -> float:
        return self._table(rate, burst, kind).take(key)

    async def peek(self, key: str, rate: float, burst: int, kind: str) -> float:
        return self.peek_now(key, rate, burst, kind)

    def peek_now(self, key: str, rate: float, burst: int, kind: str) -> float:
        return self._table(rate, burst, kind).peek(key)

    async def admit(self, key: str, failures: tuple[float, int],
                    requests: tuple[float, int]) -> float:
        return self.admit_now(key, failures, requests)

    def admit_now(self, key: str, failures: tuple[float, int],
                  requests: tuple[float, int]) -> float:
        wait = self.peek_now(key, *failures, "authfail")
        return wait if wait > 0 else self.take_now(key, *requests, "src")

    async def acquire(self, key: str, limit: int, lease_seconds: float) -> str | None:
        return self.acquire_now(key, limit)

    def acquire_now(self, key: str, limit: int) -> str | None:
        held = self._in_flight.get(key, 0)
        if held >= limit:
            return None
        self._in_flight[key] = held + 1
        return key

    async def acquire_rated(self, key: str, rate: float, burst: int, limit: int,
                            lease_seconds: float) -> tuple[float, str | None]:
        wait = self.take_now(key, rate, burst)
        return (wait, None) if wait > 0 else (0.0, self.acquire_now(key, limit))

    async def release(self, key: str, lease: str) -> None:
        self.release_now(key)

    def release_now(self, key: str) -> None:
        held = self._in_flight.get(key, 0) - 1
        if held > 0:
            self._in_flight[key] = held
        else:  # no entry for a client with nothing in flight: the table stays bounded
            self._in_flight.pop(key, None)

    async def seen(self, key: str, expires_at: float) -> bool:
        return self._replay.seen(key, expires_at, time.time())

    async def aclose(self) -> None:
        return None
