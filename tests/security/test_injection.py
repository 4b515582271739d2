"""Injection through every search parameter of every demo resource, on SQLite, PostgreSQL and
HL7 v2 (the PAS simulator).

Hostile values — SQL metacharacters, LIKE wildcards, HL7 delimiters and segment breaks, MLLP
framing bytes, control characters, very long values, unusual Unicode — go through each
parameter as a plain value, with every modifier the parameter takes, inside token systems,
date prefixes and typed references, by GET and by POST _search. None may:

* leak data — the oracle: every text value in the demo tables, folded as search folds it.
  A payload that occurs nowhere must find nothing; one that does occur may only find
  resources that contain it;
* produce a 5xx (a value the client sent is the client's problem: 200 or 400);
* corrupt anything — every table keeps its row count, and the PAS simulator's database too.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from tests.conftest import LIMITS_OFF

pytestmark = pytest.mark.anyio

PAYLOADS = [
    "' OR 1=1 --",
    "' OR '1'='1",
    "x' OR 'x'='x",
    '"; DROP TABLE "PATIENTS"; --',
    "'); DROP TABLE PATIENTS; --",
    "1; SELECT pg_sleep(10)",
    "1 UNION SELECT * FROM PATIENTS",
    "%",
    "_",
    "%%%",
    "a%",
    "%a",
    "s_i",
    "\\",
    "\\%",
    "[a-z]",
    "*",
    "?",
    ":v0",
    "$1",
    "|^~\\&",
    "SMITH|^~\\&",
    "D0000001^^^RX1^PI",
    "PID|1||D0000001^^^RX1^PI",
    "x\rPID|1||D0000001^^^RX1^PI\rZZZ|",
    "x\nMSH|^~\\&|",
    "\x0bMSH|^~\\&|PAS\x1c\r",
    "\x1c\r",
    "\x00",
    "a\x00b",
    "\x01\x02\x1b[31m\x7f",
    "\t",
    "\\X0D\\\\E\\\\F\\",
    "zoë",
    "ZOË",
    "\u202e\u200b\ufeff",
    "😀",
    "名前",
    "x" * 10_000,
    "'" * 3000,
    "../../etc/passwd",
    "NULL",
    "",
]


def fold(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch)).lower()


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)


def _tables(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            names = sa.inspect(conn).get_table_names()
            return {n: [dict(r._mapping) for r in conn.execute(sa.text(f'SELECT * FROM "{n}"'))]
                    for n in names}
    finally:
        engine.dispose()


def _counts(url: str) -> dict[str, int]:
    return {name: len(rows) for name, rows in _tables(url).items()}


class Oracle:
    """Every text value in the demo database, folded (and with spaces removed, as postcode
    and phone comparisons may ignore them)."""

    def __init__(self, url: str) -> None:
        values = {str(v) for rows in _tables(url).values() for row in rows
                  for v in row.values() if v is not None}
        self.corpus = "\x1f".join(fold(v) for v in values)
        self.compact = self.corpus.replace(" ", "")

    def occurs(self, payload: str) -> bool:
        core = fold(payload).strip()
        return core in self.corpus or core.replace(" ", "") in self.compact


def _variants(ptype: str, name: str, payload: str, targets: list[str]) -> list[tuple[str, str]]:
    if ptype == "string":
        return [(name, payload), (f"{name}:exact", payload), (f"{name}:contains", payload)]
    if ptype == "token":
        return [(name, payload), (name, f"https://fhir.nhs.uk/Id/nhs-number|{payload}"),
                (name, f"{payload}|x"), (name, f"|{payload}"), (f"{name}:not", payload)]
    if ptype == "date":
        return [(name, payload), (name, f"ge{payload}"), (name, f"eq2020{payload}")]
    if ptype == "reference":
        return [(name, payload)] + [(name, f"{t}/{payload}") for t in targets] + [
            (f"{name}:{targets[0]}", payload)]
    return [(name, payload)]  # _id


def _params(app: Starlette) -> list[tuple[str, str, str, list[str]]]:
    """(resource type, parameter, type, reference targets) for every declared parameter."""
    out = []
    for provider in app.state.registry:
        out.append((provider.resource_type, "_id", "id", []))
        for name, p in provider.params.items():
            out.append((provider.resource_type, name, p.type, list(p.reference_targets())))
    return out


def _companion(rtype: str, ptype: str, name: str) -> list[tuple[str, str]]:
    """A broad second parameter where Care Connect requires two of different types."""
    if rtype != "Patient" or name in ("identifier", "_id"):
        return []
    if ptype == "token":
        return [("birthdate", "ge1000")]
    return [("gender", "male,female,other,unknown")]


async def _attack(api: httpx.AsyncClient, app: Starlette, oracle: Oracle,
                  payloads: list[str], post_every: int = 7) -> tuple[list[str], int, int]:
    """(problems, requests sent, requests answered 200 — i.e. that reached the backend)."""
    problems: list[str] = []
    n = answered = 0
    for rtype, name, ptype, targets in _params(app):
        for payload in payloads:
            for key, value in _variants(ptype, name, payload, targets):
                pairs = [(key, value), *_companion(rtype, ptype, name), ("_count", "50")]
                n += 1
                if n % post_every == 0:
                    r = await api.post(f"/STU3/{rtype}/_search", data=dict(pairs))
                else:
                    r = await api.get(f"/STU3/{rtype}", params=pairs)
                where = f"{rtype}?{key}={value[:40]!r} -> {r.status_code}"
                if r.status_code not in (200, 400):
                    problems.append(f"{where}: {r.text[:200]}")
                    continue
                if r.status_code == 400:
                    assert r.json()["resourceType"] == "OperationOutcome"
                    continue
                answered += 1
                found = [e["resource"] for e in r.json().get("entry", [])
                         if e["search"]["mode"] == "match"]
                if not found or key.endswith(":not") or ptype in ("date", "reference", "id"):
                    # :not legitimately finds what does not match; dates and references are
                    # parsed (a payload that parses is a valid value, not an injection)
                    if found and ptype in ("reference", "id") and fold(payload).strip():
                        problems.append(f"{where}: found {len(found)} by a hostile id")
                    continue
                core = fold(payload).strip()
                if not core:
                    continue
                if not oracle.occurs(payload):
                    problems.append(f"{where}: found {len(found)}, the oracle finds none")
                    continue
                for res in found:
                    text = "\x1f".join(fold(s) for s in strings(res))
                    if core not in text and core.replace(" ", "") not in text.replace(" ", ""):
                        problems.append(f"{where}: {res['resourceType']}/{res['id']} does not "
                                        "contain the value")
    return problems, n, answered


# --- SQL: SQLite and PostgreSQL -----------------------------------------------------------------


@pytest.fixture
async def sql_api(demo_url: str, make_app: Callable[..., Starlette]
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette]]:
    # insecure-demo: a system/*.* principal, so every parameter of every type is reachable
    app = make_app(demo_url, auth_mode="insecure-demo", **LIMITS_OFF)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c, app


@pytest.fixture(scope="module")
def sql_oracle(demo_url: str) -> Oracle:
    return Oracle(demo_url)


async def test_sql_search_parameters_resist_injection(
    sql_api: tuple[httpx.AsyncClient, Starlette], sql_oracle: Oracle, demo_url: str
) -> None:
    api, app = sql_api
    before = _counts(demo_url)
    problems, sent, answered = await _attack(api, app, sql_oracle, PAYLOADS)
    assert problems == [], "\n".join(problems[:40])
    # Control characters and over-long values are 400 at parsing; the rest must have really
    # reached the database for this test to mean anything.
    assert sent > 4000 and answered > sent // 3, (sent, answered)
    assert _counts(demo_url) == before
    # and the gateway still answers normally
    r = await api.get("/STU3/Patient?family=smith&gender=female")
    assert r.status_code == 200 and r.json()["entry"]


async def test_wildcards_are_literal(sql_api: tuple[httpx.AsyncClient, Starlette]) -> None:
    api, _app = sql_api
    everyone = (await api.get("/STU3/Practitioner?_summary=count")).json()["total"]
    assert everyone > 10
    for value in ("%", "_", "%%", "*"):
        for mod in ("", ":contains", ":exact"):
            r = await api.get("/STU3/Practitioner",
                              params={f"name{mod}": value, "_summary": "count"})
            assert r.status_code in (200, 400)
            if r.status_code == 200:
                assert r.json()["total"] == 0, (value, mod)


async def test_a_hostile_sort_or_count_is_refused(
    sql_api: tuple[httpx.AsyncClient, Starlette]
) -> None:
    api, _app = sql_api
    for params in ({"_sort": "family; DROP TABLE PATIENTS"}, {"_sort": "p.SURNAME"},
                   {"_count": "1; DROP"}, {"_count": "-1"}, {"_total": "' OR 1=1"},
                   {"_include": "Encounter:patient' OR 1=1"}, {"_summary": "%"},
                   {"_page": "' OR 1=1 --"}, {"_revinclude": "PATIENTS:x"}):
        r = await api.get("/STU3/Encounter", params=params)
        assert r.status_code == 400, (params, r.text)


# --- HL7 v2: the PAS simulator ------------------------------------------------------------------

HL7_MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"


@pytest.fixture
def hl7_db(tmp_path: Path) -> str:
    from gateway.demo_pas import ensure_sqlite_demo

    path = tmp_path / "pas.sqlite"
    ensure_sqlite_demo(path, patients=200, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture
async def hl7_api(hl7_db: str, tmp_path: Path
                  ) -> AsyncIterator[tuple[httpx.AsyncClient, Starlette, Any]]:
    from gateway.app import build_app
    from gateway.demo_pas.hl7v2 import PasSimulator
    from gateway.settings import Settings

    async with PasSimulator(hl7_db) as sim:
        app = build_app(Settings(
            mappings_dir=HL7_MAPPINGS, data_dir=tmp_path, paging_secret="t", log_level="warning",
            progress=False, auth_mode="insecure-demo", **LIMITS_OFF,
            connection_urls={"pas": hl7_db, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                yield c, app, sim


async def test_hl7_search_parameters_resist_injection(
    hl7_api: tuple[httpx.AsyncClient, Starlette, Any], hl7_db: str
) -> None:
    api, app, sim = hl7_api
    before = _counts(hl7_db)
    problems, sent, answered = await _attack(api, app, Oracle(hl7_db), PAYLOADS, post_every=11)
    assert problems == [], "\n".join(problems[:40])
    assert sent > 1000 and answered > sent // 5, (sent, answered)
    assert _counts(hl7_db) == before
    # every message got its own reply: framing bytes in values never split or joined frames
    assert "" not in sim.received
    r = await api.get("/STU3/Patient/D0000001")
    assert r.status_code == 200 and r.json()["id"] == "D0000001"


async def test_hl7_delimiters_in_a_value_do_not_become_criteria(
    hl7_api: tuple[httpx.AsyncClient, Starlette, Any]
) -> None:
    """A family name carrying a PID-3 component must not turn into an identifier search."""
    api, _app, _sim = hl7_api
    for value in ("x^D0000001^^^RX1^PI", "x~@PID.3.1^D0000001", "x\r@PID.3.1^D0000001",
                  "x&D0000001", "x\\F\\D0000001"):
        r = await api.get("/STU3/Patient", params={"family": value, "gender": "female"})
        assert r.status_code in (200, 400), (value, r.text)
        if r.status_code == 200:
            assert not r.json().get("entry"), value
    r = await api.get("/STU3/Patient", params={"identifier": "D0000001^^^RX1^PI"})
    assert r.status_code in (200, 400)
    if r.status_code == 200:
        assert not r.json().get("entry")
