"""Application-restricted API keys: ``X-API-Key: <key>`` (or ``apikey: <key>``).

The keys file (``CCG_API_KEYS_FILE``) holds SHA-256 hashes, never keys. Keys must be long
random strings (``careconnect-gateway api-key new`` makes 256-bit ones), which is why an
unsalted hash is enough. The presented key's hash is compared with every configured hash in
constant time (``hmac.compare_digest``, no early exit).
"""

from __future__ import annotations

import hashlib
import hmac

from gateway.auth.config import Credential
from gateway.auth.errors import API_KEY_CHALLENGE, AuthenticationRequired, InvalidApiKey
from gateway.auth.principal import Principal

HEADERS = (b"x-api-key", b"apikey")
MAX_KEY_BYTES = 512


def sha256_hex(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


class ApiKeyAuthenticator:
    def __init__(self, credentials: tuple[Credential, ...]) -> None:
        self.credentials = credentials

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Principal:
        values = [v for k, v in headers if k in HEADERS]
        if not values:
            raise AuthenticationRequired("an API key is required (X-API-Key header)",
                                         challenge=API_KEY_CHALLENGE)
        if len(values) > 1:
            raise InvalidApiKey("send exactly one API key")
        raw = values[0].strip()
        if not raw or len(raw) > MAX_KEY_BYTES:
            raise InvalidApiKey()
        presented = hashlib.sha256(raw).hexdigest().encode("ascii")
        match: Credential | None = None
        for credential in self.credentials:  # every entry, no early exit
            if hmac.compare_digest(presented, credential.secret_sha256.encode("ascii")):
                match = credential
        if match is None:
            raise InvalidApiKey()
        return Principal(client_id=match.client_id, subject=None, role=match.role,
                         scopes=match.scopes, patient=None, mode="api-key")
