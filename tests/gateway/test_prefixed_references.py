"""References to a record of a prefixed source: ``Observation.context`` = ``Encounter/op-7``.

Encounter has three sources (spells unprefixed, outpatient attendances ``op-``, A&E
attendances ``ae-``). The demo's result reports and prescriptions are linked to an inpatient
spell (``PRVSP_REFNO``) or to the outpatient attendance they were taken or written at
(``OPATT_REFNO``); the Observation and MedicationRequest mappings declare both columns, each
with the source of Encounter its keys belong to (``sources:``). Everything that follows the
reference must honour it: the served reference, reference search, chains, ``_has``,
``_include`` / ``_revinclude``, the patient compartment and ``$everything``.

The oracle is the database, read here with plain SQL; the numbers of spells and outpatient
attendances overlap, so a reference followed to the wrong source shows. SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from gateway import cli
from gateway.app import build_app
from gateway.profiles.validator import validate
from tests.conftest import gateway_settings
from tests.gateway.test_conformance import model_errors, schema_errors
from tests.security.principals import as_, install, patient_token

pytestmark = pytest.mark.anyio

# Every served Observation (RESULTS row not deleted) with its report's links.
RESULTS = ('SELECT o."RESLT_REFNO", o."PATNT_REFNO", h."PRVSP_REFNO", h."OPATT_REFNO" '
           'FROM "RESULTS" o JOIN "RESULT_REPORTS" h ON h."REPRT_REFNO" = o."REPRT_REFNO" '
           'WHERE o."DEL_FLAG" = \'N\'')
ORDERS = ('SELECT m."PRESC_REFNO", m."PATNT_REFNO", m."PRVSP_REFNO", m."OPATT_REFNO" '
          'FROM "PRESCRIPTIONS" m WHERE m."DEL_FLAG" = \'N\'')


class Oracle:
    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]

    def linked(self, sql: str) -> list[tuple[str, str, str | None]]:
        """(id, patient, Encounter id as it must be served, or None) of each record."""
        return [(str(k), str(p), str(s) if s is not None else f"op-{o}" if o is not None
                 else None) for k, p, s, o in self.rows(sql)]


@pytest.fixture(scope="module")
def oracle(demo_url: str) -> Iterator[Oracle]:
    o = Oracle(demo_url)
    yield o
    o.engine.dispose()


@pytest.fixture(scope="module")
async def api(demo_url: str, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("prefref"),
                                     rate_limit_per_minute=100_000, rate_limit_burst=100_000,
                                     source_rate_limit_per_minute=0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            yield c


async def bundle_pages(api: httpx.AsyncClient, rtype: str, params: list[tuple[str, str]],
                       headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = await api.get(f"/STU3/{rtype}", params=(*params, ("_count", "500")), headers=headers)
    pages = []
    while True:
        assert r.status_code == 200, r.text
        pages.append(r.json())
        nxt = [x["url"] for x in pages[-1]["link"] if x["relation"] == "next"]
        if not nxt:
            return pages
        r = await api.get(nxt[0], headers=headers)


async def matches(api: httpx.AsyncClient, rtype: str, params: list[tuple[str, str]],
                  headers: dict[str, str] | None = None) -> set[str]:
    out: list[str] = []
    for page in await bundle_pages(api, rtype, params, headers):
        out += [e["resource"]["id"] for e in page.get("entry", [])
                if e["search"]["mode"] == "match"]
    assert len(out) == len(set(out))
    return set(out)


def overlapping(records: list[tuple[str, str, str | None]]) -> str:
    """A key that is both an outpatient attendance with linked records and a spell with
    linked records of its own: the two sets differ, so following either to the other shows."""
    spells = {e for _k, _p, e in records if e is not None and e.isdigit()}
    clinics = {e.removeprefix("op-") for _k, _p, e in records if e is not None
               and e.startswith("op-")}
    both = sorted(spells & clinics, key=int)
    assert both, "the demo has no attendance and spell with the same number and records"
    return both[0]


def valid(resource: dict[str, Any]) -> None:
    assert [i.message for i in validate(resource) if i.severity == "error"] == []
    assert schema_errors(resource) == [] and model_errors(resource) == []


async def test_the_served_reference_names_the_source(api: httpx.AsyncClient,
                                                     oracle: Oracle) -> None:
    for rtype, sql in (("Observation", RESULTS), ("MedicationRequest", ORDERS)):
        records = oracle.linked(sql)
        clinic = [r for r in records if r[2] is not None and r[2].startswith("op-")]
        spell = [r for r in records if r[2] is not None and r[2].isdigit()]
        none = [r for r in records if r[2] is None]
        assert clinic and spell and none, rtype
        for key, _patient, enc in (clinic[0], clinic[-1], spell[0], none[0]):
            r = await api.get(f"/STU3/{rtype}/{key}")
            assert r.status_code == 200, r.text
            res = r.json()
            assert res.get("context") == ({"reference": f"Encounter/{enc}"} if enc else None)
            valid(res)
            if enc is not None:  # it resolves, to the record of the source it names
                r = await api.get(f"/STU3/{res['context']['reference']}")
                assert r.status_code == 200 and r.json()["subject"] == res["subject"]


async def test_reference_search_goes_to_the_source_of_the_id(api: httpx.AsyncClient,
                                                             oracle: Oracle) -> None:
    records = oracle.linked(RESULTS)
    k = overlapping(records)
    clinic = {i for i, _p, e in records if e == f"op-{k}"}
    spell = {i for i, _p, e in records if e == k}
    assert clinic and spell and not clinic & spell
    for value in (f"op-{k}", f"Encounter/op-{k}", f"http://gw/STU3/Encounter/op-{k}"):
        assert await matches(api, "Observation", [("context", value)]) == clinic, value
        assert await matches(api, "Observation", [("encounter", value)]) == clinic, value
    assert await matches(api, "Observation", [("context", k)]) == spell
    assert await matches(api, "Observation", [("context", f"Encounter/{k}")]) == spell
    assert await matches(api, "Observation", [("context", f"{k},op-{k}")]) == spell | clinic
    # an A&E attendance of that number: no column holds A&E keys, so nothing — never the
    # spell or the clinic that share its number
    assert await matches(api, "Observation", [("context", f"ae-{k}")]) == set()
    assert await matches(api, "Observation", [("context:missing", "true")]) == {
        i for i, _p, e in records if e is None}
    orders = oracle.linked(ORDERS)
    op = next(e for _i, _p, e in orders if e is not None and e.startswith("op-"))
    assert await matches(api, "MedicationRequest", [("context", op)]) == {
        i for i, _p, e in orders if e == op}


async def test_chains_and_has_follow_each_column_to_its_source(api: httpx.AsyncClient,
                                                               oracle: Oracle) -> None:
    records = oracle.linked(RESULTS)
    finished = {str(k) for (k,) in oracle.rows(
        'SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS" WHERE "SPELL_STATUS" = \'D\'')}
    finished |= {f"op-{k}" for (k,) in oracle.rows(
        'SELECT "OPATT_REFNO" FROM "OUTPATIENT_ATTENDANCES" WHERE "ATTND_CODE" IN (\'5\', \'6\')')}
    expected = {i for i, _p, e in records if e in finished}
    assert any(e is not None and e.startswith("op-") for i, _p, e in records if i in expected)
    assert await matches(api, "Observation", [("context.status", "finished")]) == expected
    assert await matches(api, "Observation",
                         [("context:Encounter.status", "finished")]) == expected
    k = overlapping(records)
    assert await matches(api, "Observation", [("context._id", f"op-{k}")]) == {
        i for i, _p, e in records if e == f"op-{k}"}
    # an identifier only the outpatient source has: its attendance number
    (number,) = oracle.rows('SELECT "ATTENDANCE_ID" FROM "OUTPATIENT_ATTENDANCES" '
                            'WHERE "OPATT_REFNO" = :k', k=int(k))[0]
    system = "https://fhir.demo-trust.nhs.uk/Id/attendance-number"
    assert await matches(api, "Observation", [("context.identifier", f"{system}|{number}")]
                         ) == {i for i, _p, e in records if e == f"op-{k}"}
    # _has the other way: the encounters of either source some Observation refers to
    code = "https://fhir.demo-trust.nhs.uk/CodeSystem/test-code|HBA1C"
    with_hba1c = {str(s) if s is not None else f"op-{o}" for s, o in oracle.rows(
        'SELECT DISTINCT h."PRVSP_REFNO", h."OPATT_REFNO" FROM "RESULTS" o JOIN '
        '"RESULT_REPORTS" h ON h."REPRT_REFNO" = o."REPRT_REFNO" WHERE o."DEL_FLAG" = \'N\' '
        'AND o."TEST_CODE" = \'HBA1C\' AND (h."PRVSP_REFNO" IS NOT NULL '
        'OR h."OPATT_REFNO" IS NOT NULL)')}
    assert any(e.startswith("op-") for e in with_hba1c)
    assert await matches(api, "Encounter", [("_has:Observation:context:code", code)]
                         ) == with_hba1c


async def test_include_and_revinclude_across_the_reference(api: httpx.AsyncClient,
                                                           oracle: Oracle) -> None:
    records = oracle.linked(RESULTS)
    k = overlapping(records)
    pages = await bundle_pages(api, "Observation", [("context", f"op-{k}"),
                                                    ("_include", "Observation:context")])
    included = [e["resource"] for p in pages for e in p.get("entry", [])
                if e["search"]["mode"] == "include"]
    assert [f"{r['resourceType']}/{r['id']}" for r in included] == [f"Encounter/op-{k}"]
    for r in included:
        valid(r)
    for enc in (f"op-{k}", k):
        pages = await bundle_pages(api, "Encounter", [("_id", enc),
                                                      ("_revinclude", "Observation:context")])
        entries = [e for p in pages for e in p.get("entry", [])]
        assert [e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"] == [enc]
        assert {e["resource"]["id"] for e in entries if e["search"]["mode"] == "include"} == {
            i for i, _p, e in records if e == enc}


async def test_compartment_and_everything(api: httpx.AsyncClient, oracle: Oracle,
                                          demo_url: str, make_app: Callable[..., Starlette]
                                          ) -> None:
    records = oracle.linked(RESULTS)
    k = overlapping(records)
    owner = next(p for _i, p, e in records if e == f"op-{k}")
    # $everything: the Observations and the attendance they refer to, in one record
    r = await api.get(f"/STU3/Patient/{owner}/$everything", params={"_count": "1000"})
    assert r.status_code == 200, r.text
    served = {f"{e['resource']['resourceType']}/{e['resource']['id']}": e["resource"]
              for e in r.json().get("entry", [])}
    contexts = {res["context"]["reference"] for key, res in served.items()
                if key.split("/")[0] in ("Observation", "MedicationRequest")
                and "context" in res}
    assert f"Encounter/op-{k}" in contexts
    assert contexts <= set(served)  # every encounter referred to is in the record
    # a patient-restricted token: the attendance's results for its own patient only
    stranger = next(p for _i, p, _e in records if p != owner)
    app = make_app(demo_url)
    install(app, {"owner": patient_token(owner), "stranger": patient_token(stranger)})
    clinic = {i for i, _p, e in records if e == f"op-{k}"}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            for params in ([("context", f"op-{k}")], [("context._id", f"op-{k}")]):
                assert await matches(c, "Observation", params, as_("owner")) == clinic
                assert await matches(c, "Observation", params, as_("stranger")) == set()


def test_the_plan_joins_each_column_to_its_own_source(
        capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # ``mappings explain`` (and X-Explain: plan, the same code): placeholders, no values
    monkeypatch.setenv("CCG_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CCG_DEMO_PATIENTS", "60")
    code = cli.main(["mappings", "explain",
                     "Observation?context.status=finished&context=Encounter/op-4321"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert ("criteria: and(or(h.PRVSP_REFNO in s.PRVSP_REFNO(s.SPELL_STATUS=?),"
            "h.OPATT_REFNO in o.OPATT_REFNO(o.ATTND_CODE in ?[2])),h.OPATT_REFNO=?)") in out
    assert 'h."OPATT_REFNO" IN (SELECT o."OPATT_REFNO" \n    FROM "OUTPATIENT_ATTENDANCES"' in out
    assert "4321" not in out


# --- a single column holding A&E attendance keys ----------------------------------------------

# The demo has no clinical row linked to an A&E attendance; a trust whose theatre system
# records the attendance a procedure was done in (a wound closed in the department) has such a
# column. Here it is added to a small private demo database, and filled for procedures done
# outside a spell with an attendance of the same patient.
AE_LINK = (
    'UPDATE "PROCEDURES" SET "AEATT_REFNO" = (SELECT min(a."AEATT_REFNO") FROM '
    '"AE_ATTENDANCES" a WHERE a."PATNT_REFNO" = "PROCEDURES"."PATNT_REFNO" '
    'AND a."DEL_FLAG" = \'N\') WHERE "PRVSP_REFNO" IS NULL')


@pytest.fixture(params=["sqlite", "postgresql"])
def ae_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    from gateway.demo_pas import build_database

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ae.sqlite'}"
    else:
        server = request.getfixturevalue("postgres_server")
        url = server.create_database(f"prefref_ae_{tmp_path.name[-8:].lower()}"
                                     .replace("-", "_"))
    build_database(url, patients=300)
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text('ALTER TABLE "PROCEDURES" ADD COLUMN "AEATT_REFNO" INTEGER'))
        conn.execute(sa.text(AE_LINK))
    engine.dispose()
    yield url


async def test_a_column_of_ae_attendance_keys(ae_db: str, tmp_path: Path) -> None:
    import hashlib
    import shutil

    from tests.gateway.mapping.test_loader import CODEMAPS, DEMO

    here = tmp_path / "mappings"
    shutil.copytree(DEMO, here / "demo-pas")
    shutil.copytree(CODEMAPS, here / "codemaps")
    f = here / "demo-pas" / "Procedure.sql.yaml"
    text = f.read_text(encoding="utf-8")
    for old, new in (
        ("  x.PRVSP_REFNO: integer\n", "  x.PRVSP_REFNO: integer\n  x.AEATT_REFNO: integer\n"),
        ("  context: {reference: {column: x.PRVSP_REFNO, ref: Encounter}}\n",
         "  context:\n    reference:\n      ref: Encounter\n      sources:\n"
         "        - {column: x.PRVSP_REFNO}\n"
         "        - {column: x.AEATT_REFNO, id_prefix: ae-}\n"),
        ("  encounter: {type: reference, target: Encounter, column: x.PRVSP_REFNO, "
         "description: The spell it was performed in}\n",
         "  encounter: {type: reference, target: Encounter, column: x.AEATT_REFNO, "
         "id_prefix: ae-, description: The A&E attendance it was performed in}\n"),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    f.write_text(text, encoding="utf-8")
    oracle = Oracle(ae_db)
    try:
        rows = oracle.rows('SELECT "PROCD_REFNO", "AEATT_REFNO", "PRVSP_REFNO" FROM '
                           '"PROCEDURES" WHERE "DELETED_FLAG" = \'N\'')
    finally:
        oracle.engine.dispose()
    ae = {str(k): f"ae-{a}" for k, a, _s in rows if a is not None}
    assert ae and any(s is not None for _k, _a, s in rows)
    # a copied mapping directory is a production configuration: an API key, not the demo mode
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: '"
                    + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    app = build_app(gateway_settings(ae_db, tmp_path, mappings_dir=here / "demo-pas",
                                     auth_mode="api-key", api_keys_file=str(keys),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers={"X-API-Key": "test-key"}) as c:
            key, enc = sorted(ae.items())[0]
            r = await c.get(f"/STU3/Procedure/{key}")
            assert r.status_code == 200, r.text
            assert r.json()["context"] == {"reference": f"Encounter/{enc}"}
            valid(r.json())
            same = {k for k, e in ae.items() if e == enc}
            assert await matches(c, "Procedure", [("encounter", enc)]) == same
            # the encounter parameter holds A&E keys only: a spell id matches nothing
            number = enc.removeprefix("ae-")
            assert await matches(c, "Procedure", [("encounter", number)]) == set()
            assert await matches(c, "Procedure", [("encounter._id", enc)]) == same
            assert await matches(c, "Procedure", [("encounter.class", "EMER")]) == set(ae)
            pages = await bundle_pages(c, "Procedure", [("_id", key),
                                                        ("_include", "Procedure:encounter")])
            assert [e["resource"]["id"] for p in pages for e in p.get("entry", [])
                    if e["search"]["mode"] == "include"] == [enc]
