"""Enhanced-mode acknowledgements over real TCP (HL7 v2.4 2.13.2): the accept ACK as MSH-15
asks, then the application ACK as a separate message as MSH-16 asks.

The peer is a plain socket written here — its own framing, its own reading of the replies —
sharing no code with the listener or adapters/hl7v2; it varies its behaviour (reads every
frame as it comes, answers our application ACK with its own accept ACK, sends the next
message before reading the application ACK). Replies are also read by hl7apy, a parser that
shares no code with ours. The ITK samples are sent as they are (no PAS number: AE 101) and
as the golden cases (accepted), each with MSH-15/16 set.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from hl7apy.parser import parse_message

from gateway.adt.events import Mapper
from gateway.adt.listener import AdtListener
from gateway.adt.store import AdtStore
from tests.gateway.adt.conftest import GOLDEN, ITK, adt_message, er7_bytes

pytestmark = pytest.mark.anyio


class Peer:
    """A PAS in enhanced mode: sends framed messages, collects whatever frames come back."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.pending = b""

    def send(self, message: bytes) -> None:
        self.sock.sendall(b"\x0b" + message + b"\x1c\x0d")

    def frames(self, count: int, quiet: float = 0.4) -> list[bytes]:
        """``count`` frames, then checks that nothing more arrives for ``quiet`` seconds."""
        out: list[bytes] = []
        deadline = time.monotonic() + 10
        while len(out) < count or time.monotonic() < deadline:
            while b"\x1c\x0d" in self.pending:
                head, self.pending = self.pending.split(b"\x1c\x0d", 1)
                assert head.startswith(b"\x0b"), head[:20]
                out.append(head[1:])
            if len(out) >= count:
                deadline = min(deadline, time.monotonic() + quiet)
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            self.pending += chunk
        return out

    def close(self) -> None:
        self.sock.close()


def fields(reply: bytes, segment: str) -> list[str]:
    for seg in reply.split(b"\r"):
        if seg.startswith(segment.encode() + b"|"):
            return seg.decode().split("|")
    raise AssertionError(f"no {segment} in {reply[:60]!r}")


def kind(reply: bytes) -> tuple[str, str]:
    """(MSA-1, MSA-2), read by hl7apy."""
    m = parse_message(reply.decode(), find_groups=False)
    return m.msa.msa_1.to_er7(), m.msa.msa_2.to_er7()


def with_modes(message: bytes, accept: str, application: str) -> bytes:
    """``message`` with MSH-15 and MSH-16 set (the MSH padded with empty fields as needed)."""
    msh, rest = message.split(b"\r", 1)
    parts = msh.decode().split("|")
    parts += [""] * (16 - len(parts))
    parts[14], parts[15] = accept, application  # parts[n - 1] is MSH-n
    return "|".join(parts).encode() + b"\r" + rest


@pytest.fixture
async def listener(mapper: Mapper, store: AdtStore) -> AsyncIterator[AdtListener]:
    lis = AdtListener(mapper, store)
    await lis.start()
    yield lis
    await lis.stop()


async def exchange(port: int, *messages: bytes, expect: int) -> list[bytes]:
    def run() -> list[bytes]:
        peer = Peer(port)
        try:
            for m in messages:
                peer.send(m)
            return peer.frames(expect)
        finally:
            peer.close()
    return await asyncio.to_thread(run)


async def test_accept_then_application_ack(listener: AdtListener, store: AdtStore) -> None:
    msg = adt_message("APP-1", "D0000001", "A08", extra_msh="|||AL|AL")
    accept, app = await exchange(listener.port, msg, expect=2)
    assert kind(accept) == ("CA", "APP-1") and kind(app) == ("AA", "APP-1")
    assert store.message_count() == 1
    # the application ACK is a message of its own: its own control id, ACK^A08, and it asks
    # for no acknowledgement back; sender and receiver swapped
    msh = fields(app, "MSH")
    assert msh[8] == "ACK^A08^ACK" and msh[9] != fields(accept, "MSH")[9]
    assert (msh[14], msh[15]) == ("NE", "NE")
    assert (msh[2], msh[3], msh[4], msh[5]) == ("ROUTE", "ROUTE", "PAS", "RCB")
    m = parse_message(app.decode(), find_groups=False)
    assert (m.msh.msh_15.to_er7(), m.msh.msh_16.to_er7()) == ("NE", "NE")


@pytest.mark.parametrize(("msh15", "msh16", "expected"), [
    ("NE", "AL", [("AA", "A")]),
    ("NE", "ER", []),                # success, and errors only were asked for
    ("NE", "SU", [("AA", "A")]),
    ("AL", "NE", [("CA", "A")]),
    ("ER", "AL", [("AA", "A")]),     # accepted: no accept ACK asked for on success
    ("SU", "ER", [("CA", "A")]),
    ("AL", "", [("CA", "A")]),       # an empty MSH-16 asks for no application ACK
    ("", "AL", [("CA", "A"), ("AA", "A")]),  # an empty MSH-15 is read as AL
])
async def test_msh15_and_msh16_on_success(listener: AdtListener, store: AdtStore, msh15: str,
                                          msh16: str, expected: list[tuple[str, str]]) -> None:
    ctl = f"S-{msh15 or 'x'}-{msh16 or 'x'}"
    msg = with_modes(adt_message(ctl, "D0000002", "A08"), msh15, msh16)
    got = await exchange(listener.port, msg, expect=len(expected))
    assert [kind(r) for r in got] == [(code, ctl) for code, _ in expected]
    assert store.message_count() == 1  # recorded whatever was asked for


async def test_application_errors(listener: AdtListener, store: AdtStore) -> None:
    # an unmapped code (patient class Q): committed as a refusal (CA), then AE 103
    unmapped = with_modes(er7_bytes(GOLDEN / "itk-a03.hl7").replace(b"\rPV1|1|I|",
                                                                     b"\rPV1|1|Q|"), "AL", "ER")
    ctl = fields(unmapped, "MSH")[9]
    accept, app = await exchange(listener.port, unmapped, expect=2)
    assert kind(accept) == ("CA", ctl)
    assert kind(app) == ("AE", ctl)
    assert fields(app, "ERR")[1].split("^")[3].split("&")[0] == "103"
    assert "ERR|" not in accept.decode()
    assert store.message_count() == 0
    (refusal,) = store.refused()
    assert (refusal["control_id"], refusal["code"], refusal["error"], refusal["event"]) == (
        ctl, "AE", "103", "A03")
    # the header refused (an event not configured): CR, then AR (errors were asked for)
    refused = adt_message("R-1", "D0000003", "A17", extra_msh="|||AL|ER")
    accept, app = await exchange(listener.port, refused, expect=2)
    assert (kind(accept), kind(app)) == (("CR", "R-1"), ("AR", "R-1"))
    assert fields(app, "ERR")[1].split("^")[3].split("&")[0] == "201"
    # SU: success only, so an error has its accept ACK alone
    (only,) = await exchange(listener.port, with_modes(unmapped.replace(
        ctl.encode(), b"SU-ONLY", 1), "AL", "SU"), expect=1)
    assert kind(only) == ("CA", "SU-ONLY")
    assert len(store.refused()) == 2  # header refusals are not recorded; the SU one is


async def test_no_application_ack_when_the_store_fails(mapper: Mapper, tmp_path: Path) -> None:
    store = AdtStore(f"sqlite:///{tmp_path / 'adt.sqlite'}")
    lis = AdtListener(mapper, store)
    await lis.start()
    try:
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE adt_message"))
            conn.execute(sa.text("DROP TABLE adt_refusal"))
        ok = adt_message("F-1", "D0000004", "A08", extra_msh="|||AL|AL")
        bad = er7_bytes(GOLDEN / "itk-a03.hl7").replace(b"\rPV1|1|I|", b"\rPV1|1|Q|")
        for msg in (ok, with_modes(bad, "AL", "AL")):
            (only,) = await exchange(lis.port, msg, expect=1)
            # CE: not committed, resend later; not processed, so no application ACK
            assert kind(only)[0] == "CE"
            assert fields(only, "ERR")[1].split("^")[3].split("&")[0] == "207"
    finally:
        await lis.stop()
        store.close()


async def test_a_peer_that_acknowledges_our_application_ack(listener: AdtListener,
                                                           store: AdtStore) -> None:
    def run() -> list[bytes]:
        peer = Peer(listener.port)
        try:
            peer.send(adt_message("P-1", "D0000005", "A08", extra_msh="|||AL|AL"))
            accept, app = peer.frames(2)
            # its accept ACK of our application ACK (as a v2.4 sender may send): never answered
            ctl = fields(app, "MSH")[9]
            peer.send(f"MSH|^~\\&|PAS|RCB|ROUTE|ROUTE|20240101120001||ACK|PAS-ACK-1|P|2.4\r"
                      f"MSA|CA|{ctl}\r".encode())
            silent = peer.frames(0, quiet=0.5)
            # and the conversation goes on; this time the next message goes out before the
            # application ACK of the previous one is read
            peer.send(adt_message("P-2", "D0000005", "A08", extra_msh="|||AL|AL"))
            peer.send(adt_message("P-3", "D0000005", "A08", extra_msh="|||NE|AL"))
            return [accept, app, *silent, *peer.frames(3)]
        finally:
            peer.close()

    got = await asyncio.to_thread(run)
    assert [kind(r) for r in got] == [("CA", "P-1"), ("AA", "P-1"), ("CA", "P-2"),
                                      ("AA", "P-2"), ("AA", "P-3")]
    assert store.message_count() == 3


@pytest.mark.parametrize("case", sorted(GOLDEN.glob("itk-*.hl7")), ids=lambda p: p.stem)
async def test_itk_golden_samples_in_enhanced_mode(listener: AdtListener, store: AdtStore,
                                                   case: Path) -> None:
    raw = er7_bytes(case)
    control = fields(raw, "MSH")[9]
    accept, app = await exchange(listener.port, with_modes(raw, "AL", "AL"), expect=2)
    assert (kind(accept), kind(app)) == (("CA", control), ("AA", control))
    assert fields(app, "MSH")[8] == f"ACK^{fields(raw, 'MSH')[8].split('^')[1]}^ACK"
    assert store.message_count() == 1


@pytest.mark.parametrize("sample", sorted(ITK.glob("*.txt")), ids=lambda p: p.stem)
async def test_raw_itk_samples_get_an_application_error(listener: AdtListener,
                                                        store: AdtStore, sample: Path) -> None:
    raw = er7_bytes(sample)
    control = fields(raw, "MSH")[9]
    # errors only, both levels: accepted (as a refusal) silently, then the AE
    (app,) = await exchange(listener.port, with_modes(raw, "ER", "ER"), expect=1)
    assert kind(app) == ("AE", control)
    assert fields(app, "ERR")[1].split("^")[3].split("&")[0] in ("101", "103")
    assert store.message_count() == 0 and len(store.refused()) == 1
