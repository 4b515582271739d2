"""Patient from an SQL table and an independent ITK PAS at once, paged as one type.

The PAS is tests/adapters/hl7v2/itk_peer.py (python-hl7, no code shared with the adapter or
the simulator) over real TCP MLLP, its QBP^Q22 paging varied: honest RCP-2 pages, short
pages, RCP-2 ignored (a reply larger than asked, so a page ends part-way through it and the
next one sends that pointer again), single-use and expiring pointers, and a PAS that stops
answering mid-walk. The oracle: the peer's own patients and the SQL table read in the test.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from gateway.app import build_app
from gateway.demo_pas import build_database, ensure_sqlite_demo
from gateway.settings import Settings
from tests.adapters.hl7v2.itk_peer import ItkPeer
from tests.gateway.test_multisource_hl7 import code, link, matches, outcomes, walk
from tests.pg import TempPostgres

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[2]
QUERY = "/STU3/Patient?family=s&gender=female&_count=5&_total=accurate"
KEY = "multisource-itk-test-key"
PATIENTS = 120
STRICT = {"Prefer": "handling=strict"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp("ms-itk") / "pas.sqlite"
        ensure_sqlite_demo(path, patients=PATIENTS, progress=False)
        return f"sqlite:///{path}"
    server: TempPostgres = request.getfixturevalue("postgres_server")
    url = server.create_database("multisource_itk")
    build_database(url, patients=PATIENTS)
    return url


@pytest.fixture(scope="module")
def mappings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient twice: the SQL demo's (bare ids) and the HL7 v2 demo's (ids prefixed itk-)."""
    d = tmp_path_factory.mktemp("ms-itk-mappings")
    (d / "connections.yaml").write_text(
        "connections:\n"
        "  pas-hl7: {adapter: hl7v2, url: 'mllp://127.0.0.1:1', timezone: Europe/London,\n"
        "            options: {retries: 0, deadline: 10}}\n"
        "  pas: {adapter: sql, url_env: CCG_PAS_URL, default: embedded-demo,\n"
        "        timezone: Europe/London}\n"
        f"codemaps: {REPO / 'mappings' / 'codemaps'}\n", encoding="utf-8")
    (d / "Patient.sql.yaml").write_text(
        (REPO / "mappings" / "demo-pas" / "Patient.sql.yaml").read_text(encoding="utf-8"),
        encoding="utf-8")
    text = (REPO / "mappings" / "demo-hl7v2" / "Patient.hl7v2.yaml").read_text(encoding="utf-8")
    assert text.count("resource: Patient\n") == 1
    (d / "Patient.hl7v2.yaml").write_text(
        text.replace("resource: Patient\n", "resource: Patient\nid_prefix: itk-\n"),
        encoding="utf-8")
    return d


def sql_females(url: str) -> list[str]:
    """The SQL source's women whose family name starts with S, in key order."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(sa.text(
                'SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "SEXXX_CODE" = \'2\' '
                'AND UPPER("SURNAME") LIKE \'S%\' ORDER BY "PATNT_REFNO"'))]
    finally:
        engine.dispose()


def grow(peer: ItkPeer, n: int) -> list[str]:
    """``n`` more patients on the peer (every other one female, every family name starting
    with S); the peer's women named S..., in its order."""
    sample = next(iter(peer.patients.values()))
    for i in range(n):
        pid = list(sample)
        number = f"RCB{9000000 + i:07d}"
        pid[3] = f"{number}^^^RCB^PI"
        pid[5] = f"SPEER{i:02d}^ANNE^^^MRS" if i % 2 == 0 else f"SPEER{i:02d}^JOHN^^^MR"
        pid[8] = "F" if i % 2 == 0 else "M"
        peer.patients[number] = pid
    return [f"itk-{number}" for number, pid in peer.patients.items()
            if peer._holds(pid, "@PID.8^F") and peer._holds(pid, "@PID.5.1^S*")]


@asynccontextmanager
async def gateway(peer: ItkPeer, db_url: str, mappings: Path, tmp: Path
                  ) -> AsyncIterator[httpx.AsyncClient]:
    port = await peer.start()
    keys = tmp / "api-keys.yaml"  # not a bundled demo directory: a real credential
    keys.write_text("keys: [{client_id: t, sha256: '" + hashlib.sha256(KEY.encode()).hexdigest()
                    + "', scopes: system/*.read}]", encoding="utf-8")
    app = build_app(Settings(
        mappings_dir=mappings, data_dir=tmp, paging_secret="t", log_level="warning",
        progress=False, auth_mode="api-key", api_keys_file=str(keys),
        audit_log=str(tmp / "audit.jsonl"),
        rate_limit_per_minute=100_000,
        rate_limit_burst=100_000, source_rate_limit_per_minute=0,
        connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{port}"}))
    try:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                         headers={"X-API-Key": KEY}) as c:
                yield c
    finally:
        await peer.stop()


PAGINGS = {
    "honest": {},
    "short-replies": {"page_cap": 2},
    "rcp2-ignored": {"honour_quantity": False, "page_cap": 7},
    "single-use-pointers": {"pointer_uses": 1},
}


@pytest.mark.parametrize("how", list(PAGINGS))
async def test_a_walk_serves_each_patient_of_both_sources_once(
        how: str, db_url: str, mappings: Path, tmp_path: Path) -> None:
    peer = ItkPeer(**PAGINGS[how])  # type: ignore[arg-type]
    theirs = grow(peer, 23)
    ours = sql_females(db_url)
    assert len(theirs) > 10 and len(ours) > 5
    async with gateway(peer, db_url, mappings, tmp_path) as c:
        ids, pages = await walk(c, QUERY)
    assert ids == theirs + ours  # source order (Patient.hl7v2, Patient.sql), each once
    assert [len(matches(p)) for p in pages[:-1]] == [5] * (len(pages) - 1)
    assert 0 < len(matches(pages[-1])) <= 5
    assert {p.get("total") for p in pages} == {len(theirs) + len(ours)}
    assert not any(outcomes(p) for p in pages)
    if how == "rcp2-ignored":  # a page ended inside a reply: its pointer was sent again
        assert len(peer.continued) > len(set(peer.continued)) > 0
    else:  # otherwise no pointer is ever sent twice (a single-use cursor is enough)
        assert len(peer.continued) == len(set(peer.continued)) > 0


async def test_a_single_use_pointer_sent_again_is_a_clear_400(
        db_url: str, mappings: Path, tmp_path: Path) -> None:
    # RCP-2 ignored: replies of 7 for pages of 5. Page 2 sends the first query again (no
    # pointer), then its reply's pointer, and ends inside that second reply; page 3 must
    # send that pointer again, which a single-use PAS refuses: the link cannot be
    # followed — said (400, start again), not a loop of warnings.
    peer = ItkPeer(honour_quantity=False, page_cap=7, pointer_uses=1)
    grow(peer, 23)
    async with gateway(peer, db_url, mappings, tmp_path) as c:
        url: str | None = QUERY
        statuses = []
        while url is not None and len(statuses) < 10:
            r = await c.get(url)
            statuses.append(r.status_code)
            if r.status_code != 200:
                break
            url = link(r.json(), "next")
        assert statuses[-1] == 400 and set(statuses[:-1]) == {200}, statuses
        assert code(r) == "INVALID_PAGE_TOKEN"
        text = r.json()["issue"][0]["diagnostics"]
        assert "already used" in text and "start the search again" in text


async def test_an_expired_pointer_is_a_clear_400(db_url: str, mappings: Path, tmp_path: Path
                                                 ) -> None:
    peer = ItkPeer(pointer_ttl=0.5)
    grow(peer, 23)
    async with gateway(peer, db_url, mappings, tmp_path) as c:
        first = (await c.get(QUERY)).json()
        nxt = link(first, "next")
        assert nxt is not None
        await asyncio.sleep(0.8)
        r = await c.get(nxt)
        assert r.status_code == 400 and code(r) == "INVALID_PAGE_TOKEN"
        assert "expired" in r.json()["issue"][0]["diagnostics"]


async def test_a_pas_that_stops_answering_mid_walk_is_said_never_a_silent_gap(
        db_url: str, mappings: Path, tmp_path: Path) -> None:
    peer = ItkPeer(page_cap=3)
    theirs = grow(peer, 23)
    ours = sql_females(db_url)

    async def outage(page: int) -> None:
        peer.down = page in (1, 2)  # down after page 1, back after page 3

    async with gateway(peer, db_url, mappings, tmp_path) as c:
        ids, pages = await walk(c, QUERY.replace("&_total=accurate", ""), between=outage)
        # strict: the failure is the answer
        peer.down = True
        r = await c.get(QUERY, headers=STRICT)
        assert r.status_code in (502, 503, 504), r.text
    assert sorted(ids) == sorted(theirs + ours) and len(ids) == len(set(ids))
    assert [bool(outcomes(p)) for p in pages[:4]] == [False, True, True, False]
    for p in pages[1:3]:
        assert [w for w, _ in outcomes(p)] == ["SOURCE_UNAVAILABLE"]
        assert matches(p) and not any(m.startswith("itk-") for m in matches(p))
    # the peer's first page; the SQL source's patients while the peer was down; the rest
    assert ids == theirs[:5] + ours + theirs[5:]
