"""The demo PAS's EPR half: deterministic, leaves the existing rows alone, covers its code maps,
is clinically consistent, and the cached demo file follows the schema."""

from __future__ import annotations

import functools
import pathlib
import sqlite3
from collections import Counter
from typing import Any

import pytest
import yaml
from sqlalchemy import Column, String, Table

import gateway.demo_pas.generate as gen
from gateway.app import demo_database_url
from gateway.demo_pas import demo_file_name, epr_clinical, metadata, schema_fingerprint
from tests.conftest import gateway_settings

REPO = pathlib.Path(__file__).parents[3]
CODEMAPS = REPO / "mappings" / "codemaps"
SEED = 20261123
PATIENTS = 1500
EPR_TABLES = {t.name for t in epr_clinical.TABLES}

Rows = dict[str, list[dict[str, Any]]]


def _rows(batches: Any) -> Rows:
    out: Rows = {}
    for batch in batches:
        out.setdefault(batch.table.name, []).extend(batch.rows)
    return out


@functools.cache
def _built(patients: int, seed: int, chunk: int = 5000) -> Rows:
    return _rows(epr_clinical.extend(gen.generate(patients, seed, chunk), seed))


@pytest.fixture(scope="module")
def rows() -> Rows:
    return _built(PATIENTS, SEED)


def _codemap(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((CODEMAPS / f"{name}.yaml").read_text())
    return doc


# --- determinism and the existing tables -----------------------------------------------------

def test_existing_tables_are_exactly_what_the_main_generator_makes() -> None:
    alone = _rows(gen.generate(300, SEED))
    extended = _built(300, SEED)
    assert {k: v for k, v in extended.items() if k not in EPR_TABLES} == alone
    assert set(extended) >= EPR_TABLES


def test_rows_do_not_depend_on_chunk_size() -> None:
    assert _built(120, 7, 7) == _built(120, 7, 5000)


def test_other_seed_other_rows() -> None:
    assert _built(120, 7)["PROBLEMS"] != _built(120, 8)["PROBLEMS"]


# --- realistic frequencies ---------------------------------------------------------------------

def _per_patient(rows: Rows, table: str, where: Any = lambda r: True) -> Counter[int]:
    return Counter(r["PATNT_REFNO"] for r in rows[table] if where(r))


def test_not_everybody_has_everything_and_some_have_a_lot(rows: Rows) -> None:
    problems = _per_patient(rows, "PROBLEMS")
    assert 0.4 <= len(problems) / PATIENTS <= 0.9
    assert sum(1 for n in problems.values() if n >= 8) >= 10  # some have a lot
    nka = _per_patient(rows, "ALLERGIES", lambda r: r["SUBST_CODE"] == "NKA")
    real = _per_patient(rows, "ALLERGIES", lambda r: r["SUBST_CODE"] != "NKA")
    assert 0.3 <= len(nka) / PATIENTS <= 0.5
    assert 0.1 <= len(real) / PATIENTS <= 0.3
    asked = set(nka) | set(real)
    assert 0.3 <= 1 - len(asked) / PATIENTS <= 0.6  # never asked: no row at all
    assert 0.03 <= len(_per_patient(rows, "ALERTS")) / PATIENTS <= 0.2
    procedures = _per_patient(rows, "PROCEDURES")
    assert 0.05 <= len(procedures) / PATIENTS <= 0.4
    # Soft deletes exist, and are rare.
    for table, flag in (("PROBLEMS", "DELETED_FLAG"), ("ALLERGIES", "DELETED_FLAG"),
                        ("ALERTS", "ARCHV_FLAG"), ("PROCEDURES", "DELETED_FLAG")):
        deleted = sum(r[flag] == "Y" for r in rows[table])
        assert 0 < deleted < 0.06 * len(rows[table]), table


def test_fixture_patients(rows: Rows) -> None:
    for table in ("PROBLEMS", "ALLERGIES", "ALERTS", "PROCEDURES"):
        assert _per_patient(rows, table)[100001] >= 24, table  # dozens of each
        assert _per_patient(rows, table)[100005] == 0, table  # the archived duplicate
    [nka] = [r for r in rows["ALLERGIES"] if r["PATNT_REFNO"] == 100002]
    assert (nka["SUBST_CODE"], nka["ALLGY_STATUS"], nka["DELETED_FLAG"]) == ("NKA", "A", "N")
    assert _per_patient(rows, "ALLERGIES")[100004] == 0  # never asked
    rich = [r for r in rows["PROBLEMS"] if r["PATNT_REFNO"] == 100001]
    assert {r["READ_CODE"] for r in rich} > {"G20..", "1Z12."}
    assert {r["CTV3_CODE"] for r in rich} > {"X40J5", "XaIIt"}
    assert any(r["PRVSP_REFNO"] == 1 for r in rich)  # diagnoses of her spell


# --- every code the PAS emits is in its code map --------------------------------------------

@pytest.mark.parametrize(("table", "column", "codemaps"), [
    ("PROBLEMS", "READ_CODE", ["readv2-snomed"]),
    ("PROBLEMS", "CTV3_CODE", ["ctv3-snomed"]),
    ("PROBLEMS", "PROBL_TYPE", ["condition-category"]),
    ("PROBLEMS", "PROBL_STATUS", ["condition-clinical-status"]),
    ("PROBLEMS", "EPISD_CODE", ["condition-episodicity"]),
    ("ALLERGIES", "SUBST_CODE", ["allergy-substance"]),
    ("ALLERGIES", "ALCAT_CODE", ["allergy-category"]),
    ("ALLERGIES", "ALLTY_CODE", ["allergy-type"]),
    ("ALLERGIES", "CRITY_CODE", ["allergy-criticality"]),
    ("ALLERGIES", "VERIF_CODE", ["allergy-verification-status"]),
    ("ALLERGIES", "ALLGY_STATUS", ["allergy-clinical-status"]),
    ("ALLERGY_REACTIONS", "MANIF_CODE", ["allergy-manifestation"]),
    ("ALLERGY_REACTIONS", "SEVRT_CODE", ["reaction-severity"]),
    ("ALERTS", "ALTYP_CODE", ["alert-type", "alert-category"]),
    ("ALERTS", "ALERT_STATUS", ["flag-status"]),
    ("PROCEDURES", "OPCS_CODE", ["opcs4", "opcs4-snomed"]),
    ("PROCEDURES", "PROCD_STATUS", ["procedure-status"]),
])
def test_emitted_codes_are_listed_in_the_code_maps(rows: Rows, table: str, column: str,
                                                   codemaps: list[str]) -> None:
    emitted = {r[column] for r in rows[table]} - {None}
    assert emitted
    for name in codemaps:
        listed = set(_codemap(name)["map"])
        assert emitted <= listed, (name, emitted - listed)


def test_codes_the_trust_has_not_mapped_do_occur(rows: Rows) -> None:
    """The unmapped policy is exercised by real rows, not only by the maps' null entries."""
    for table, column, name in (("PROBLEMS", "READ_CODE", "readv2-snomed"),
                                ("PROBLEMS", "CTV3_CODE", "ctv3-snomed"),
                                ("ALLERGIES", "SUBST_CODE", "allergy-substance"),
                                ("ALERTS", "ALTYP_CODE", "alert-type"),
                                ("PROCEDURES", "OPCS_CODE", "opcs4-snomed")):
        unmapped = {k for k, v in _codemap(name)["map"].items() if v is None}
        assert unmapped & {r[column] for r in rows[table]}, name


# --- clinical consistency ------------------------------------------------------------------------

def test_problems_are_consistent(rows: Rows) -> None:
    for r in rows["PROBLEMS"]:
        assert (r["READ_CODE"] is None) != (r["CTV3_CODE"] is None), r  # one scheme, as entered
        if r["RESOLVED_DATE"] is not None:  # FHIR con-4: abated means not active
            assert r["PROBL_STATUS"] in ("R", "I"), r
            if r["ONSET_DATE"] is not None:
                assert r["ONSET_DATE"] <= r["RESOLVED_DATE"], r
        if r["PROBL_TYPE"] == "DX":
            assert r["PRVSP_REFNO"] is not None


def test_nothing_happens_after_death_or_today(rows: Rows) -> None:
    death = {p["PATNT_REFNO"]: p["DTTM_OF_DEATH"][:8] for p in rows["PATIENTS"]
             if p["DTTM_OF_DEATH"]}
    birth = {p["PATNT_REFNO"]: p["DTTM_OF_BIRTH"] for p in rows["PATIENTS"]}
    for table, column in (("PROBLEMS", "RECORDED_DTTM"), ("ALLERGIES", "RECORDED_DTTM"),
                          ("ALERTS", "START_DTTM"), ("PROCEDURES", "PROC_DTTM")):
        for r in rows[table]:
            day = r[column][:8]
            assert birth[r["PATNT_REFNO"]] <= day <= death.get(r["PATNT_REFNO"], "20261123"), (
                table, r)


def test_linked_spells_are_the_patients_own_and_procedures_fall_within_them(rows: Rows) -> None:
    spells = {s["PRVSP_REFNO"]: s for s in rows["PROVIDER_SPELLS"]}
    linked = 0
    for r in rows["PROCEDURES"]:
        if r["PRVSP_REFNO"] is None:
            continue
        linked += 1
        s = spells[r["PRVSP_REFNO"]]
        assert s["PATNT_REFNO"] == r["PATNT_REFNO"]
        assert s["ADMIT_DTTM"][:8] <= r["PROC_DTTM"][:8] <= (s["DISCH_DTTM"] or "9")[:8]
    assert linked > 50
    for r in rows["PROBLEMS"]:
        if r["PRVSP_REFNO"] is not None:
            assert spells[r["PRVSP_REFNO"]]["PATNT_REFNO"] == r["PATNT_REFNO"]
    allergy_ids = {a["ALLGY_REFNO"] for a in rows["ALLERGIES"]}
    assert {x["ALLGY_REFNO"] for x in rows["ALLERGY_REACTIONS"]} <= allergy_ids


# --- the cached demo file follows the schema ------------------------------------------------------

def test_the_fingerprint_changes_with_the_schema() -> None:
    before = schema_fingerprint()
    assert before == schema_fingerprint() and len(before) == 10
    extra = Table("ZZ_FINGERPRINT_PROBE", metadata, Column("X", String(1)))
    try:
        assert schema_fingerprint() != before
    finally:
        metadata.remove(extra)
    assert schema_fingerprint() == before
    assert demo_file_name(300) == f"demo-pas-300-{before}.sqlite"


def test_an_older_cached_demo_file_is_not_served(tmp_path: pathlib.Path) -> None:
    # What a gateway from before the EPR tables left in its data directory.
    stale = tmp_path / "demo-pas-50.sqlite"
    with sqlite3.connect(stale) as db:
        db.execute('CREATE TABLE "PATIENTS" ("PATNT_REFNO" INTEGER PRIMARY KEY)')
    url = demo_database_url(gateway_settings("sqlite://", tmp_path, demo_patients=50))
    path = pathlib.Path(url.removeprefix("sqlite:///"))
    assert path.name == demo_file_name(50) and path != stale
    with sqlite3.connect(path) as db:
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert tables >= EPR_TABLES
        assert db.execute('SELECT COUNT(*) FROM "PROBLEMS"').fetchone()[0] > 0
    assert stale.exists()  # left alone, not deleted: it is the user's file
