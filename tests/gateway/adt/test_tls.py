"""The listener over TLS and mutual TLS (certificates made by the MLLP tests' throwaway CA),
with a client built on the ssl module alone."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.adt.events import Mapper
from gateway.adt.listener import AdtListener
from gateway.adt.store import AdtStore
from tests.adapters.hl7v2.test_mllp import Pki, _make_pki
from tests.gateway.adt.conftest import adt_message, adt_settings, msa

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("adt-pki"))


@pytest.fixture
async def tls_listener(mapper: Mapper, store: AdtStore, pki: Pki, tmp_path: Path
                       ) -> AsyncIterator[AdtListener]:
    settings = adt_settings(tmp_path, tls_cert_file=pki.server_cert,
                            tls_key_file=pki.server_key, tls_client_ca_file=pki.ca)
    lis = AdtListener(mapper, store, ssl=settings.ssl_context())
    await lis.start()
    yield lis
    await lis.stop()


def _send(port: int, pki: Pki, client_cert: bool) -> bytes:
    ctx = ssl.create_default_context(cafile=pki.ca)
    if client_cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"\x0b" + adt_message("TLS-1", "D0000001") + b"\x1c\r")
        buf = b""
        while b"\x1c" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return buf[1:buf.index(b"\x1c")]


async def test_mutual_tls(tls_listener: AdtListener, pki: Pki, store: AdtStore) -> None:
    reply = await asyncio.to_thread(_send, tls_listener.port, pki, True)
    assert msa(reply)[1:3] == ["AA", "TLS-1"]
    assert store.message_count() == 1


async def test_a_client_without_a_certificate_is_refused(tls_listener: AdtListener, pki: Pki,
                                                          store: AdtStore) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        await asyncio.to_thread(_send, tls_listener.port, pki, False)
    assert store.message_count() == 0


def test_cert_without_key_is_a_configuration_error(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(ValueError):
        adt_settings(tmp_path, tls_cert_file=pki.server_cert).ssl_context()
