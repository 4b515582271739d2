"""The listener over real TCP, with a sender that shares no code with ours, on SQLite and a
real PostgreSQL: ACK codes, ACK only after the commit, duplicates recorded once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from gateway.adt.events import Mapper
from gateway.adt.listener import AdtListener
from gateway.adt.store import AdtStore, messages
from tests.gateway.adt.conftest import GOLDEN, Sender, adt_message, er7_bytes, err_code, msa

pytestmark = pytest.mark.anyio


@pytest.fixture
async def listener(mapper: Mapper, any_store: AdtStore) -> AsyncIterator[AdtListener]:
    lis = AdtListener(mapper, any_store)
    await lis.start()
    yield lis
    await lis.stop()


async def _send(port: int, *payloads: bytes) -> list[bytes | None]:
    def run() -> list[bytes | None]:
        s = Sender(port)
        try:
            return [s.send(p) for p in payloads]
        finally:
            s.close()
    return await asyncio.to_thread(run)


async def test_valid_message_is_recorded_then_acked(listener: AdtListener,
                                                    any_store: AdtStore) -> None:
    (reply,) = await _send(listener.port, er7_bytes(GOLDEN / "itk-a01.hl7"))
    assert reply is not None
    fields = msa(reply)
    assert fields[1:3] == ["AA", "1391320453338055"]
    with any_store.engine.connect() as conn:
        row = conn.execute(sa.select(messages.c.event, messages.c.patient_key)).one()
    assert tuple(row) == ("A01", "R1234567")


async def test_ack_codes_over_tcp(listener: AdtListener, any_store: AdtStore) -> None:
    replies = await _send(
        listener.port,
        b"this is not HL7\r",
        adt_message("U1", "D1", "A17"),                 # not configured
        # an unmapped code: AE 103 (the ITK A03 with a patient class no code map knows)
        er7_bytes(GOLDEN / "itk-a03.hl7").replace(b"\rPV1|1|I|", b"\rPV1|1|Q|"),
        adt_message("V1", "D0000001", "A08"),           # valid
    )
    codes = [(msa(r)[1], err_code(r)) for r in replies if r is not None]
    assert codes == [("AR", "100"), ("AR", "201"), ("AE", "103"), ("AA", None)]
    assert any_store.message_count() == 1  # only the valid one is recorded
    assert b"\rPV1|1|I|" in er7_bytes(GOLDEN / "itk-a03.hl7")  # the edit above took


async def test_a_resent_message_is_acked_and_recorded_once(listener: AdtListener,
                                                           any_store: AdtStore) -> None:
    msg = adt_message("DUP-1", "D0000002", "A08")
    replies = await _send(listener.port, msg, msg)
    assert [msa(r)[1] for r in replies if r] == ["AA", "AA"]
    assert any_store.message_count() == 1
    # the same control id with other content is an application error, not silently merged
    other = adt_message("DUP-1", "D0000003", "A08")
    (reply,) = await _send(listener.port, other)
    assert reply is not None and msa(reply)[1] == "AE" and err_code(reply) == "205"
    assert any_store.message_count() == 1


async def test_enhanced_mode_commit_ack(listener: AdtListener) -> None:
    (reply,) = await _send(listener.port, adt_message("EN-1", "D0000004", "A08",
                                                      extra_msh="|||AL|NE"))
    assert reply is not None and msa(reply)[1:3] == ["CA", "EN-1"]


async def test_no_ack_when_the_store_cannot_record(mapper: Mapper, tmp_path: Path) -> None:
    store = AdtStore(f"sqlite:///{tmp_path / 'adt.sqlite'}")
    lis = AdtListener(mapper, store)
    await lis.start()
    try:
        with store.engine.begin() as conn:  # the store breaks under the listener
            conn.execute(sa.text("DROP TABLE adt_message"))
        (reply,) = await _send(lis.port, adt_message("S1", "D0000005"))
        assert reply is not None and msa(reply)[1] == "AR" and err_code(reply) == "207"
    finally:
        await lis.stop()
        store.close()
