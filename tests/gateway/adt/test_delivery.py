"""Rest-hook delivery to a real HTTP receiver: order per patient, retries with the same id,
dead letters, and nothing sent outside the allow-list."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from gateway.adt.api import checked
from gateway.adt.config import AdtSettings, Endpoint
from gateway.adt.delivery import Deliverer
from gateway.adt.store import AdtStore, Incoming
from tests.gateway.adt.conftest import Receiver, adt_settings

pytestmark = pytest.mark.anyio


def subscribe(store: AdtStore, settings: AdtSettings, endpoint: str,
              criteria: str = "Patient", payload: str | None = "application/fhir+json",
              headers: list[str] | None = None) -> str:
    channel: dict[str, Any] = {"type": "rest-hook", "endpoint": endpoint}
    if payload:
        channel["payload"] = payload
    if headers:
        channel["header"] = headers
    sub = checked({"resourceType": "Subscription", "status": "requested",
                   "reason": "test", "criteria": criteria, "channel": channel}, settings)
    store.add_subscription(sub["id"], sub, "test")
    return str(sub["id"])


def event(patient: str, n: int) -> Incoming:
    return Incoming(sender="PAS^RCB", control_id=f"{patient}-{n}-{uuid.uuid4().hex[:6]}",
                    digest="d", event="A08", patient_key=patient,
                    resources=[{"resourceType": "Patient", "id": patient,
                                "identifier": [{"system": "urn:x", "value": patient}],
                                "note": n}])


async def drain(d: Deliverer, until: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not until():
        if loop.time() > deadline:
            raise AssertionError("delivery did not finish in time")
        if await d.run_once() == 0:
            await asyncio.sleep(0.05)


async def test_in_order_per_patient_with_retries_and_stable_ids(
        tmp_path: Path, any_store: AdtStore, receiver: Receiver) -> None:
    store = any_store  # SQLite and PostgreSQL
    settings = adt_settings(tmp_path)
    sid = subscribe(store, settings, receiver.url, headers=["Authorization: Bearer s3cret"])
    for n in range(5):
        for p in ("P1", "P2", "P3"):
            store.record(event(p, n))
    receiver.fail_next = 3  # the first attempts fail: backoff, then the same notifications
    d = Deliverer(store, settings, base_url="http://gw/STU3")
    try:
        await drain(d, lambda: len(receiver.got) >= 15)
    finally:
        await d.stop()
    got = receiver.wait_for(15)
    ids = [g.notification_id for g in got]
    assert len(set(ids)) == 15 and all(i.startswith(f"{sid}-") for i in ids)
    for p in ("P1", "P2", "P3"):
        mine = [g.body["entry"][0]["resource"]["note"] for g in got  # type: ignore[index]
                if g.body and g.body["entry"][0]["resource"]["id"] == p]
        assert mine == [0, 1, 2, 3, 4]
    first = got[0]
    assert first.headers["authorization"] == "Bearer s3cret"
    assert first.body is not None and first.body["id"] == first.notification_id
    assert first.headers["content-type"] == "application/fhir+json"
    assert store.outbox_counts() == {"delivered": 15}


async def test_criteria_select_the_events(tmp_path: Path, store: AdtStore,
                                          receiver: Receiver) -> None:
    settings = adt_settings(tmp_path)
    subscribe(store, settings, receiver.url, criteria="Patient?identifier=urn:x|P2",
              payload=None)
    for p in ("P1", "P2", "P3"):
        store.record(event(p, 0))
    d = Deliverer(store, settings)
    try:
        await drain(d, lambda: store.outbox_counts().get("pending", 0) == 0)
    finally:
        await d.stop()
    assert len(receiver.got) == 1 and receiver.got[0].body is None  # no payload asked for
    assert store.outbox_counts() == {"delivered": 1}


async def test_dead_letter_then_the_next_notification(tmp_path: Path, store: AdtStore,
                                                      receiver: Receiver) -> None:
    settings = adt_settings(tmp_path, max_attempts=3)
    sid = subscribe(store, settings, receiver.url)
    store.record(event("P1", 0))
    receiver.status = 500
    d = Deliverer(store, settings)
    try:
        await drain(d, lambda: store.outbox_counts().get("dead") == 1)
        assert receiver.got == []
        dead = store.dead_letters()
        assert dead[0]["attempts"] == 3 and dead[0]["last_error"] == "HTTP 500"
        sub = store.get_subscription(sid)
        assert sub is not None and sub["status"] == "error"
        receiver.status = 200
        store.record(event("P1", 1))
        await drain(d, lambda: len(receiver.got) == 1)
    finally:
        await d.stop()
    assert receiver.got[0].body["entry"][0]["resource"]["note"] == 1  # type: ignore[index]
    sub = store.get_subscription(sid)
    assert sub is not None and sub["status"] == "active"


async def test_nothing_is_sent_outside_the_allow_list(tmp_path: Path, store: AdtStore,
                                                      receiver: Receiver) -> None:
    settings = adt_settings(tmp_path, max_attempts=2)
    subscribe(store, settings, receiver.url)
    store.record(event("P1", 0))
    # the allow-list is narrowed after the Subscription was accepted
    narrowed = adt_settings(tmp_path, max_attempts=2,
                            allowed_endpoints=(Endpoint.parse("https://hooks.example.org"),))
    d = Deliverer(store, narrowed)
    try:
        await drain(d, lambda: store.outbox_counts().get("dead") == 1)
    finally:
        await d.stop()
    assert receiver.got == []
    assert store.dead_letters()[0]["last_error"] == "endpoint not in the allow-list"


@pytest.mark.parametrize(("allowed", "url", "ok"), [
    ("http://127.0.0.1:*", "http://127.0.0.1:8080/hook", True),
    ("http://127.0.0.1:*", "http://127.0.0.1.evil.example/hook", False),
    ("http://127.0.0.1:*", "https://127.0.0.1:8080/hook", False),
    ("http://127.0.0.1:*", "http://user@127.0.0.1:8080/hook", False),
    ("https://hooks.trust.nhs.uk/fhir", "https://hooks.trust.nhs.uk/fhir/ward1", True),
    ("https://hooks.trust.nhs.uk/fhir", "https://hooks.trust.nhs.uk/other", False),
    ("https://hooks.trust.nhs.uk/fhir", "https://hooks.trust.nhs.uk:8443/fhir", False),
])
def test_allow_list(allowed: str, url: str, ok: bool) -> None:
    assert Endpoint.parse(allowed).allows(url) is ok


async def test_prune_keeps_pending_and_dead(tmp_path: Path, store: AdtStore,
                                            receiver: Receiver) -> None:
    import time

    settings = adt_settings(tmp_path, max_attempts=1)
    subscribe(store, settings, receiver.url)
    store.record(event("P1", 0))
    d = Deliverer(store, settings)
    try:
        await drain(d, lambda: len(receiver.got) == 1)
        receiver.status = 500
        store.record(event("P2", 0))  # will be dead-lettered
        await drain(d, lambda: store.outbox_counts().get("dead") == 1)
    finally:
        await d.stop()
    store.record(event("P3", 0))  # pending (nobody delivers it)
    assert store.message_count() == 3
    gone = store.prune(time.time() + 1)
    assert gone == 2  # P1's notification and its message
    assert store.outbox_counts() == {"dead": 1, "pending": 1}
    assert store.message_count() == 2


def test_one_delivery_lease_per_store(any_store: AdtStore) -> None:
    import time

    assert any_store.acquire_lease("delivery", "host-a:2576", 0.5)
    assert not any_store.acquire_lease("delivery", "host-b:2576", 0.5)
    assert any_store.acquire_lease("delivery", "host-a:2576", 0.5)  # renewal, or a restart
    time.sleep(0.7)
    assert any_store.acquire_lease("delivery", "host-b:2576", 0.5)  # host-a died: it expired
    assert not any_store.acquire_lease("delivery", "host-a:2576", 0.5)


async def test_a_second_deliverer_on_the_store_stays_idle(tmp_path: Path, store: AdtStore,
                                                          receiver: Receiver) -> None:
    settings = adt_settings(tmp_path)
    subscribe(store, settings, receiver.url)
    assert store.acquire_lease("delivery", "someone-else", 60)
    store.record(event("P1", 0))
    d = Deliverer(store, settings, holder="me")
    await d.start()
    try:
        await asyncio.sleep(1.0)
        assert receiver.got == []  # the other holder delivers, not this one
    finally:
        await d.stop()
    d2 = Deliverer(store, settings, holder="someone-else")
    await d2.start()
    try:
        for _ in range(200):  # the event loop must run the deliverer meanwhile
            if receiver.got:
                break
            await asyncio.sleep(0.05)
    finally:
        await d2.stop()
    assert len(receiver.got) == 1
