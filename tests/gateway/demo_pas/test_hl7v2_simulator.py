"""The PAS simulator over real TCP on 127.0.0.1: queries against the demo PAS (checked against
SQL), writes in a private copy, and every scripted fault as the MLLP client sees it."""

from __future__ import annotations

import asyncio
import pathlib
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
import sqlalchemy as sa
from hl7apy.parser import parse_message

from adapters.hl7v2 import er7, messages
from adapters.hl7v2.mllp import (
    Endpoint,
    MllpClient,
    MllpProtocolError,
    MllpTimeout,
    MllpUnavailable,
)
from adapters.text import fold
from gateway.demo_pas import ensure_sqlite_demo, schema
from gateway.demo_pas.hl7v2 import PasSimulator

pytestmark = pytest.mark.anyio

HEADER = messages.Header()
Build = Callable[[str], bytes]


# --- fixtures and helpers ---------------------------------------------------------------------


@asynccontextmanager
async def client_for(sim: PasSimulator, **kw: Any) -> AsyncIterator[MllpClient]:
    options: dict[str, Any] = {"connect_timeout": 2.0, "reply_timeout": 5.0, "retries": 0,
                               "backoff_base": 0.01, "backoff_cap": 0.02,
                               "rng": random.Random(3)}
    options.update(kw)
    client = MllpClient(Endpoint("127.0.0.1", sim.port), **options)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def sim(demo_sqlite_url: str) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(demo_sqlite_url) as s:
        yield s


@pytest.fixture
async def client(sim: PasSimulator) -> AsyncIterator[MllpClient]:
    async with client_for(sim) as c:
        yield c


@pytest.fixture
def write_url(tmp_path: pathlib.Path) -> str:
    """A private demo PAS (200 patients) that writes may change."""
    path = ensure_sqlite_demo(tmp_path / "pas.sqlite", patients=200, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture
async def wsim(write_url: str) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(write_url) as s:
        yield s


@pytest.fixture
async def wclient(wsim: PasSimulator) -> AsyncIterator[MllpClient]:
    async with client_for(wsim) as c:
        yield c


async def exchange(client: MllpClient, build: Build) -> tuple[str, er7.Message]:
    control = messages.new_control_id()
    reply = await client.send(build(control), control)
    msg = er7.parse(reply)
    msa = msg.segment("MSA")
    assert msa is not None and msa.value(2) == control
    return control, msg


async def ask(client: MllpClient, build: Build) -> er7.Message:
    return (await exchange(client, build))[1]


def q21(identifier: str, id_type: str, authority: str | None = None) -> Build:
    return lambda c: messages.qbp_q21(HEADER, c, identifier=identifier, identifier_type=id_type,
                                      authority=authority, query_tag="tag-" + c[-6:])


def q22(criteria: list[tuple[str, str]], quantity: int = 100,
        continuation: str | None = None) -> Build:
    return lambda c: messages.qbp_q22(HEADER, c, criteria=criteria, quantity=quantity,
                                      query_tag="tag-" + c[-6:], continuation=continuation)


def zv1(criteria: list[tuple[str, str]], quantity: int = 100,
        continuation: str | None = None) -> Build:
    return lambda c: messages.qbp_zv1(HEADER, c, criteria=criteria, quantity=quantity,
                                      query_tag="tag-" + c[-6:], continuation=continuation)


def adt(event: str, values: dict[str, str]) -> Build:
    return lambda c: messages.adt(HEADER, c, event=event, values=values)  # type: ignore[arg-type]


def ack_code(msg: er7.Message) -> str | None:
    msa = msg.segment("MSA")
    return msa.value(1) if msa else None


def err_code(msg: er7.Message) -> str | None:
    err = msg.segment("ERR")
    return err.value(1, 4, 1) if err else None


def qak(msg: er7.Message) -> tuple[str | None, ...]:
    seg = msg.segment("QAK")
    assert seg is not None
    return tuple(seg.value(n) for n in range(1, 7))


def pasids(msg: er7.Message) -> list[str | None]:
    return [g[0].value(3, 1, repetition=0) for g in msg.groups("PID", {"DSC"})]


def spell_numbers(msg: er7.Message) -> list[str | None]:
    return [s.value(19) for g in msg.groups("PID", {"DSC"}) for s in g if s.name == "PV1"]


def pointer(msg: er7.Message) -> str | None:
    dsc = msg.segment("DSC")
    return dsc.value(1) if dsc else None


def rows(url: str, stmt: Any) -> list[Any]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(stmt))
    finally:
        engine.dispose()


P = schema.patients


# --- Q21 --------------------------------------------------------------------------------------


async def test_q21_by_pas_number(client: MllpClient) -> None:
    control, msg = await exchange(client, q21("D0000001", "PI", "RX1"))
    assert msg.segments[0].raw(9) == "RSP^K21^RSP_K21"
    assert msg.segments[0].value(3) == "PAS"
    assert [s.name for s in msg.segments] == ["MSH", "MSA", "QAK", "QPD", "PID", "PD1"]
    assert ack_code(msg) == "AA"
    assert qak(msg) == ("tag-" + control[-6:], "OK", "Q21", "1", "1", "0")
    assert msg.segment("QPD").raw(3) == "D0000001^^^RX1^PI"  # type: ignore[union-attr]
    pid = msg.segment("PID")
    assert pid is not None
    ids = {(pid.value(3, 5, repetition=r), pid.value(3, 4, repetition=r)):
           pid.value(3, 1, repetition=r) for r in range(pid.repetitions(3))}
    assert ids == {("PI", "RX1"): "D0000001", ("NH", "NHS"): "9990000018",
                   ("OLDHN", "RX1"): "D0000005"}
    old = pid.repetitions(3) - 1
    assert (pid.value(3, 7, repetition=old), pid.value(3, 8, repetition=old)) == (
        "20030411", "20110516")
    assert [pid.value(5, c) for c in (1, 2, 3, 5, 7)] == [
        "SMITH", "JANE", "ELIZABETH", "MRS", "L"]
    assert (pid.value(7), pid.value(8)) == ("19650412", "F")
    # current home address first, then the old one with its end date
    assert pid.repetitions(11) == 2
    assert [pid.value(11, c, repetition=0) for c in (1, 2, 3, 4, 5, 7)] == [
        "7 Church Lane", "Roundhay", "Leeds", "West Yorkshire", "LS8 2DR", "H"]
    assert (pid.value(11, 12, 1, repetition=0), pid.value(11, 12, 2, repetition=0)) == (
        "201806300000", None)
    assert pid.value(11, 12, 2, repetition=1) == "201806300000"
    telecom = {(pid.value(13, 2, repetition=r), pid.value(13, 3, repetition=r)):
               pid.value(13, 1, repetition=r) or pid.value(13, 4, repetition=r)
               for r in range(pid.repetitions(13))}
    assert telecom == {("PRN", "PH"): "01632 960001", ("ORN", "CP"): "07700 900001",
                       ("NET", "Internet"): "jane.smith@example.com"}
    assert (pid.value(15), pid.value(16), pid.value(22), pid.value(32)) == (
        "ENG", "M", "WB", "NSTS01")
    assert pid.value(29) is None and pid.value(30) is None
    pd1 = msg.segment("PD1")
    assert pd1 is not None and pd1.value(3, 3) and pd1.value(4, 1, 1)
    assert pd1.value(4, 9) == "GMP" and pd1.value(4, 1).startswith("G")  # type: ignore[union-attr]


async def test_q21_reply_is_an_rsp_k21_for_hl7apy(client: MllpClient) -> None:
    control = messages.new_control_id()
    reply = await client.send(q21("D0000003", "PI")(control), control)
    m = parse_message(reply.decode(), find_groups=True)
    assert m.name == "RSP_K21"
    group = m.rsp_k21_query_response
    assert group.pid.pid_5.xpn_1.fn_1.to_er7() == "BROWN"
    assert group.pid.pid_29.to_er7() == "202403150930"
    assert group.pid.pid_30.to_er7() == "Y"
    assert m.msa.msa_2.to_er7() == control


async def test_q21_by_nhs_number_and_itk_authority(client: MllpClient) -> None:
    for build in (q21("9990000018", "NH"), q21("9990000018", "", "NHS")):
        pid = (await ask(client, build)).segment("PID")
        assert pid is not None and pid.value(3, 1) == "D0000001"


async def test_q21_not_found_and_archived(client: MllpClient) -> None:
    for build in (q21("D9999999", "PI"), q21("D0000005", "PI"), q21("9990000026x", "NH")):
        msg = await ask(client, build)
        assert ack_code(msg) == "AA"
        assert qak(msg)[1:] == ("NF", "Q21", "0", "0", "0")
        assert msg.segment("PID") is None


async def test_q21_unsupported_identifier_type(client: MllpClient) -> None:
    msg = await ask(client, q21("X1", "SS"))
    assert ack_code(msg) == "AE" and err_code(msg) == "103"
    assert qak(msg)[1] == "AE"
    assert msg.segment("PID") is None


async def test_nhs_sex_codes(demo_sqlite_url: str) -> None:
    async with PasSimulator(demo_sqlite_url, sex_codes="nhs") as s, client_for(s) as c:
        pid = (await ask(c, q21("D0000001", "PI"))).segment("PID")
        assert pid is not None and pid.value(8) == "2"
        # queries take either code set
        msg = await ask(c, q22([("PID.3.1", "D0000001"), ("PID.8", "F")]))
        assert pasids(msg) == ["D0000001"]


# --- Q22 --------------------------------------------------------------------------------------


def oracle(url: str, where: Callable[[Any], bool]) -> list[str]:
    """The expected PAS numbers, computed in Python over every patient, in PATNT_REFNO order."""
    everyone = rows(url, sa.select(P).order_by(P.c.PATNT_REFNO))
    return [p.PASID for p in everyone if p.ARCHV_FLAG != "Y" and where(p)]


async def walk(client: MllpClient, make: Callable[[str | None], Build]) -> tuple[
        list[str | None], list[er7.Message]]:
    found: list[str | None] = []
    pages: list[er7.Message] = []
    cont: str | None = None
    while True:
        msg = await ask(client, make(cont))
        assert ack_code(msg) == "AA", err_code(msg)
        pages.append(msg)
        found += pasids(msg)
        cont = pointer(msg)
        if cont is None:
            return found, pages
        assert len(pages) < 100


async def test_q22_family_prefix_and_sex_walks_every_page(
        client: MllpClient, demo_sqlite_url: str) -> None:
    criteria = [("PID.5.1", "SM*"), ("PID.8", "F")]
    found, pages = await walk(client, lambda cont: q22(criteria, 7, cont))
    expected = oracle(demo_sqlite_url,
                      lambda p: fold(p.SURNAME).startswith("sm") and p.SEXXX_CODE == "2")
    assert len(expected) > 14  # several pages
    assert found == expected
    total = len(expected)
    seen = 0
    for page in pages:
        _, status, _, qak4, qak5, qak6 = qak(page)
        seen += int(qak5 or 0)
        assert (status, qak4, qak6) == ("OK", str(total), str(total - seen))
        assert int(qak5 or 0) == len(pasids(page)) <= 7
        assert (pointer(page) is None) == (seen == total)
        for group in page.groups("PID", {"DSC"}):
            assert group[0].value(8) == "F"
            assert fold(group[0].value(5) or "").startswith("sm")


async def test_q22_accents_case_given_and_dates(
        client: MllpClient, demo_sqlite_url: str) -> None:
    cases: list[tuple[list[tuple[str, str]], Callable[[Any], bool]]] = [
        ([("PID.5.1", "bronte")], lambda p: fold(p.SURNAME) == "bronte"),
        ([("PID.5.1", "SMITH"), ("PID.5.2", "ELIZABETH")],
         lambda p: p.SURNAME == "SMITH" and "elizabeth" in (
             fold(p.FORENAME), fold(p.SECOND_FORENAME or ""))),
        ([("PID.5.1", "SMITH"), ("PID.5.3", "ELIZ*")],
         lambda p: p.SURNAME == "SMITH" and fold(p.SECOND_FORENAME or "").startswith("eliz")),
        ([("PID.7", "19650412")], lambda p: p.DTTM_OF_BIRTH == "19650412"),
        ([("PID.7", "1965"), ("PID.8", "M")],
         lambda p: p.DTTM_OF_BIRTH.startswith("1965") and p.SEXXX_CODE == "1"),
        ([("PID.5.1", "JONES"), ("PID.8", "U")],
         lambda p: p.SURNAME == "JONES" and p.SEXXX_CODE == "X"),
    ]
    for criteria, where in cases:
        def make(cont: str | None, c: list[tuple[str, str]] = criteria) -> Build:
            return q22(c, 50, cont)

        found, _ = await walk(client, make)
        expected = oracle(demo_sqlite_url, where)
        assert found == expected, criteria
    assert "D0000004" in (await walk(client, lambda cont: q22([("PID.5.1", "BRONTË")])))[0]


async def test_q22_identifiers_and_postcodes(client: MllpClient) -> None:
    cases = [
        [("PID.3.1", "D0000001"), ("PID.3.5", "PI")],
        [("PID.3.1", "9990000018"), ("PID.3.5", "NH")],
        [("PID.3.1", "9990000018")],  # no type: any identifier
        [("PID.3.1", "D0000005"), ("PID.3.5", "OLDHN")],  # the merged record's old number
        [("PID.3.1", "D0000001"), ("PID.3.4", "RX1")],
        [("PID.3", "D0000001")],
        [("PID.5.1", "SMITH"), ("PID.11.5", "LS8 2DR")],
        [("PID.5.1", "SMITH"), ("PID.11.5", "ls82dr")],
        [("PID.5.1", "SMITH"), ("PID.11.5", "LS6 1LJ")],  # a past address counts
        [("PID.5.1", "SMITH"), ("PID.11.5", "LS8*")],
    ]
    for criteria in cases:
        found = pasids(await ask(client, q22(criteria)))
        assert "D0000001" in found, criteria
        assert "D0000005" not in found  # archived, never returned
    assert pasids(await ask(client, q22([("PID.3.1", "D0000001"), ("PID.3.5", "NH")]))) == []


async def test_q22_no_match(client: MllpClient) -> None:
    msg = await ask(client, q22([("PID.5.1", "NOSUCHNAME"), ("PID.8", "F")]))
    assert ack_code(msg) == "AA"
    assert qak(msg)[1:] == ("NF", "Q22", "0", "0", "0")
    assert msg.segment("PID") is None and msg.segment("DSC") is None


@pytest.mark.parametrize(("criteria", "code", "named"), [
    ([("PID.19", "123")], "103", "PID.19"),
    ([("PID.5.1", "SMITH"), ("PV1.44", "2024")], "103", "PV1.44"),
    ([("PID.7", "1965-04-12")], "102", "PID.7"),
    ([("PID.8", "Q")], "103", "PID.8"),
    ([("PID.5.1", "*")], "101", "empty"),
    ([("PID.3.5", "PI")], "101", "PID.3.1"),
])
async def test_q22_refusals(client: MllpClient, criteria: list[tuple[str, str]], code: str,
                            named: str) -> None:
    msg = await ask(client, q22(criteria))
    assert ack_code(msg) == "AE"
    assert err_code(msg) == code
    text = msg.segment("MSA").value(3)  # type: ignore[union-attr]
    assert text is not None and named in text
    assert qak(msg)[1] == "AE" and msg.segment("PID") is None


async def test_q22_quantity_is_capped_and_zero_counts(demo_sqlite_url: str) -> None:
    async with PasSimulator(demo_sqlite_url, max_quantity=5) as s, client_for(s) as c:
        msg = await ask(c, q22([("PID.5.1", "S*")], quantity=50))
        total = int(qak(msg)[3] or 0)
        assert total > 5 and len(pasids(msg)) == 5 and qak(msg)[4:] == ("5", str(total - 5))
        counted = await ask(c, q22([("PID.5.1", "S*")], quantity=0))
        assert qak(counted)[3:] == (str(total), "0", str(total))
        assert pasids(counted) == [] and pointer(counted) is None


async def test_continuation_belongs_to_its_query(client: MllpClient) -> None:
    first = await ask(client, q22([("PID.5.1", "S*")], quantity=2))
    cont = pointer(first)
    assert cont is not None
    # the same query, another tag: the next page
    second = await ask(client, q22([("PID.5.1", "S*")], quantity=2, continuation=cont))
    assert ack_code(second) == "AA" and set(pasids(second)).isdisjoint(pasids(first))
    for build in (q22([("PID.5.1", "T*")], 2, cont), q22([("PID.5.1", "S*")], 2, cont + "x"),
                  q22([("PID.5.1", "S*")], 2, "not-a-pointer"),
                  zv1([("PID.5.1", "S*")], 2, cont)):
        msg = await ask(client, build)
        assert ack_code(msg) == "AE" and err_code(msg) == "102"


async def test_concurrent_queries(demo_sqlite_url: str) -> None:
    async with PasSimulator(demo_sqlite_url) as s, client_for(s, pool_size=4) as c:
        names = ["SMITH", "JONES", "BROWN", "TAYLOR", "WILSON", "DAVIES", "EVANS", "KHAN"]
        replies = await asyncio.gather(*(ask(c, q22([("PID.5.1", n)])) for n in names))
        for name, msg in zip(names, replies, strict=True):
            assert all(g[0].value(5) == name for g in msg.groups("PID", {"DSC"}))
        assert len(s.received) == len(names)


# --- ZV1 --------------------------------------------------------------------------------------


S = schema.provider_spells


async def test_zv1_spells_of_one_patient(client: MllpClient, demo_sqlite_url: str) -> None:
    msg = await ask(client, zv1([("PID.3.1", "D0000001"), ("PID.3.5", "PI")]))
    assert msg.segments[0].raw(9) == "RSP^ZV2^RSP_ZV2"
    spells = rows(demo_sqlite_url, sa.select(S).where(S.c.PATNT_REFNO == 100001)
                  .order_by(S.c.PRVSP_REFNO))
    groups = msg.groups("PID", {"DSC"})
    assert len(groups) == len(spells) == 1
    assert [s.name for s in groups[0]] == ["PID", "PD1", "PV1", "PV2"]
    pv1 = groups[0][2]
    spell = spells[0]
    assert pv1.value(19) == spell.SPELL_NUMBER and pv1.value(19, 5) == "VN"
    assert (pv1.value(2), pv1.value(4), pv1.value(10), pv1.value(14), pv1.value(18)) == (
        "I", "21", "320", "19", "1")
    assert (pv1.value(36), pv1.value(37), pv1.value(41)) == ("1", "19", "D")
    assert (pv1.value(44), pv1.value(45)) == ("202309041130", "202309071600")
    assert pv1.value(3) and pv1.value(3, 4) == "RX1"
    assert pv1.value(7) and pv1.value(7, 9) == "GMC"
    ward = rows(demo_sqlite_url, sa.select(schema.locations.c.LOCTN_CODE).where(
        schema.locations.c.LOCTN_REFNO == spell.LOCTN_REFNO))[0][0]
    assert pv1.value(3) == ward
    assert qak(msg)[1:] == ("OK", "ZV1", "1", "1", "0")
    # the same spell found by its attributes
    for criteria in ([("PV1.19", spell.SPELL_NUMBER)],
                     [("PID.3.1", "D0000001"), ("PV1.44", "20230101-20231231")],
                     [("PID.3.1", "D0000001"), ("PV1.44", "20230904")],
                     [("PID.3.1", "D0000001"), ("PV1.45", "-20230907")],
                     [("PID.3.1", "D0000001"), ("PV1.2", "I"), ("PV1.3", ward)]):
        found = await ask(client, zv1(criteria))
        assert spell_numbers(found) == [spell.SPELL_NUMBER]
    for criteria in ([("PID.3.1", "D0000001"), ("PV1.44", "20240101-")],
                     [("PID.3.1", "D0000001"), ("PV1.45", "20230908-20231231")],
                     [("PID.3.1", "D0000001"), ("PV1.2", "D")]):
        assert qak(await ask(client, zv1(criteria)))[1] == "NF"


async def test_zv1_paging_matches_sql(client: MllpClient, demo_sqlite_url: str) -> None:
    def make(cont: str | None) -> Build:
        return zv1([("PV1.10", "320"), ("PV1.44", "2024-")], 9, cont)

    numbers: list[str | None] = []
    cont: str | None = None
    while True:
        msg = await ask(client, make(cont))
        numbers += spell_numbers(msg)
        cont = pointer(msg)
        if cont is None:
            break
    expected = rows(demo_sqlite_url, sa.select(S.c.SPELL_NUMBER)
                    .select_from(S.join(P, P.c.PATNT_REFNO == S.c.PATNT_REFNO))
                    .where(S.c.MAIN_SPECT_CODE == "320", S.c.ADMIT_DTTM >= "2024",
                           P.c.ARCHV_FLAG != "Y")
                    .order_by(S.c.PATNT_REFNO, S.c.PRVSP_REFNO))
    assert len(expected) > 9
    assert numbers == [r[0] for r in expected]


# --- ADT^A28 / A31 ----------------------------------------------------------------------------

NEW_PATIENT = {
    "PID-5.1": "O'BRIEN-SMYTHE|^~\\&", "PID-5.2": "SIOBHAN", "PID-5.3": "MARY",
    "PID-5.5": "MS", "PID-7": "19910203", "PID-8": "F",
    "PID-11[0].1": "12 Meadow Lane", "PID-11[0].3": "Leeds", "PID-11[0].5": "LS6 2AB",
    "PID-11[0].7": "H",
    "PID-13[0].1": "01632 960777", "PID-13[0].2": "PRN", "PID-13[0].3": "PH",
    "PID-13[1].1": "07700 900777", "PID-13[1].2": "ORN", "PID-13[1].3": "CP",
    "PID-13[2].2": "NET", "PID-13[2].3": "Internet", "PID-13[2].4": "s.obrien@example.com",
    "PID-16": "S", "PID-22": "WI", "PID-15": "ENG",
    "PD1-3.3": "A81001",
}


def count_patients(url: str) -> int:
    return int(rows(url, sa.select(sa.func.count()).select_from(P))[0][0])


async def test_a28_creates_a_patient_that_q21_then_finds(
        wclient: MllpClient, write_url: str) -> None:
    before = count_patients(write_url)
    msg = await ask(wclient, adt("A28", NEW_PATIENT))
    assert msg.segments[0].raw(9) == "ACK^A28^ACK"
    assert ack_code(msg) == "AA"
    pid = msg.segment("PID")
    assert pid is not None and (pid.value(3, 4), pid.value(3, 5)) == ("RX1", "PI")
    pasid = pid.value(3, 1)
    assert pasid == "D0000201"  # the next free PAS number after the 200 demo patients
    assert count_patients(write_url) == before + 1
    found = (await ask(wclient, q21(pasid, "PI"))).segment("PID")
    assert found is not None
    assert [found.value(5, c) for c in (1, 2, 3, 5)] == [
        "O'BRIEN-SMYTHE|^~\\&", "SIOBHAN", "MARY", "MS"]
    assert (found.value(7), found.value(8), found.value(16), found.value(22)) == (
        "19910203", "F", "S", "WI")
    assert found.value(11, 5) == "LS6 2AB" and found.value(11, 12, 2) is None
    assert found.value(13, 4, repetition=2) == "s.obrien@example.com"
    assert found.repetitions(3) == 1  # no NHS number given
    pd1 = (await ask(wclient, q21(pasid, "PI"))).segment("PD1")
    assert pd1 is not None and pd1.value(3, 3) == "A81001"
    # and by search, escaped characters included
    assert pasids(await ask(wclient, q22([("PID.5.1", "o'brien-smythe|^~\\&")]))) == [pasid]


async def test_a28_resend_of_the_same_control_id_is_not_applied_twice(
        wsim: PasSimulator, wclient: MllpClient, write_url: str) -> None:
    before = count_patients(write_url)
    control = messages.new_control_id()
    data = adt("A28", NEW_PATIENT)(control)
    first = await wclient.send(data, control)
    second = await wclient.send(data, control)
    assert first == second  # the very same ACK
    assert count_patients(write_url) == before + 1
    assert wsim.received == [control, control]
    other = await ask(wclient, adt("A28", NEW_PATIENT))  # a new control id is a new patient
    assert ack_code(other) == "AA"
    assert count_patients(write_url) == before + 2


async def test_lost_ack_then_resend_creates_one_patient(wsim: PasSimulator,
                                                        write_url: str) -> None:
    before = count_patients(write_url)
    wsim.faults.drop_count = 1
    async with client_for(wsim, retries=1) as c:
        control, msg = await exchange(c, adt("A28", NEW_PATIENT))
    assert ack_code(msg) == "AA"
    assert wsim.received == [control, control]
    assert count_patients(write_url) == before + 1


@pytest.mark.parametrize(("values", "code"), [
    ({**NEW_PATIENT, "PID-3[0].1": "D0000001", "PID-3[0].5": "PI"}, "205"),
    ({**NEW_PATIENT, "PID-3[0].1": "9990000018", "PID-3[0].5": "NH"}, "205"),
    ({**NEW_PATIENT, "PID-3[0].1": "9990000019", "PID-3[0].5": "NH"}, "102"),
    ({k: v for k, v in NEW_PATIENT.items() if k != "PID-5.1"}, "101"),
    ({k: v for k, v in NEW_PATIENT.items() if k != "PID-7"}, "101"),
    ({**NEW_PATIENT, "PID-7": "19910231"}, "102"),
    ({**NEW_PATIENT, "PID-8": "Q"}, "103"),
    ({**NEW_PATIENT, "PD1-3.3": "Z99999"}, "204"),
    ({**NEW_PATIENT, "PID-5.1": "X" * 51}, "102"),
])
async def test_a28_refusals(wclient: MllpClient, write_url: str, values: dict[str, str],
                            code: str) -> None:
    before = count_patients(write_url)
    msg = await ask(wclient, adt("A28", values))
    assert (ack_code(msg), err_code(msg)) == ("AE", code)
    text = msg.segment("MSA").value(3)  # type: ignore[union-attr]
    assert text and "SMYTHE" not in text and "9990000018" not in text  # no PHI
    assert msg.segment("PID") is None
    assert count_patients(write_url) == before


async def test_a28_with_new_nhs_number_and_given_pas_number(wclient: MllpClient) -> None:
    values = {**NEW_PATIENT, "PID-3[0].1": "X1234567", "PID-3[0].5": "PI",
              "PID-3[1].1": "9990000050", "PID-3[1].5": "NH", "PID-32": "NSTS02"}
    pid = (await ask(wclient, adt("A28", values))).segment("PID")
    assert pid is not None
    assert [pid.value(3, 1, repetition=r) for r in (0, 1)] == ["X1234567", "9990000050"]
    found = (await ask(wclient, q21("9990000050", "NH"))).segment("PID")
    assert found is not None and found.value(3) == "X1234567" and found.value(32) == "NSTS02"


async def test_a31_updates_demographics_address_and_telecom(
        wclient: MllpClient, write_url: str) -> None:
    modified = rows(write_url, sa.select(P.c.MODIF_DTTM).where(P.c.PASID == "D0000001"))[0][0]
    values = {"PID-3[0].1": "D0000001", "PID-3[0].5": "PI", "PID-5.1": "SMITH-JONES",
              "PID-11[0].1": "1 New Street", "PID-11[0].3": "York", "PID-11[0].5": "YO1 7AA",
              "PID-11[0].7": "H", "PID-13[0].1": "07700 900999", "PID-13[0].3": "CP",
              "PID-16": '""'}
    msg = await ask(wclient, adt("A31", values))
    assert msg.segments[0].raw(9) == "ACK^A31^ACK"
    assert ack_code(msg) == "AA"
    assert msg.segment("PID").value(3) == "D0000001"  # type: ignore[union-attr]
    pid = (await ask(wclient, q21("D0000001", "PI"))).segment("PID")
    assert pid is not None
    assert [pid.value(5, c) for c in (1, 2, 3)] == ["SMITH-JONES", "JANE", "ELIZABETH"]
    assert (pid.value(7), pid.value(8)) == ("19650412", "F")  # not sent: unchanged
    assert pid.value(16) is None  # sent as "": cleared
    # PID-13 sent: the new list (home phone and e-mail gone)
    assert [(pid.value(13, 1, repetition=r), pid.value(13, 3, repetition=r))
            for r in range(pid.repetitions(13))] == [("07700 900999", "CP")]
    # the new home address is current, the previous one end-dated, history kept
    assert pid.repetitions(11) == 3
    assert pid.value(11, 1) == "1 New Street" and pid.value(11, 12, 2) is None
    ended = [pid.value(11, 1, repetition=r) for r in (1, 2)]
    assert "7 Church Lane" in ended
    church = ended.index("7 Church Lane") + 1
    assert pid.value(11, 12, 2, repetition=church) == pid.value(11, 12, 1, repetition=0)
    assert rows(write_url, sa.select(P.c.MODIF_DTTM).where(P.c.PASID == "D0000001"))[0][0] \
        != modified
    # the same update again changes no address
    await ask(wclient, adt("A31", values))
    pid = (await ask(wclient, q21("D0000001", "PI"))).segment("PID")
    assert pid is not None and pid.repetitions(11) == 3


async def test_a31_changes_gp_and_refuses_unknown_patients(wclient: MllpClient) -> None:
    pd1 = (await ask(wclient, q21("D0000002", "PI"))).segment("PD1")
    assert pd1 is not None and pd1.value(3, 3) == "A81001"
    msg = await ask(wclient, adt("A31", {"PID-3[0].1": "D0000002", "PID-3[0].5": "PI",
                                         "PD1-3.3": "B81001"}))
    assert ack_code(msg) == "AA", msg.segment("MSA").value(3)  # type: ignore[union-attr]
    pd1 = (await ask(wclient, q21("D0000002", "PI"))).segment("PD1")
    assert pd1 is not None and pd1.value(3, 3) == "B81001"
    for values in ({"PID-3[0].1": "D9999999", "PID-3[0].5": "PI", "PID-5.1": "X"},
                   {"PID-3[0].1": "D0000005", "PID-3[0].5": "PI", "PID-5.1": "X"},
                   {"PID-3[0].1": "9990000018", "PID-3[0].5": "NH", "PID-5.1": "X"}):
        msg = await ask(wclient, adt("A31", values))
        assert (ack_code(msg), err_code(msg)) == ("AE", "204")
    msg = await ask(wclient, adt("A31", {"PID-3[0].1": "D0000001", "PID-3[0].5": "PI",
                                         "PID-5.1": '""'}))
    assert (ack_code(msg), err_code(msg)) == ("AE", "101")


# --- faults -----------------------------------------------------------------------------------


async def test_fault_delay_beyond_the_reply_timeout(sim: PasSimulator) -> None:
    reply_timeout = 0.5
    # Held far beyond the timeout (the listener's task is cancelled when the simulator stops),
    # so the timeout cannot be a race between the delay and a slow machine.
    sim.faults.delay_seconds = 100 * reply_timeout
    sim.faults.delay_count = 1
    async with client_for(sim, reply_timeout=reply_timeout) as c:
        with pytest.raises(MllpTimeout):
            await ask(c, q21("D0000001", "PI"))
        # On a loaded machine the client may time out while the query still runs: wait for
        # the simulator to have taken the fault before the next message can compete for it.
        with anyio.fail_after(30):
            while sim.faults.delay_count:
                await anyio.sleep(0.01)
        assert len(sim.received) == 1
        # The next one is answered, on the same client; its timeout no longer races the query.
        c.reply_timeout = 30.0
        msg = await ask(c, q21("D0000001", "PI"))
        assert ack_code(msg) == "AA"
        assert sim.faults.delay_count == 0 and len(sim.received) == 2


async def test_fault_drop_then_retry_succeeds(sim: PasSimulator) -> None:
    sim.faults.drop_count = 1
    async with client_for(sim, retries=1) as c:
        control, msg = await exchange(c, q21("D0000001", "PI"))
    assert ack_code(msg) == "AA"
    assert sim.received == [control, control]
    assert sim.faults.drop_count == 0


async def test_fault_drop_without_retry(sim: PasSimulator, client: MllpClient) -> None:
    sim.faults.drop_count = 1
    with pytest.raises(MllpUnavailable):
        await ask(client, q21("D0000001", "PI"))


async def test_fault_split_and_missing_cr_still_parse(sim: PasSimulator,
                                                      client: MllpClient) -> None:
    normal = await ask(client, q22([("PID.5.1", "SMITH")], 3))
    sim.faults.split_count = 1
    split = await ask(client, q22([("PID.5.1", "SMITH")], 3))
    sim.faults.missing_cr_count = 2
    control = messages.new_control_id()
    raw = await client.send(q22([("PID.5.1", "SMITH")], 3)(control), control)
    assert not raw.endswith(b"\r")
    bare = er7.parse(raw)
    again = await ask(client, q22([("PID.5.1", "SMITH")], 3))  # same connection, still in step
    for msg in (split, bare, again):
        assert pasids(msg) == pasids(normal) and qak(msg)[3:] == qak(normal)[3:]
    assert sim.faults == type(sim.faults)(missing_cr_count=0)


async def test_fault_wrong_msa2(sim: PasSimulator, client: MllpClient) -> None:
    sim.faults.wrong_msa2_count = 1
    with pytest.raises(MllpProtocolError):
        await ask(client, q21("D0000001", "PI"))
    assert ack_code(await ask(client, q21("D0000001", "PI"))) == "AA"


@pytest.mark.parametrize("code", ["AE", "AR"])
async def test_fault_naks(sim: PasSimulator, client: MllpClient, code: str) -> None:
    if code == "AE":
        sim.faults.nak_ae_count = 1
    else:
        sim.faults.nak_ar_count = 1
    msg = await ask(client, q21("D0000001", "PI"))
    assert ack_code(msg) == code and err_code(msg) == "207"
    assert msg.segment("PID") is None
    assert ack_code(await ask(client, q21("D0000001", "PI"))) == "AA"


async def test_fault_nak_is_not_remembered_for_resends(wsim: PasSimulator,
                                                       wclient: MllpClient) -> None:
    wsim.faults.nak_ae_count = 1
    control = messages.new_control_id()
    data = adt("A28", NEW_PATIENT)(control)
    assert ack_code(er7.parse(await wclient.send(data, control))) == "AE"
    assert ack_code(er7.parse(await wclient.send(data, control))) == "AA"


# --- malformed and unsupported messages -------------------------------------------------------


async def test_malformed_message_with_a_control_id_gets_ar(client: MllpClient) -> None:
    data = b"MSH|^~\\&|GW|RX1|PAS|RX1|20240101||QBP^Q22^QBP_Q21|BAD1|P|2.4\rQ!D|oops\r"
    msg = er7.parse(await client.send(data, "BAD1"))
    assert ack_code(msg) == "AR" and err_code(msg) == "100"


async def test_unreadable_message_closes_the_connection(sim: PasSimulator,
                                                        client: MllpClient) -> None:
    with pytest.raises(MllpUnavailable):
        await client.send(b"this is not HL7", "X1")
    assert sim.received == [""]


@pytest.mark.parametrize(("message_type", "code"), [("ADT^A02^ADT_A02", "201"),
                                                    ("ORU^R01^ORU_R01", "200")])
async def test_unsupported_message_types(client: MllpClient, message_type: str,
                                         code: str) -> None:
    data = (f"MSH|^~\\&|GW|RX1|PAS|RX1|20240101||{message_type}|U1|P|2.4\r"
            "PID|1||D0000001^^^RX1^PI\r").encode()
    msg = er7.parse(await client.send(data, "U1"))
    assert ack_code(msg) == "AR" and err_code(msg) == code


async def test_latin1_request_gets_a_latin1_reply(client: MllpClient) -> None:
    header = messages.Header(charset="8859/1")
    control = messages.new_control_id()
    data = messages.qbp_q22(header, control, criteria=[("PID.5.1", "BRONTË")], quantity=5,
                            query_tag="t")
    raw = await client.send(data, control)
    assert "BRONTË".encode("latin-1") in raw
    msg = er7.parse(raw)
    assert msg.charset == "latin-1" and msg.segments[0].value(18) == "8859/1"
    assert pasids(msg) == ["D0000004"]


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_pas_simulator_options() -> None:
    from gateway.cli import cmd_pas_simulator, parser

    args = parser().parse_args(["pas-simulator"])
    assert (args.host, args.port, args.db, args.sex_codes) == ("127.0.0.1", 2575, None, "hl7")
    assert args.func is cmd_pas_simulator
    args = parser().parse_args(["pas-simulator", "--port", "0", "--db", "/nowhere.sqlite",
                                "--sex-codes", "nhs"])
    assert (args.port, args.sex_codes) == (0, "nhs")
    assert cmd_pas_simulator(args) == 2  # no such database
