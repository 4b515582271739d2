"""JWT bearer tokens: the attack matrix, with real keys and PyJWT (nothing mocked)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette

from gateway.auth.config import JwtConfig
from gateway.auth.errors import InvalidToken
from gateway.auth.jwks import JwksSource
from gateway.auth.tokens import JwtVerifier, ReplayCache
from tests.gateway.auth.helpers import (
    AUDIENCE,
    ISSUER,
    JwksServer,
    SigningKey,
    claims,
    code,
    ec_key,
    hs256_with,
    jwks,
    jwt_app,
    rsa_key,
    sign,
    unsigned,
)

pytestmark = pytest.mark.anyio

READ = "/STU3/Patient/100001"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_invalid(r: httpx.Response, reason: str) -> None:
    assert r.status_code == 401, r.text
    assert code(r) == "INVALID_TOKEN"
    challenge = r.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="careconnect-gateway", error="invalid_token"')
    assert reason in challenge, challenge
    assert reason in r.json()["issue"][0]["diagnostics"]
    assert r.headers["x-request-id"]


# --- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["rs_key", "es_key", "ps_key"])
async def test_a_valid_token_is_accepted(gw: httpx.AsyncClient, which: str,
                                         request: pytest.FixtureRequest) -> None:
    key: SigningKey = request.getfixturevalue(which)
    r = await gw.get(READ, headers=bearer(sign(key, claims())))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "100001"


async def test_application_at_jwt_typ_and_scp_list_are_accepted(
        gw: httpx.AsyncClient, rs_key: SigningKey) -> None:
    token = sign(rs_key, claims(scope=None, scp=["user/Patient.rs"]), typ="application/at+jwt")
    assert (await gw.get(READ, headers=bearer(token))).status_code == 200


async def test_expiry_within_the_leeway_is_accepted(gw: httpx.AsyncClient,
                                                    rs_key: SigningKey) -> None:
    now = int(time.time())
    token = sign(rs_key, claims(iat=now - 300, nbf=now - 300, exp=now - 10))
    assert (await gw.get(READ, headers=bearer(token))).status_code == 200


# --- no or unusable credentials ---------------------------------------------------------------


async def test_no_token_is_401_with_a_bare_challenge(gw: httpx.AsyncClient) -> None:
    r = await gw.get(READ)
    assert r.status_code == 401
    assert code(r) == "AUTHENTICATION_REQUIRED"
    assert r.headers["www-authenticate"] == 'Bearer realm="careconnect-gateway"'
    assert r.headers["content-type"].startswith("application/fhir+json")
    xml = await gw.get(READ, params={"_format": "xml"})
    assert xml.status_code == 401 and "<OperationOutcome" in xml.text


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "Token abc"])
async def test_other_schemes_and_empty_bearer(gw: httpx.AsyncClient, header: str) -> None:
    r = await gw.get(READ, headers={"Authorization": header})
    assert r.status_code == 401
    assert code(r) in ("AUTHENTICATION_REQUIRED", "INVALID_TOKEN")


async def test_unknown_paths_need_authentication_too(gw: httpx.AsyncClient) -> None:
    for path in ("/nope", "/STU3/Foo", "/STU3/Patient/100001/_history", "/STU3/metadata/x"):
        assert (await gw.get(path)).status_code == 401, path


async def test_public_endpoints_need_no_token(gw: httpx.AsyncClient) -> None:
    assert (await gw.get("/STU3/metadata")).status_code == 200
    assert (await gw.head("/STU3/metadata")).status_code == 200
    assert (await gw.get("/_health")).status_code == 200
    assert (await gw.get("/_ready")).status_code == 200


# --- the attack matrix ------------------------------------------------------------------------


def _matrix(rs: SigningKey, es: SigningKey) -> list[tuple[str, str, str]]:
    now = int(time.time())
    good = claims()
    public_pem = rs.public.public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    attacker = rsa_key(rs.kid)  # same kid, different key
    valid = sign(rs, good)
    head, body, sig = valid.split(".")
    escalated = sign(rs, claims(scope="system/*.*"))
    flipped = sig[:-2] + ("AA" if sig[-2:] != "AA" else "BB")
    return [
        ("alg none", unsigned({"alg": "none", "typ": "at+jwt", "kid": rs.kid}, good),
         "algorithm is not allowed"),
        ("alg None", unsigned({"alg": "None", "typ": "at+jwt", "kid": rs.kid}, good),
         "algorithm is not allowed"),
        ("HS256 keyed with the RSA public key PEM",
         hs256_with(public_pem, {"alg": "HS256", "typ": "at+jwt", "kid": rs.kid}, good),
         "algorithm is not allowed"),
        ("wrong iss", sign(rs, claims(iss="https://evil.example/realms/fhir")), "issuer"),
        ("iss with a trusted prefix", sign(rs, claims(iss=ISSUER + ".evil")), "issuer"),
        ("iss substring", sign(rs, claims(iss=ISSUER[:-1])), "issuer"),
        ("no iss", sign(rs, claims(iss=None)), "no iss claim"),
        ("wrong aud", sign(rs, claims(aud="https://other-gateway.example/STU3")), "aud"),
        ("aud list without us", sign(rs, claims(aud=["a", "b"])), "aud"),
        ("no aud", sign(rs, claims(aud=None)), "no aud claim"),
        ("typ JWT", sign(rs, good, typ="JWT"), "typ"),
        ("no typ", sign(rs, good, typ=None), "typ"),
        ("typ id-token-ish", sign(rs, good, typ="dpop+jwt"), "typ"),
        ("expired", sign(rs, claims(iat=now - 600, nbf=now - 600, exp=now - 120)), "expired"),
        ("no exp", sign(rs, claims(exp=None)), "no exp claim"),
        ("no iat", sign(rs, claims(iat=None)), "no iat claim"),
        ("not yet valid (nbf)", sign(rs, claims(nbf=now + 300, exp=now + 900)),
         "not valid yet"),
        ("issued in the future (iat)", sign(rs, claims(iat=now + 300, nbf=None, exp=now + 900)),
         "not valid yet"),
        ("lifetime too long", sign(rs, claims(exp=now + 7 * 86_400)), "lifetime"),
        ("unknown kid", sign(rsa_key("rsa-unknown"), good), "signing key is not known"),
        ("kid of a key of another type", sign(SigningKey(rs.kid, "ES256", es.private), good),
         "signing key is not known"),
        ("attacker key under our kid", sign(attacker, claims(scope="system/*.*")),
         "signature is not valid"),
        ("tampered signature", f"{head}.{body}.{flipped}", "signature is not valid"),
        ("payload swapped under a valid signature", f"{head}.{escalated.split('.')[1]}.{sig}",
         "signature is not valid"),
        ("stripped signature", f"{head}.{body}.", "signature is not valid"),
        ("embedded jwk header", sign(attacker, good, jwk=attacker.jwk()),
         "signature is not valid"),
        ("jku header", sign(attacker, good, jku="https://evil.example/jwks.json"),
         "signature is not valid"),
        # PyJWT refuses unknown crit extensions already; the gateway refuses any crit
        ("crit header", sign(rs, good, crit=["exp"]), "cannot be decoded"),
        ("JWE", "a.b.c.d.e", "JWE"),
        ("garbage", "not-a-token", "JWS compact"),
        ("bad base64", "a.b.c", "cannot be decoded"),
        ("too large", sign(rs, claims(pad="x" * 20_000)), "too large"),
        ("patient/ scope without a patient claim", sign(rs, claims(scope="patient/*.read")),
         "patient claim"),
        ("patient claim that is not an id", sign(rs, claims(scope="patient/*.read",
                                                            patient="../Patient/1")),
         "not a FHIR id"),
        ("no client", sign(rs, claims(client_id=None, sub=None)), "names no client"),
    ]


async def test_attack_matrix(gw: httpx.AsyncClient, rs_key: SigningKey,
                             es_key: SigningKey) -> None:
    cases = _matrix(rs_key, es_key)
    assert len(cases) >= 30
    for name, token, reason in cases:
        r = await gw.get(READ, headers=bearer(token))
        assert r.status_code == 401, (name, r.text)
        assert_invalid(r, reason)
        assert token not in r.text and token not in str(r.headers)  # never echoed


async def test_two_authorization_headers_are_refused(gw: httpx.AsyncClient,
                                                     rs_key: SigningKey) -> None:
    token = sign(rs_key, claims())
    r = await gw.get(READ, headers=[("Authorization", f"Bearer {token}"),
                                    ("Authorization", f"Bearer {token}")])
    assert_invalid(r, "exactly one")


async def test_typ_jwt_is_accepted_only_when_configured(
        demo_sqlite_url: str, tmp_path: Path, jwks_file: Path, rs_key: SigningKey,
        serve: Callable[[Starlette], Any]) -> None:
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file, jwt_accept_typ_jwt=True)
    async with serve(app) as c:
        for typ in ("JWT", None, "at+jwt"):
            r = await c.get(READ, headers=bearer(sign(rs_key, claims(), typ=typ)))
            assert r.status_code == 200, (typ, r.text)
        assert_invalid(await c.get(READ, headers=bearer(sign(rs_key, claims(), typ="jose"))),
                       "typ")


async def test_replayed_jti_is_refused_when_the_replay_cache_is_on(
        demo_sqlite_url: str, tmp_path: Path, jwks_file: Path, rs_key: SigningKey,
        serve: Callable[[Starlette], Any]) -> None:
    app = jwt_app(demo_sqlite_url, tmp_path, jwks_file, jwt_jti_replay=True)
    async with serve(app) as c:
        token = sign(rs_key, claims())
        assert (await c.get(READ, headers=bearer(token))).status_code == 200
        assert_invalid(await c.get(READ, headers=bearer(token)), "already been used")
        assert (await c.get(READ, headers=bearer(sign(rs_key, claims())))).status_code == 200
        assert_invalid(await c.get(READ, headers=bearer(sign(rs_key, claims(jti=None)))),
                       "no jti claim")


async def test_without_the_replay_cache_a_token_is_reused(gw: httpx.AsyncClient,
                                                          rs_key: SigningKey) -> None:
    token = sign(rs_key, claims())
    for _ in range(3):
        assert (await gw.get(READ, headers=bearer(token))).status_code == 200


def test_replay_cache_is_bounded_and_forgets_expired_entries() -> None:
    cache = ReplayCache(max_entries=3)
    assert not cache.seen("a", expires_at=10, now=0)
    assert cache.seen("a", expires_at=10, now=5)
    assert not cache.seen("a", expires_at=20, now=11)  # expired: forgotten
    for name in "bcde":
        assert not cache.seen(name, expires_at=100, now=12)
    assert len(cache) == 3


# --- JWKS: file and URL, cached, refreshed on an unknown kid at most once per interval --------


async def test_jwks_url_is_fetched_once_and_refreshed_at_most_once_per_interval(
        demo_sqlite_url: str, tmp_path: Path, rs_key: SigningKey,
        serve: Callable[[Starlette], Any]) -> None:
    rotated = rsa_key("rsa-2")
    with JwksServer(jwks(rs_key)) as server:
        app = jwt_app(demo_sqlite_url, tmp_path, jwt_jwks_url=server.url,
                      jwt_jwks_refresh_interval=1)
        async with serve(app) as c:
            for _ in range(3):
                assert (await c.get(READ, headers=bearer(sign(rs_key, claims())))).status_code \
                    == 200
            assert server.fetches == 1  # cached
            time.sleep(1.1)
            unknown = sign(rsa_key("nobody"), claims())
            for _ in range(5):  # a flood of unknown kids: one refresh, not five
                assert_invalid(await c.get(READ, headers=bearer(unknown)), "not known")
            assert server.fetches == 2
            server.document = jwks(rs_key, rotated)  # the issuer rotates its keys
            assert_invalid(await c.get(READ, headers=bearer(sign(rotated, claims()))),
                           "not known")  # within the interval: not fetched again
            assert server.fetches == 2
            time.sleep(1.1)
            r = await c.get(READ, headers=bearer(sign(rotated, claims())))
            assert r.status_code == 200, r.text
            assert server.fetches == 3
            assert (await c.get(READ, headers=bearer(sign(rs_key, claims())))).status_code \
                == 200
            assert server.fetches == 3


async def test_jwks_file_is_reread_for_a_new_kid_once_per_interval(
        demo_sqlite_url: str, tmp_path: Path, rs_key: SigningKey,
        serve: Callable[[Starlette], Any]) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks(rs_key)))
    rotated = ec_key("ec-2")
    app = jwt_app(demo_sqlite_url, tmp_path, path, jwt_jwks_refresh_interval=1)
    async with serve(app) as c:
        assert (await c.get(READ, headers=bearer(sign(rs_key, claims())))).status_code == 200
        path.write_text(json.dumps(jwks(rs_key, rotated)))
        time.sleep(1.1)
        assert (await c.get(READ, headers=bearer(sign(rotated, claims())))).status_code == 200


async def test_jwks_source_counts_fetches(tmp_path: Path, rs_key: SigningKey) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks(rs_key)))
    now = [1000.0]
    source = JwksSource(file=path, refresh_interval=60, max_age=3600, clock=lambda: now[0])
    assert await source.key_for(rs_key.kid, "RS256") is not None
    assert await source.key_for(rs_key.kid, "RS256") is not None
    assert source.fetches == 1
    for _ in range(10):
        assert await source.key_for("other", "RS256") is None
    assert source.fetches == 1  # the initial load counts: no refresh within 60 s
    now[0] += 61
    assert await source.key_for("other", "RS256") is None
    assert await source.key_for("other", "RS256") is None
    assert source.fetches == 2
    assert await source.key_for(rs_key.kid, "ES256") is None  # alg must match the key
    now[0] += 3600  # too old: re-read even for a known kid
    assert await source.key_for(rs_key.kid, "RS256") is not None
    assert source.fetches == 3


async def test_a_token_without_kid_needs_an_unambiguous_key(tmp_path: Path) -> None:
    one, two = rsa_key("a"), rsa_key("b")
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks(one, ec_key("c"))))
    config = JwtConfig(ISSUER, (AUDIENCE,), None, path, ("RS256", "ES256"))
    assert (await JwtVerifier(config).verify(sign(one, claims(), kid=None)))["iss"] == ISSUER
    path.write_text(json.dumps(jwks(one, two)))
    with pytest.raises(InvalidToken, match="not known"):
        await JwtVerifier(config).verify(sign(one, claims(), kid=None))


async def test_jwks_keys_that_must_not_verify_are_skipped(tmp_path: Path) -> None:
    key = rsa_key("k")
    private = json.loads(__import__("jwt").algorithms.RSAAlgorithm.to_jwk(key.private))
    variants = {
        "enc": {**key.jwk(), "use": "enc"},
        "ops": {**key.jwk(), "key_ops": ["encrypt"]},
        "private": {**private, "kid": "k", "alg": "RS256"},
        "alg": {**key.jwk(), "alg": "RS512"},
    }
    for name, jwk in variants.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"keys": [jwk]}))
        source = JwksSource(file=path)
        assert await source.key_for("k", "RS256") is None, name


async def test_unreachable_jwks_is_503_not_401(demo_sqlite_url: str, tmp_path: Path,
                                               rs_key: SigningKey,
                                               serve: Callable[[Starlette], Any]) -> None:
    with JwksServer(jwks(rs_key)) as server:
        url = server.url
    app = jwt_app(demo_sqlite_url, tmp_path, jwt_jwks_url=url)  # nothing listens there now
    async with serve(app) as c:
        r = await c.get(READ, headers=bearer(sign(rs_key, claims())))
    assert r.status_code == 503
    assert code(r) == "AUTHORIZATION_SERVER_UNAVAILABLE"


async def test_verifier_directly(tmp_path: Path, rs_key: SigningKey) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks(rs_key)))
    config = JwtConfig(ISSUER, (AUDIENCE, "urn:other"), None, path, ("RS256",))
    verifier = JwtVerifier(config)
    principal = await verifier.principal(sign(rs_key, claims(
        scope="patient/Patient.rs launch/patient openid", patient="100001", role="clinician",
        aud=["urn:other"])))
    assert principal.client_id == "ward-app" and principal.subject == "user-1"
    assert principal.patient == "100001" and principal.role == "clinician"
    assert principal.patient_restricted and principal.mode == "jwt"
    assert principal.scope_text == "patient/Patient.rs"


def test_no_secret_in_error_output(rs_key: SigningKey) -> None:
    # The fixture key must not be an HMAC-capable secret: confusion needs the allow-list.
    from gateway.auth.config import _algorithms
    from gateway.auth.errors import AuthConfigError

    for alg in ("HS256", "none", "RS256,HS512", "hs384"):
        with pytest.raises(AuthConfigError, match="refused"):
            _algorithms(alg)
    with pytest.raises(AuthConfigError, match="unknown algorithm"):
        _algorithms("RS1")


# --- verified tokens are remembered (JwtVerifier.principal), within limits ---------------------


def counting(verifier: JwtVerifier) -> list[str]:
    """Record every full verification the verifier makes."""
    calls: list[str] = []
    inner = verifier._verify

    async def spy(token: str) -> Any:
        calls.append(token)
        return await inner(token)

    verifier._verify = spy  # type: ignore[method-assign]
    return calls


def keys_file(tmp_path: Path, *keys: SigningKey) -> Path:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(jwks(*keys)))
    return path


async def test_a_verified_token_is_remembered_and_another_is_verified_afresh(
        tmp_path: Path, rs_key: SigningKey) -> None:
    now = [time.time()]
    config = JwtConfig(ISSUER, (AUDIENCE,), None, keys_file(tmp_path, rs_key), ("RS256",))
    verifier = JwtVerifier(config, clock=lambda: now[0])
    calls = counting(verifier)
    token = sign(rs_key, claims())
    first = await verifier.principal(token)
    assert await verifier.principal(token) is first
    assert len(calls) == 1
    other = sign(rs_key, claims(client_id="other-app"))
    assert (await verifier.principal(other)).client_id == "other-app"
    assert len(calls) == 2
    now[0] += 61  # past the TTL: verified again
    assert await verifier.principal(token) == first
    assert len(calls) == 3


async def test_a_remembered_token_is_not_used_past_its_expiry(
        tmp_path: Path, rs_key: SigningKey) -> None:
    config = JwtConfig(ISSUER, (AUDIENCE,), None, keys_file(tmp_path, rs_key), ("RS256",),
                       leeway=0)
    verifier = JwtVerifier(config)
    # exp two whole seconds ahead: with one, a start late in a second (now=int(100.98)=100,
    # exp=101) reached PyJWT's whole-second clock at 101 and the first use was already expired.
    now = int(time.time())
    exp = now + 2
    token = sign(rs_key, claims(iat=now, nbf=now, exp=exp))
    assert (await verifier.principal(token)).client_id == "ward-app"
    while time.time() < exp:  # until exp has passed (real time: PyJWT's clock too)
        time.sleep(0.05)
    with pytest.raises(InvalidToken, match="expired"):
        await verifier.principal(token)


async def test_a_remembered_token_fails_once_its_key_leaves_the_jwks(
        tmp_path: Path, rs_key: SigningKey) -> None:
    path = keys_file(tmp_path, rs_key)
    clock = [1000.0]
    source = JwksSource(file=path, refresh_interval=60, max_age=3600, clock=lambda: clock[0])
    verifier = JwtVerifier(JwtConfig(ISSUER, (AUDIENCE,), None, path, ("RS256",)), source)
    token = sign(rs_key, claims())
    await verifier.principal(token)
    await verifier.principal(token)
    path.write_text(json.dumps(jwks(rsa_key("rsa-2"))))  # the issuer rotates rsa-1 out
    clock[0] += 3600  # the JWKS is re-read when too old, as for any token
    with pytest.raises(InvalidToken, match="not known"):
        await verifier.principal(token)


async def test_the_remembered_tokens_are_bounded_and_failures_not_kept(
        tmp_path: Path, rs_key: SigningKey) -> None:
    config = JwtConfig(ISSUER, (AUDIENCE,), None, keys_file(tmp_path, rs_key), ("RS256",))
    verifier = JwtVerifier(config, cache_entries=3)
    calls = counting(verifier)
    tokens = [sign(rs_key, claims()) for _ in range(5)]
    for token in tokens:
        await verifier.principal(token)
    assert verifier._verified is not None and len(verifier._verified) == 3
    await verifier.principal(tokens[-1])  # among the newest: remembered
    assert len(calls) == 5
    await verifier.principal(tokens[0])  # the oldest was dropped: verified again
    assert len(calls) == 6
    bad = sign(rs_key, claims(scope="patient/*.read"))  # no patient claim: refused
    for _ in range(2):
        with pytest.raises(InvalidToken, match="patient claim"):
            await verifier.principal(bad)
    assert len(calls) == 8


async def test_nothing_is_remembered_with_the_replay_cache_on(
        tmp_path: Path, rs_key: SigningKey) -> None:
    config = JwtConfig(ISSUER, (AUDIENCE,), None, keys_file(tmp_path, rs_key), ("RS256",),
                       jti_replay=True)
    verifier = JwtVerifier(config)
    token = sign(rs_key, claims())
    await verifier.principal(token)
    with pytest.raises(InvalidToken, match="already been used"):
        await verifier.principal(token)
