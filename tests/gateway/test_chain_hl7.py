"""Chained parameters and ``_has`` over HL7 v2: no join is possible, so the chain is resolved
through the target's own query (bounded) and the self link says what it found.

Patient and Encounter come from the PAS simulator over real MLLP (mappings/demo-hl7v2); the
simulator answers from a demo SQLite database, which the test reads with plain SQL for the
expected answers.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa

from gateway import chain
from gateway.app import build_app
from gateway.chain import MAX_CHAIN_MATCHES
from gateway.demo_pas import ensure_sqlite_demo
from gateway.demo_pas.hl7v2 import PasSimulator
from gateway.mapping.transforms import TRANSFORMS
from gateway.settings import Settings
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings" / "demo-hl7v2"
NHS = "https://fhir.nhs.uk/Id/nhs-number"


@pytest.fixture(scope="module")
def db_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("chain-hl7") / "pas.sqlite"
    ensure_sqlite_demo(path, patients=300, progress=False)
    return f"sqlite:///{path}"


@pytest.fixture(scope="module")
def rows(db_url: str) -> list[dict[str, Any]]:
    """Every live spell with its patient, by plain SQL."""
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(
                'SELECT s."SPELL_NUMBER", p."PASID", p."NHS_NUMBER", p."SURNAME", '
                'p."SEXXX_CODE" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."ARCHV_FLAG" = \'N\''))]
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def patients(db_url: str) -> list[dict[str, Any]]:
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(sa.text(
                'SELECT "PASID", "NHS_NUMBER", "SURNAME", "SEXXX_CODE" FROM "PATIENTS" '
                'WHERE "ARCHV_FLAG" = \'N\''))]
    finally:
        engine.dispose()


@pytest.fixture
async def sim(db_url: str) -> AsyncIterator[PasSimulator]:
    async with PasSimulator(db_url) as simulator:
        yield simulator


@pytest.fixture
async def api(db_url: str, sim: PasSimulator, tmp_path: Path, rows: list[dict[str, Any]]
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(Settings(
        mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="test", log_level="warning",
        progress=False, auth_mode="insecure-demo",
        connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
    install(app, {"P": patient_token(rows[0]["PASID"], "patient/*.read"),
                  "B": patient_token(_busiest(rows)["PASID"], "patient/*.read"),
                  "clinician": user_token()})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


def _matches(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def _spells(bundle: dict[str, Any]) -> set[str]:
    return {i["value"] for r in _matches(bundle) for i in r["identifier"]}


def _notes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [i for e in bundle.get("entry", []) if e["search"]["mode"] == "outcome"
            for i in e["resource"]["issue"]]


def _link(bundle: dict[str, Any], relation: str) -> dict[str, list[str]]:
    """A link's query parameters (without the page token)."""
    [url] = [x["url"] for x in bundle["link"] if x["relation"] == relation]
    query = parse_qs(urlsplit(url).query)
    query.pop("_page", None)
    query.pop("_count", None)
    return query


def served_family(surname: str) -> str:
    """SURNAME as the mapping serves PID-5.1 (transform title_case): :exact compares that."""
    return str(TRANSFORMS["title_case"][0](surname))


def _code(r: httpx.Response) -> str:
    body = r.json()
    assert body["resourceType"] == "OperationOutcome", body
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


def _busiest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    by: dict[str, int] = {}
    for r in rows:
        if r["NHS_NUMBER"]:
            by[r["NHS_NUMBER"]] = by.get(r["NHS_NUMBER"], 0) + 1
    nhs = max(sorted(by), key=lambda n: by[n])
    return next(r for r in rows if r["NHS_NUMBER"] == nhs)


async def test_patient_identifier_is_resolved_through_the_patient_query(
        api: httpx.AsyncClient, sim: PasSimulator, rows: list[dict[str, Any]]) -> None:
    who = _busiest(rows)
    expected = {r["SPELL_NUMBER"] for r in rows if r["NHS_NUMBER"] == who["NHS_NUMBER"]}
    assert len(expected) >= 2
    before = len(sim.received)
    r = await api.get("/STU3/Encounter", params={"patient.identifier":
                                                 f"{NHS}|{who['NHS_NUMBER']}"})
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert _spells(bundle) == expected
    assert {m["subject"]["reference"] for m in _matches(bundle)} == {f"Patient/{who['PASID']}"}
    assert len(sim.received) == before + 2  # the patient query, then the visit query
    [note] = _notes(bundle)
    assert note["severity"] == "information"
    assert note["details"]["coding"][0]["code"] == "CHAIN_RESOLVED_BY_SEARCH"
    assert "patient.identifier" in note["diagnostics"] and "Patient" in note["diagnostics"]
    assert who["NHS_NUMBER"] not in note["diagnostics"]  # names, never values

    # The self link says what the chain found, as STU3 asks ("the parameters actually
    # used"): the search by the patient found. Its paging links page over that, so later
    # pages send the PAS the visit query only, and need no note.
    assert _link(bundle, "self") == {"patient": [f"Patient/{who['PASID']}"]}
    r = await api.get("/STU3/Encounter", params={"patient.identifier":
                                                 f"{NHS}|{who['NHS_NUMBER']}", "_count": "1"})
    seen: set[str] = set()
    pages = 0
    while True:
        assert r.status_code == 200, r.text
        bundle = r.json()
        seen |= _spells(bundle)
        assert [n["details"]["coding"][0]["code"] for n in _notes(bundle)] == (
            ["CHAIN_RESOLVED_BY_SEARCH"] if pages == 0 else [])
        assert _link(bundle, "self")["patient"] == [f"Patient/{who['PASID']}"]
        assert not any(k.startswith("patient.") for k in _link(bundle, "self"))
        nxt = [x["url"] for x in bundle["link"] if x["relation"] == "next"]
        if not nxt:
            break
        assert "patient.identifier" not in nxt[0]
        before = len(sim.received)
        r = await api.get(nxt[0])
        assert len(sim.received) == before + 1  # the visit query only
        pages += 1
    assert seen == expected and pages == len(expected) - 1


async def test_no_target_match_sends_no_second_query(
        api: httpx.AsyncClient, sim: PasSimulator, patients: list[dict[str, Any]]) -> None:
    known = {p["NHS_NUMBER"] for p in patients}
    unused = next(n for n in ("9990000026", "9990000034", "9990000042", "9990000050")
                  if n not in known)
    before = len(sim.received)
    r = await api.get("/STU3/Encounter", params={"patient.identifier": f"{NHS}|{unused}"})
    assert r.status_code == 200 and _matches(r.json()) == []
    assert len(sim.received) == before + 1  # only the patient query


async def test_too_many_target_matches_is_a_400_not_a_cut(
        api: httpx.AsyncClient, patients: list[dict[str, Any]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Patient's rule applies to a chain into it: two parameters of different types. The
    # commonest (initial, sex) of this 300-patient demo is over a bound lowered to fit it.
    by = Counter((p["SURNAME"][:1], p["SEXXX_CODE"]) for p in patients
                 if p["SEXXX_CODE"] in ("1", "2"))
    (initial, sex), n = by.most_common(1)[0]
    assert n >= 3
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", n - 1)
    params = {"patient.family": initial, "patient.gender": {"1": "male", "2": "female"}[sex]}
    r = await api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400 and _code(r) == "CHAIN_TOO_BROAD", r.text
    # at the bound, not over it: on to the visit query (which takes one patient, so refuses)
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", n)
    r = await api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH", r.text


async def test_several_target_matches_are_refused_not_answered_for_one(
        api: httpx.AsyncClient, sim: PasSimulator, patients: list[dict[str, Any]]) -> None:
    """The visit query takes one patient: an OR of several is refused (400), never sent
    for the first patient only."""
    by = Counter((p["SURNAME"], p["SEXXX_CODE"]) for p in patients
                 if p["SEXXX_CODE"] in ("1", "2"))
    surname, sex = next(k for k in sorted(by) if 2 <= by[k] <= MAX_CHAIN_MATCHES)
    before = len(sim.received)
    r = await api.get("/STU3/Encounter", params={
        "patient.family:exact": served_family(surname),
        "patient.gender": {"1": "male", "2": "female"}[sex]})
    assert r.status_code == 400 and _code(r) == "UNSUPPORTED_SEARCH"
    assert len(sim.received) == before + 1  # the patient query only: no visit query


async def test_the_bound_is_also_what_a_paging_link_may_carry(
        db_url: str, sim: PasSimulator, tmp_path: Path, patients: list[dict[str, Any]]) -> None:
    """The found references go into the links as one parameter: more of them than a
    request may give one parameter (max_values_per_parameter) would make a link the
    server itself refuses, so that is the bound too."""
    by = Counter((p["SURNAME"], p["SEXXX_CODE"]) for p in patients
                 if p["SEXXX_CODE"] in ("1", "2"))
    surname, sex = next(k for k in sorted(by) if by[k] == 2)
    params = {"patient.family:exact": served_family(surname),
              "patient.gender": {"1": "male", "2": "female"}[sex]}
    for most, expected in ((2, "UNSUPPORTED_SEARCH"), (1, "CHAIN_TOO_BROAD")):
        app = build_app(Settings(
            mappings_dir=MAPPINGS, data_dir=tmp_path, paging_secret="test",
            log_level="warning", progress=False, auth_mode="insecure-demo",
            max_values_per_parameter=most,
            connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{sim.port}"}))
        async with (app.router.lifespan_context(app),
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://gw") as c):
            r = await c.get("/STU3/Encounter", params=params)
        # two patients: within 2 (then the visit query refuses the OR, as above), not 1
        assert r.status_code == 400 and _code(r) == expected, r.text


async def test_has_over_hl7(api: httpx.AsyncClient, rows: list[dict[str, Any]]) -> None:
    spell = rows[-1]
    gender = {"1": "male", "2": "female"}.get(spell["SEXXX_CODE"], "unknown")
    r = await api.get("/STU3/Patient", params={
        "_has:Encounter:patient:identifier": spell["SPELL_NUMBER"], "gender": gender})
    assert r.status_code == 200, r.text
    assert [m["id"] for m in _matches(r.json())] == [spell["PASID"]]
    assert [n["details"]["coding"][0]["code"] for n in _notes(r.json())] == [
        "CHAIN_RESOLVED_BY_SEARCH"]
    # the patients the visit was found to refer to, as the search actually used them
    assert _link(r.json(), "self") == {"_id": [spell["PASID"]], "gender": [gender]}
    other = "female" if gender == "male" else "male"
    r = await api.get("/STU3/Patient", params={
        "_has:Encounter:patient:identifier": spell["SPELL_NUMBER"], "gender": other})
    assert r.status_code == 200 and _matches(r.json()) == []
    # the two-type rule still applies
    r = await api.get("/STU3/Patient", params={
        "_has:Encounter:patient:identifier": spell["SPELL_NUMBER"]})
    assert r.status_code == 400 and _code(r) == "INSUFFICIENT_SEARCH_CRITERIA"


async def test_compartment_confines_the_resolving_search(
        api: httpx.AsyncClient, rows: list[dict[str, Any]]) -> None:
    mine = rows[0]
    other = next(r for r in rows if r["PASID"] != mine["PASID"] and r["NHS_NUMBER"])
    params = {"patient.identifier": f"{NHS}|{other['NHS_NUMBER']}"}
    r = await api.get("/STU3/Encounter", params=params, headers=as_("clinician"))
    assert other["SPELL_NUMBER"] in _spells(r.json())
    r = await api.get("/STU3/Encounter", params=params, headers=as_("P"))
    assert r.status_code == 200 and _matches(r.json()) == []
    # ... and finds the token's own patient: the PAS is asked by one identifier (the NHS
    # number) and the reply checked for the compartment's PAS number, never sent both
    # numbers in one QPD, whose qualifiers (PID-3.4/3.5) a PAS cannot tie to either one
    assert mine["NHS_NUMBER"]
    own = {"patient.identifier": f"{NHS}|{mine['NHS_NUMBER']}"}
    r = await api.get("/STU3/Encounter", params=own, headers=as_("P"))
    assert r.status_code == 200, r.text
    assert _spells(r.json()) == {x["SPELL_NUMBER"] for x in rows if x["PASID"] == mine["PASID"]}
    assert _link(r.json(), "self") == {"patient": [f"Patient/{mine['PASID']}"]}
    r = await api.get("/STU3/Patient", params={"identifier": own["patient.identifier"]},
                      headers=as_("P"))
    assert [m["id"] for m in _matches(r.json())] == [mine["PASID"]]
    # The rewritten next link cannot be turned onto another patient: the page token holds
    # the search and the compartment; the same search sent fresh is confined
    busy = _busiest(rows)
    r = await api.get("/STU3/Encounter", params={
        "patient.identifier": f"{NHS}|{busy['NHS_NUMBER']}", "_count": "1"}, headers=as_("B"))
    [nxt] = [x["url"] for x in r.json()["link"] if x["relation"] == "next"]
    elsewhere = next(x for x in rows if x["PASID"] != busy["PASID"])
    busy_ref, other_ref = (f"patient=Patient%2F{x['PASID']}" for x in (busy, elsewhere))
    assert busy_ref in nxt
    r = await api.get(nxt.replace(busy_ref, other_ref), headers=as_("B"))
    assert r.status_code == 400 and _code(r) == "INVALID_PAGE_TOKEN"
    r = await api.get(nxt.split("&_page=")[0].replace(busy_ref, other_ref), headers=as_("B"))
    assert r.status_code == 200 and _matches(r.json()) == []


async def test_capability_statement_says_how_chains_are_answered(api: httpx.AsyncClient) -> None:
    cs = (await api.get("/STU3/metadata")).json()
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    patient_param = next(p for p in resources["Encounter"]["searchParam"]
                         if p["name"] == "patient")
    assert "patient.identifier" in patient_param["documentation"]
    assert f"at most {MAX_CHAIN_MATCHES} matches" in patient_param["documentation"]
    assert "_has:Encounter:patient:<parameter> (through a search" in resources["Patient"][
        "documentation"]
    # a _has is bounded by the ids it finds and the records it reads to find them
    assert (f"at most {MAX_CHAIN_MATCHES} ids from at most {chain.MAX_HAS_RECORDS} records"
            in resources["Patient"]["documentation"])
    # SQL into SQL on one connection is joined: no such remark
    location = {p["name"]: p for p in resources["Location"]["searchParam"]}
    assert "partof.name" in location["partof"]["documentation"]
    assert "at most" not in location["partof"]["documentation"]


# --- an independent PAS (tests/adapters/hl7v2/itk_peer.py) as the chain's target ------------


@pytest.fixture(scope="module")
def itk_mappings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Patient from an ITK PAS over HL7 v2 (no prefix), Encounter from SQL naming its patient
    by the PAS number (mappings/demo-hl7v2-mixed/Encounter.sql.yaml): no join is possible."""
    repo = MAPPINGS.parents[1]
    d = tmp_path_factory.mktemp("chain-itk-mappings")
    (d / "connections.yaml").write_text(
        "connections:\n"
        "  pas-hl7: {adapter: hl7v2, url: 'mllp://127.0.0.1:1', timezone: Europe/London,\n"
        "            options: {retries: 0, deadline: 10}}\n"
        "  pas: {adapter: sql, url_env: CCG_PAS_URL, default: embedded-demo,\n"
        "        timezone: Europe/London}\n"
        f"codemaps: {repo / 'mappings' / 'codemaps'}\n", encoding="utf-8")
    for src in (MAPPINGS / "Patient.hl7v2.yaml",
                repo / "mappings" / "demo-hl7v2-mixed" / "Encounter.sql.yaml"):
        (d / src.name).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    return d


def _peer_with(peer: Any, patients: list[dict[str, Any]]) -> None:
    """The demo patients on the peer, under their PAS numbers (PID as the ITK sample's)."""
    sample = next(iter(peer.patients.values()))
    peer.patients.clear()
    for p in patients:
        pid = list(sample)
        pid[3] = f"{p['PASID']}^^^RX1^PI"
        pid[5] = f"{p['SURNAME'].upper()}^ANNE"
        pid[8] = {"1": "M", "2": "F"}.get(p["SEXXX_CODE"], "U")
        peer.patients[p["PASID"]] = pid


ITK_PAGINGS = {
    "honest": {},
    "short-replies": {"page_cap": 2},
    "rcp2-ignored": {"honour_quantity": False, "page_cap": 7},
    "single-use-pointers": {"pointer_uses": 1, "page_cap": 3},
}


@pytest.mark.parametrize("how", list(ITK_PAGINGS))
async def test_an_itk_pas_answering_in_short_replies(
        how: str, db_url: str, itk_mappings: Path, tmp_path: Path,
        patients: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The target's search reads every reply of the PAS's continuation (DSC-1), as a client
    walking the Patient search would: a PAS that answers two patients a reply is not 'more
    than the bound' (400 CHAIN_TOO_BROAD) for a chain finding a dozen."""
    from tests.adapters.hl7v2.itk_peer import ItkPeer

    peer = ItkPeer(**ITK_PAGINGS[how])  # type: ignore[arg-type]
    _peer_with(peer, patients)
    initial = Counter(p["SURNAME"][:1].upper() for p in patients if p["SEXXX_CODE"] == "2")
    letter = next(x for x, n in initial.most_common() if 5 <= n <= 40)
    women = {p["PASID"] for p in patients
             if p["SEXXX_CODE"] == "2" and p["SURNAME"].upper().startswith(letter)}
    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:  # the SQL source's spells of those women
            want = {str(k) for k, pasid in conn.execute(sa.text(
                'SELECT s."PRVSP_REFNO", p."PASID" FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
                'ON p."PATNT_REFNO" = s."PATNT_REFNO"')) if pasid in women}
    finally:
        engine.dispose()
    assert want
    port = await peer.start()
    try:
        keys = tmp_path / "api-keys.yaml"  # not a bundled demo directory: a real credential
        keys.write_text("keys: [{client_id: t, sha256: '" + hashlib.sha256(b"k").hexdigest()
                        + "', scopes: system/*.read}]", encoding="utf-8")
        app = build_app(Settings(
            mappings_dir=itk_mappings, data_dir=tmp_path, paging_secret="test",
            log_level="warning", progress=False, auth_mode="api-key",
            api_keys_file=str(keys), audit_log=str(tmp_path / "audit.jsonl"),
            connection_urls={"pas": db_url, "pas-hl7": f"mllp://127.0.0.1:{port}"}))
        async with (app.router.lifespan_context(app),
                    httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                      base_url="http://gw", headers={"X-API-Key": "k"}) as c):
            r = await c.get("/STU3/Encounter", params={
                "patient.family": letter.lower(), "patient.gender": "female", "_count": "500"})
            assert r.status_code == 200, r.text
            assert {m["id"] for m in _matches(r.json())} == want
            # the self link is the search by the women the PAS's replies named, all of them
            assert {v for v in _link(r.json(), "self")["patient"][0].split(",")} == {
                f"Patient/{w}" for w in women}
            cap = ITK_PAGINGS[how].get("page_cap")
            if cap is not None and ITK_PAGINGS[how].get("honour_quantity", True):
                # every reply was read: at least one a cap's worth of women
                assert peer.received.count("QBP^Q22") >= -(-len(women) // cap)
            # one fewer allowed: refused, having read no further than past the bound
            monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", len(women) - 1)
            before = len(peer.received)
            r = await c.get("/STU3/Encounter", params={
                "patient.family": letter.lower(), "patient.gender": "female"})
            assert r.status_code == 400 and _code(r) == "CHAIN_TOO_BROAD", r.text
            assert len(peer.received) - before <= -(-len(women) // (cap or len(women)))
    finally:
        await peer.stop()
