"""The PAS simulator's ADT^A01 (admit): a new PROVIDER_SPELLS row, checked with plain SQL, its
refusals (AE with the table 0357 code) and the dialect that takes no A01 (AR 201)."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp import MllpClient
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from tests.gateway.demo_pas.test_hl7v2_simulator import (
    HEADER,
    ack_code,
    client_for,
    err_code,
)

pytestmark = pytest.mark.anyio

ADMIT = {"PID-3[0].1": "D0000003", "PID-3[0].5": "PI", "PV1-2.1": "I", "PV1-3.1": "W11",
         "PV1-4.1": "21", "PV1-7.1": "2000026", "PV1-10.1": "320", "PV1-14.1": "19",
         "PV1-44.1": "202612011015"}


@pytest.fixture
def write_url(tmp_path: pathlib.Path) -> str:
    """A private demo PAS (200 patients) that the A01s may change."""
    return f"sqlite:///{ensure_sqlite_demo(tmp_path / 'pas.sqlite', patients=200, progress=False)}"


def spell_rows(url: str, where: str = "1 = 1") -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(sa.text(
            f'SELECT * FROM "PROVIDER_SPELLS" WHERE {where} ORDER BY "PRVSP_REFNO"'))
            .mappings()]
    engine.dispose()
    return rows


@pytest.fixture(params=["demo", "itk", "strict"])
async def dialect_client(request: pytest.FixtureRequest, write_url: str
                         ) -> AsyncIterator[tuple[MllpClient, str, str]]:
    async with PasSimulator(write_url, dialect=request.param) as sim, \
            client_for(sim) as client:
        yield client, write_url, request.param


async def admit(client: MllpClient, values: dict[str, str],
                control: str | None = None) -> er7.Message:
    control = control or messages.new_control_id()
    raw = await client.send(messages.adt(HEADER, control, event="A01", values=values), control)
    msg = er7.parse(raw)
    msa = msg.segment("MSA")
    assert msa is not None and msa.value(2) == control
    return msg


async def test_an_a01_adds_a_spell(dialect_client: tuple[MllpClient, str, str]) -> None:
    client, url, dialect = dialect_client
    before = spell_rows(url)
    msg = await admit(client, ADMIT)
    if dialect == "strict":
        assert (ack_code(msg), err_code(msg)) == ("AR", "201")
        assert spell_rows(url) == before
        return
    assert ack_code(msg) == "AA", msg.segments
    after = spell_rows(url)
    assert len(after) == len(before) + 1
    new = after[-1]
    patient = spell_rows(url, '"PATNT_REFNO" = (SELECT "PATNT_REFNO" FROM "PATIENTS" '
                              'WHERE "PASID" = \'D0000003\')')
    assert new in patient
    assert (new["ADMIT_DTTM"], new["DISCH_DTTM"], new["SPELL_STATUS"], new["PATCL_CODE"],
            new["ADMET_CODE"], new["ADSOR_CODE"], new["MAIN_SPECT_CODE"]) == (
        "202612011015", None, "A", "1", "21", "19", "320")
    assert new["SPELL_NUMBER"] == f"IP{int(max(r['SPELL_NUMBER'] for r in before)[2:]) + 1:08d}"
    pv1 = msg.segment("PV1")
    if dialect == "demo":  # the ACK names the new spell (PV1-19), as an A28's the patient
        assert pv1 is not None and pv1.value(19) == new["SPELL_NUMBER"]
        assert pv1.value(19, 5) == "VN"
    else:
        assert pv1 is None
    # the spell number sent is the one kept; taken again → AE 205
    msg = await admit(client, {**ADMIT, "PV1-19.1": "IPX1"})
    assert ack_code(msg) == "AA" and spell_rows(url)[-1]["SPELL_NUMBER"] == "IPX1"
    msg = await admit(client, {**ADMIT, "PV1-19.1": "IPX1"})
    assert (ack_code(msg), err_code(msg)) == ("AE", "205")


@pytest.mark.parametrize(("change", "code"), [
    ({"PV1-44.1": None}, "101"),
    ({"PV1-44.1": "yesterday"}, "102"),
    ({"PV1-2.1": "Q"}, "103"),
    ({"PV1-3.1": "NOWARD"}, "204"),
    ({"PV1-7.1": "9999999"}, "204"),
    ({"PID-3[0].1": "D9999999"}, "204"),
    ({"PID-3[0].5": None, "PID-3[0].1": None}, "204"),
])
async def test_what_an_a01_refuses(write_url: str, change: dict[str, str | None],
                                   code: str) -> None:
    values = {k: v for k, v in {**ADMIT, **change}.items() if v is not None}
    before = spell_rows(write_url)
    async with PasSimulator(write_url) as sim, client_for(sim) as client:
        msg = await admit(client, values)
    assert (ack_code(msg), err_code(msg)) == ("AE", code)
    assert spell_rows(write_url) == before


async def test_a_resent_a01_is_applied_once(write_url: str) -> None:
    before = spell_rows(write_url)
    data = messages.adt(HEADER, "ADM1", event="A01", values=ADMIT)
    async with PasSimulator(write_url) as sim, client_for(sim) as client:
        first = await client.send(data, "ADM1")
        again = await client.send(data, "ADM1")
    assert ack_code(er7.parse(first)) == "AA"
    assert again == first  # the same ACK, byte for byte
    assert len(spell_rows(write_url)) == len(before) + 1
