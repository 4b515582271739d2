"""The local development signing key, for the demo only.

On first use an ES256 key pair is generated into ``<data dir>/dev-auth/``:
``signing-key.pem`` (the private key, mode 0600) and ``jwks.json`` (its public JWKS). A gateway
serving the bundled demo with no JWT settings trusts exactly that JWKS file, and
``careconnect-gateway dev-token`` mints access tokens with the private key. A production
configuration never falls back to this key (see ``gateway.auth.config``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

DEV_ISSUER = "urn:careconnect-gateway:dev"
DEV_AUDIENCE = "urn:careconnect-gateway:demo"
DEV_ALGORITHM = "ES256"


@dataclass(frozen=True)
class DevKey:
    private_key: ec.EllipticCurvePrivateKey
    kid: str
    jwks_path: Path


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def thumbprint(public_jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256) of an EC public key."""
    members = {k: public_jwk[k] for k in ("crv", "kty", "x", "y")}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return _b64(hashlib.sha256(canonical).digest())


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write ``path`` complete or not at all; never replace one another process wrote."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def ensure_dev_key(data_dir: Path) -> DevKey:
    directory = data_dir / "dev-auth"
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_path = directory / "signing-key.pem"
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        _create_exclusive(key_path, pem, 0o600)
    loaded = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    public = ECAlgorithm.to_jwk(loaded.public_key(), as_dict=True)
    kid = thumbprint(public)
    jwks = {"keys": [{**public, "kid": kid, "use": "sig", "alg": DEV_ALGORITHM}]}
    text = json.dumps(jwks, indent=2).encode() + b"\n"
    jwks_path = directory / "jwks.json"
    if not jwks_path.exists() or jwks_path.read_bytes() != text:
        tmp = jwks_path.with_name(f".jwks.{uuid.uuid4().hex}")
        tmp.write_bytes(text)
        os.replace(tmp, jwks_path)
    return DevKey(loaded, kid, jwks_path)


def mint_dev_token(data_dir: Path, scope: str, *, patient: str | None = None,
                   client_id: str = "dev-client", subject: str | None = "dev-user",
                   lifetime: int = 3600, audience: str = DEV_AUDIENCE,
                   issuer: str = DEV_ISSUER, role: str | None = None) -> str:
    """An RFC 9068 access token signed with the local development key."""
    key = ensure_dev_key(data_dir)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": issuer, "aud": audience, "client_id": client_id, "scope": scope,
        "iat": now, "nbf": now, "exp": now + lifetime, "jti": uuid.uuid4().hex,
    }
    claims["sub"] = subject or client_id
    if patient is not None:
        claims["patient"] = patient
    if role:
        claims["role"] = role
    return jwt.encode(claims, key.private_key, algorithm=DEV_ALGORITHM,
                      headers={"kid": key.kid, "typ": "at+jwt"})
