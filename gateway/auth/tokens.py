"""JWT bearer access tokens (RFC 9068 profile, RFC 8725 best practice), verified with PyJWT.

Checked, in this order, each failure a 401 ``invalid_token`` with a reason:

1. size (16 KiB at most) and shape: a compact JWS (three parts; JWE is refused);
2. ``alg`` in the configured allow-list — asymmetric algorithms only (``none`` and HS* are
   refused when the settings are read, so an HMAC "signed" with a public key never verifies);
3. ``typ`` is ``at+jwt`` / ``application/at+jwt`` (``JWT`` or no ``typ`` too when
   ``CCG_JWT_ACCEPT_TYP_JWT`` is on); a ``crit`` header is refused (no extension is understood);
4. the key: by ``kid`` from the configured JWKS only (never from the token);
5. the signature, then ``exp`` / ``nbf`` / ``iat`` (with ``leeway`` seconds), the exact
   ``iss``, and an ``aud`` naming this gateway — ``exp``, ``iat``, ``iss`` and ``aud`` are
   required;
6. lifetime ``exp - iat`` at most ``max_lifetime``;
7. optionally, ``jti`` not seen before (replay cache, see ``ReplayCache``);
8. a client identity (``client_id``, else ``azp``, else ``sub``), a well-formed ``patient``
   claim, and a ``patient`` claim whenever a ``patient/`` scope is granted.

A token that passed is remembered (``JwtVerifier.principal``), so a client that sends the same
token on every request pays for the signature once: by the SHA-256 of the whole token, at most
``VERIFIED_CACHE_ENTRIES`` tokens, each until its ``exp`` or for ``VERIFIED_CACHE_TTL`` seconds,
whichever is sooner, and only while the JWKS still gives the very key that verified it (a
rotated-out key, or a JWKS that cannot be loaded, is noticed as before). Failures are never
remembered, and nothing is when the ``jti`` replay cache is on (every use must reach it).
"""

from __future__ import annotations

import hashlib
import heapq
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jwt

from gateway.auth.config import JwtConfig
from gateway.auth.errors import AuthorizationServerUnavailable, InvalidToken
from gateway.auth.jwks import JwksSource, JwksUnavailable
from gateway.auth.principal import Principal, parse_scopes

MAX_TOKEN_BYTES = 16 * 1024
FHIR_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_ACCESS_TOKEN_TYPES = ("at+jwt", "application/at+jwt")
VERIFIED_CACHE_ENTRIES = 1024
VERIFIED_CACHE_TTL = 60.0


class ReplayCache:
    """Seen ``jti`` values until their token expires; bounded.

    Per process: replicas do not share it. When full, the entry closest to expiry is
    evicted (that token could then be replayed once more); size it above the number of
    tokens accepted per token lifetime.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    def seen(self, key: str, expires_at: float, now: float) -> bool:
        """Record ``key``; True if it was already recorded and has not expired."""
        while self._heap and self._heap[0][0] <= now:
            when, old = heapq.heappop(self._heap)
            if self._expiry.get(old) == when:
                del self._expiry[old]
        if key in self._expiry:
            return True
        while len(self._expiry) >= self.max_entries and self._heap:
            when, old = heapq.heappop(self._heap)
            if self._expiry.get(old) == when:
                del self._expiry[old]
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return False


class _Verified(NamedTuple):
    principal: Principal
    kid: str | None
    alg: str
    key: Any
    """The key that verified the token: the entry holds only while the JWKS still gives it."""
    until: float


class JwtVerifier:
    def __init__(self, config: JwtConfig, jwks: JwksSource | None = None,
                 clock: Callable[[], float] = time.time,
                 cache_entries: int = VERIFIED_CACHE_ENTRIES,
                 cache_ttl: float = VERIFIED_CACHE_TTL, shared_replay: Any = None) -> None:
        self.config = config
        self.jwks = jwks or JwksSource(
            url=config.jwks_url, file=config.jwks_file,
            refresh_interval=config.jwks_refresh_interval, max_age=config.jwks_max_age)
        self.clock = clock
        self.replay = ReplayCache() if config.jti_replay else None
        # gateway.state.SharedState (Redis): one replay cache for every worker and replica
        self.shared_replay = shared_replay if config.jti_replay else None
        self.cache_entries = cache_entries
        self.cache_ttl = cache_ttl
        # Verified tokens by SHA-256 (see the module doc); none with the replay cache on.
        self._verified: dict[bytes, _Verified] | None = (
            {} if self.replay is None and cache_entries > 0 else None)

    async def verify(self, token: str) -> dict[str, Any]:
        """The token's claims, or InvalidToken / AuthorizationServerUnavailable."""
        claims, _kid, _alg, _key = await self._verify(token)
        return claims

    async def _verify(self, token: str) -> tuple[dict[str, Any], str | None, str, Any]:
        """``verify``, plus the kid, algorithm and key that verified the token."""
        cfg = self.config
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("the token is too large")
        parts = token.split(".")
        if len(parts) == 5:
            raise InvalidToken("encrypted tokens (JWE) are not accepted")
        if len(parts) != 3:
            raise InvalidToken("the token is not a JWS compact serialization")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("the token cannot be decoded") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in cfg.algorithms:
            raise InvalidToken("the signing algorithm is not allowed")
        typ = header.get("typ")
        typ = typ.lower() if isinstance(typ, str) else typ
        accepted = typ in _ACCESS_TOKEN_TYPES or (cfg.accept_typ_jwt and typ in ("jwt", None))
        if not accepted:
            raise InvalidToken("the token type (typ) must be at+jwt")
        if "crit" in header:
            raise InvalidToken("critical header extensions are not supported")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("the key id (kid) is malformed")
        try:
            key = await self.jwks.key_for(kid, alg)
        except JwksUnavailable:
            raise AuthorizationServerUnavailable() from None
        if key is None:
            raise InvalidToken("the signing key is not known")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=[alg], audience=list(cfg.audiences),
                issuer=cfg.issuer, leeway=cfg.leeway,
                options={"require": ["exp", "iat", "iss", "aud"], "verify_signature": True,
                         "verify_exp": True, "verify_nbf": True, "verify_iat": True,
                         "verify_iss": True, "verify_aud": True},
            )
        except jwt.ExpiredSignatureError:
            raise InvalidToken("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("the token is not valid yet") from None
        except jwt.InvalidAudienceError:
            raise InvalidToken("the token is not intended for this server (aud)") from None
        except jwt.InvalidIssuerError:
            raise InvalidToken("the token issuer is not trusted") from None
        except jwt.InvalidSignatureError:
            raise InvalidToken("the token signature is not valid") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"the token has no {exc.claim} claim") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise InvalidToken("the token is malformed") from None
        if claims.get("iss") != cfg.issuer:  # exact, whatever the library version does
            raise InvalidToken("the token issuer is not trusted")
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int | float) or not isinstance(iat, int | float):
            raise InvalidToken("exp and iat must be numbers")
        if exp - iat > cfg.max_lifetime:
            raise InvalidToken("the token lifetime is longer than this server accepts")
        if self.replay is not None:
            jti = claims.get("jti")
            if not isinstance(jti, str) or not jti:
                raise InvalidToken("the token has no jti claim")
            now = self.clock()
            key = f"{cfg.issuer}\x00{jti}"
            if self.shared_replay is not None:  # fails closed: SharedStateUnavailable (503)
                used = await self.shared_replay.seen(key, exp + cfg.leeway)
            else:
                used = self.replay.seen(key, exp + cfg.leeway, now)
            if used:
                raise InvalidToken("the token has already been used (jti)")
        return claims, kid, alg, key

    async def principal(self, token: str) -> Principal:
        cache = self._verified
        if cache is None:
            return principal_from_claims(await self.verify(token))
        digest = hashlib.sha256(token.encode()).digest()
        now = self.clock()
        hit = cache.get(digest)
        if hit is not None:
            if now < hit.until:
                try:
                    key = await self.jwks.key_for(hit.kid, hit.alg)
                except JwksUnavailable:
                    raise AuthorizationServerUnavailable() from None
                if key is hit.key:
                    return hit.principal
            cache.pop(digest, None)  # expired, or the key changed: verify afresh
        claims, kid, alg, key = await self._verify(token)
        principal = principal_from_claims(claims)
        until = min(float(claims["exp"]), now + self.cache_ttl)
        if until > now:
            while len(cache) >= self.cache_entries:
                del cache[next(iter(cache))]  # the oldest
            cache[digest] = _Verified(principal, kid, alg, key, until)
        return principal


def principal_from_claims(claims: dict[str, Any]) -> Principal:
    raw_scope = claims.get("scope", claims.get("scp", ""))
    if isinstance(raw_scope, str):
        scopes = parse_scopes(raw_scope)
    elif isinstance(raw_scope, list):
        scopes = parse_scopes([s for s in raw_scope if isinstance(s, str)])
    else:
        raise InvalidToken("the scope claim is malformed")
    client_id = next((v for v in (claims.get("client_id"), claims.get("azp"), claims.get("sub"))
                      if isinstance(v, str) and v), None)
    if client_id is None:
        raise InvalidToken("the token names no client (client_id)")
    sub = claims.get("sub")
    patient = claims.get("patient")
    if patient is not None and not (isinstance(patient, str) and FHIR_ID.match(patient)):
        raise InvalidToken("the patient claim is not a FHIR id")
    if patient is None and any(s.context == "patient" for s in scopes):
        raise InvalidToken("patient/ scopes need a patient claim (launch context)")
    role = claims.get("role")
    return Principal(client_id=client_id, subject=sub if isinstance(sub, str) else None,
                     role=role if isinstance(role, str) else None, scopes=scopes,
                     patient=patient, mode="jwt")
