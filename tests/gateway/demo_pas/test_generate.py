"""The demo PAS builds deterministic, internally consistent legacy data, and its code maps cover
every local code it emits with targets that exist in the Care Connect reference material."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import pathlib
import sqlite3
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from sqlalchemy import String

import gateway.demo_pas.generate as gen
from gateway.demo_pas import (
    DemoDatabaseNotEmpty,
    build_database,
    ensure_sqlite_demo,
    metadata,
)
from tests.reference import SHARED, require_shared

REPO = pathlib.Path(__file__).parents[3]
CODEMAPS = REPO / "mappings" / "codemaps"
FHIR_NS = "{http://hl7.org/fhir}"
PATIENTS = 500


def _build(path: pathlib.Path, patients: int = PATIENTS,
           seed: int = 20261123) -> sqlite3.Connection:
    build_database(f"sqlite:///{path}", patients=patients, seed=seed)
    return sqlite3.connect(path)


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    conn = _build(tmp_path_factory.mktemp("pas") / "pas.db")
    yield conn
    conn.close()


def _dump(conn: sqlite3.Connection) -> dict[str, list[tuple[Any, ...]]]:
    return {t.name: conn.execute(f'SELECT * FROM "{t.name}" ORDER BY 1').fetchall()
            for t in metadata.sorted_tables}


def _col(conn: sqlite3.Connection, sql: str) -> list[Any]:
    return [r[0] for r in conn.execute(sql)]


def nhs_number_valid(n: str) -> bool:
    """Modulus 11, written independently of the generator."""
    if len(n) != 10 or not n.isdigit():
        return False
    remainder = sum(int(n[i]) * (10 - i) for i in range(9)) % 11
    check = (11 - remainder) % 11
    return check != 10 and check == int(n[9])


# --- determinism ---------------------------------------------------------------------------

def test_same_seed_gives_identical_rows(db: sqlite3.Connection, tmp_path: pathlib.Path) -> None:
    again = _build(tmp_path / "again.db")
    try:
        assert _dump(again) == _dump(db)
    finally:
        again.close()


def test_other_seed_gives_other_rows(db: sqlite3.Connection, tmp_path: pathlib.Path) -> None:
    other = _build(tmp_path / "other.db", seed=1)
    try:
        assert _dump(other)["PATIENTS"] != _dump(db)["PATIENTS"]
    finally:
        other.close()


def test_rows_do_not_depend_on_chunk_size() -> None:
    def rows(chunk: int) -> dict[str, list[dict[str, Any]]]:
        out: dict[str, list[dict[str, Any]]] = {}
        for batch in gen.generate(120, seed=7, chunk_size=chunk):
            out.setdefault(batch.table.name, []).extend(batch.rows)
        return out

    assert rows(7) == rows(5000)


# --- identifiers ----------------------------------------------------------------------------

def test_modulus_11_reference_values() -> None:
    assert nhs_number_valid("9990000018")
    assert not nhs_number_valid("9990000017")
    assert not nhs_number_valid("9990000000")  # check digit would be 10


def test_nhs_numbers_valid_unique_and_in_test_range(db: sqlite3.Connection) -> None:
    numbers = _col(db, 'SELECT NHS_NUMBER FROM "PATIENTS" WHERE NHS_NUMBER IS NOT NULL')
    assert numbers
    assert [n for n in numbers if not nhs_number_valid(n)] == []
    assert all(n.startswith("999") for n in numbers)
    assert len(set(numbers)) == len(numbers)


def test_about_five_percent_have_no_nhs_number(db: sqlite3.Connection) -> None:
    missing = db.execute('SELECT COUNT(*) FROM "PATIENTS" WHERE NHS_NUMBER IS NULL').fetchone()[0]
    assert 0.02 <= missing / PATIENTS <= 0.09
    # The verification status exists exactly when the number does.
    assert db.execute('SELECT COUNT(*) FROM "PATIENTS" WHERE (NHS_NUMBER IS NULL) <> '
                      '(NNNTS_CODE IS NULL)').fetchone()[0] == 0


def test_hospital_numbers_unique(db: sqlite3.Connection) -> None:
    pasids = _col(db, 'SELECT PASID FROM "PATIENTS"')
    assert len(set(pasids)) == PATIENTS
    assert all(len(p) == 8 and p[0] == "D" and p[1:].isdigit() for p in pasids)
    refnos = _col(db, 'SELECT PATNT_REFNO FROM "PATIENTS" ORDER BY 1')
    assert refnos == list(range(100001, 100001 + PATIENTS))


# --- referential integrity and consistency -------------------------------------------------

CHILD_TABLES = ("PATIENT_IDS", "ADDRESSES", "GP_REGISTRATIONS", "PROVIDER_SPELLS",
                "OUTPATIENT_ATTENDANCES")


@pytest.mark.parametrize("table", CHILD_TABLES)
def test_child_rows_point_at_patients(db: sqlite3.Connection, table: str) -> None:
    orphans = db.execute(f'SELECT COUNT(*) FROM "{table}" c WHERE NOT EXISTS '
                         f'(SELECT 1 FROM "PATIENTS" p WHERE p.PATNT_REFNO = c.PATNT_REFNO)')
    assert orphans.fetchone()[0] == 0
    assert db.execute(f'SELECT COUNT(*) FROM "{table}"').fetchone()[0] > 0


def test_gp_registrations_point_at_a_gp_of_that_practice(db: sqlite3.Connection) -> None:
    bad = db.execute("""
        SELECT COUNT(*) FROM "GP_REGISTRATIONS" g
        LEFT JOIN "CLINICIANS" c ON c.PROCA_REFNO = g.PROCA_REFNO
        LEFT JOIN "ORGANISATIONS" o ON o.ORGAN_REFNO = g.ORGAN_REFNO
        WHERE c.PRTYP_CODE IS NOT 'GP' OR c.ORGAN_REFNO IS NOT g.ORGAN_REFNO
           OR o.ORGTY_CODE IS NOT 'GPP'""").fetchone()[0]
    assert bad == 0


def test_one_current_gp_registration_per_living_patient(db: sqlite3.Connection) -> None:
    rows = db.execute("""
        SELECT p.PATNT_REFNO, p.DTTM_OF_DEATH,
               (SELECT COUNT(*) FROM "GP_REGISTRATIONS" g
                 WHERE g.PATNT_REFNO = p.PATNT_REFNO AND g.END_DTTM IS NULL)
        FROM "PATIENTS" p""").fetchall()
    assert [r for r in rows if r[1] is None and r[2] != 1] == []
    assert [r for r in rows if r[1] is not None and r[2] != 0] == []
    older = db.execute('SELECT COUNT(DISTINCT PATNT_REFNO) FROM "GP_REGISTRATIONS" '
                       "WHERE END_DTTM IS NOT NULL").fetchone()[0]
    assert 0.1 <= older / PATIENTS <= 0.35  # ~20% changed practice (plus the deceased)


def test_every_patient_has_one_current_home_address(db: sqlite3.Connection) -> None:
    counts = Counter(_col(db, 'SELECT PATNT_REFNO FROM "ADDRESSES" '
                              "WHERE ADTYP_CODE = 'HOME' AND END_DTTM IS NULL"))
    assert len(counts) == PATIENTS and set(counts.values()) == {1}
    movers = db.execute('SELECT COUNT(DISTINCT PATNT_REFNO) FROM "ADDRESSES" '
                        "WHERE ADTYP_CODE = 'HOME' AND END_DTTM IS NOT NULL").fetchone()[0]
    assert 0.15 <= movers / PATIENTS <= 0.35


def test_clinical_references_exist(db: sqlite3.Connection) -> None:
    for table, kind in (("PROVIDER_SPELLS", "WARD"), ("OUTPATIENT_ATTENDANCES", "CLIN")):
        bad = db.execute(f"""
            SELECT COUNT(*) FROM "{table}" t
            LEFT JOIN "CLINICIANS" c ON c.PROCA_REFNO = t.PROCA_REFNO
            LEFT JOIN "LOCATIONS" l ON l.LOCTN_REFNO = t.LOCTN_REFNO
            WHERE c.PRTYP_CODE IS NOT 'CONS' OR l.LOCTY_CODE IS NOT '{kind}'
               OR t.MAIN_SPECT_CODE IS NOT c.MAIN_SPECT_CODE""").fetchone()[0]
        assert bad == 0, table
    bad_parent = db.execute("""
        SELECT COUNT(*) FROM "LOCATIONS" l LEFT JOIN "LOCATIONS" s
          ON s.LOCTN_REFNO = l.PARENT_REFNO
        WHERE l.LOCTY_CODE <> 'SITE' AND s.LOCTY_CODE IS NOT 'SITE'""").fetchone()[0]
    assert bad_parent == 0
    trust = db.execute('SELECT ODS_CODE, ORGTY_CODE FROM "ORGANISATIONS" '
                       "WHERE ORGAN_REFNO = 1").fetchone()
    assert trust == ("RX1", "NHST")


def test_spell_status_matches_discharge(db: sqlite3.Connection) -> None:
    rows = db.execute('SELECT SPELL_STATUS, DISCH_DTTM, DISMT_CODE, DISDE_CODE '
                      'FROM "PROVIDER_SPELLS"').fetchall()
    for status, disch, method, dest in rows:
        assert (status == "D") == (disch is not None) == (method is not None) == (
            dest is not None)
    statuses = Counter(r[0] for r in rows)
    assert statuses["A"] > 0 and statuses["A"] / len(rows) < 0.06
    # Died in hospital <=> discharge method 4, destination 79, at the date-time of death.
    died = db.execute("""SELECT s.DISCH_DTTM, s.DISDE_CODE, p.DTTM_OF_DEATH
        FROM "PROVIDER_SPELLS" s JOIN "PATIENTS" p USING (PATNT_REFNO)
        WHERE s.DISMT_CODE = '4'""").fetchall()
    assert died and all(d == death and dest == "79" for d, dest, death in died)


def test_no_overlapping_spells_and_no_activity_after_death(db: sqlite3.Connection) -> None:
    spells: dict[int, list[tuple[str, str | None]]] = {}
    for pat, admit, disch in db.execute('SELECT PATNT_REFNO, ADMIT_DTTM, DISCH_DTTM FROM '
                                        '"PROVIDER_SPELLS" WHERE SPELL_STATUS <> \'C\' '
                                        "ORDER BY PATNT_REFNO, ADMIT_DTTM"):
        spells.setdefault(pat, []).append((admit, disch))
    for pat, periods in spells.items():
        for (_, disch), (next_admit, _) in itertools.pairwise(periods):
            assert disch is not None and disch <= next_admit, pat
    late = db.execute("""
        SELECT COUNT(*) FROM "PATIENTS" p WHERE p.DTTM_OF_DEATH IS NOT NULL AND (
          EXISTS (SELECT 1 FROM "PROVIDER_SPELLS" s WHERE s.PATNT_REFNO = p.PATNT_REFNO
                  AND COALESCE(s.DISCH_DTTM, s.ADMIT_DTTM) > p.DTTM_OF_DEATH)
          OR EXISTS (SELECT 1 FROM "OUTPATIENT_ATTENDANCES" o
                     WHERE o.PATNT_REFNO = p.PATNT_REFNO AND o.APPT_DTTM > p.DTTM_OF_DEATH))
        """).fetchone()[0]
    assert late == 0


# --- formats ------------------------------------------------------------------------------

def _formats() -> Iterator[tuple[str, str, str]]:
    for table in metadata.sorted_tables:
        for col in table.columns:
            if col.name == "MODIF_DTTM":
                yield table.name, col.name, "%Y-%m-%d %H:%M:%S"
            elif col.name == "DTTM_OF_BIRTH" or col.name.endswith("_DATE"):
                yield table.name, col.name, "%Y%m%d"
            elif col.name.endswith("_DTTM"):
                yield table.name, col.name, "%Y%m%d%H%M"


@pytest.mark.parametrize(("table", "column", "fmt"), list(_formats()))
def test_date_strings_parse(db: sqlite3.Connection, table: str, column: str, fmt: str) -> None:
    values = _col(db, f'SELECT "{column}" FROM "{table}" WHERE "{column}" IS NOT NULL')
    assert values, f"{table}.{column} is never filled"
    width = len(dt.datetime(2000, 1, 1).strftime(fmt))
    reference_end = dt.datetime(2026, 11, 24)
    future_allowed = column == "EXPIRY_DATE"  # a vaccine batch expires after it is given
    for v in values:
        assert len(v) == width, (table, column, v)
        when = dt.datetime.strptime(v, fmt)
        assert future_allowed or when < reference_end, (table, column, v)


def test_periods_are_ordered(db: sqlite3.Connection) -> None:
    for table, start, end in (("ADDRESSES", "START_DTTM", "END_DTTM"),
                              ("GP_REGISTRATIONS", "START_DTTM", "END_DTTM"),
                              ("PATIENT_IDS", "START_DTTM", "END_DTTM"),
                              ("PROVIDER_SPELLS", "ADMIT_DTTM", "DISCH_DTTM")):
        bad = db.execute(f'SELECT COUNT(*) FROM "{table}" WHERE "{end}" < "{start}"')
        assert bad.fetchone()[0] == 0, table
    for table, start in (("ADDRESSES", "START_DTTM"), ("GP_REGISTRATIONS", "START_DTTM"),
                         ("PROVIDER_SPELLS", "ADMIT_DTTM"),
                         ("OUTPATIENT_ATTENDANCES", "APPT_DTTM")):
        before_birth = db.execute(f"""SELECT COUNT(*) FROM "{table}" t JOIN "PATIENTS" p
            USING (PATNT_REFNO) WHERE substr(t."{start}", 1, 8) < p.DTTM_OF_BIRTH""")
        assert before_birth.fetchone()[0] == 0, table
    assert db.execute('SELECT COUNT(*) FROM "PATIENTS" '
                      "WHERE substr(DTTM_OF_DEATH, 1, 8) < DTTM_OF_BIRTH").fetchone()[0] == 0


def test_values_fit_declared_lengths(db: sqlite3.Connection) -> None:
    # SQLite ignores VARCHAR lengths; PostgreSQL and SQL Server would reject these rows.
    for table in metadata.sorted_tables:
        for col in table.columns:
            if isinstance(col.type, String) and col.type.length:
                longest = db.execute(
                    f'SELECT MAX(LENGTH("{col.name}")) FROM "{table.name}"').fetchone()[0]
                assert (longest or 0) <= col.type.length, f"{table.name}.{col.name}"


def test_addresses_keep_the_town_in_the_third_line(db: sqlite3.Connection) -> None:
    """Organisations and sites store the town in ADDR_LINE3, as the mappings read it."""
    for table in ("ORGANISATIONS", "LOCATIONS"):
        rows = db.execute(f'SELECT "ADDR_LINE1", "ADDR_LINE3" FROM "{table}" '
                          'WHERE "PCODE" IS NOT NULL').fetchall()
        assert rows and all(line1 and town for line1, town in rows), table


def test_names_look_like_a_uk_pas(db: sqlite3.Connection) -> None:
    surnames = Counter(_col(db, 'SELECT SURNAME FROM "PATIENTS"'))
    assert surnames.most_common(1)[0][0] == "SMITH"
    assert db.execute('SELECT COUNT(*) FROM "PATIENTS" '
                      "WHERE SURNAME = 'SMITH' AND SEXXX_CODE = '2'").fetchone()[0] >= 10
    assert all(s == s.upper() for s in surnames)
    sexes = Counter(_col(db, 'SELECT SEXXX_CODE FROM "PATIENTS"'))
    assert sexes["1"] > 0.4 * PATIENTS and sexes["2"] > 0.4 * PATIENTS
    assert len(gen.SURNAMES) >= 150
    assert len(set(gen.FORENAMES_MALE)) >= 100 and len(set(gen.FORENAMES_FEMALE)) >= 100


# --- fixtures -------------------------------------------------------------------------------

def test_fixture_patients_present(db: sqlite3.Connection) -> None:
    for fx in gen.FIXTURE_PATIENTS:
        row = db.execute('SELECT PASID, NHS_NUMBER, SURNAME, FORENAME, SECOND_FORENAME, '
                         'SEXXX_CODE, DTTM_OF_BIRTH, DTTM_OF_DEATH FROM "PATIENTS" '
                         "WHERE PATNT_REFNO = ?", (fx["patnt_refno"],)).fetchone()
        assert row == (fx["pasid"], fx["nhs_number"], fx["surname"], fx["forename"],
                       fx["second_forename"], fx["sex"], fx["birth_date"], fx["deceased"])
        if fx["nhs_number"]:
            assert nhs_number_valid(fx["nhs_number"])
    homes = db.execute('SELECT END_DTTM FROM "ADDRESSES" WHERE PATNT_REFNO = 100001 '
                       "AND ADTYP_CODE = 'HOME' ORDER BY START_DTTM").fetchall()
    assert len(homes) == 2 and homes[0][0] is not None and homes[1][0] is None
    assert db.execute('SELECT IDENTIFIER FROM "PATIENT_IDS" WHERE PATNT_REFNO = 100001'
                      ).fetchall() == [("D0000005",)]
    assert db.execute('SELECT ARCHV_FLAG FROM "PATIENTS" WHERE PATNT_REFNO = 100005'
                      ).fetchone() == ("Y",)
    assert db.execute('SELECT ETHGR_CODE FROM "PATIENTS" WHERE PATNT_REFNO = 100006'
                      ).fetchone() == ("ZZ",)
    assert db.execute('SELECT SPELL_STATUS FROM "PROVIDER_SPELLS" WHERE PATNT_REFNO = 100006'
                      ).fetchall() == [("A",)]


# --- building -------------------------------------------------------------------------------

def test_build_refuses_a_database_with_rows(db: sqlite3.Connection,
                                             tmp_path: pathlib.Path) -> None:
    path = tmp_path / "twice.db"
    build_database(f"sqlite:///{path}", patients=10)
    with pytest.raises(DemoDatabaseNotEmpty):
        build_database(f"sqlite:///{path}", patients=10)


def test_ensure_sqlite_demo_is_idempotent(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sub" / "demo.db"
    path.parent.mkdir()
    path.with_suffix(".tmp").write_bytes(b"half-built leftover of a killed start")
    assert ensure_sqlite_demo(path, patients=30, progress=True) == path
    assert not path.with_suffix(".tmp").exists()
    stat = path.stat()
    with sqlite3.connect(path) as conn:
        assert conn.execute('SELECT COUNT(*) FROM "PATIENTS"').fetchone()[0] == 30
    conn.close()
    assert ensure_sqlite_demo(path, patients=30, progress=False) == path
    assert path.stat().st_mtime_ns == stat.st_mtime_ns and path.stat().st_size == stat.st_size
    # The database and its document store (gateway.demo_pas.epr_documents); no leftovers.
    assert sorted(p.name for p in path.parent.iterdir()) == ["demo.db", "demo.documents"]


# --- code maps ------------------------------------------------------------------------------

# codemap name -> the coded columns it translates
CODED_COLUMNS = {
    "sex": [("PATIENTS", "SEXXX_CODE"), ("CLINICIANS", "SEXXX_CODE")],
    "ethnic-category": [("PATIENTS", "ETHGR_CODE")],
    "marital-status": [("PATIENTS", "MARRY_CODE")],
    "nhs-number-verification-status": [("PATIENTS", "NNNTS_CODE")],
    "language": [("PATIENTS", "LANG_CODE")],
    "address-use": [("ADDRESSES", "ADTYP_CODE")],
    "organisation-type": [("ORGANISATIONS", "ORGTY_CODE")],
    "location-type": [("LOCATIONS", "LOCTY_CODE")],
    "encounter-status": [("PROVIDER_SPELLS", "SPELL_STATUS")],
    "encounter-class-inpatient": [("PROVIDER_SPELLS", "PATCL_CODE")],
    "admission-method": [("PROVIDER_SPELLS", "ADMET_CODE")],
    "source-of-admission": [("PROVIDER_SPELLS", "ADSOR_CODE")],
    "discharge-method": [("PROVIDER_SPELLS", "DISMT_CODE")],
    "discharge-destination": [("PROVIDER_SPELLS", "DISDE_CODE")],
    "encounter-status-outpatient": [("OUTPATIENT_ATTENDANCES", "ATTND_CODE")],
    "outcome-of-attendance": [("OUTPATIENT_ATTENDANCES", "OUTCM_CODE")],
    "specialty": [("CLINICIANS", "MAIN_SPECT_CODE"), ("PROVIDER_SPELLS", "MAIN_SPECT_CODE"),
                  ("OUTPATIENT_ATTENDANCES", "MAIN_SPECT_CODE")],
}
# Every local code the generator can emit, from its own tables (rare ones may miss a small db).
GENERATOR_CODES: dict[str, set[str]] = {
    "sex": set(gen.SEX_WEIGHTS),
    "ethnic-category": set(gen.ETHNIC_WEIGHTS),
    "marital-status": set(gen.MARITAL_ADULT_WEIGHTS),
    "nhs-number-verification-status": set(gen.NNNTS_WEIGHTS),
    "language": set(gen.LANGUAGES).union(*(v[0] for v in gen._LANG_BY_ETHNIC.values())),
    "address-use": set(gen.ADDRESS_TYPES),
    "organisation-type": set(gen.ORG_TYPES),
    "location-type": set(gen.LOCATION_TYPES),
    "encounter-status": set(gen.SPELL_STATUSES),
    "encounter-class-inpatient": set(gen.PATIENT_CLASSES),
    "admission-method": {*gen.ADMET_ELECTIVE, *gen.ADMET_EMERGENCY, gen.ADMET_MATERNITY},
    "source-of-admission": set(gen.ADSOR_WEIGHTS),
    "discharge-method": {*gen.DISMT_LIVE, "4"},
    "discharge-destination": {*gen.DISDE_LIVE, gen.DISDE_DIED},
    "encounter-status-outpatient": set(gen.ATTND_WEIGHTS),
    "outcome-of-attendance": set(gen.OUTCOME_WEIGHTS),
    "specialty": {*gen.CONSULTANT_SPECIALTIES, gen.GP_SPECIALTY},
}
# Local codes left out of their map on purpose (their maps say unmapped: omit).
DELIBERATELY_UNMAPPED = {"ethnic-category": {"ZZ"}, "marital-status": {"U"}}
# Maps written alongside the gateway's demo mappings that also read demo PAS columns:
# checked against the generated data when present.
OTHER_CODED_COLUMNS = {
    "location-status": [("LOCATIONS", "ACTIVE_FLAG")],
    "location-code-system": [("LOCATIONS", "LOCTY_CODE")],
}


def _load_codemaps() -> dict[str, dict[str, Any]]:
    maps = {}
    for path in sorted(CODEMAPS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["name"] == path.stem, path
        maps[doc["name"]] = doc
    return maps


def test_codemap_files_are_well_formed() -> None:
    maps = _load_codemaps()
    assert set(CODED_COLUMNS) <= set(maps)
    for name, doc in maps.items():
        assert set(doc) <= {"name", "source", "source_system", "target_system", "unmapped",
                            "default", "map"}, name
        assert doc["unmapped"] in ("error", "omit", "default"), name
        assert ("default" in doc) == (doc["unmapped"] == "default"), name
        if name in CODED_COLUMNS:  # the ones for this PAS's coded columns all name a system
            assert doc["target_system"].startswith(("http://", "https://")), name
        assert doc["map"], name
        for key, value in doc["map"].items():
            # Unquoted YAML keys such as 1 or Y would load as int/bool and never match.
            assert isinstance(key, str), (name, key)
            if value is None:  # listed on purpose with no target
                continue
            assert set(value) <= {"code", "display"} and isinstance(value["code"], str)
            assert isinstance(value.get("display", ""), str), (name, key)


def test_every_generated_code_is_mapped(db: sqlite3.Connection) -> None:
    maps = _load_codemaps()
    others = {k: v for k, v in OTHER_CODED_COLUMNS.items() if k in maps}
    for name, columns in {**CODED_COLUMNS, **others}.items():
        keys = set(maps[name]["map"])
        allowed = keys | DELIBERATELY_UNMAPPED.get(name, set())
        used = {v for table, col in columns
                for v in _col(db, f'SELECT DISTINCT "{col}" FROM "{table}"') if v is not None}
        assert used <= allowed, (name, used - allowed)
        assert GENERATOR_CODES.get(name, set()) <= allowed, name
    for name, codes in DELIBERATELY_UNMAPPED.items():
        assert not codes & set(maps[name]["map"]) and maps[name]["unmapped"] == "omit"


def _shared_or_skip() -> pathlib.Path:
    require_shared(SHARED / "careconnect" / "codesystems")
    return SHARED


def _reference_codes(shared: pathlib.Path) -> dict[str, dict[str, str | None]]:
    """system url -> {code: display} from Care Connect CodeSystems and ValueSet includes."""
    systems: dict[str, dict[str, str | None]] = {}

    def concepts(elem: ET.Element, into: dict[str, str | None]) -> None:
        for c in elem.iter(f"{FHIR_NS}concept"):
            code, display = c.find(f"{FHIR_NS}code"), c.find(f"{FHIR_NS}display")
            assert code is not None
            into[code.get("value", "")] = None if display is None else display.get("value")

    for path in sorted((shared / "careconnect" / "codesystems").glob("*.xml")):
        root = ET.parse(path).getroot()
        url = root.find(f"{FHIR_NS}url")
        assert url is not None
        concepts(root, systems.setdefault(url.get("value", ""), {}))
    for path in sorted((shared / "careconnect" / "valuesets").glob("*.xml")):
        for include in ET.parse(path).getroot().iter(f"{FHIR_NS}include"):
            system = include.find(f"{FHIR_NS}system")
            if system is not None and include.find(f"{FHIR_NS}concept") is not None:
                concepts(include, systems.setdefault(system.get("value", ""), {}))
    return systems


def test_codemap_targets_exist_in_care_connect_reference() -> None:
    reference = _reference_codes(_shared_or_skip())
    checked = set()
    for name, doc in _load_codemaps().items():
        system = doc.get("target_system", "")
        if system.startswith("https://fhir.hl7.org.uk/"):
            assert system in reference, f"{name}: no Care Connect CodeSystem {system}"
        # SNOMED CT is a terminology, not a Care Connect CodeSystem: ../shared holds only the
        # few concepts some ValueSets list (episodicity), so SNOMED maps are not checked here.
        if system not in reference or system == "http://snomed.info/sct":
            continue
        for key, target in doc["map"].items():
            if target is None:  # listed as deliberately unmapped
                continue
            assert target["code"] in reference[system], (name, key, target["code"])
            expected = reference[system][target["code"]]
            if "display" in target and expected is not None:
                assert target["display"] == expected, (name, key)
        checked.add(name)
    # The Care Connect ones, plus gender and marital status through the Care Connect ValueSets.
    assert {"ethnic-category", "nhs-number-verification-status", "language", "admission-method",
            "source-of-admission", "discharge-method", "discharge-destination",
            "outcome-of-attendance", "sex", "marital-status"} <= checked


def test_codemap_targets_allowed_by_stu3_schema() -> None:
    """Required-binding STU3 codes (gender, statuses, address use) are in the schema's enums."""
    schema_path = _shared_or_skip() / "fhir-stu3" / "fhir.schema.json"
    defs = json.loads(schema_path.read_text(encoding="utf-8"))["definitions"]
    enums = {
        "http://hl7.org/fhir/administrative-gender": defs["Patient"]["properties"]["gender"],
        "http://hl7.org/fhir/encounter-status": defs["Encounter"]["properties"]["status"],
        "http://hl7.org/fhir/address-use": defs["Address"]["properties"]["use"],
        "http://hl7.org/fhir/location-status": defs["Location"]["properties"]["status"],
    }
    for name, doc in _load_codemaps().items():
        prop = enums.get(doc.get("target_system", ""))
        if prop is not None:
            assert {t["code"] for t in doc["map"].values()} <= set(prop["enum"]), name
