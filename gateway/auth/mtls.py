"""Mutual TLS: the verified client certificate's subject is the client identity.

uvicorn (0.30 to 0.54) verifies client certificates (``ssl_cert_reqs=CERT_REQUIRED`` with
``ssl_ca_certs``) but does not put the peer certificate into the ASGI scope. ``TLSHttpProtocol``
is a small uvicorn HTTP protocol hook that does: once per connection, after the TLS handshake,
it reads the verified peer certificate from the SSL object and adds the ASGI TLS extension
(``scope["extensions"]["tls"]``: ``client_cert_chain`` with the leaf certificate as PEM,
``client_cert_name`` in RFC 4514 form, ``tls_version``) to every request on that connection.

Only the leaf certificate is available from Python's ``ssl`` module before 3.13, so
``client_cert_chain`` has one element. A certificate is exposed only when the TLS context
verifies peers (``verify_mode`` is not ``CERT_NONE``); otherwise the extension is absent and
mTLS authentication answers 401. Certificates forwarded by a proxy in headers are never
trusted: in mTLS mode the gateway must terminate TLS itself.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from gateway.auth.config import Credential
from gateway.auth.errors import ClientCertificateRequired
from gateway.auth.principal import Principal

_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


def tls_extension(transport: Any) -> dict[str, Any] | None:
    """The ASGI TLS extension for a connection, or None (no TLS / no verified client)."""
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    if ssl_object.context.verify_mode == ssl.CERT_NONE:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    cert = x509.load_der_x509_certificate(der)
    return {
        "server_cert": None,
        "client_cert_chain": [cert.public_bytes(Encoding.PEM).decode("ascii")],
        "client_cert_name": cert.subject.rfc4514_string(),
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
    }


class TLSHttpProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    """uvicorn's default HTTP protocol, plus the ASGI TLS extension (see module doc)."""

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        tls = tls_extension(transport)
        if tls is None:
            return
        inner: Any = getattr(self, "app")  # noqa: B009 (set by the uvicorn protocol)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] in ("http", "websocket"):
                scope["extensions"] = {**(scope.get("extensions") or {}), "tls": tls}
            await inner(scope, receive, send)

        self.app = app


def client_certificate(scope: Any) -> x509.Certificate | None:
    tls = (scope.get("extensions") or {}).get("tls")
    if not isinstance(tls, dict):
        return None
    chain = tls.get("client_cert_chain") or []
    if not chain or not isinstance(chain[0], str):
        return None
    try:
        return x509.load_pem_x509_certificate(chain[0].encode("ascii"))
    except ValueError:
        return None


class MtlsAuthenticator:
    def __init__(self, clients: dict[str, Credential]) -> None:
        self.clients = clients

    def authenticate(self, scope: Any) -> Principal:
        cert = client_certificate(scope)
        if cert is None:
            raise ClientCertificateRequired()
        subject = cert.subject.rfc4514_string()
        known = self.clients.get(subject)
        if known is None:  # verified by the trust's CA, but not registered: no scopes at all
            return Principal(client_id=subject, subject=None, role=None, scopes=(),
                             patient=None, mode="mtls")
        return Principal(client_id=known.client_id, subject=None, role=known.role,
                         scopes=known.scopes, patient=None, mode="mtls")
