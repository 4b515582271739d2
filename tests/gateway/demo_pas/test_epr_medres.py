"""The EPR's medicines and results: deterministic, leaving every PAS row as it was, coherent
with the PAS rows they hang off, and coded only with codes the code maps know."""

from __future__ import annotations

import pathlib
import sqlite3
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from gateway.demo_pas import build_database, epr_medication, epr_results
from gateway.demo_pas.epr_medres import RICH_PATIENT, with_medication_and_results
from gateway.demo_pas.generate import generate

REPO = pathlib.Path(__file__).parents[3]
CODEMAPS = REPO / "mappings" / "codemaps"
PATIENTS = 400
EPR_TABLES = ("DRUGS", "PRESCRIPTIONS", "MEDICATION_LIST", "IMMUNISATIONS", "TEST_CODES",
              "RESULT_REPORTS", "RESULTS")


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sqlite3.Connection]:
    path = tmp_path_factory.mktemp("epr") / "pas.db"
    build_database(f"sqlite:///{path}", patients=PATIENTS)
    conn = sqlite3.connect(path)
    yield conn
    conn.close()


def _rows(patients: int, seed: int, chunk: int, wrap: bool) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    batches = generate(patients, seed, chunk_size=chunk)
    for batch in with_medication_and_results(batches, seed) if wrap else batches:
        out.setdefault(batch.table.name, []).extend(batch.rows)
    return out


def _col(conn: sqlite3.Connection, sql: str) -> list[Any]:
    return [r[0] for r in conn.execute(sql)]


# --- determinism and the PAS rows ------------------------------------------------------------

def test_pas_rows_are_unchanged_and_epr_rows_do_not_depend_on_chunk_size() -> None:
    plain = _rows(120, 7, 5000, wrap=False)
    small, large = _rows(120, 7, 7, wrap=True), _rows(120, 7, 5000, wrap=True)
    assert small == large
    assert {k: v for k, v in large.items() if k not in EPR_TABLES} == plain
    assert set(large) - set(plain) == set(EPR_TABLES)
    assert _rows(120, 8, 5000, wrap=True)["RESULTS"] != large["RESULTS"]


# --- coherence --------------------------------------------------------------------------------

@pytest.mark.parametrize("table", ["PRESCRIPTIONS", "MEDICATION_LIST", "IMMUNISATIONS",
                                   "RESULT_REPORTS", "RESULTS"])
def test_rows_point_at_patients_and_happen_in_their_lifetime(db: sqlite3.Connection,
                                                             table: str) -> None:
    assert _col(db, f'SELECT COUNT(*) FROM "{table}" t LEFT JOIN PATIENTS p USING (PATNT_REFNO)'
                    " WHERE p.PATNT_REFNO IS NULL") == [0]
    when = {"PRESCRIPTIONS": "ORDER_DTTM", "MEDICATION_LIST": "START_DATE",
            "IMMUNISATIONS": "GIVEN_DTTM", "RESULT_REPORTS": "COLLECTED_DTTM"}.get(table)
    if when:
        assert _col(db, f"""SELECT COUNT(*) FROM "{table}" t JOIN PATIENTS p USING (PATNT_REFNO)
            WHERE substr(t."{when}", 1, 8) < p.DTTM_OF_BIRTH
               OR substr(t."{when}", 1, 8) > coalesce(substr(p.DTTM_OF_DEATH, 1, 8), '20261123')
            """) == [0]


def test_references_exist(db: sqlite3.Connection) -> None:
    for sql in (
        "SELECT COUNT(*) FROM PRESCRIPTIONS m LEFT JOIN DRUGS d USING (DRUG_REFNO) "
        "WHERE d.DRUG_REFNO IS NULL",
        "SELECT COUNT(*) FROM MEDICATION_LIST m LEFT JOIN DRUGS d USING (DRUG_REFNO) "
        "WHERE d.DRUG_REFNO IS NULL",
        "SELECT COUNT(*) FROM PRESCRIPTIONS m LEFT JOIN PROVIDER_SPELLS s USING (PRVSP_REFNO) "
        "WHERE m.PRVSP_REFNO IS NOT NULL AND (s.PRVSP_REFNO IS NULL "
        "OR s.PATNT_REFNO != m.PATNT_REFNO)",
        "SELECT COUNT(*) FROM PRESCRIPTIONS m LEFT JOIN CLINICIANS c USING (PROCA_REFNO) "
        "WHERE m.PROCA_REFNO IS NOT NULL AND c.PROCA_REFNO IS NULL",
        "SELECT COUNT(*) FROM RESULTS o LEFT JOIN RESULT_REPORTS h USING (REPRT_REFNO) "
        "WHERE h.REPRT_REFNO IS NULL OR h.PATNT_REFNO != o.PATNT_REFNO",
        "SELECT COUNT(*) FROM RESULTS o LEFT JOIN TEST_CODES t USING (TEST_CODE) "
        "WHERE t.TEST_CODE IS NULL",
        "SELECT COUNT(*) FROM RESULT_REPORTS h LEFT JOIN PROVIDER_SPELLS s USING (PRVSP_REFNO) "
        "WHERE h.PRVSP_REFNO IS NOT NULL AND (s.PRVSP_REFNO IS NULL "
        "OR s.PATNT_REFNO != h.PATNT_REFNO)",
        "SELECT COUNT(*) FROM MEDICATION_LIST l LEFT JOIN PRESCRIPTIONS m USING (PRESC_REFNO) "
        "WHERE l.PRESC_REFNO IS NOT NULL AND m.PATNT_REFNO IS NOT l.PATNT_REFNO",
    ):
        assert _col(db, sql) == [0], sql


def test_a_result_is_a_number_with_its_unit_or_a_text(db: sqlite3.Connection) -> None:
    # exactly one of the two, so the Observation has one value[x]; no unit without a number
    assert _col(db, "SELECT COUNT(*) FROM RESULTS WHERE (VALUE_NUM IS NULL) = "
                    "(VALUE_TEXT IS NULL)") == [0]
    assert _col(db, "SELECT COUNT(*) FROM RESULTS WHERE VALUE_NUM IS NULL AND "
                    "(UNITS IS NOT NULL OR REF_LOW IS NOT NULL OR REF_HIGH IS NOT NULL)") == [0]
    assert _col(db, "SELECT COUNT(*) FROM RESULTS WHERE COMPARATOR IS NOT NULL") != [0]
    flags = _col(db, "SELECT ABN_FLAG FROM RESULTS WHERE VALUE_NUM IS NOT NULL AND "
                     "REF_HIGH IS NOT NULL AND CAST(VALUE_NUM AS REAL) > CAST(REF_HIGH AS REAL)")
    assert flags and set(flags) <= {"H", "HH"}


def test_a_not_given_immunisation_says_why_and_nothing_of_a_dose(db: sqlite3.Connection) -> None:
    rows = db.execute("SELECT NOT_GIVEN_CODE, REASON_CODE, BATCH_NO, SITE_CODE, DOSE_VALUE "
                      "FROM IMMUNISATIONS WHERE NOT_GIVEN = 'Y'").fetchall()
    assert rows and all(r[0] is not None and r[1:] == (None,) * 4 for r in rows)
    assert _col(db, "SELECT COUNT(*) FROM IMMUNISATIONS WHERE NOT_GIVEN = 'N' AND "
                    "(NOT_GIVEN_CODE IS NOT NULL OR BATCH_NO IS NULL)") == [0]


def test_frequencies_look_lived_in(db: sqlite3.Connection) -> None:
    def share(table: str) -> float:
        with_rows = _col(db, f'SELECT COUNT(DISTINCT PATNT_REFNO) FROM "{table}"')[0]
        return float(with_rows) / PATIENTS

    # not everyone has everything
    assert 0.3 < share("MEDICATION_LIST") < 0.8
    assert 0.1 < share("PRESCRIPTIONS") < 0.7
    assert 0.3 < share("IMMUNISATIONS") < 0.9
    assert 0.1 < share("RESULTS") < 0.7
    # but some have a lot, and the over-65s are on more medicines than the under-40s
    by_age = dict(db.execute("""SELECT p.DTTM_OF_BIRTH < '19610101', AVG(n) FROM PATIENTS p
        JOIN (SELECT PATNT_REFNO, COUNT(*) n FROM MEDICATION_LIST GROUP BY PATNT_REFNO)
        USING (PATNT_REFNO) WHERE p.DTTM_OF_BIRTH < '19610101' OR p.DTTM_OF_BIRTH > '19870101'
        GROUP BY 1""").fetchall())
    assert by_age[1] > by_age[0]


def test_the_rich_patient_has_dozens_of_each(db: sqlite3.Connection) -> None:
    counts = {t: _col(db, f'SELECT COUNT(*) FROM "{t}" WHERE PATNT_REFNO = {RICH_PATIENT} '
                          "AND DEL_FLAG = 'N'")[0]
              for t in ("PRESCRIPTIONS", "MEDICATION_LIST", "IMMUNISATIONS", "RESULTS")}
    assert all(n >= 12 for n in counts.values()), counts
    assert sum(counts.values()) >= 200, counts
    assert counts["RESULTS"] >= 100


def test_soft_deleted_rows_exist(db: sqlite3.Connection) -> None:
    total = sum(_col(db, f"SELECT COUNT(*) FROM \"{t}\" WHERE DEL_FLAG = 'Y'")[0]
                for t in ("PRESCRIPTIONS", "MEDICATION_LIST", "IMMUNISATIONS", "RESULTS"))
    assert total > 0


# --- codes ------------------------------------------------------------------------------------

def _map(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CODEMAPS / f"{name}.yaml").read_text(encoding="utf-8"))
    return doc


# code map -> (table, column) it translates, and the codes the generator can emit
CODED = {
    "medication-form": [("DRUGS", "FORM_CODE")],
    "medication-route": [("PRESCRIPTIONS", "ROUTE_CODE"), ("MEDICATION_LIST", "ROUTE_CODE"),
                         ("IMMUNISATIONS", "ROUTE_CODE")],
    "ucum-unit": [("PRESCRIPTIONS", "DOSE_UNIT"), ("PRESCRIPTIONS", "QTY_UNIT"),
                  ("IMMUNISATIONS", "DOSE_UNIT"), ("RESULTS", "UNITS")],
    "medication-status": [("DRUGS", "ACTIVE_FLAG")],
    "medication-request-status": [("PRESCRIPTIONS", "STATUS_CODE")],
    "medication-request-category": [("PRESCRIPTIONS", "PRSTY_CODE")],
    "prescription-type": [("PRESCRIPTIONS", "RXTYP_CODE")],
    "timing-abbreviation": [("PRESCRIPTIONS", "FREQ_CODE")],
    "medication-statement-status": [("MEDICATION_LIST", "STATUS_CODE")],
    "medication-change-status": [("MEDICATION_LIST", "CHANGE_CODE")],
    "medication-change-reason": [("MEDICATION_LIST", "CHANGE_REASON")],
    "vaccine": [("IMMUNISATIONS", "VACC_CODE")],
    "vaccination-site": [("IMMUNISATIONS", "SITE_CODE")],
    "immunization-not-given-reason": [("IMMUNISATIONS", "NOT_GIVEN_CODE")],
    "immunization-reason": [("IMMUNISATIONS", "REASON_CODE")],
    "immunization-origin": [("IMMUNISATIONS", "PRIMARY_SRC")],
    "yes-no": [("IMMUNISATIONS", "NOT_GIVEN")],
    "observation-status": [("RESULTS", "RESULT_STATUS")],
    "observation-category": [("TEST_CODES", "OBSCT_CODE")],
    "observation-interpretation": [("RESULTS", "ABN_FLAG")],
}
GENERATOR_CODES = {
    "medication-form": {d[4] for d in epr_medication.DRUGS},
    "medication-route": set(epr_medication.ROUTES),
    "ucum-unit": ({d[7] for d in epr_medication.DRUGS} | {d[12] for d in epr_medication.DRUGS}
                  | {t[5] for t in epr_results.TESTS if t[5]} | {"ml"}),
    "timing-abbreviation": set(epr_medication.FREQUENCIES),
    "medication-change-reason": set(epr_medication.STOP_REASONS),
    "vaccine": {v[0] for v in epr_medication.VACCINES},
    "immunization-not-given-reason": set(epr_medication.NOT_GIVEN_CODES),
    "immunization-reason": set(epr_medication.GIVEN_REASONS),
    "observation-status": set(epr_results.RESULT_STATUSES),
    "observation-category": set(epr_results.OBS_CATEGORIES),
    "observation-interpretation": set(epr_results.ABNORMAL_FLAGS),
}
# Listed in the generator but left out of a code map on purpose (the map's unmapped: omit says
# what then happens): vaccines with no agreed procedure code.
DELIBERATELY_UNMAPPED = {"vaccination-procedure": {"SHING", "TDIPV", "DTAP6", "MENB",
                                                   "MENACWY"}}


@pytest.mark.parametrize("name", sorted(CODED))
def test_every_code_the_epr_emits_is_listed_in_its_map(db: sqlite3.Connection,
                                                        name: str) -> None:
    listed = set(_map(name)["map"])
    used = {v for table, col in CODED[name]
            for v in _col(db, f'SELECT DISTINCT "{col}" FROM "{table}"') if v is not None}
    assert used, name  # the column is filled
    assert used <= listed, (name, used - listed)
    assert GENERATOR_CODES.get(name, set()) <= listed, name


def test_vaccination_procedures_left_out_on_purpose() -> None:
    doc = _map("vaccination-procedure")
    vaccines = {v[0] for v in epr_medication.VACCINES}
    assert vaccines - set(doc["map"]) == DELIBERATELY_UNMAPPED["vaccination-procedure"]
    assert doc["unmapped"] == "omit"


def test_units_without_ucum_are_listed_with_no_target() -> None:
    # a tablet or a score has no UCUM unit: listed (no log), shown as unit text only
    doc = _map("ucum-unit")
    assert {"tablet", "puff", "score"} <= {k for k, v in doc["map"].items() if v is None}
    assert doc["unmapped"] == "omit"
