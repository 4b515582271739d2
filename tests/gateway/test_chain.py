"""Chained parameters and ``_has`` on SQLite and PostgreSQL, against an independent oracle.

The gateway answers over HTTP; each expected set is computed in the test with plain SQL
joins over the demo PAS tables (``sa.text``, never the adapter or the mapping), and a text
or code predicate in plain Python where one is needed. A page of a chained search must be
one statement: counted at the database driver, below SQLAlchemy.
"""

from __future__ import annotations

import unicodedata
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
import sqlalchemy as sa
from starlette.applications import Starlette

from gateway.app import build_app
from tests.conftest import gateway_settings
from tests.security.principals import as_, install, patient_token, user_token

pytestmark = pytest.mark.anyio

NHS = "https://fhir.nhs.uk/Id/nhs-number"
MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
Params = list[tuple[str, str]]
# Patient's search policy (two parameters of different types, unless identifier or _id)
# applies to chains into Patient too: a date every demo patient's birth date satisfies
# keeps a string or token chain's oracle unchanged.
ANY_BIRTH = ("patient.birthdate", "le2100-01-01")
ANY_GENDER = "male,female,other,unknown"  # every sex code the demo maps


# --- the oracle: plain SQL over the demo tables ----------------------------------------------


class Oracle:
    def __init__(self, url: str) -> None:
        self.engine = sa.create_engine(url)

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as conn:
            return [tuple(r) for r in conn.execute(sa.text(sql), params)]

    def ids(self, sql: str, **params: Any) -> set[str]:
        return {str(r[0]) for r in self.rows(sql, **params)}


@pytest.fixture(scope="module")
def oracle(demo_url: str) -> Iterator[Oracle]:
    o = Oracle(demo_url)
    yield o
    o.engine.dispose()


@pytest.fixture(scope="module")
async def api(demo_url: str, tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(gateway_settings(demo_url, tmp_path_factory.mktemp("chain")))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as c:
            yield c


def fold(text: str | None) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", text or "")
                   if not unicodedata.combining(c)).lower()


async def search(api: httpx.AsyncClient, rtype: str, params: Params,
                 headers: dict[str, str] | None = None, all_sources: bool = False) -> list[str]:
    """Every matching id in order, following ``next`` links; fails on a duplicate."""
    if not any(k == "_count" for k, _ in params):
        params = [*params, ("_count", "500")]
    r = await api.get(f"/STU3/{rtype}", params=tuple(params), headers=headers)
    out: list[str] = []
    while True:
        assert r.status_code == 200, r.text
        bundle = r.json()
        out += [e["resource"]["id"] for e in bundle.get("entry", [])
                if e["search"]["mode"] == "match"]
        assert all(e["resource"]["resourceType"] == rtype for e in bundle.get("entry", [])
                   if e["search"]["mode"] == "match")
        nxt = [x["url"] for x in bundle["link"] if x["relation"] == "next"]
        if not nxt:
            break
        r = await api.get(nxt[0], headers=headers)
    assert len(out) == len(set(out)), "an id came back twice"
    if rtype == "Encounter" and not all_sources:
        # The oracles here are the inpatient spells. Encounter also comes from outpatient and
        # A&E attendances ("op-", "ae-" ids): test_chain_across_encounter_sources has them.
        out = [i for i in out if i.isdigit()]
    return out


async def found(api: httpx.AsyncClient, rtype: str, params: Params) -> set[str]:
    return set(await search(api, rtype, params))


async def error(api: httpx.AsyncClient, rtype: str, params: Params,
                headers: dict[str, str] | None = None, status: int = 400) -> str:
    r = await api.get(f"/STU3/{rtype}", params=tuple(params), headers=headers)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    code: str = body["issue"][0]["details"]["coding"][0]["code"]
    return code


SPELLS_WITH_PATIENT = ('SELECT s."PRVSP_REFNO", p."PATNT_REFNO", p."NHS_NUMBER", p."SURNAME", '
                       'p."DTTM_OF_BIRTH", p."SEXXX_CODE" FROM "PROVIDER_SPELLS" s '
                       'JOIN "PATIENTS" p ON p."PATNT_REFNO" = s."PATNT_REFNO"')


# Every Encounter, from its three sources (mappings/demo-pas/Encounter*.sql.yaml): id as
# served, patient, status as served (the sources' code maps), consultant or attender.
ALL_ENCOUNTERS = (
    'SELECT \'\', "PRVSP_REFNO", "PATNT_REFNO", "SPELL_STATUS", "PROCA_REFNO" '
    'FROM "PROVIDER_SPELLS" UNION ALL '
    'SELECT \'op-\', "OPATT_REFNO", "PATNT_REFNO", "ATTND_CODE", "PROCA_REFNO" '
    'FROM "OUTPATIENT_ATTENDANCES" UNION ALL '
    'SELECT \'ae-\', "AEATT_REFNO", "PATNT_REFNO", "AE_STATUS", "PROCA_REFNO" '
    'FROM "AE_ATTENDANCES" WHERE "DEL_FLAG" = \'N\'')
ENCOUNTER_STATUS = {  # mappings/codemaps/encounter-status*.yaml
    "": {"A": "in-progress", "D": "finished", "C": "cancelled"},
    "op-": {"5": "finished", "6": "finished", "7": "cancelled", "2": "cancelled",
            "3": "cancelled", "4": "cancelled"},
    "ae-": {"A": "in-progress", "D": "finished"},
}


def all_encounters(oracle: Oracle) -> list[tuple[str, int, str | None, Any]]:
    """(id, patient key, FHIR status, practitioner key) of every Encounter served."""
    return [(f"{pre}{k}", patient,
             None if status is None else ENCOUNTER_STATUS[pre][str(status)], proca)
            for pre, k, patient, status, proca in oracle.rows(ALL_ENCOUNTERS)]


# --- chained parameters ----------------------------------------------------------------------


async def test_chain_across_encounter_sources(api: httpx.AsyncClient, oracle: Oracle) -> None:
    # Encounter has three sources; a chain is planned on each, against its own columns.
    busiest = oracle.rows(
        'SELECT p."NHS_NUMBER" FROM "PATIENTS" p WHERE p."NHS_NUMBER" IS NOT NULL '
        'AND EXISTS (SELECT 1 FROM "OUTPATIENT_ATTENDANCES" o WHERE o."PATNT_REFNO" = '
        'p."PATNT_REFNO") AND EXISTS (SELECT 1 FROM "AE_ATTENDANCES" e WHERE e."PATNT_REFNO" = '
        'p."PATNT_REFNO") ORDER BY p."NHS_NUMBER" LIMIT 3')
    assert len(busiest) == 3
    for (nhs,) in busiest:
        pid = 'SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n'
        spells = f'SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS" WHERE "PATNT_REFNO" IN ({pid})'
        outpatient = (f'SELECT "OPATT_REFNO" FROM "OUTPATIENT_ATTENDANCES" '
                      f'WHERE "PATNT_REFNO" IN ({pid})')
        ae = (f'SELECT "AEATT_REFNO" FROM "AE_ATTENDANCES" WHERE "PATNT_REFNO" IN ({pid}) '
              "AND \"DEL_FLAG\" = 'N'")  # rows recorded in error are never served
        expected = (oracle.ids(spells, n=nhs)
                    | {f"op-{i}" for i in oracle.ids(outpatient, n=nhs)}
                    | {f"ae-{i}" for i in oracle.ids(ae, n=nhs)})
        got = await search(api, "Encounter", [("patient.identifier", f"{NHS}|{nhs}")],
                           all_sources=True)
        assert set(got) == expected
        assert any(i.startswith("op-") for i in got) and any(i.startswith("ae-") for i in got)


# PROBLEMS.PRVSP_REFNO, under Condition's 'encounter': the keys of inpatient spells only.
CONDITIONS_OF_SPELLS = ('SELECT c."PROBL_REFNO" FROM "PROBLEMS" c JOIN "PROVIDER_SPELLS" s '
                        'ON s."PRVSP_REFNO" = c."PRVSP_REFNO" WHERE c."DELETED_FLAG" = \'N\'')


async def test_references_hold_the_unprefixed_sources_keys(api: httpx.AsyncClient,
                                                           oracle: Oracle) -> None:
    """A reference column holds the keys of its target's unprefixed source (an output
    reference carries no prefix): a chain onto Encounter, or a _has from it, never joins the
    outpatient or A&E keys, whose numbers the spells' share."""
    finished = oracle.ids(CONDITIONS_OF_SPELLS + ' AND s."SPELL_STATUS" = \'D\'')
    # conditions whose spell number is also a finished clinic attendance's number
    same_number = oracle.ids(
        'SELECT c."PROBL_REFNO" FROM "PROBLEMS" c JOIN "OUTPATIENT_ATTENDANCES" o '
        'ON o."OPATT_REFNO" = c."PRVSP_REFNO" WHERE c."DELETED_FLAG" = \'N\' '
        'AND o."ATTND_CODE" IN (\'5\', \'6\')')
    assert finished and same_number - finished  # the wrong join would show
    assert await found(api, "Condition", [("encounter.status", "finished")]) == finished
    # an id of a prefixed source, chained or plain: no PROBLEMS row refers to it
    (op,) = oracle.rows('SELECT min("OPATT_REFNO") FROM "OUTPATIENT_ATTENDANCES"')[0]
    assert oracle.ids(CONDITIONS_OF_SPELLS + ' AND s."PRVSP_REFNO" = :k', k=op)
    for params in ([("encounter._id", f"op-{op}")], [("encounter", f"op-{op}")],
                   [("encounter", f"Encounter/op-{op}")]):
        assert await found(api, "Condition", params) == set(), params
    assert await found(api, "Condition", [("encounter._id", str(op))]) == oracle.ids(
        CONDITIONS_OF_SPELLS + ' AND s."PRVSP_REFNO" = :k', k=op)
    # _has the other way: spells only, never an attendance with a spell's number
    spells = oracle.ids('SELECT DISTINCT c."PRVSP_REFNO" FROM "PROBLEMS" c WHERE '
                        'c."DELETED_FLAG" = \'N\' AND c."PROBL_TYPE" = \'DX\' '
                        'AND c."PRVSP_REFNO" IS NOT NULL')
    assert spells
    got = await search(api, "Encounter", [("_has:Condition:encounter:category",
                                           "encounter-diagnosis")], all_sources=True)
    assert set(got) == spells


async def test_patient_identifier_nhs_number(api: httpx.AsyncClient, oracle: Oracle) -> None:
    # the NHS numbers of the three patients with the most spells
    busiest = oracle.rows(
        'SELECT p."NHS_NUMBER", count(*) FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p '
        'ON p."PATNT_REFNO" = s."PATNT_REFNO" WHERE p."NHS_NUMBER" IS NOT NULL '
        'GROUP BY p."NHS_NUMBER" ORDER BY count(*) DESC, p."NHS_NUMBER" LIMIT 3')
    assert busiest[0][1] >= 2
    for nhs, n in busiest:
        expected = oracle.ids(SPELLS_WITH_PATIENT + ' WHERE p."NHS_NUMBER" = :n', n=nhs)
        assert len(expected) == n
        for param in ("patient.identifier", "subject:Patient.identifier"):
            assert await found(api, "Encounter", [(param, f"{NHS}|{nhs}")]) == expected
    # two NHS numbers: either
    (a, _), (b, _) = busiest[:2]
    expected = oracle.ids(SPELLS_WITH_PATIENT + ' WHERE p."NHS_NUMBER" IN (:a, :b)', a=a, b=b)
    assert await found(api, "Encounter", [("patient.identifier", f"{NHS}|{a},{NHS}|{b}")]
                       ) == expected


def nhs_check_digit(nine: str) -> int | None:
    """Modulus 11 (NHS Data Dictionary): None where the number cannot be valid."""
    check = 11 - sum(int(d) * (10 - i) for i, d in enumerate(nine)) % 11
    return 0 if check == 11 else None if check == 10 else check


async def test_target_mapping_checks_apply(api: httpx.AsyncClient, oracle: Oracle) -> None:
    # the Patient mapping's NHS number check digit, not the Encounter's (it has none)
    code = await error(api, "Encounter", [("patient.identifier", f"{NHS}|9990000019")])
    assert code == "INVALID_NHS_NUMBER"
    known = oracle.ids('SELECT "NHS_NUMBER" FROM "PATIENTS"')
    unused = next(f"{n}{d}" for n in map(str, range(999_100_000, 999_200_000))
                  if (d := nhs_check_digit(n)) is not None and f"{n}{d}" not in known)
    assert await found(api, "Encounter", [("patient.identifier", f"{NHS}|{unused}")]
                       ) == set()  # valid, but nobody has it


@pytest.mark.parametrize("value", ["smith", "Smith", "JO", "o'b", "w"])
async def test_patient_family(api: httpx.AsyncClient, oracle: Oracle, value: str) -> None:
    expected = {str(s) for s, _, _, surname, _, _ in oracle.rows(SPELLS_WITH_PATIENT)
                if fold(surname).startswith(fold(value))}
    assert await found(api, "Encounter", [("patient.family", value), ANY_BIRTH]) == expected
    # :exact is case- and accent-sensitive on the served family name (the mapping serves
    # SURNAME title-cased: SMITH as Smith), as Patient?family:exact is
    exact = {str(s) for s, _, _, surname, _, _ in oracle.rows(SPELLS_WITH_PATIENT)
             if served_family(surname) == value}
    assert (value == "Smith") == bool(exact)
    assert await found(api, "Encounter", [("patient.family:exact", value), ANY_BIRTH]
                       ) == exact
    patients = {str(p) for _, p, _, surname, _, _ in oracle.rows(SPELLS_WITH_PATIENT)
                if served_family(surname) == value}
    assert await found(api, "Patient", [("family:exact", value), ("birthdate", "le2100")]
                       ) >= patients


def served_family(surname: str | None) -> str:
    """SURNAME as the demo mapping serves it (transform title_case: O'BRIEN -> O'Brien)."""
    from gateway.mapping.transforms import TRANSFORMS

    return str(TRANSFORMS["title_case"][0](surname)) if surname else ""


@pytest.mark.parametrize("value", ["lt1950", "ge1950-06", "1962", "gt1990-01-01"])
async def test_subject_birthdate(api: httpx.AsyncClient, oracle: Oracle, value: str) -> None:
    # birth dates are YYYYMMDD strings: string comparison is date order
    prefix, date = (value[:2], value[2:]) if value[:2].isalpha() else ("eq", value)
    digits = date.replace("-", "")
    lo = digits.ljust(8, "0") if len(digits) < 8 else digits
    hi = (str(int(digits) + 1) + "0000" if len(digits) == 4 else
          _next_month(digits) + "00" if len(digits) == 6 else _next_day(digits))
    where = {"lt": 'p."DTTM_OF_BIRTH" < :lo', "ge": 'p."DTTM_OF_BIRTH" >= :lo',
             "gt": 'p."DTTM_OF_BIRTH" >= :hi',
             "eq": 'p."DTTM_OF_BIRTH" >= :lo AND p."DTTM_OF_BIRTH" < :hi'}[prefix]
    expected = oracle.ids(SPELLS_WITH_PATIENT + " WHERE " + where, lo=lo, hi=hi)
    assert expected or prefix == "eq"
    assert await found(api, "Encounter", [("subject:Patient.birthdate", value),
                                          ("subject:Patient.gender", ANY_GENDER)]) == expected


def _next_month(yyyymm: str) -> str:
    y, m = int(yyyymm[:4]), int(yyyymm[4:])
    return f"{y + (m == 12):04d}{m % 12 + 1:02d}"


def _next_day(yyyymmdd: str) -> str:
    import datetime as dt

    d = dt.date(int(yyyymmdd[:4]), int(yyyymmdd[4:6]), int(yyyymmdd[6:])) + dt.timedelta(1)
    return d.strftime("%Y%m%d")


async def test_code_map_and_not_on_the_target(api: httpx.AsyncClient, oracle: Oracle) -> None:
    female = oracle.ids(SPELLS_WITH_PATIENT + ' WHERE p."SEXXX_CODE" = \'2\'')
    assert await found(api, "Encounter", [("patient.gender", "female"), ANY_BIRTH]) == female
    everyone = oracle.ids('SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS"')
    # :not is the target's: encounters whose patient is not female (a spell always has one)
    assert await found(api, "Encounter", [("patient.gender:not", "female"), ANY_BIRTH]
                       ) == everyone - female


async def test_chain_and_plain_parameters_together(api: httpx.AsyncClient,
                                                   oracle: Oracle) -> None:
    expected = oracle.ids(SPELLS_WITH_PATIENT + ' WHERE p."SEXXX_CODE" = \'1\' AND '
                          's."SPELL_STATUS" = \'D\' AND s."ADMIT_DTTM" >= \'2015\'')
    params = [("patient.gender", "male"), ANY_BIRTH, ("status", "finished"),
              ("date", "ge2015-01-01")]
    assert await found(api, "Encounter", params) == expected
    # the chained parameter's id, and a repeat of it (AND)
    pid = oracle.rows('SELECT "PATNT_REFNO" FROM "PROVIDER_SPELLS" ORDER BY "PRVSP_REFNO"')[0][0]
    mine = oracle.ids('SELECT "PRVSP_REFNO" FROM "PROVIDER_SPELLS" WHERE "PATNT_REFNO" = :p',
                      p=pid)
    assert await found(api, "Encounter", [("patient._id", str(pid))]) == mine
    assert await found(api, "Encounter", [("patient._id", str(pid)),
                                          ("patient", f"Patient/{pid}")]) == mine


async def test_paging_sorting_and_totals(api: httpx.AsyncClient, oracle: Oracle) -> None:
    rows = [r for r in oracle.rows(
        'SELECT s."PRVSP_REFNO", s."ADMIT_DTTM", p."SURNAME" FROM "PROVIDER_SPELLS" s '
        'JOIN "PATIENTS" p ON p."PATNT_REFNO" = s."PATNT_REFNO"') if fold(r[2]).startswith("s")]
    assert len(rows) > 14
    # newest admission first, the key breaking ties (the gateway's total order)
    rows.sort(key=lambda r: r[0])
    rows.sort(key=lambda r: r[1], reverse=True)
    params = [("patient.family", "s"), ANY_BIRTH, ("_sort", "-date"), ("_count", "4")]
    assert await search(api, "Encounter", params) == [str(r[0]) for r in rows]
    # totals count every Encounter source: outpatient and A&E attendances too
    others = sum(1 for (name,) in oracle.rows(
        'SELECT p."SURNAME" FROM "OUTPATIENT_ATTENDANCES" o JOIN "PATIENTS" p '
        'ON p."PATNT_REFNO" = o."PATNT_REFNO" UNION ALL SELECT p."SURNAME" FROM '
        '"AE_ATTENDANCES" e JOIN "PATIENTS" p ON p."PATNT_REFNO" = e."PATNT_REFNO" '
        "WHERE e.\"DEL_FLAG\" = 'N'") if fold(name).startswith("s"))
    assert others > 0
    r = await api.get("/STU3/Encounter", params=[*params, ("_total", "accurate")])
    assert r.json()["total"] == len(rows) + others
    r = await api.get("/STU3/Encounter", params=[("patient.family", "s"), ANY_BIRTH,
                                                 ("_summary", "count")])
    assert r.json()["total"] == len(rows) + others


async def test_multi_target_reference(api: httpx.AsyncClient, oracle: Oracle) -> None:
    gp = ('SELECT r."PATNT_REFNO", c."SURNAME", c."FORENAME", o."ORG_NAME", p."SEXXX_CODE" '
          'FROM "GP_REGISTRATIONS" r JOIN "PATIENTS" p ON p."PATNT_REFNO" = r."PATNT_REFNO" '
          'LEFT JOIN "CLINICIANS" c ON c."PROCA_REFNO" = r."PROCA_REFNO" '
          'LEFT JOIN "ORGANISATIONS" o ON o."ORGAN_REFNO" = r."ORGAN_REFNO" '
          'WHERE r."END_DTTM" IS NULL')
    rows = [(str(p), fold(c), fold(f), fold(o), sex) for p, c, f, o, sex in oracle.rows(gp)]
    surname = next(c for _, c, _, _, _ in rows if c)[:3]
    expected = {p for p, c, _, _, sex in rows if sex == "2" and c.startswith(surname)}
    assert expected
    for param in ("general-practitioner.family", "general-practitioner:Practitioner.family"):
        assert await found(api, "Patient", [(param, surname), ("gender", "female")]) == expected
    org = next(o for _, _, _, o, _ in rows if o)[:4]
    by_org = {p for p, _, _, o, sex in rows if sex == "2" and o.startswith(org)}
    assert by_org
    assert await found(api, "Patient", [("general-practitioner:Organization.name", org),
                                        ("gender", "female")]) == by_org
    # Practitioner and Organization both have 'name': without a type, either
    for name in (org, surname):
        either = {p for p, c, f, o, sex in rows
                  if sex == "2" and any(x.startswith(name) for x in (c, f, o))}
        assert either
        assert await found(api, "Patient", [("general-practitioner.name", name),
                                            ("gender", "female")]) == either


async def test_self_reference(api: httpx.AsyncClient, oracle: Oracle) -> None:
    """Location partof Location: the subquery reads the outer query's table, uncorrelated."""
    pairs = oracle.rows('SELECT l."LOCTN_REFNO", parent."LOCTN_NAME" FROM "LOCATIONS" l '
                        'JOIN "LOCATIONS" parent ON parent."LOCTN_REFNO" = l."PARENT_REFNO"')
    assert pairs
    name = fold(pairs[0][1])[:5]
    expected = {str(k) for k, n in pairs if fold(n).startswith(name)}
    assert await found(api, "Location", [("partof.name", name)]) == expected
    parents = oracle.rows('SELECT parent."LOCTN_REFNO", l."LOCTN_NAME" FROM "LOCATIONS" l '
                          'JOIN "LOCATIONS" parent ON parent."LOCTN_REFNO" = l."PARENT_REFNO"')
    child = fold(parents[-1][1])[:6]
    assert await found(api, "Location", [("_has:Location:partof:name", child)]) == {
        str(k) for k, n in parents if fold(n).startswith(child)}


# --- _has ------------------------------------------------------------------------------------


async def test_has_encounter(api: httpx.AsyncClient, oracle: Oracle) -> None:
    # an Encounter from any of its three sources, each status through its own code map
    encounters = all_encounters(oracle)
    female = oracle.ids('SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "SEXXX_CODE" = \'2\'')
    finished = {str(p) for _, p, st, _ in encounters if st == "finished"}
    expected = finished & female
    # patients whose only finished encounters are attendances: a spells-only join misses them
    assert expected - oracle.ids('SELECT "PATNT_REFNO" FROM "PROVIDER_SPELLS" '
                                 'WHERE "SPELL_STATUS" = \'D\'')
    for has in ("_has:Encounter:patient:status", "_has:Encounter:subject:status"):
        assert await found(api, "Patient", [(has, "finished"), ("gender", "female")]
                           ) == expected
    ongoing = {str(p) for _, p, st, _ in encounters if st == "in-progress"}
    assert await found(api, "Patient", [("_has:Encounter:patient:status", "in-progress"),
                                        ("birthdate", "ge1800")]) == ongoing
    # :not is the Encounter's: patients with an encounter that is not finished
    unfinished = {str(p) for _, p, st, _ in encounters if st != "finished"}
    assert unfinished > ongoing
    assert await found(api, "Patient", [("_has:Encounter:patient:status:not", "finished"),
                                        ("birthdate", "ge1800")]) == unfinished


async def test_has_into_a_child_table(api: httpx.AsyncClient, oracle: Oracle) -> None:
    """Practitioners some patient with this surname is registered with (a child row)."""
    rows = oracle.rows('SELECT r."PROCA_REFNO", p."SURNAME" FROM "GP_REGISTRATIONS" r '
                       'JOIN "PATIENTS" p ON p."PATNT_REFNO" = r."PATNT_REFNO" '
                       'WHERE r."END_DTTM" IS NULL AND r."PROCA_REFNO" IS NOT NULL')
    expected = {str(k) for k, s in rows if fold(s).startswith("smith")}
    assert expected
    assert await found(api, "Practitioner", [("_has:Patient:general-practitioner:family",
                                              "smith")]) == expected


async def test_has_and_the_patient_search_rule(api: httpx.AsyncClient) -> None:
    """A _has counts as one reference parameter under the Care Connect two-type rule."""
    has = ("_has:Encounter:patient:status", "finished")
    for params in ([has],
                   [has, ("_has:Encounter:patient:class", "inpatient")],  # one type twice
                   [("general-practitioner.family", "smith"), has]):      # both references
        assert await error(api, "Patient", params) == "INSUFFICIENT_SEARCH_CRITERIA"
    await found(api, "Patient", [has, ("family", "smith")])  # string + reference: allowed
    await found(api, "Patient", [has, ("identifier", f"{NHS}|9990000018")])


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("rtype", "params", "code"), [
    ("Encounter", [("colour.family", "x")], "UNKNOWN_CHAIN"),
    ("Encounter", [("patient.colour", "x")], "UNKNOWN_CHAIN"),
    ("Encounter", [("patient:Location.name", "x")], "UNKNOWN_CHAIN"),
    ("Encounter", [("patient.", "x")], "UNKNOWN_CHAIN"),
    ("Encounter", [("status.code", "x")], "CHAIN_NOT_REFERENCE"),
    ("Encounter", [("date.family", "x")], "CHAIN_NOT_REFERENCE"),
    ("Encounter", [("patient.general-practitioner.family", "x")], "CHAIN_TOO_DEEP"),
    ("Encounter", [("patient._has:Encounter:patient:status", "x")], "CHAIN_TOO_DEEP"),
    ("Patient", [("_has:Encounter:patient:_has:Encounter:patient:status", "x"),
                 ("family", "x")], "CHAIN_TOO_DEEP"),
    ("Patient", [("_has:Encounter:patient:patient.family", "x"), ("family", "x")],
     "CHAIN_TOO_DEEP"),
    ("Patient", [("_has:Encounter:patient", "x"), ("family", "x")], "UNKNOWN_CHAIN"),
    ("Patient", [("_has:Colour:patient:status", "x"), ("family", "x")], "UNKNOWN_CHAIN"),
    ("Patient", [("_has:Encounter:practitioner:status", "x"), ("family", "x")],
     "UNKNOWN_CHAIN"),  # refers to Practitioner, not Patient
    ("Patient", [("_has:Encounter:date:status", "x"), ("family", "x")], "CHAIN_NOT_REFERENCE"),
    ("Patient", [("_has:Encounter:patient:colour", "x"), ("family", "x")], "UNKNOWN_CHAIN"),
    ("Encounter", [("patient.birthdate", "soon")], "INVALID_PARAMETER"),
    ("Encounter", [("patient.family:sounds", "x")], "INVALID_PARAMETER"),
])
async def test_errors(api: httpx.AsyncClient, rtype: str, params: Params, code: str) -> None:
    assert await error(api, rtype, params) == code
    # the same under lenient and strict handling: ignoring a chain would widen the result
    for prefer in ("handling=lenient", "handling=strict"):
        assert await error(api, rtype, params, headers={"Prefer": prefer}) == code


# --- the target's own search policy ------------------------------------------------------------


@pytest.mark.parametrize("params", [
    [("patient.family", "smith")],                                   # one parameter
    [("patient.family", "smith"), ("patient.given", "jane")],        # two, both strings
    [("patient.gender", "female"), ("patient.gender:not", "male")],  # two, both tokens
    [("subject:Patient.family", "smith"), ("patient.birthdate", "1970")],  # two references
    [("patient.family", "smith"), ("status", "finished")],  # Encounter's, not Patient's
])
async def test_a_chain_into_patient_follows_patients_rule(api: httpx.AsyncClient,
                                                         params: Params) -> None:
    """``Patient?family=smith`` alone is refused (Care Connect: two parameters of different
    types unless identifier): so is ``Encounter?patient.family=smith``, which would run the
    same weak Patient search inside it. The error names what to add."""
    for prefer in (None, "handling=lenient", "handling=strict"):
        r = await api.get("/STU3/Encounter", params=params,
                          headers={"Prefer": prefer} if prefer else {})
        assert r.status_code == 400, r.text
        issue = r.json()["issue"][0]
        assert (issue["severity"], issue["code"]) == ("error", "required")
        assert issue["details"]["coding"][0]["code"] == "INSUFFICIENT_CHAIN_CRITERIA"
        head = params[0][0].split(".")[0]
        assert f"{head}.identifier" in issue["diagnostics"]
        assert "of a different type" in issue["diagnostics"]
        assert "smith" not in issue["diagnostics"] and "jane" not in issue["diagnostics"]


async def test_a_chain_that_meets_the_rule_is_answered(api: httpx.AsyncClient,
                                                      oracle: Oracle) -> None:
    rows = oracle.rows(SPELLS_WITH_PATIENT)
    smith_1970s = {str(s) for s, _, _, surname, born, _ in rows
                   if fold(surname).startswith("smith") and "1970" <= born[:4] < "1980"}
    smith_women = {str(s) for s, _, _, surname, _, sex in rows
                   if fold(surname).startswith("smith") and sex == "2"}
    assert smith_1970s != smith_women
    for head in ("patient", "subject:Patient"):
        got = await found(api, "Encounter", [(f"{head}.family", "smith"),
                                             (f"{head}.birthdate", "ge1970"),
                                             (f"{head}.birthdate", "lt1980")])
        assert got == smith_1970s
    # the two halves of one reference count together, whichever way each is written
    assert await found(api, "Encounter", [("patient.family", "smith"),
                                          ("patient:Patient.gender", "female")]) == smith_women
    # identifier (or _id) alone is enough, as for a Patient search
    nhs, = next((n,) for _, _, n, _, _, _ in rows if n)
    assert await found(api, "Encounter", [("patient.identifier", f"{NHS}|{nhs}")]) == {
        str(s) for s, _, n, _, _, _ in rows if n == nhs}


# --- one statement per page --------------------------------------------------------------------


def _count_statements(engine: sa.Engine, sink: list[str]) -> None:
    """Record every statement sent on new DBAPI connections, below SQLAlchemy (the adapter
    runs reused statements on the driver's cursor directly)."""
    if engine.dialect.name == "sqlite":
        sa.event.listen(engine, "connect",
                        lambda conn, _rec: conn.set_trace_callback(sink.append))
        return
    import psycopg

    class Counting(psycopg.Cursor[Any]):
        def execute(self, query: Any, *args: Any, **kw: Any) -> Any:
            sink.append(str(query))
            return super().execute(query, *args, **kw)

    def install_cursor(conn: Any, _rec: Any) -> None:
        conn.cursor_factory = Counting

    sa.event.listen(engine, "connect", install_cursor)


async def test_one_statement_per_page(demo_url: str, make_app: Callable[..., Starlette]
                                      ) -> None:
    app = make_app(demo_url)
    registry = app.state.registry
    engine = registry.get("Patient").mapping.adapter.engine
    # Encounter's three sources, all on the Patient mapping's connection
    tables = ("PROVIDER_SPELLS", "OUTPATIENT_ATTENDANCES", "AE_ATTENDANCES")
    assert {s.mapping.spec.source["table"] for s in registry.get("Encounter").sources
            } == set(tables)
    assert all(s.mapping.adapter.engine is engine for s in registry.get("Encounter").sources)
    sent: list[str] = []
    _count_statements(engine, sent)

    def selects() -> list[str]:
        return [s for s in sent if "PATIENTS" in s or any(t in s for t in tables)]

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            url: str | None = ("/STU3/Encounter?patient.family=s"
                               "&patient.birthdate=le2100-01-01&_count=3")
            pages = 0
            while url is not None and pages < 4:
                sent.clear()
                r = await c.get(url)
                assert r.status_code == 200, r.text
                statements = selects()
                # one statement per source still unfinished (the first page asks all three),
                # each reading the patient table inside it, as a subquery
                asked = [t for st in statements for t in tables if t in st]
                assert len(asked) == len(statements) == len(set(asked)), statements
                assert pages or len(asked) == 3
                assert all("PATIENTS" in st for st in statements), statements
                pages += 1
                nxt = [x["url"] for x in r.json()["link"] if x["relation"] == "next"]
                url = nxt[0] if nxt else None
            assert pages == 4
            sent.clear()
            r = await c.get("/STU3/Patient?_has:Encounter:patient:status=finished&family=s"
                            "&_count=5")
            assert r.status_code == 200
            # the Patient page, then its children (identifiers, addresses, GP): never a
            # query of spells whose keys feed a second one
            patients = [s for s in selects() if "PROVIDER_SPELLS" in s]
            assert len(patients) == 1 and "PATIENTS" in patients[0]


# --- authorisation and the patient compartment -----------------------------------------------


async def test_chains_need_search_on_the_other_type(
        demo_url: str, make_app: Callable[..., Starlette], oracle: Oracle) -> None:
    app = make_app(demo_url)
    pid, spell = oracle.rows('SELECT "PATNT_REFNO", "PRVSP_REFNO" FROM "PROVIDER_SPELLS" '
                             'ORDER BY "PRVSP_REFNO"')[0]
    install(app, {"enc": user_token("user/Encounter.read"),
                  "pat": user_token("user/Patient.read"),
                  "both": user_token("user/Encounter.read user/Patient.read"),
                  "P": patient_token(str(pid), "patient/*.read")})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            chained = [("patient._id", str(pid))]
            has = [("_has:Encounter:patient:_id", str(spell)), ("family", "a")]
            assert await error(c, "Encounter", chained, as_("enc"), 403) == "ACCESS_DENIED"
            assert await error(c, "Patient", has, as_("pat"), 403) == "ACCESS_DENIED"
            assert str(spell) in await found_as(c, "Encounter", chained, "both")


async def found_as(c: httpx.AsyncClient, rtype: str, params: Params, who: str) -> set[str]:
    return set(await search(c, rtype, params, as_(who)))


async def test_compartment_confines_the_other_side(
        demo_url: str, make_app: Callable[..., Starlette], oracle: Oracle) -> None:
    """A patient/ token cannot learn about another patient's encounters through _has on a
    type outside the compartment (Practitioner): the subquery is confined too."""
    by_patient: dict[int, set[int]] = {}
    for _, patient, _, consultant in all_encounters(oracle):  # all three Encounter sources
        if consultant is not None:
            by_patient.setdefault(patient, set()).add(consultant)
    # P and Q: each with a consultant the other never saw
    p, q = next((a, b) for a in sorted(by_patient) for b in sorted(by_patient)
                if by_patient[a] - by_patient[b] and by_patient[b] - by_patient[a])
    app = make_app(demo_url)
    install(app, {"P": patient_token(str(p), "patient/*.read"), "clinician": user_token()})
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            params = [("_has:Encounter:practitioner:patient", f"Patient/{q}")]
            assert await found_as(c, "Practitioner", params, "clinician") == {
                str(k) for k in by_patient[q]}
            assert await found_as(c, "Practitioner", params, "P") == set()
            mine = [("_has:Encounter:practitioner:patient", f"Patient/{p}")]
            assert await found_as(c, "Practitioner", mine, "P") == {str(k) for k in by_patient[p]}


# --- the CapabilityStatement -----------------------------------------------------------------


async def test_capability_statement_lists_what_works(api: httpx.AsyncClient) -> None:
    cs = (await api.get("/STU3/metadata")).json()
    resources = {r["type"]: r for r in cs["rest"][0]["resource"]}
    enc = {p["name"]: p for p in resources["Encounter"]["searchParam"]}
    doc = enc["patient"]["documentation"]
    for name in ("patient.identifier", "patient.family", "patient.birthdate", "patient._id"):
        assert name in doc
    assert "patient.colour" not in doc and "Chains" not in enc["date"].get("documentation", "")
    gp = {p["name"]: p for p in resources["Patient"]["searchParam"]}["general-practitioner"]
    assert "general-practitioner:Practitioner.family" in gp["documentation"]
    assert "general-practitioner:Organization.name" in gp["documentation"]
    assert "_has:Encounter:patient:<parameter>" in resources["Patient"]["documentation"]
    assert "A chain into Patient follows Patient's own rule" in doc
    # every chain it lists answers (no 400) — with Patient's rule met: by identifier or _id,
    # or with a chained parameter of another type
    listed = doc.split("Chains (one level): ")[1].split(". ")[0].split(", ")
    assert "patient.family" in listed and "patient.identifier" in listed
    for name in listed:
        target = name.split(".")[1]
        value = {"birthdate": "1970", "death-date": "1970", "_id": "1",
                 "general-practitioner": "Practitioner/1"}.get(target, "a")
        params = [(name, value), ("_count", "1")]
        if target not in ("identifier", "_id"):
            params.append(("patient.gender", ANY_GENDER) if target.endswith("date")
                          else ("patient.birthdate", "le2100-01-01"))
        r = await api.get("/STU3/Encounter", params=params)
        assert r.status_code == 200, (name, r.text)



# --- _revinclude onto Patient, for every type that refers to one -------------------------------


async def test_revinclude_of_every_type_onto_patient(
        demo_url: str, make_app: Callable[..., Starlette], oracle: Oracle) -> None:
    """Every ``_revinclude`` the CapabilityStatement offers on Patient brings exactly what a
    search of that type by the patient finds, and is capped with a warning, never cut
    silently. Generic: types that refer to Patient join the loop as their mappings arrive."""
    busiest = oracle.rows('SELECT "PATNT_REFNO", count(*) FROM "PROVIDER_SPELLS" '
                          'GROUP BY "PATNT_REFNO" ORDER BY count(*) DESC, "PATNT_REFNO"')[0]
    pid, n = str(busiest[0]), busiest[1]
    assert n >= 2
    app = make_app(demo_url, include_limit=n - 1)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
            cs = (await c.get("/STU3/metadata")).json()
            patient = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Patient")
            offered = patient["searchRevInclude"]
            assert "Encounter:patient" in offered
            capped = 0
            for rev in offered:
                rtype, param = rev.split(":")
                # every source of a type: _revinclude brings them all
                by_search = set(await search(c, rtype, [(param, f"Patient/{pid}")],
                                             all_sources=True))
                r = await c.get("/STU3/Patient", params={"_id": pid, "_revinclude": rev})
                assert r.status_code == 200, r.text
                entries = r.json()["entry"]
                included = {e["resource"]["id"] for e in entries
                            if e["search"]["mode"] == "include"}
                warnings = [i for e in entries if e["search"]["mode"] == "outcome"
                            for i in e["resource"]["issue"]
                            if i["details"]["coding"][0]["code"] == "INCLUDE_LIMIT"]
                if len(by_search) > n - 1:
                    capped += 1
                    assert len(included) == n - 1 and included < by_search
                    assert warnings and f"_revinclude={rev}" in warnings[0]["diagnostics"]
                else:
                    assert included == by_search and not warnings
            assert capped  # Encounter:patient at least: the cap was exercised


# --- two connections: no join, the chain resolved through the target's search ----------------


@pytest.fixture
async def split_api(demo_url: str, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The demo mappings with Encounter on a second connection (the same database, another
    adapter): the SQL adapter cannot join across connections."""
    app = split_app(demo_url, tmp_path)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gw",
                                     headers={"X-API-Key": "test-key"}) as c:
            yield c


def split_app(demo_url: str, tmp_path: Path) -> Starlette:
    import hashlib
    import shutil

    here = tmp_path / "mappings"
    shutil.copytree(MAPPINGS / "demo-pas", here / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", here / "codemaps")
    conn = here / "demo-pas" / "connections.yaml"
    conn.write_text(conn.read_text().replace(
        "codemaps: ../codemaps",
        "  other:\n    adapter: sql\n    url_env: CCG_OTHER_URL\n    timezone: Europe/London\n"
        "codemaps: ../codemaps"))
    for enc in (here / "demo-pas").glob("Encounter*.sql.yaml"):  # all three sources
        enc.write_text(enc.read_text().replace("connection: pas", "connection: other"))
    # a copied mapping directory is a production configuration: an API key, not the demo mode
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: '"
                    + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    app = build_app(gateway_settings(demo_url, tmp_path, mappings_dir=here / "demo-pas",
                                     connection_urls={"pas": demo_url, "other": demo_url},
                                     auth_mode="api-key", api_keys_file=str(keys),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    return app


async def test_across_connections(split_api: httpx.AsyncClient, oracle: Oracle) -> None:
    rows = oracle.rows(SPELLS_WITH_PATIENT)
    nhs = next(n for _, _, n, _, _, _ in rows if n)
    # every source's through the search of Patient
    patient = oracle.rows('SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "NHS_NUMBER" = :n',
                          n=nhs)[0][0]
    expected = {e for e, p, _, _ in all_encounters(oracle) if p == patient}
    assert any(not e.isdigit() for e in expected)
    r = await split_api.get("/STU3/Encounter", params={"patient.identifier": f"{NHS}|{nhs}"})
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert {e["resource"]["id"] for e in bundle["entry"]
            if e["search"]["mode"] == "match"} == expected
    notes = [i for e in bundle["entry"] if e["search"]["mode"] == "outcome"
             for i in e["resource"]["issue"]]
    assert [(n["severity"], n["details"]["coding"][0]["code"]) for n in notes] == [
        ("information", "CHAIN_RESOLVED_BY_SEARCH")]
    # the self link is the search as answered: by the patient the chain found
    [self_link] = [x["url"] for x in bundle["link"] if x["relation"] == "self"]
    assert parse_qs(urlsplit(self_link).query) == {"patient": [f"Patient/{patient}"]}
    # several patients (an OR of their keys), paged: as the join would answer
    few = {str(s) for s, _, _, surname, _, _ in rows if fold(surname).startswith("smith")}
    assert len(few) > 1
    assert await found(split_api, "Encounter", [("patient.family", "smith"), ANY_BIRTH,
                                                ("_count", "3")]) == few
    # _has the other way round, with the Patient two-type rule
    female = oracle.ids('SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "SEXXX_CODE" = \'2\'')
    ongoing = female & {str(p) for _, p, st, _ in all_encounters(oracle) if st == "in-progress"}
    assert await found(split_api, "Patient", [("_has:Encounter:patient:status", "in-progress"),
                                              ("gender", "female")]) == ongoing
    # a costly chain is refused before the Patient search it would run first (issue 13)
    addresses = ",".join(f"a{i}" for i in range(50))
    r = await split_api.get("/STU3/Encounter", params=[("patient.address", addresses),
                                                       ANY_BIRTH])
    assert r.status_code == 400 and r.json()["issue"][0]["details"]["coding"][0]["code"] == (
        "SEARCH_TOO_COSTLY"), r.text
    # more than the bound: refused, never cut
    r = await split_api.get("/STU3/Encounter", params=[("patient.gender", "female"),
                                                       ANY_BIRTH])
    assert r.status_code == 400 and r.json()["issue"][0]["details"]["coding"][0]["code"] == (
        "CHAIN_TOO_BROAD")


# --- a trust that lets chains into Patient off Patient's rule --------------------------------


async def test_a_policy_for_its_own_search_only(api: httpx.AsyncClient, demo_url: str,
                                                tmp_path: Path, oracle: Oracle) -> None:
    """``search_policy: {chains: false}`` keeps Patient's rule for Patient searches and lets
    ``Observation?subject:Patient.birthdate=...`` alone through (the default refuses it)."""
    import hashlib
    import shutil

    here = tmp_path / "mappings"
    shutil.copytree(MAPPINGS / "demo-pas", here / "demo-pas")
    shutil.copytree(MAPPINGS / "codemaps", here / "codemaps")
    patient = here / "demo-pas" / "Patient.sql.yaml"
    text = patient.read_text()
    rule = "  unless_any_of: [identifier, _id]"
    assert rule in text
    patient.write_text(text.replace(rule, rule + "\n  chains: false", 1))
    keys = tmp_path / "api-keys.yaml"
    keys.write_text("keys: [{client_id: t, sha256: '"
                    + hashlib.sha256(b"test-key").hexdigest() + "', scopes: system/*.read}]")
    year = "1962"
    born = oracle.ids('SELECT "PATNT_REFNO" FROM "PATIENTS" WHERE "ARCHV_FLAG" = \'N\' '
                      'AND "DTTM_OF_BIRTH" LIKE :y', y=f"{year}%")
    assert born
    params = [("subject:Patient.birthdate", year)]
    assert await error(api, "Observation", params) == "INSUFFICIENT_CHAIN_CRITERIA"
    app = build_app(gateway_settings(demo_url, tmp_path, mappings_dir=here / "demo-pas",
                                     auth_mode="api-key", api_keys_file=str(keys),
                                     audit_log=str(tmp_path / "audit.jsonl")))
    async with (app.router.lifespan_context(app),
                httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                                  headers={"X-API-Key": "test-key"}) as c):
        got = await found(c, "Observation", params)
        # the same as asking by each patient born that year
        want: set[str] = set()
        for pid in sorted(born):
            want |= await found(c, "Observation", [("patient", pid)])
        assert want and got == want
        # Patient's own search keeps the rule
        assert await error(c, "Patient", [("birthdate", year)]) == (
            "INSUFFICIENT_SEARCH_CRITERIA")
        cs = (await c.get("/STU3/metadata")).json()
        obs = next(r for r in cs["rest"][0]["resource"] if r["type"] == "Observation")
        subject = next(p for p in obs["searchParam"] if p["name"] == "subject")
        assert "follows Patient's own rule" not in subject["documentation"]


async def test_the_audit_names_what_was_asked_and_every_patient_the_links_name(
        split_api: httpx.AsyncClient, oracle: Oracle, tmp_path: Path) -> None:
    """The audit record's query is the search as the client sent it (the chain), and the
    patients the chain found are named in the trail: their ids go back to the client in the
    links, whether or not the page holds any of their Encounters."""
    import json

    audit = tmp_path / "audit.jsonl"
    smiths = {str(p) for _, p, _, surname, _, _ in oracle.rows(SPELLS_WITH_PATIENT)
              if fold(surname).startswith("smith")}
    assert len(smiths) > 2
    start = len(audit.read_text().splitlines()) if audit.exists() else 0
    r = await split_api.get("/STU3/Encounter", params=[("patient.family", "smith"), ANY_BIRTH,
                                                       ("_count", "1")])
    assert r.status_code == 200, r.text
    [self_link] = [x["url"] for x in r.json()["link"] if x["relation"] == "self"]
    named = {v.removeprefix("Patient/")
             for v in parse_qs(urlsplit(self_link).query)["patient"][0].split(",")}
    assert smiths <= named  # (and smiths with no spell: the chain searched Patient alone)
    records = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    assert records and {tuple(x["query"][0]) for x in records} == {("patient.family", "smith")}
    assert {x["patient"] for x in records} >= named


@pytest.mark.parametrize("protocol", ["h11", "httptools"])
async def test_links_with_the_most_references_are_accepted_back_by_uvicorn(
        demo_sqlite_url: str, tmp_path: Path, protocol: str) -> None:
    """A chain finding max_values_per_parameter patients puts that many references in every
    link: a real uvicorn (either HTTP parser, with the serve command's limits) must take
    each back, and the walk must be the one the join would give."""
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    from gateway.server import uvicorn_options
    from tests.conftest import LiveServer

    db = Oracle(demo_sqlite_url)
    longest = [k for (k,) in db.rows(
        'SELECT "PATNT_REFNO" FROM "PATIENTS" ORDER BY "PATNT_REFNO" DESC LIMIT 100')]
    want = {e for e, p, _, _ in all_encounters(db) if p in set(longest)}
    db.engine.dispose()
    http = H11Protocol if protocol == "h11" else HttpToolsProtocol
    app = split_app(demo_sqlite_url, tmp_path)
    with (LiveServer(app, **uvicorn_options(5.0, http)) as server,
          httpx.Client(base_url=server.url, headers={"X-API-Key": "test-key"}) as c):
        r = c.get("/STU3/Encounter", params={"patient._id": ",".join(map(str, longest)),
                                             "_count": "7"})
        got: list[str] = []
        longest_url = 0
        while True:
            assert r.status_code == 200, r.text
            bundle = r.json()
            got += [e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"]
            nxt = [x["url"] for x in bundle["link"] if x["relation"] == "next"]
            if not nxt:
                break
            longest_url = max(longest_url, len(nxt[0]))
            assert nxt[0].count("Patient%2F") == 100
            r = c.get(nxt[0])
    assert len(got) == len(set(got)) and set(got) == want
    assert longest_url > 2000


async def test_a_walk_keeps_what_the_chain_found(split_api: httpx.AsyncClient, demo_url: str,
                                                 oracle: Oracle) -> None:
    """The links carry the patients found on the first page: the patients renamed, or a new
    one of that name, between pages do not empty, shift or grow the walk."""
    names = dict(oracle.rows('SELECT "PATNT_REFNO", "SURNAME" FROM "PATIENTS"'))
    smiths = {p for p, surname in names.items() if fold(surname).startswith("smith")}
    encounters = all_encounters(oracle)
    want = {e for e, p, _, _ in encounters if p in smiths}
    joiner = min({p for _, p, _, _ in encounters} - smiths)  # a patient with an Encounter
    names = {p: names[p] for p in (*smiths, joiner)}
    assert len(want) > 10
    r = await split_api.get("/STU3/Encounter", params=[("patient.family", "smith"), ANY_BIRTH,
                                                       ("_count", "4")])
    got: list[str] = []
    engine = sa.create_engine(demo_url)
    try:
        while True:
            assert r.status_code == 200, r.text
            bundle = r.json()
            got += [e["resource"]["id"] for e in bundle["entry"]
                    if e["search"]["mode"] == "match"]
            nxt = [x["url"] for x in bundle["link"] if x["relation"] == "next"]
            if not nxt:
                break
            if len(got) == 4:  # after the first page: no Smith is left, and a new one comes
                with engine.begin() as conn:
                    for who in names:
                        conn.execute(sa.text('UPDATE "PATIENTS" SET "SURNAME" = :s '
                                             'WHERE "PATNT_REFNO" = :p'),
                                     {"s": "SMITHERS" if who == joiner else "JONES", "p": who})
            r = await split_api.get(nxt[0])
    finally:
        with engine.begin() as conn:  # the session's demo database, as it was
            for who, name in names.items():
                conn.execute(sa.text('UPDATE "PATIENTS" SET "SURNAME" = :s '
                                     'WHERE "PATNT_REFNO" = :p'), {"s": name, "p": who})
        engine.dispose()
    assert len(got) == len(set(got)) and set(got) == want


async def test_every_form_of_the_search_is_the_hand_written_one(
        split_api: httpx.AsyncClient, oracle: Oracle) -> None:
    """POST _search, _summary=count, _count=0, _include and a lenient unknown parameter with
    a chain: each answers as the search by the patients found, written by hand, and the
    SQL oracle."""
    names = dict(oracle.rows('SELECT "PATNT_REFNO", "SURNAME" FROM "PATIENTS"'))
    smiths = {p for p, surname in names.items() if fold(surname).startswith("smith")}
    want = {e for e, p, _, _ in all_encounters(oracle) if p in smiths}
    chain = [("patient.family", "smith"), ANY_BIRTH]
    by_hand = [("patient", ",".join(f"Patient/{p}" for p in sorted(smiths)))]

    def notes(bundle: dict[str, Any]) -> list[str]:
        return [i["details"]["coding"][0]["code"] for e in bundle.get("entry", [])
                if e["search"]["mode"] == "outcome" for i in e["resource"]["issue"]]

    def self_query(bundle: dict[str, Any]) -> dict[str, list[str]]:
        [url] = [x["url"] for x in bundle["link"] if x["relation"] == "self"]
        return parse_qs(urlsplit(url).query)

    assert set(await search(split_api, "Encounter", chain, all_sources=True)) == want
    assert set(await search(split_api, "Encounter", by_hand, all_sources=True)) == want
    got = await split_api.post("/STU3/Encounter/_search?patient.family=smith",
                               data={ANY_BIRTH[0]: ANY_BIRTH[1], "_count": "500"})
    assert got.status_code == 200, got.text
    assert {e["resource"]["id"] for e in got.json()["entry"]
            if e["search"]["mode"] == "match"} == want
    assert {p.removeprefix("Patient/") for p in self_query(got.json())["patient"][0].split(",")
            } == {str(p) for p in smiths}
    for counting in (("_summary", "count"), ("_count", "0")):
        got = await split_api.get("/STU3/Encounter", params=[*chain, counting])
        assert got.status_code == 200 and got.json()["total"] == len(want), got.text
        assert notes(got.json()) == ["CHAIN_RESOLVED_BY_SEARCH"]
        assert "patient.family" not in self_query(got.json())
    included = [("_include", "Encounter:patient"), ("_count", "500")]
    got = await split_api.get("/STU3/Encounter", params=[*chain, *included])
    hand = await split_api.get("/STU3/Encounter", params=[*by_hand, *included])
    assert got.status_code == hand.status_code == 200

    def entries(r: httpx.Response) -> set[tuple[str, str]]:
        return {(e["search"]["mode"], e["resource"]["id"]) for e in r.json()["entry"]
                if e["search"]["mode"] != "outcome"}

    assert entries(got) == entries(hand)
    assert set() < {i for m, i in entries(got) if m == "include"} <= {str(p) for p in smiths}
    got = await split_api.get("/STU3/Encounter", params=[*chain, ("bogus", "1"),
                                                         ("_count", "500")],
                              headers={"Prefer": "handling=lenient"})
    assert got.status_code == 200 and notes(got.json()) == ["UNKNOWN_PARAMETER",
                                                            "CHAIN_RESOLVED_BY_SEARCH"]
    assert {e["resource"]["id"] for e in got.json()["entry"]
            if e["search"]["mode"] == "match"} == want
    got = await split_api.get("/STU3/Encounter", params=[*chain, ("bogus", "1")],
                              headers={"Prefer": "handling=strict"})
    assert got.status_code == 400, got.text
    assert got.json()["issue"][0]["details"]["coding"][0]["code"] == "UNKNOWN_PARAMETER"


async def test_a_page_token_beside_a_chain_searches_nothing(
        split_api: httpx.AsyncClient, tmp_path: Path) -> None:
    """The links of a chain resolved by searching first never carry the chain (they carry
    what it found), so a chain beside _page is no link of this server's: refused before the
    target is searched. (A page token turns the search policy off, as a link's search was
    checked on its first page: the chain into Patient would otherwise run unchecked.)"""
    import json

    audit = tmp_path / "audit.jsonl"
    start = len(audit.read_text().splitlines()) if audit.exists() else 0
    first = await split_api.get("/STU3/Encounter", params=[("patient.family", "smith"),
                                                           ANY_BIRTH, ("_count", "2")])
    [nxt] = [x["url"] for x in first.json()["link"] if x["relation"] == "next"]
    token = parse_qs(urlsplit(nxt).query)["_page"][0]
    for params in ([("patient.birthdate", "1962"), ("_page", token)],  # Patient's rule unmet
                   [("patient.family", "smith"), ANY_BIRTH, ("_count", "2"), ("_page", token)]):
        r = await split_api.get("/STU3/Encounter", params=params)
        assert r.status_code == 400, r.text
        assert r.json()["issue"][0]["details"]["coding"][0]["code"] == "INVALID_PAGE_TOKEN"
    records = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    refused = [x for x in records if x["outcome"]["status"] == 400]
    assert len(refused) == 2
    assert all(not x["backend"]["queries"] and not x["entities"] for x in refused)


async def test_what_chains_find_must_fit_a_link(split_api: httpx.AsyncClient, oracle: Oracle,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Each chain is bounded; several together are bounded by the link that carries what
    they found (MAX_LINK_QUERY bytes of query): past it, 400, never a link refused later."""
    from gateway import chain

    rows = oracle.rows(SPELLS_WITH_PATIENT)
    smiths = {str(p) for _, p, _, surname, _, _ in rows if fold(surname).startswith("smith")}
    assert len(smiths) > 1
    params = [("patient.family", "smith"), ANY_BIRTH]
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 200, r.text
    [self_link] = [x["url"] for x in r.json()["link"] if x["relation"] == "self"]
    query = urlsplit(self_link).query
    # every Smith (those with spells among them)
    assert set(parse_qs(query)["patient"][0].split(",")) >= {f"Patient/{p}" for p in smiths}
    monkeypatch.setattr(chain, "MAX_LINK_QUERY", len(query) - 1)
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400 and r.json()["issue"][0]["details"]["coding"][0]["code"] == (
        "CHAIN_TOO_BROAD"), r.text
    assert "smith" not in r.json()["issue"][0]["diagnostics"].lower()


# --- _has resolved by searching first: bounded by the ids it finds and the records it reads --


def results_by_month(oracle: Oracle) -> dict[str, list[tuple[str, int]]]:
    """Each live result's (Encounter id as served, patient key), by collection month."""
    out: dict[str, list[tuple[str, int]]] = {}
    for month, spell, clinic, patient in oracle.rows(
            'SELECT substr(h."COLLECTED_DTTM", 1, 6), h."PRVSP_REFNO", h."OPATT_REFNO", '
            'o."PATNT_REFNO" FROM "RESULTS" o JOIN "RESULT_REPORTS" h '
            'ON h."REPRT_REFNO" = o."REPRT_REFNO" WHERE o."DEL_FLAG" = \'N\''):
        enc = f"{spell}" if spell is not None else f"op-{clinic}" if clinic is not None else ""
        out.setdefault(month, []).append((enc, patient))
    return out


def a_busy_month(oracle: Oracle) -> tuple[str, list[tuple[str, int]]]:
    """The month whose results are most numerous while within MAX_HAS_RECORDS, over the id
    bound (MAX_CHAIN_MATCHES) in records but not in the Encounters they were taken in."""
    from gateway import chain

    fits = {m: rs for m, rs in results_by_month(oracle).items()
            if chain.MAX_CHAIN_MATCHES < len(rs) <= chain.MAX_HAS_RECORDS
            and len({e for e, _ in rs if e}) <= chain.MAX_CHAIN_MATCHES}
    month = max(sorted(fits), key=lambda m: len(fits[m]))
    return f"{month[:4]}-{month[4:]}", fits[month]


def _code_and_text(r: httpx.Response) -> tuple[str, str]:
    issue = r.json()["issue"][0]
    return issue["details"]["coding"][0]["code"], issue["diagnostics"]


async def test_a_has_is_bounded_by_the_ids_it_finds_not_the_records_it_reads(
        split_api: httpx.AsyncClient, api: httpx.AsyncClient, oracle: Oracle,
        tmp_path: Path) -> None:
    """Hundreds of a month's results taken in a score of Encounters: the _id= the request
    is rewritten to carries the Encounters, within the bound, so it is answered as the
    joined single-connection search and the SQL oracle answer (it was 400 CHAIN_TOO_BROAD
    at the 101st result). The results are read in pages, not served: the audit names the
    Encounters the links disclose, with the results' patients, and no Observation."""
    import json

    from gateway import chain

    month, results = a_busy_month(oracle)
    served = {e for e, _, _, _ in all_encounters(oracle)}
    want = {e for e, _ in results if e} & served
    assert len(results) > chain.MAX_CHAIN_MATCHES + 1 and want
    params = [("_has:Observation:encounter:date", month)]
    audit = tmp_path / "audit.jsonl"
    start = len(audit.read_text().splitlines()) if audit.exists() else 0
    r = await split_api.get("/STU3/Encounter", params=[*params, ("_count", "500")])
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert {e["resource"]["id"] for e in bundle["entry"] if e["search"]["mode"] == "match"
            } == want
    assert set(await search(api, "Encounter", params, all_sources=True)) == want  # joined
    [self_link] = [x["url"] for x in bundle["link"] if x["relation"] == "self"]
    named = parse_qs(urlsplit(self_link).query)["_id"][0].split(",")
    assert set(named) == {e for e, _ in results if e}
    records = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    record = records[0]  # one per patient, of this one request
    assert all(x["request_id"] == record["request_id"] for x in records)
    entities = {e for x in records for e in x["entities"]}
    assert {f"Encounter/{e}" for e in named} <= entities
    assert not any(e.startswith("Observation/") for e in entities)
    assert {x["patient"] for x in records} == {str(p) for e, p in results if e}
    # read in pages of MAX_CHAIN_MATCHES + 1, each one statement, the last one short
    fetched = [q for q in record["backend"]["queries"] if q["resource_type"] == "Observation"]
    assert len(fetched) == len(results) // (chain.MAX_CHAIN_MATCHES + 1) + 1


async def test_a_has_over_the_id_bound_is_refused(split_api: httpx.AsyncClient,
                                                  api: httpx.AsyncClient, oracle: Oracle,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """More Encounters than a link may carry: 400, saying so, never cut; at the bound,
    answered."""
    from gateway import chain

    resolved = oracle.rows('SELECT "PRVSP_REFNO" FROM "PROBLEMS" WHERE "DELETED_FLAG" = \'N\' '
                           'AND "PROBL_STATUS" = \'R\'')
    spells = {str(s) for (s,) in resolved if s is not None}
    assert len(resolved) <= chain.MAX_HAS_RECORDS and len(spells) > chain.MAX_CHAIN_MATCHES
    params = [("_has:Condition:encounter:clinical-status", "resolved")]
    assert set(await search(api, "Encounter", params)) == spells  # joined: no bound
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400, r.text
    code, text = _code_and_text(r)
    assert code == "CHAIN_TOO_BROAD"
    assert f"refer to more than {chain.MAX_CHAIN_MATCHES} Encounter" in text
    # the month's results: over a bound lowered below their Encounters, then at it
    month, results = a_busy_month(oracle)
    found_ids = {e for e, _ in results if e}
    params = [("_has:Observation:encounter:date", month)]
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", len(found_ids) - 1)
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400 and _code_and_text(r)[0] == "CHAIN_TOO_BROAD", r.text
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", len(found_ids))
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 200, r.text


async def test_a_has_over_the_record_budget_is_refused(split_api: httpx.AsyncClient,
                                                       oracle: Oracle, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """More records of the other type than MAX_HAS_RECORDS: 400 saying so, having read no
    further than one page past the budget; at the budget, answered."""
    import json

    from gateway import chain

    month, results = a_busy_month(oracle)
    params = [("_has:Observation:encounter:date", month)]
    monkeypatch.setattr(chain, "MAX_HAS_RECORDS", len(results) - 1)
    audit = tmp_path / "audit.jsonl"
    start = len(audit.read_text().splitlines()) if audit.exists() else 0
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 400, r.text
    code, text = _code_and_text(r)
    assert code == "CHAIN_TOO_BROAD"
    assert f"more than {len(results) - 1} Observation resources" in text
    assert month not in text
    [record] = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    assert not record["entities"]  # nothing disclosed, nothing noted
    fetched = [q for q in record["backend"]["queries"] if q["resource_type"] == "Observation"]
    assert len(fetched) == -(-len(results) // (chain.MAX_CHAIN_MATCHES + 1))
    monkeypatch.setattr(chain, "MAX_HAS_RECORDS", len(results))
    r = await split_api.get("/STU3/Encounter", params=params)
    assert r.status_code == 200, r.text


async def test_a_has_audits_the_ids_the_links_carry_not_the_records_it_read(
        split_api: httpx.AsyncClient, oracle: Oracle, tmp_path: Path) -> None:
    """``Practitioner?_has:Patient:general-practitioner:family:exact=Smith`` is resolved by
    searching Patient first (:exact is compared on the served name): the links carry the
    GPs found, which tell whom the Smiths are registered with. The trail names those GPs,
    each with the patients whose registration named it, and no Patient resource as served
    (none was sent)."""
    import json

    rows = oracle.rows('SELECT r."PROCA_REFNO", p."PATNT_REFNO", p."SURNAME" '
                       'FROM "GP_REGISTRATIONS" r JOIN "PATIENTS" p '
                       'ON p."PATNT_REFNO" = r."PATNT_REFNO" '
                       'WHERE r."END_DTTM" IS NULL AND r."PROCA_REFNO" IS NOT NULL')
    smiths = {(str(k), str(p)) for k, p, surname in rows if served_family(surname) == "Smith"}
    gps = {k for k, _ in smiths}
    assert len({p for _, p in smiths}) > 1
    audit = tmp_path / "audit.jsonl"
    start = len(audit.read_text().splitlines()) if audit.exists() else 0
    r = await split_api.get("/STU3/Practitioner", params=[
        ("_has:Patient:general-practitioner:family:exact", "Smith"), ("_count", "500")])
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert {e["resource"]["id"] for e in bundle["entry"]
            if e["search"]["mode"] == "match"} == gps
    [self_link] = [x["url"] for x in bundle["link"] if x["relation"] == "self"]
    assert set(parse_qs(urlsplit(self_link).query)["_id"][0].split(",")) == gps
    records = [json.loads(line) for line in audit.read_text().splitlines()[start:]]
    assert {x["patient"] for x in records} == {p for _, p in smiths}
    for x in records:  # each Smith's record names the GP they are registered with
        assert {e for e in x["entities"] if not e.startswith("Practitioner/")} == set()
        assert {e.removeprefix("Practitioner/") for e in x["entities"]} == {
            k for k, p in smiths if p == x["patient"]}


async def test_a_has_in_a_plan_of_the_server_s_own_is_bounded_alike(
        demo_url: str, tmp_path: Path, oracle: Oracle, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan that is no client's search (a conditional create, a record operation) resolves
    its _has just before each source's query (chain.resolve): the same bounds, on the ids
    found and the records read."""
    from gateway import chain

    month, results = a_busy_month(oracle)
    served = {e for e, _, _, _ in all_encounters(oracle)}
    want = {e for e, _ in results if e} & served
    app = split_app(demo_url, tmp_path)
    async with app.router.lifespan_context(app):
        registry = app.state.registry
        encounter = registry.get("Encounter")

        async def ids() -> set[str]:
            plan = registry.plan(encounter, [("_has:Observation:encounter:date", month)],
                                 default_count=500, max_count=500, strict=True)
            assert chain.unresolved(plan)  # not joined: resolved by searching first
            page = await encounter.search(plan)
            assert not page.more
            return {encounter.record_id(r) for r in page.records}

        assert await ids() == want  # 100+ results, a few Encounters: answered
        monkeypatch.setattr(chain, "MAX_HAS_RECORDS", len(results) - 1)
        with pytest.raises(chain.ChainTooBroad, match="more than this server reads"):
            await ids()
        monkeypatch.setattr(chain, "MAX_HAS_RECORDS", len(results))
        assert await ids() == want
        # the ids bound each source's own statement here: the spells' keys
        spells = {e for e, _ in results if e.isdigit()}
        monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", len(spells))
        assert await ids() == want
        monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", len(spells) - 1)
        with pytest.raises(chain.ChainTooBroad, match="refer to more than"):
            await ids()


async def test_an_exact_chain_counts_what_is_served_exactly(
        split_api: httpx.AsyncClient, oracle: Oracle, monkeypatch: pytest.MonkeyPatch) -> None:
    """The database finds every SMITH for ``smith``; the bound counts only the patients
    served with the family name as sent, so ``patient.family:exact=smith`` is an empty
    answer, not "too broad"."""
    from gateway import chain

    rows = oracle.rows(SPELLS_WITH_PATIENT)
    smiths = {p for _, p, _, surname, _, _ in rows if served_family(surname) == "Smith"}
    assert len(smiths) > 2
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", 2)
    assert await found(split_api, "Encounter", [("patient.family:exact", "smith"),
                                                ANY_BIRTH]) == set()
    assert await error(split_api, "Encounter", [("patient.family:exact", "Smith"),
                                                ANY_BIRTH]) == "CHAIN_TOO_BROAD"
    monkeypatch.setattr(chain, "MAX_CHAIN_MATCHES", 100)
    assert await found(split_api, "Encounter", [("patient.family:exact", "Smith"),
                                                ANY_BIRTH]) == {
        str(s) for s, p, _, surname, _, _ in rows if served_family(surname) == "Smith"}
