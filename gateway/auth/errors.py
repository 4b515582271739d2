"""Authentication and authorisation errors, rendered as OperationOutcome like every other error.

Stable codes (``issue[0].details.coding[0].code``):

* 401 ``AUTHENTICATION_REQUIRED``: no credential was presented.
* 401 ``INVALID_TOKEN``: a bearer token was presented and rejected (RFC 6750 ``invalid_token``).
* 401 ``INVALID_API_KEY``: an API key was presented and is not known.
* 401 ``CLIENT_CERTIFICATE_REQUIRED``: mTLS mode, and no verified client certificate.
* 403 ``ACCESS_DENIED``: authenticated, but no scope grants the interaction.
* 503 ``AUTHORIZATION_SERVER_UNAVAILABLE``: the signing keys (JWKS) could not be loaded.

Messages name the reason, never the credential itself or anything from a patient record.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.errors import GatewayError

REALM = "careconnect-gateway"
_UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')


def _quote(value: str) -> str:
    """A value safe inside an RFC 7235 quoted-string (no quotes, backslashes, controls)."""
    return _UNSAFE.sub("", value)


def bearer_challenge(error: str | None = None, description: str | None = None,
                     scope: str | None = None) -> str:
    parts = [f'realm="{REALM}"']
    if error:
        parts.append(f'error="{_quote(error)}"')
    if description:
        parts.append(f'error_description="{_quote(description)}"')
    if scope:
        parts.append(f'scope="{_quote(scope)}"')
    return "Bearer " + ", ".join(parts)


API_KEY_CHALLENGE = f'APIKey realm="{REALM}", header="X-API-Key"'
MTLS_CHALLENGE = f'Mutual realm="{REALM}"'


class AuthenticationRequired(GatewayError):
    status = 401
    issue_code = "login"
    error_code = "AUTHENTICATION_REQUIRED"

    def __init__(self, message: str = "authentication is required", *,
                 challenge: str | None = None, **kw: Any) -> None:
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault("WWW-Authenticate", challenge or bearer_challenge())
        super().__init__(message, headers=headers, **kw)


class InvalidToken(AuthenticationRequired):
    issue_code = "security"
    error_code = "INVALID_TOKEN"

    def __init__(self, description: str) -> None:
        super().__init__(f"the access token was rejected: {description}",
                         challenge=bearer_challenge("invalid_token", description))
        self.description = description


class InvalidApiKey(AuthenticationRequired):
    issue_code = "security"
    error_code = "INVALID_API_KEY"

    def __init__(self, message: str = "the API key was rejected") -> None:
        super().__init__(message, challenge=API_KEY_CHALLENGE)


class ClientCertificateRequired(AuthenticationRequired):
    issue_code = "security"
    error_code = "CLIENT_CERTIFICATE_REQUIRED"

    def __init__(self, message: str = "a verified TLS client certificate is required") -> None:
        super().__init__(message, challenge=MTLS_CHALLENGE)


class AccessDenied(GatewayError):
    status = 403
    issue_code = "forbidden"
    error_code = "ACCESS_DENIED"


class AuthorizationServerUnavailable(GatewayError):
    status = 503
    issue_code = "transient"
    error_code = "AUTHORIZATION_SERVER_UNAVAILABLE"

    def __init__(self, message: str = "the token signing keys could not be loaded") -> None:
        super().__init__(message, headers={"Retry-After": "5"})


class AuthConfigError(Exception):
    """The authentication settings are missing or wrong: the gateway refuses to start."""
