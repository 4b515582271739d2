"""MLLP transport: framing, and every fault over real TCP (and TLS) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import pathlib
import random
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.hl7v2 import er7
from adapters.hl7v2.mllp import (
    CARRIAGE_RETURN,
    END_BLOCK,
    START_BLOCK,
    Endpoint,
    FrameDecoder,
    MllpClient,
    MllpError,
    MllpProtocolError,
    MllpTimeout,
    MllpUnavailable,
    client_ssl_context,
    frame,
)
from adapters.hl7v2.mllp_server import MllpServer, Reply, server_ssl_context

pytestmark = pytest.mark.anyio


def query(control_id: str) -> bytes:
    return ("MSH|^~\\&|GW|GWF|PAS|RCB|20240101120000||QBP^Q22^QBP_Q21|"
            f"{control_id}|P|2.4\rQPD|Q22^Find Candidates^HL7|{control_id}|@PID.5.1^TEST\r"
            "RCP|I|20^RD\r").encode()


def ack(acknowledged: str | None, *, control_id: str = "PAS1") -> bytes:
    msh = f"MSH|^~\\&|PAS|RCB|GW|GWF|20240101120001||ACK^Q22|{control_id}|P|2.4\r"
    return (msh + (f"MSA|AA|{acknowledged}\r" if acknowledged is not None else "")).encode()


@dataclass
class Pas:
    """A scriptable PAS: records what it received, answers with ``script`` (default: ACK)."""

    received: list[bytes] = field(default_factory=list)
    script: Callable[[int, bytes], Reply | bytes | None] | None = None
    in_flight: int = 0
    max_in_flight: int = 0
    hold: float = 0.0

    @property
    def control_ids(self) -> list[str | None]:
        return [er7.parse(m).control_id for m in self.received]

    async def __call__(self, payload: bytes) -> Reply | bytes | None:
        self.received.append(payload)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            if self.script is not None:
                return self.script(len(self.received), payload)
            return ack(er7.parse(payload).control_id)
        finally:
            self.in_flight -= 1


async def until(condition: Callable[[], bool], limit: float = 30.0) -> None:
    """Wait (bounded) for ``condition``: what a slow machine delays is waited for, not guessed."""
    with anyio.fail_after(limit):
        while not condition():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def running(pas: Pas, **server_kw: object) -> AsyncIterator[MllpServer]:
    async with MllpServer(pas, **server_kw) as server:  # type: ignore[arg-type]
        yield server


@asynccontextmanager
async def client_for(server: MllpServer, **kw: object) -> AsyncIterator[MllpClient]:
    options: dict[str, object] = {"connect_timeout": 1.0, "reply_timeout": 1.0,
                                  "backoff_base": 0.01, "backoff_cap": 0.05,
                                  "rng": random.Random(7)}
    ssl_ctx = kw.pop("ssl", None)
    options.update(kw)
    endpoint = Endpoint("127.0.0.1", server.port, ssl_ctx,  # type: ignore[arg-type]
                        server_hostname="localhost" if ssl_ctx else None)
    client = MllpClient(endpoint, **options)  # type: ignore[arg-type]
    try:
        yield client
    finally:
        await client.aclose()


# --- framing --------------------------------------------------------------------------------


def test_frame() -> None:
    assert frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"
    assert frame(b"") == START_BLOCK + END_BLOCK + CARRIAGE_RETURN
    for bad in (b"a\x0bb", b"a\x1cb"):
        with pytest.raises(MllpProtocolError):
            frame(bad)


def test_decoder_two_frames_in_one_read() -> None:
    d = FrameDecoder()
    assert d.feed(frame(b"one") + frame(b"two")) == [b"one", b"two"]
    assert not d.in_frame


def test_decoder_frame_split_across_reads() -> None:
    d = FrameDecoder()
    data = frame(b"MSH|split") + frame(b"next")
    out: list[bytes] = []
    for i in range(len(data)):
        out += d.feed(data[i : i + 1])
    assert out == [b"MSH|split", b"next"]


def test_decoder_missing_final_cr() -> None:
    d = FrameDecoder()
    # 0x1C followed directly by the next frame's 0x0B, then by nothing at all
    assert d.feed(b"\x0bone\x1c\x0btwo\x1c") == [b"one", b"two"]
    assert d.feed(b"\x0bthree\x1c") == [b"three"]
    assert d.feed(b"\r") == []  # a late CR is noise between frames
    assert d.feed(b"\x0bfour\x1c\r") == [b"four"]


def test_decoder_discards_junk_and_restarts() -> None:
    d = FrameDecoder()
    assert d.feed(b"garbage\r\n\x00\x0bone\x1c\rmore junk") == [b"one"]
    assert d.feed(b"\x0bpartial\x0bwhole\x1c\r") == [b"whole"]  # sender started over
    assert d.feed(b"\x1c\r") == []  # an end block with no start is noise


def test_decoder_limits_frame_size() -> None:
    d = FrameDecoder(max_frame_bytes=10)
    assert d.feed(frame(b"0123456789")) == [b"0123456789"]
    with pytest.raises(MllpProtocolError):
        d.feed(frame(b"0123456789A"))
    d = FrameDecoder(max_frame_bytes=10)
    d.feed(b"\x0b012345")
    with pytest.raises(MllpProtocolError):
        d.feed(b"6789AB")
    # junk outside frames is never buffered, however much arrives
    d = FrameDecoder(max_frame_bytes=10)
    assert d.feed(b"x" * 1000) == [] and d.feed(frame(b"ok")) == [b"ok"]


payloads = st.binary(max_size=300).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))
noise = st.binary(max_size=8).map(lambda b: b.replace(b"\x0b", b""))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(payloads, noise, st.sampled_from([b"\r", b""])), max_size=6),
       st.lists(st.integers(min_value=1, max_value=64), min_size=1), st.data())
def test_decoder_random_chunking(
    frames: list[tuple[bytes, bytes, bytes]], sizes: list[int], data: st.DataObject
) -> None:
    stream = b"".join(noise_ + START_BLOCK + p + END_BLOCK + cr for p, noise_, cr in frames)
    d = FrameDecoder()
    out: list[bytes] = []
    pos = 0
    while pos < len(stream):
        size = data.draw(st.sampled_from(sizes))
        out += d.feed(stream[pos : pos + size])
        pos += size
    assert out == [p for p, _, _ in frames]
    assert not d.in_frame


# --- client and server over TCP -------------------------------------------------------------


async def test_round_trip() -> None:
    pas = Pas()
    async with running(pas) as server, client_for(server) as client:
        reply = await client.send(query("Q1"), "Q1")
        assert er7.parse(reply).segment("MSA") is not None
        assert pas.received == [query("Q1")]


async def test_reply_split_into_several_writes() -> None:
    pas = Pas(script=lambda n, p: Reply(ack(er7.parse(p).control_id), split_into=7))
    async with running(pas) as server, client_for(server) as client:
        for cid in ("S1", "S2"):
            assert er7.parse(await client.send(query(cid), cid)).segment("MSA") is not None
        assert server.connections_accepted == 1  # the split reply left the connection usable


async def test_reply_without_final_cr() -> None:
    pas = Pas(script=lambda n, p: Reply(ack(er7.parse(p).control_id), omit_final_cr=True))
    async with running(pas) as server, client_for(server) as client:
        for cid in ("C1", "C2", "C3"):
            assert er7.parse(await client.send(query(cid), cid)).control_id == "PAS1"
        assert server.connections_accepted == 1


async def test_slow_reply_times_out_after_retries_with_the_same_control_id() -> None:
    late = 60.0  # far beyond the three reply timeouts: no race with a slow machine
    pas = Pas(script=lambda n, p: Reply(ack(er7.parse(p).control_id), delay=late))
    async with running(pas) as server, client_for(server, reply_timeout=0.15,
                                                  retries=2) as client:
        started = time.monotonic()
        with pytest.raises(MllpTimeout):
            await client.send(query("SLOW1"), "SLOW1")
        assert time.monotonic() - started < late  # gave up; did not wait for the reply
        await until(lambda: len(pas.received) >= 3)  # the last may still be in the server
        assert pas.control_ids == ["SLOW1"] * 3
        assert len(set(pas.received)) == 1  # the same bytes each time
        assert server.connections_accepted == 3  # each retry on a fresh connection


async def test_late_reply_is_never_taken_for_the_next_one() -> None:
    second_arrived = asyncio.Event()

    async def pas(payload: bytes) -> bytes:
        cid = er7.parse(payload).control_id
        if cid == "FIRST":  # answered only once SECOND is on the wire: late, whatever the load
            await second_arrived.wait()
        elif cid == "SECOND":
            second_arrived.set()
            await asyncio.sleep(0)  # FIRST's late reply goes out first
        return ack(cid)

    async with MllpServer(pas) as server, client_for(server, reply_timeout=0.1,
                                                     retries=0) as client:
        with pytest.raises(MllpTimeout):
            await client.send(query("FIRST"), "FIRST")
        client.reply_timeout = 30.0  # from here on, no reply may race the clock
        reply = await client.send(query("SECOND"), "SECOND")
        msa = er7.parse(reply).segment("MSA")
        assert msa is not None and msa.value(2) == "SECOND"
        # the late reply to FIRST has gone out on its (closed) connection, which is gone
        await until(lambda: server.active_connections == 1)
        msa = er7.parse(await client.send(query("THIRD"), "THIRD")).segment("MSA")
        assert msa is not None and msa.value(2) == "THIRD"
        assert server.connections_accepted == 2


async def test_connection_refused_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    client = MllpClient(Endpoint("127.0.0.1", port), connect_timeout=10.0, retries=2,
                        backoff_base=0.01, backoff_cap=0.02)
    started = time.monotonic()
    with pytest.raises(MllpUnavailable) as info:
        await client.send(query("R1"), "R1")
    assert time.monotonic() - started < client.connect_timeout  # refused, not waited out
    assert "R1" not in str(info.value)
    await client.aclose()


async def test_dropped_connection_is_retried_with_the_same_control_id() -> None:
    def script(n: int, payload: bytes) -> Reply:
        if n == 1:
            return Reply(None, drop_connection=True)
        return Reply(ack(er7.parse(payload).control_id))

    pas = Pas(script=script)
    async with running(pas) as server, client_for(server) as client:
        with structlog.testing.capture_logs() as logs:
            reply = await client.send(query("DROP1"), "DROP1")
        msa = er7.parse(reply).segment("MSA")
        assert msa is not None and msa.value(2) == "DROP1"
        assert pas.control_ids == ["DROP1", "DROP1"]
        assert server.connections_accepted == 2
        assert [e["event"] for e in logs] == ["mllp_retry"]
        assert logs[0]["error"] == "MllpUnavailable" and logs[0]["control_id"] == "DROP1"


async def test_wrong_msa2_is_a_protocol_error_logged_and_not_retried() -> None:
    pas = Pas(script=lambda n, p: ack("SOMEONE-ELSE") if n == 1 else ack(er7.parse(p).control_id))
    async with running(pas) as server, client_for(server, retries=2) as client:
        with structlog.testing.capture_logs() as logs, pytest.raises(MllpProtocolError) as info:
            await client.send(query("MINE1"), "MINE1")
        assert "SOMEONE-ELSE" not in str(info.value)
        assert pas.control_ids == ["MINE1"]  # never retried
        warning = next(e for e in logs if e["event"] == "mllp_reply_mismatch")
        assert warning["log_level"] == "warning"
        assert (warning["expected"], warning["received"]) == ("MINE1", "SOMEONE-ELSE")
        assert set(warning) == {"event", "log_level", "endpoint", "expected", "received",
                                "reply_control_id"}
        # the connection that carried the wrong reply is not reused
        assert er7.parse(await client.send(query("MINE2"), "MINE2")).segment("MSA") is not None
        assert server.connections_accepted == 2


@pytest.mark.parametrize("reply", [ack(None), b"not hl7 at all", b""])
async def test_reply_without_msa_is_a_protocol_error(reply: bytes) -> None:
    pas = Pas(script=lambda n, p: reply)
    async with running(pas) as server, client_for(server) as client:
        with pytest.raises(MllpProtocolError):
            await client.send(query("N1"), "N1")
        assert len(pas.received) == 1


async def test_sequential_sends_reuse_pooled_connections() -> None:
    pas = Pas()
    async with running(pas) as server, client_for(server, pool_size=2) as client:
        for i in range(6):
            await client.send(query(f"SEQ{i}"), f"SEQ{i}")
        assert server.connections_accepted == 1
        assert server.active_connections == 1


async def test_concurrent_sends_run_pool_size_at_a_time() -> None:
    pas = Pas(hold=0.05)
    async with running(pas) as server, client_for(server, pool_size=3) as client:
        cids = [f"PAR{i}" for i in range(9)]
        replies = await asyncio.gather(*(client.send(query(c), c) for c in cids))
        acked = [er7.parse(r).segment("MSA") for r in replies]
        assert [m.value(2) if m else None for m in acked] == cids
        assert pas.max_in_flight == 3
        assert server.connections_accepted == 3


async def test_server_closing_idle_connections_is_survived() -> None:
    pas = Pas(script=lambda n, p: Reply(ack(er7.parse(p).control_id), drop_connection=True))
    async with running(pas) as server, client_for(server, retries=1) as client:
        for i in range(3):
            await client.send(query(f"IDLE{i}"), f"IDLE{i}")
            # the server has closed its side: the pooled connection has seen the close
            await until(lambda: server.active_connections == 0)
        assert pas.control_ids == ["IDLE0", "IDLE1", "IDLE2"]  # no resend was needed
        assert server.connections_accepted == 3


async def test_failing_handler_closes_the_connection() -> None:
    def script(n: int, payload: bytes) -> bytes:
        raise RuntimeError("simulated PAS bug")

    pas = Pas(script=script)
    async with running(pas) as server, client_for(server, retries=0, reply_timeout=5) as client:
        started = time.monotonic()
        with structlog.testing.capture_logs() as logs, pytest.raises(MllpUnavailable):
            await client.send(query("H1"), "H1")
        assert time.monotonic() - started < client.reply_timeout  # not a reply timeout
        assert {"event": "mllp_handler_failed", "error": "RuntimeError",
                "log_level": "error"} in logs


async def test_handler_returning_none_sends_nothing() -> None:
    pas = Pas(script=lambda n, p: None)
    async with running(pas) as server, client_for(server, retries=0,
                                                  reply_timeout=0.1) as client:
        with pytest.raises(MllpTimeout):
            await client.send(query("Q"), "Q")


async def test_unsolicited_frame_on_an_idle_connection_is_not_reused() -> None:
    """A PAS that sends a second frame after its reply: the next send must not read it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    cid = er7.parse(payload).control_id
                    writer.write(frame(ack(cid)) + frame(ack("STRAY")))
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = MllpClient(Endpoint("127.0.0.1", port), reply_timeout=1.0, retries=0)
    try:
        with structlog.testing.capture_logs() as logs:
            for cid in ("U1", "U2", "U3"):
                await asyncio.sleep(0.02)  # let the stray frame arrive while idle
                msa = er7.parse(await client.send(query(cid), cid)).segment("MSA")
                assert msa is not None and msa.value(2) == cid
        assert [e["event"] for e in logs] == ["mllp_unsolicited_data"] * 3
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_oversized_reply_is_a_protocol_error() -> None:
    pas = Pas(script=lambda n, p: ack(er7.parse(p).control_id) + b"ZZZ|" + b"x" * 5000 + b"\r")
    async with running(pas) as server, client_for(server, max_frame_bytes=1000) as client:
        with pytest.raises(MllpProtocolError):
            await client.send(query("BIG"), "BIG")
        assert len(pas.received) == 1


async def test_aclose_fails_sends_in_flight_and_later() -> None:
    pas = Pas(hold=5.0)
    async with running(pas) as server:
        client = MllpClient(Endpoint("127.0.0.1", server.port), reply_timeout=10)
        pending = asyncio.ensure_future(client.send(query("A1"), "A1"))
        while not pas.received:
            await asyncio.sleep(0.01)
        await client.aclose()
        with pytest.raises(MllpUnavailable):
            await pending
        with pytest.raises(MllpUnavailable):
            await client.send(query("A2"), "A2")


async def test_server_stop_closes_open_connections() -> None:
    pas = Pas()
    server = MllpServer(pas)
    await server.start()
    async with client_for(server) as client:
        await client.send(query("ST1"), "ST1")
        assert server.active_connections == 1
        await server.stop()
        assert server.active_connections == 0
        with pytest.raises(MllpUnavailable):
            await client.send(query("ST2"), "ST2")
    with pytest.raises(RuntimeError):
        _ = server.port


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str


def _make_pki(folder: pathlib.Path) -> Pki:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client cert."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: pathlib.Path) -> str:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return str(path)

    def write_cert(cert: x509.Certificate, path: pathlib.Path) -> str:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return str(path)

    def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def issue(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, cn: str,
              usage: x509.ObjectIdentifier,
              san: list[x509.GeneralName]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, True, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca = make_ca("Test MLLP CA")
    _, other_ca = make_ca("Some Other CA")
    s_key, s_cert = issue(ca_key, ca, "localhost", ExtendedKeyUsageOID.SERVER_AUTH,
                          [x509.DNSName("localhost"),
                           x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))])
    c_key, c_cert = issue(ca_key, ca, "gateway", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return Pki(
        ca=write_cert(ca, folder / "ca.pem"),
        server_cert=write_cert(s_cert, folder / "server.pem"),
        server_key=write_key(s_key, folder / "server.key"),
        client_cert=write_cert(c_cert, folder / "client.pem"),
        client_key=write_key(c_key, folder / "client.key"),
        other_ca=write_cert(other_ca, folder / "other-ca.pem"),
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return _make_pki(tmp_path_factory.mktemp("pki"))


async def test_tls(pki: Pki) -> None:
    pas = Pas()
    server_ctx = server_ssl_context(cert_file=pki.server_cert, key_file=pki.server_key)
    async with running(pas, ssl=server_ctx) as server:
        async with client_for(server, ssl=client_ssl_context(ca_file=pki.ca)) as client:
            for cid in ("T1", "T2"):
                msa = er7.parse(await client.send(query(cid), cid)).segment("MSA")
                assert msa is not None and msa.value(2) == cid
            assert server.connections_accepted == 1
        # a client that does not trust the server's CA refuses it
        untrusting = client_ssl_context(ca_file=pki.other_ca)
        async with client_for(server, ssl=untrusting, retries=0) as client:
            with pytest.raises(MllpUnavailable, match="not trusted"):
                await client.send(query("T3"), "T3")
        # a plain-TCP client gets no MLLP reply from a TLS listener
        async with client_for(server, retries=0, reply_timeout=0.3) as client:
            with pytest.raises((MllpUnavailable, MllpTimeout)):
                await client.send(query("T4"), "T4")
    assert pas.control_ids == ["T1", "T2"]


async def test_mutual_tls(pki: Pki) -> None:
    pas = Pas()
    server_ctx = server_ssl_context(cert_file=pki.server_cert, key_file=pki.server_key,
                                    client_ca_file=pki.ca)
    async with running(pas, ssl=server_ctx) as server:
        with_cert = client_ssl_context(ca_file=pki.ca, cert_file=pki.client_cert,
                                       key_file=pki.client_key)
        async with client_for(server, ssl=with_cert) as client:
            msa = er7.parse(await client.send(query("M1"), "M1")).segment("MSA")
            assert msa is not None and msa.value(2) == "M1"
        # no client certificate: the server refuses the connection
        async with client_for(server, ssl=client_ssl_context(ca_file=pki.ca),
                              retries=1) as client:
            with pytest.raises(MllpUnavailable):
                await client.send(query("M2"), "M2")
    assert pas.control_ids == ["M1"]


def test_ssl_context_errors(tmp_path: pathlib.Path) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(MllpError):
        client_ssl_context(ca_file=missing)
    with pytest.raises(MllpError):
        client_ssl_context(ca_file=None, key_file=missing)
    with pytest.raises(MllpError):
        server_ssl_context(cert_file=missing, key_file=missing)
    ctx = client_ssl_context(ca_file=None, verify=False)
    assert not ctx.check_hostname


def test_client_arguments() -> None:
    with pytest.raises(ValueError):
        MllpClient(Endpoint("127.0.0.1", 1), pool_size=0)
    with pytest.raises(ValueError):
        MllpClient(Endpoint("127.0.0.1", 1), retries=-1)
    assert str(Endpoint("pas.example", 2575)) == "mllp://pas.example:2575"

