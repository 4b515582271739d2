"""Mutual TLS with a real uvicorn on loopback: a test CA, server and client certificates.

uvicorn verifies the client certificate (CERT_REQUIRED); the gateway's protocol hook puts the
verified certificate into the ASGI TLS extension, and its subject picks the client's scopes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from starlette.applications import Starlette

from gateway.auth.config import load_mtls_clients
from gateway.auth.errors import AuthConfigError
from gateway.auth.serve import uvicorn_tls_options
from gateway.settings import Settings
from tests.conftest import gateway_settings
from tests.gateway.auth.helpers import code

REGISTERED = "CN=ward-dashboard,OU=Digital,O=Example NHS Trust,C=GB"
UNREGISTERED = "CN=somebody-else,O=Example NHS Trust,C=GB"


def _name(rfc4514: str) -> x509.Name:
    return x509.Name.from_rfc4514_string(rfc4514)


@dataclass
class Issued:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
        cert.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(self.key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return cert, key


def _issue(subject: str, issuer: Issued | None, *, ca: bool = False,
           server: bool = False) -> Issued:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(_name(subject))
               .issuer_name(issuer.cert.subject if issuer else _name(subject))
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    elif server:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([
                       x509.DNSName("localhost"),
                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                  critical=False))
    else:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    signer = issuer.key if issuer else key
    return Issued(builder.sign(signer, hashes.SHA256()), key)


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]
    registered: tuple[Path, Path]
    unregistered: tuple[Path, Path]
    untrusted: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = _issue("CN=Test Trust CA,O=Example NHS Trust,C=GB", None, ca=True)
    rogue = _issue("CN=Rogue CA,C=GB", None, ca=True)
    ca_path = d / "ca.pem"
    ca_path.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca_path,
        server=_issue("CN=localhost", ca, server=True).write(d, "server"),
        registered=_issue(REGISTERED, ca).write(d, "registered"),
        unregistered=_issue(UNREGISTERED, ca).write(d, "unregistered"),
        untrusted=_issue(REGISTERED, rogue).write(d, "untrusted"),  # same subject, wrong CA
    )


def mtls_settings(url: str, tmp: Path, pki: Pki) -> Settings:
    clients = tmp / "mtls-clients.yaml"
    clients.write_text(yaml.safe_dump({"clients": [
        {"subject": "CN=ward-dashboard, OU=Digital, O=Example NHS Trust, C=GB",
         "client_id": "ward-dashboard", "scopes": "system/Patient.read"}]}))
    return gateway_settings(url, tmp, auth_mode="mtls", mtls_clients_file=str(clients),
                            ssl_certfile=str(pki.server[0]), ssl_keyfile=str(pki.server[1]),
                            ssl_ca_certs=str(pki.ca), audit_log=str(tmp / "audit.jsonl"))


class TlsServer:
    def __init__(self, app: Starlette, settings: Settings) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"https://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None,
                                access_log=False, lifespan="on", **uvicorn_tls_options(settings))
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> TlsServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


@pytest.fixture
def server(demo_sqlite_url: str, tmp_path: Path, pki: Pki) -> Iterator[TlsServer]:
    from gateway.app import build_app

    settings = mtls_settings(demo_sqlite_url, tmp_path, pki)
    with TlsServer(build_app(settings), settings) as running:
        yield running


def client(pki: Pki, cert: tuple[Path, Path] | None) -> httpx.Client:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert[0]), str(cert[1]))
    return httpx.Client(verify=context, timeout=10)


def test_uvicorn_options_require_and_verify_client_certificates(tmp_path: Path,
                                                                pki: Pki) -> None:
    from gateway.auth.mtls import TLSHttpProtocol

    options = uvicorn_tls_options(mtls_settings("sqlite://", tmp_path, pki))
    assert options["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert options["ssl_ca_certs"] == str(pki.ca)
    assert options["http"] is TLSHttpProtocol
    assert uvicorn_tls_options(Settings()) == {}  # plain HTTP by default
    plain_tls = uvicorn_tls_options(Settings(ssl_certfile="c.pem", ssl_keyfile="k.pem"))
    assert "ssl_cert_reqs" not in plain_tls and "http" not in plain_tls


def test_a_registered_client_certificate(server: TlsServer, pki: Pki) -> None:
    with client(pki, pki.registered) as c:
        r = c.get(f"{server.url}/STU3/Patient/100001")
        assert r.status_code == 200, r.text
        assert r.json()["id"] == "100001"
        denied = c.get(f"{server.url}/STU3/Encounter/1")
        assert denied.status_code == 403 and code(denied) == "ACCESS_DENIED"
        assert "www-authenticate" not in denied.headers  # not a bearer token


def test_a_verified_but_unregistered_certificate_gets_no_scopes(server: TlsServer,
                                                                pki: Pki) -> None:
    with client(pki, pki.unregistered) as c:
        r = c.get(f"{server.url}/STU3/Patient/100001")
        assert r.status_code == 403 and code(r) == "ACCESS_DENIED"
        assert c.get(f"{server.url}/STU3/metadata").status_code == 200


@pytest.mark.parametrize("which", ["none", "untrusted"])
def test_no_or_untrusted_certificate_fails_the_tls_handshake(server: TlsServer, pki: Pki,
                                                             which: str) -> None:
    cert = None if which == "none" else pki.untrusted
    with client(pki, cert) as c, pytest.raises(httpx.TransportError):
        c.get(f"{server.url}/STU3/metadata")


def test_metadata_advertises_certificates(server: TlsServer, pki: Pki) -> None:
    with client(pki, pki.registered) as c:
        security = c.get(f"{server.url}/STU3/metadata").json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "Certificates"


@pytest.mark.anyio
async def test_without_the_tls_extension_mtls_mode_is_401(demo_sqlite_url: str,
                                                          tmp_path: Path, pki: Pki) -> None:
    """No verified certificate in the scope (e.g. TLS ended at a proxy): 401, never a
    certificate taken from a forwarded header."""
    from gateway.app import build_app

    app = build_app(mtls_settings(demo_sqlite_url, tmp_path, pki))
    cert_pem = pki.registered[0].read_text()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            r = await c.get("/STU3/Patient/100001", headers={
                "X-SSL-Client-Cert": cert_pem.replace("\n", " "),
                "X-Client-Cert-Subject": REGISTERED})
    assert r.status_code == 401 and code(r) == "CLIENT_CERTIFICATE_REQUIRED"


@pytest.mark.parametrize(("content", "message"), [
    ("clients: [{subject: 'not a name', scopes: system/*.read}]", "RFC 4514"),
    ("clients: [{scopes: system/*.read}]", "'subject'"),
    ("clients: [{subject: 'CN=a', scopes: patient/*.read}]", "patient launch context"),
    ("clients: [{subject: 'CN=a,C=GB', scopes: system/*.read}, "
     "{subject: 'CN=a, C=GB', scopes: system/*.read}]", "duplicate"),
])
def test_bad_client_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "clients.yaml"
    path.write_text(content)
    with pytest.raises(AuthConfigError, match=message):
        load_mtls_clients(str(path))
