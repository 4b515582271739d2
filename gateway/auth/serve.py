"""What ``careconnect-gateway serve`` needs from the auth settings: uvicorn TLS options, and
one line on stderr saying how requests are authenticated."""

from __future__ import annotations

import ssl
from typing import Any

from gateway.settings import Settings


def uvicorn_tls_options(settings: Settings) -> dict[str, Any]:
    """uvicorn.run keyword arguments: none for plain HTTP; TLS when a certificate is set;
    required, verified client certificates (and the TLS-extension hook) in mTLS mode."""
    if not settings.ssl_certfile:
        return {}
    options: dict[str, Any] = {"ssl_certfile": settings.ssl_certfile,
                               "ssl_keyfile": settings.ssl_keyfile or None}
    if settings.auth_mode.strip().lower() == "mtls":
        from gateway.auth.mtls import TLSHttpProtocol

        options.update(ssl_ca_certs=settings.ssl_ca_certs, ssl_cert_reqs=ssl.CERT_REQUIRED,
                       http=TLSHttpProtocol)
    return options


def banner(settings: Settings) -> str:
    mode = settings.auth_mode.strip().lower()
    if mode == "insecure-demo":
        return ("WARNING: CCG_AUTH_MODE=insecure-demo: AUTHENTICATION IS OFF. Every request is "
                "allowed. Demo data only; never expose this gateway.")
    if not mode and not (settings.jwt_issuer or settings.jwt_jwks_url or settings.jwt_jwks_file):
        return ("Authentication: bearer tokens signed by the local development key. Get one "
                "with: TOKEN=$(careconnect-gateway dev-token --scope 'user/*.read') and send "
                '-H "Authorization: Bearer $TOKEN"')
    return f"Authentication: {mode}"
