"""ADT feed and Subscription delivery metrics: messages by trigger event and ACK code,
deliveries by outcome — bounded labels (an event nobody configured is 'other'), no PHI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY, generate_latest

from gateway.adt.delivery import Deliverer
from gateway.adt.events import Mapper
from gateway.adt.listener import AdtListener
from gateway.adt.store import AdtStore
from tests.gateway.adt.conftest import (
    GOLDEN,
    Receiver,
    Sender,
    adt_message,
    adt_settings,
    er7_bytes,
)
from tests.gateway.adt.test_delivery import drain, event, subscribe

pytestmark = pytest.mark.anyio


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def listener(mapper: Mapper, store: AdtStore) -> AsyncIterator[AdtListener]:
    lis = AdtListener(mapper, store)
    await lis.start()
    yield lis
    await lis.stop()


async def test_adt_messages_are_counted_by_event_and_ack_code(listener: AdtListener) -> None:
    name = "ccg_adt_messages_total"
    keys = [("A08", "AA"), ("other", "AR"), ("A01", "AA"), ("A03", "AE"), ("other", "AR")]
    before = {k: value(name, event=k[0], ack_code=k[1]) for k in set(keys)}

    def run() -> None:
        s = Sender(listener.port)
        try:
            s.send(adt_message("M1", "D0000101", "A08"))
            s.send(adt_message("M2", "D0000102", "Z99"))  # not configured: AR, 'other'
            s.send(er7_bytes(GOLDEN / "itk-a01.hl7"))
            s.send(er7_bytes(GOLDEN / "itk-a03.hl7").replace(b"\rPV1|1|I|", b"\rPV1|1|Q|"))
            s.send(b"this is not HL7\r")
        finally:
            s.close()

    await asyncio.to_thread(run)
    after = {k: value(name, event=k[0], ack_code=k[1]) for k in set(keys)}
    assert {k: after[k] - before[k] for k in after} == {
        ("A08", "AA"): 1, ("other", "AR"): 2, ("A01", "AA"): 1, ("A03", "AE"): 1}
    text = generate_latest(REGISTRY).decode()
    for leak in ("Z99", "D0000101", "M2", "TESTER", "R1234567"):
        assert leak not in text


async def test_deliveries_retries_and_dead_letters_are_counted(
        tmp_path: Path, store: AdtStore, receiver: Receiver) -> None:
    settings = adt_settings(tmp_path, max_attempts=2)
    subscribe(store, settings, receiver.url)
    name = "ccg_deliveries_total"

    def counts() -> tuple[float, float, float]:
        return tuple(value(name, channel="subscription", outcome=o)  # type: ignore[return-value]
                     for o in ("delivered", "retry", "dead_letter"))

    before = counts()
    store.record(event("P1", 0))
    receiver.status = 500
    d = Deliverer(store, settings)
    try:
        await drain(d, lambda: store.outbox_counts().get("dead") == 1)  # 1 retry, then dead
        receiver.status = 200
        store.record(event("P1", 1))
        await drain(d, lambda: len(receiver.got) == 1)
    finally:
        await d.stop()
    assert tuple(a - b for a, b in zip(counts(), before, strict=True)) == (1, 1, 1)
