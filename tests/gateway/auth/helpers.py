"""Real keys, real tokens and a real JWKS HTTP server for the authentication tests."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from starlette.applications import Starlette

from tests.conftest import gateway_settings

ISSUER = "https://auth.example-trust.nhs.uk/realms/fhir"
AUDIENCE = "https://fhir.example-trust.nhs.uk/STU3"
SERVED = ("Patient", "Practitioner", "Organization", "Location", "Encounter")
READ_IDS = {"Patient": "100001", "Practitioner": "1", "Organization": "1", "Location": "1",
            "Encounter": "1"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64json(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


@dataclass
class SigningKey:
    kid: str
    alg: str
    private: Any

    @property
    def public(self) -> Any:
        return self.private.public_key()

    def jwk(self) -> dict[str, Any]:
        if isinstance(self.private, rsa.RSAPrivateKey):
            data = RSAAlgorithm.to_jwk(self.public, as_dict=True)
        else:
            data = ECAlgorithm.to_jwk(self.public, as_dict=True)
        return {**data, "kid": self.kid, "alg": self.alg, "use": "sig"}


def rsa_key(kid: str, alg: str = "RS256") -> SigningKey:
    return SigningKey(kid, alg, rsa.generate_private_key(public_exponent=65537, key_size=2048))


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, "ES256", ec.generate_private_key(ec.SECP256R1()))


def jwks(*keys: SigningKey) -> dict[str, Any]:
    return {"keys": [k.jwk() for k in keys]}


def claims(scope: str | None = "user/*.read", **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    out: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1",
                           "client_id": "ward-app", "scope": scope, "iat": now, "nbf": now,
                           "exp": now + 300, "jti": uuid.uuid4().hex}
    if scope is None:
        del out["scope"]
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def sign(key: SigningKey, payload: dict[str, Any], **header: Any) -> str:
    """A token signed by ``key``; header values of None are left out (typ=None: no typ)."""
    headers: dict[str, Any] = {"kid": key.kid, "typ": "at+jwt", **header}
    if headers["kid"] is None:
        del headers["kid"]
    token: str = jwt.encode(payload, key.private, algorithm=key.alg, headers=headers)
    return token


def unsigned(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64json(header)}.{b64json(payload)}.{b64(signature)}"


def hs256_with(secret: bytes, header: dict[str, Any], payload: dict[str, Any]) -> str:
    signing_input = f"{b64json(header)}.{b64json(payload)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def jwt_app(url: str, tmp: Path, jwks_file: Path | None = None, **overrides: Any) -> Starlette:
    from gateway.app import build_app

    values: dict[str, Any] = {"auth_mode": "jwt", "jwt_issuer": ISSUER, "jwt_audience": AUDIENCE,
                              "audit_log": str(tmp / "audit.jsonl")}
    if jwks_file is not None:
        values["jwt_jwks_file"] = str(jwks_file)
    values.update(overrides)
    return build_app(gateway_settings(url, tmp, **values))


def code(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    value: str = body["issue"][0]["details"]["coding"][0]["code"]
    return value


@dataclass
class JwksServer:
    """A real HTTP server on 127.0.0.1 serving a JWKS that the test can change; counts GETs."""

    document: dict[str, Any]
    fetches: int = 0
    server: ThreadingHTTPServer | None = None
    thread: threading.Thread | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/jwks.json"

    def __enter__(self) -> JwksServer:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with outer.lock:
                    outer.fetches += 1
                    body = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None and self.thread is not None
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


Client = Callable[..., Any]
