"""Signing keys from a JWKS URL or file: cached, refreshed on an unknown ``kid`` at most once
per ``refresh_interval``, and re-read when older than ``max_age``.

Keys are selected by the token's ``kid`` only. Keys embedded in or pointed to by the token
(``jwk``, ``jku``, ``x5u``, ``x5c`` headers) are never used. Keys marked ``use: enc``, keys
whose ``key_ops`` exclude ``verify``, keys with private members and keys whose ``alg`` or
curve does not match the token's algorithm are never candidates.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import jwt
import structlog

log = structlog.get_logger("gateway.auth")

MAX_JWKS_BYTES = 1024 * 1024
_KTY = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
_CURVE = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "k")


class JwksUnavailable(Exception):
    pass


class JwksSource:
    def __init__(self, *, url: str | None = None, file: Path | None = None,
                 refresh_interval: float = 60, max_age: float = 3600, timeout: float = 5,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if (url is None) == (file is None):
            raise ValueError("a JWKS source needs exactly one of url and file")
        self.url = url
        self.file = file
        self.refresh_interval = refresh_interval
        self.max_age = max_age
        self.timeout = timeout
        self.clock = clock
        self.fetches = 0
        """How many times the JWKS was fetched or read (successful or not)."""
        self._keys: list[dict[str, Any]] | None = None
        self._loaded_at = 0.0
        self._last_attempt: float | None = None
        self._parsed: dict[tuple[str | None, str, int], Any] = {}
        self._lock = anyio.Lock()

    # -- fetching

    def _read(self) -> bytes:
        if self.file is not None:
            with self.file.open("rb") as f:
                return f.read(MAX_JWKS_BYTES + 1)
        assert self.url is not None
        request = urllib.request.Request(self.url, headers={"Accept": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            data: bytes = response.read(MAX_JWKS_BYTES + 1)
            return data

    async def _refresh(self) -> None:
        self._last_attempt = self.clock()
        self.fetches += 1
        try:
            raw = await anyio.to_thread.run_sync(self._read)
            if len(raw) > MAX_JWKS_BYTES:
                raise ValueError("JWKS larger than 1 MiB")
            document = json.loads(raw)
            keys = document.get("keys") if isinstance(document, dict) else None
            if not isinstance(keys, list):
                raise ValueError("no 'keys' array")
        except Exception as exc:  # a JWKS problem must not take the gateway down
            log.warning("jwks_fetch_failed", error=type(exc).__name__,
                        source="url" if self.url else "file")
            return
        self._keys = [k for k in keys if isinstance(k, dict)]
        self._loaded_at = self._last_attempt
        self._parsed.clear()

    def _may_refresh(self) -> bool:
        return (self._last_attempt is None
                or self.clock() - self._last_attempt >= self.refresh_interval)

    # -- lookup

    async def key_for(self, kid: str | None, alg: str) -> Any | None:
        """The verification key for (kid, alg), or None. Raises JwksUnavailable if no JWKS
        could ever be loaded."""
        stale = self._keys is None or self.clock() - self._loaded_at >= self.max_age
        if stale and self._may_refresh():
            async with self._lock:
                stale = self._keys is None or self.clock() - self._loaded_at >= self.max_age
                if stale and self._may_refresh():
                    await self._refresh()
        key = self._find(kid, alg)
        if key is None and self._may_refresh():
            attempt = self._last_attempt
            async with self._lock:
                # Another request may have refreshed while this one waited for the lock.
                if self._last_attempt == attempt and self._may_refresh():
                    await self._refresh()
            key = self._find(kid, alg)
        if self._keys is None:
            raise JwksUnavailable()
        return key

    def _find(self, kid: str | None, alg: str) -> Any | None:
        if not self._keys:
            return None
        generation = id(self._keys)
        cache_key = (kid, alg, generation)
        if cache_key in self._parsed:
            return self._parsed[cache_key]
        candidates = [k for k in self._keys if _usable(k, alg)]
        if kid is not None:
            candidates = [k for k in candidates if k.get("kid") == kid]
        found: Any | None = None
        if len(candidates) == 1:  # without a kid, only an unambiguous key set will do
            try:
                found = jwt.PyJWK(candidates[0], algorithm=alg).key
            except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
                found = None
        self._parsed[cache_key] = found
        return found


def _usable(jwk: dict[str, Any], alg: str) -> bool:
    if jwk.get("use", "sig") != "sig":
        return False
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return False
    if any(m in jwk for m in _PRIVATE_MEMBERS):
        return False
    if "alg" in jwk and jwk["alg"] != alg:
        return False
    if jwk.get("kty") != _KTY.get(alg[:2]):
        return False
    return not (alg in _CURVE and jwk.get("crv") != _CURVE[alg])
