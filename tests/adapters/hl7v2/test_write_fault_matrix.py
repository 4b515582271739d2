"""1,000 creates through the gateway (real uvicorn) into the PAS simulator (real MLLP), with
faults injected on the ADT messages: nothing is duplicated, nothing reported done is lost.

Faults, drawn per ADT^A28 from a seeded random stream (about one create in three is hit):

* connection dropped *before* the PAS applied the message (the write is lost in transit);
* connection dropped after the PAS applied it, before the ACK (the ACK is lost);
* connection closed just after the ACK (the next exchange on it finds it gone);
* NAK (AE) without applying it, every n-th A28;
* an ACK with the wrong MSA-2 (applied; the answer is for "another" message);
* the ACK held back past the gateway's deadline (applied; the answer comes too late).

The client does what the gateway's errors tell it: a success is final; a known failure
(BACKEND_REJECTED, BACKEND_UNAVAILABLE) is resent as is; an unknown outcome
(WRITE_OUTCOME_UNKNOWN) is resent as a conditional create (If-None-Exist on the NHS number).
At the end the PAS's own tables are counted per patient.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp_server import Reply
from gateway import nhs_number
from gateway.app import build_app
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.settings import Settings
from tests.adapters.hl7v2.test_adapter import NEW_PATIENT
from tests.conftest import LIMITS_OFF, LiveServer

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[3] / "mappings" / "demo-hl7v2"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
CREATES = int(os.environ.get("CCG_FAULT_CREATES", "1000"))
WORKERS = 12
FAULTS = ("drop-unapplied", "drop-before-ack", "close-after-ack", "nak", "wrong-msa2",
          "late")
KNOWN_NOT_APPLIED = {(502, "BACKEND_REJECTED"), (503, "BACKEND_UNAVAILABLE")}
UNKNOWN = (504, "WRITE_OUTCOME_UNKNOWN")


def _nhs_numbers(n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    base = 400_000_000
    while len(out) < n:
        base += 1
        stem = f"{base:09d}"
        check = nhs_number.check_digit(stem)
        if check is not None and (number := f"{stem}{check}") not in taken:
            out.append(number)
    return out


class FaultyPas:
    """Wraps the simulator's MLLP handler: faults on ADT^A28, chosen per message."""

    def __init__(self, sim: PasSimulator, seed: int, nak_every: int = 9) -> None:
        self.handler = sim._server.handler
        self.rng = random.Random(seed)
        self.nak_every = nak_every
        self.a28s = 0
        self.injected: Counter[str] = Counter()

    def _fault(self) -> str | None:
        self.a28s += 1
        if self.a28s % self.nak_every == 0:
            return "nak"
        draw = self.rng.random()
        return self.rng.choice([f for f in FAULTS if f != "nak"]) if draw < 0.25 else None

    async def __call__(self, data: bytes) -> bytes | Reply | None:
        if b"ADT^A28" not in data:
            return await self.handler(data)
        fault = self._fault()
        if fault is None:
            return await self.handler(data)
        self.injected[fault] += 1
        control = er7.parse(data).control_id or ""
        if fault == "drop-unapplied":
            return Reply(None, drop_connection=True)
        if fault == "nak":
            return messages.ack(messages.Header(sending_application="PAS"),
                                messages.new_control_id(), acknowledges=control, code="AE",
                                text="busy, try again", error=("207", "busy"))
        reply = await self.handler(data)  # applied
        assert isinstance(reply, bytes)
        if fault == "drop-before-ack":
            return Reply(None, drop_connection=True)
        if fault == "close-after-ack":
            return Reply(reply, drop_connection=True)
        if fault == "wrong-msa2":
            return reply.replace(f"MSA|AA|{control}".encode(), b"MSA|AA|NOTYOURS0000000001")
        return Reply(reply, delay=1.2)  # late: past the reply timeout and the deadline


async def test_a_thousand_creates_with_faults_none_duplicated_none_lost(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    db = tmp_path_factory.mktemp("faults") / "pas.sqlite"
    ensure_sqlite_demo(db, patients=200, progress=False)
    url = f"sqlite:///{db}"
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        taken = {r[0] for r in conn.execute(sa.text(
            'SELECT "NHS_NUMBER" FROM "PATIENTS" WHERE "NHS_NUMBER" IS NOT NULL'))}
    numbers = _nhs_numbers(CREATES, taken)

    async with PasSimulator(url, dialect="itk") as sim:  # plain ACKs, no MSH-10 memory
        faulty = FaultyPas(sim, seed=20261207)
        sim._server.handler = faulty
        app = build_app(Settings(
            mappings_dir=MAPPINGS, data_dir=tmp_path_factory.mktemp("gw"), paging_secret="t",
            log_level="error", progress=False, auth_mode="insecure-demo",
            **LIMITS_OFF,  # one client sends everything: not what is tested here
            connection_urls={"pas": url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        adapter = next(p.mapping.adapter for p in app.state.registry
                       if p.resource_type == "Patient")
        adapter.client.reply_timeout = 1.0
        adapter.client._slots = asyncio.Semaphore(WORKERS)  # a pool as wide as the clients
        adapter.client.backoff_base = 0.01
        adapter.options = adapter.options.model_copy(update={"deadline": 2.5})

        statuses: Counter[tuple[int, str]] = Counter()
        succeeded: dict[str, int] = {}
        unexpected: list[tuple[int, str]] = []

        async def create(client: httpx.AsyncClient, number: str) -> None:
            body: dict[str, Any] = {**NEW_PATIENT, "identifier": [
                {**NEW_PATIENT["identifier"][0], "value": number}]}
            headers = {"Content-Type": "application/fhir+json"}
            for _ in range(12):
                r = await client.post("/STU3/Patient", json=body, headers=headers)
                code = "" if r.status_code < 300 else (
                    r.json()["issue"][0]["details"]["coding"][0]["code"])
                statuses[(r.status_code, code)] += 1
                if r.status_code in (200, 201):
                    succeeded[number] = r.status_code
                    return
                if (r.status_code, code) == UNKNOWN:
                    headers["If-None-Exist"] = f"identifier={NHS}|{number}"
                elif (r.status_code, code) not in KNOWN_NOT_APPLIED:
                    unexpected.append((r.status_code, code))
                    return

        async def worker(client: httpx.AsyncClient, queue: list[str]) -> None:
            while queue:
                await create(client, queue.pop())

        queue = list(numbers)
        with LiveServer(app) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                await asyncio.gather(*(worker(client, queue) for _ in range(WORKERS)))

    with engine.connect() as conn:
        rows = Counter(r[0] for r in conn.execute(sa.text(
            'SELECT "NHS_NUMBER" FROM "PATIENTS" WHERE "NHS_NUMBER" >= \'4000000000\' '
            'AND "NHS_NUMBER" < \'5000000000\'')))
    engine.dispose()
    applied_once = sum(1 for n in numbers if rows[n] == 1)
    applied_twice = sum(1 for n in numbers if rows[n] > 1)
    success_not_applied = sum(1 for n in succeeded if rows[n] == 0)
    print(f"\nfaults injected: {dict(faulty.injected)}; responses: {dict(statuses)}; "
          f"applied once {applied_once}, twice {applied_twice}, "
          f"reported success but not applied {success_not_applied}")

    assert sum(faulty.injected.values()) > CREATES // 5  # the faults really happened
    assert all(faulty.injected[f] > CREATES // 100 for f in FAULTS), faulty.injected
    assert unexpected == []  # every failure said whether the outcome is known
    assert applied_twice == 0
    assert success_not_applied == 0
    assert len(succeeded) == CREATES and applied_once == CREATES
    assert statuses[UNKNOWN] > 0 and statuses[(200, "")] > 0  # unknowns resolved by If-None-Exist
